"""The built-in estimators, registered with :mod:`datacredit.shapley.registry` on import of the package."""

from __future__ import annotations

from functools import partial

import numpy as np

from datacredit.shapley.banzhaf import banzhaf
from datacredit.shapley.design import Plan, exact_plan, loo_plan, paired_plan, permutation_plan
from datacredit.shapley.exact import exact_banzhaf, exact_shapley, is_complete, semivalue_weights
from datacredit.shapley.kernel import kernel_covariance, kernel_fit, kernel_shapley
from datacredit.shapley.loo import leave_one_out
from datacredit.shapley.permutation import permutation_shapley
from datacredit.shapley.registry import Method, register_method
from datacredit.shapley.seednoise import semivalue_sensitivity
from datacredit.shapley.table import Observations, Table


def _shapley(obs: Observations, table: Table, plan: Plan | None, upto: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The exact formula once all 2^n coalitions are present, else the kernel regression over the rows."""
    return exact_shapley(obs) if is_complete(obs) else kernel_shapley(obs)


def _permutation(obs: Observations, table: Table, plan: Plan | None, upto: int | None
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Marginal contributions along the plan's antithetic chains; without them (a table read back) or before the
    first pair is complete, the kernel regression (same target, any design)."""
    if not is_complete(obs) and plan is not None and plan.chains is not None:
        result = permutation_shapley(table, plan.chains, len(table.count) if upto is None else upto)
        if result is not None:
            return result
    return _shapley(obs, table, plan, upto)


def _banzhaf(obs: Observations, table: Table, plan: Plan | None, upto: int | None) -> tuple[np.ndarray, np.ndarray]:
    return exact_banzhaf(obs) if is_complete(obs) else banzhaf(obs)


def _loo(obs: Observations, table: Table, plan: Plan | None, upto: int | None) -> tuple[np.ndarray, np.ndarray]:
    return leave_one_out(obs)


def _complete_shapley(obs: Observations) -> np.ndarray | None:
    return semivalue_sensitivity(obs, semivalue_weights(obs.members.shape[1], "shapley")) if is_complete(obs) else None


def _kernel_sensitivity(obs: Observations) -> np.ndarray:
    complete = _complete_shapley(obs)
    return complete if complete is not None else kernel_fit(obs).sensitivity


def _kernel_covariance(obs: Observations, table: Table, plan: Plan | None, upto: int | None) -> np.ndarray | None:
    """The regression's covariance; None once the exact formula takes over (its errors are the noise alone)."""
    return None if is_complete(obs) else kernel_covariance(obs)


def _banzhaf_sensitivity(obs: Observations) -> np.ndarray | None:
    n = obs.members.shape[1]
    return semivalue_sensitivity(obs, semivalue_weights(n, "banzhaf")) if is_complete(obs) else None


register_method(Method("kernel", "paired, size-stratified, regression-adjusted KernelSHAP (the default)",
                       paired_plan, _shapley, sensitivity=_kernel_sensitivity, covariance=_kernel_covariance))
register_method(Method("exact", "all 2^n coalitions", exact_plan, _shapley, stops_early=False,
                       sensitivity=_complete_shapley))
register_method(Method("permutation", "antithetic permutation sampling", permutation_plan, _permutation,
                       sensitivity=_complete_shapley))
register_method(Method("banzhaf", "Banzhaf values from the maximum-sample-reuse design",
                       partial(paired_plan, weighting="banzhaf"), _banzhaf,
                       sensitivity=_banzhaf_sensitivity))
register_method(Method("loo", "leave-one-out: v(N) - v(N without i)", loo_plan, _loo, stops_early=False))
