"""Shapley values by paired, size-stratified, regression-adjusted KernelSHAP with a noise-aware blend.

Constrained least squares of v(S) - v(∅) on membership plus a size curve g(|S|) (regression
adjustment; g vanishes at 0 and n, so its Shapley value is 0 and nothing needs adding back), with
efficiency sum(phi) = v(N) - v(∅) exact. ∅ and the full set enter only as constraints. Two fits
are made:

* with Shapley-kernel weights (each size class's kernel mass over its row count): ``phi_K``,
  design-unbiased for any game, and exact once all coalitions are observed;
* on membership alone with equal weight per evaluation: ``phi_E``, the least-noise fit when the game
  is additive (what the Hadamard part of the design is built for), biased otherwise.

The values are ``phi_K + lam (phi_E - phi_K)``: James-Stein shrinkage of ``phi_K`` towards ``phi_E``,
by how small their difference is next to ``phi_K``'s own variance. On a noisy, nearly additive game
``lam`` is about 1; on a non-additive game the bias of ``phi_E`` stays while ``phi_K``'s variance
shrinks, so ``lam`` falls as the budget grows (with all 2^n coalitions the exact formula takes over).
The variance of the blend adds ``lam^2`` times the estimated squared bias of ``phi_E``.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from datacredit.shapley.regression import (
    Fit,
    basis_for,
    class_weights,
    design_variance,
    pair_units,
    stratified_wls,
    t_stderr,
)
from datacredit.shapley.sizes import shapley_class_mass, size_class
from datacredit.shapley.table import Observations


def anchors(obs: Observations) -> tuple[float, float]:
    """Utilities of ∅ and the full set; raises ``ValueError`` when either is missing."""
    n = obs.members.shape[1]
    empty, full = obs.lookup(np.zeros(n, dtype=bool)), obs.lookup(np.ones(n, dtype=bool))
    if empty is None or full is None:
        raise ValueError("an estimate needs the utilities of both ∅ and the full coalition")
    return float(obs.values[empty]), float(obs.values[full])


class KernelFit(NamedTuple):
    """The blended values with their standard errors, and the two fits behind them."""

    values: np.ndarray
    stderr: np.ndarray
    kernel_values: np.ndarray  # phi_K
    equal_values: np.ndarray  # phi_E
    blend: float  # lam
    sensitivity: np.ndarray  # (n, rows of obs): d values / d utility at the fitted lam


def kernel_shapley(obs: Observations) -> tuple[np.ndarray, np.ndarray]:
    """Shapley values and standard errors from any set of observed coalitions."""
    fit = kernel_fit(obs)
    return fit.values, fit.stderr


def kernel_fit(obs: Observations) -> KernelFit:
    """Both fits and their blend. Assumes coalitions were drawn uniformly within each size (true of
    every plan here)."""
    n = obs.members.shape[1]
    v0, v1 = anchors(obs)
    sizes = obs.members.sum(axis=1)
    inner = (sizes > 0) & (sizes < n)
    members, sizes, counts = obs.members[inner], sizes[inner], obs.counts[inner]
    classes, units = size_class(sizes, n), pair_units(members)
    X = np.hstack([members.astype(float), basis_for(sizes, n)[0]])
    y = obs.values[inner] - v0
    a = np.zeros(X.shape[1])
    a[:n] = 1.0
    transform = np.eye(n, X.shape[1])
    kernel_w = class_weights(classes, shapley_class_mass(n, classes))
    equal_w = counts * (kernel_w.sum() / max(counts.sum(), 1))
    kern = stratified_wls(X, y, kernel_w, classes, units, transform, constraint=(a, v1 - v0))
    eff = stratified_wls(X[:, :n], y, equal_w, classes, units, np.eye(n), constraint=(a[:n], v1 - v0))
    noise = _noise_var(obs, kern, counts, X.shape[1] - 1)
    lam, bias2 = _blend(kern, eff)
    values = kern.values + lam * (eff.values - kern.values)
    influence = (1 - lam) * kern.hat * kern.resid + lam * eff.hat * eff.resid
    var, dof = design_variance(influence, classes, units, X.shape[1] - 1)
    var += lam**2 * bias2 + _anchor_var(obs, [(1 - lam, kern), (lam, eff)], noise)
    jac = np.zeros((n, len(obs.values)))
    jac[:, inner] = (1 - lam) * kern.hat + lam * eff.hat
    d_full, d_empty = _anchor_sensitivity([(1 - lam, kern), (lam, eff)])
    jac[:, obs.lookup(np.ones(n, dtype=bool))] += d_full
    jac[:, obs.lookup(np.zeros(n, dtype=bool))] += d_empty
    return KernelFit(values, t_stderr(var, min(dof, kern.dof)), kern.values, eff.values, lam, jac)


def _noise_var(obs: Observations, fit: Fit, counts: np.ndarray, n_free: int) -> float | None:
    """Per-evaluation noise variance: from repeated evaluations if any, else the residual variance of
    the size-adjusted fit (an upper bound: it also holds what the size curve leaves of the game's
    non-additivity); None without spare rows."""
    if obs.noise_var is not None:
        return obs.noise_var
    spare = len(fit.resid) - n_free
    return float(counts @ fit.resid**2) / spare if spare >= 1 else None


def _blend(kern: Fit, eff: Fit) -> tuple[float, np.ndarray]:
    """Weight ``lam`` on the equal-weight fit, and the estimated squared bias of each of its values.

    Positive-part James-Stein shrinkage of the unbiased ``phi_K`` towards ``phi_E`` (Green &
    Strawderman 1991): lam = (p - 2) / p * tr Var(phi_K) / |phi_E - phi_K|^2, capped at 1, with
    p = n - 1 free dimensions (efficiency fixes the sum) and Var(phi_K) the design-based variance.
    When the difference is no larger than ``phi_K``'s own noise, ``phi_E`` is taken whole.
    """
    n = len(kern.values)
    diff = eff.values - kern.values
    if n <= 3 or kern.dof < 1 or eff.dof < 1 or not diff.any():
        return 0.0, np.zeros(n)
    lam = min(1.0, (n - 3) / (n - 1) * float(kern.var.sum()) / float(diff @ diff))
    return lam, np.maximum(diff**2 - kern.var, 0.0)


def _anchor_sensitivity(parts: list[tuple[float, Fit]]) -> tuple[np.ndarray, np.ndarray]:
    """How the blend moves with v(N) (through the efficiency constraint) and with v(∅) (the constraint and
    the offset of every row)."""
    d_full = sum(coef * fit.solve[:, -1] for coef, fit in parts)
    d_empty = -sum(coef * fit.hat.sum(axis=1) for coef, fit in parts) - d_full
    return np.asarray(d_full), np.asarray(d_empty)


def _anchor_var(obs: Observations, parts: list[tuple[float, Fit]], noise: float | None) -> np.ndarray:
    """Variance the noise of v(∅) and v(N) adds to every value (shared by all rows, so the sandwich
    misses it), for the blend ``sum(coef * fit)``: v(N) enters through the efficiency constraint,
    v(∅) through the constraint and as an offset of every row."""
    n = obs.members.shape[1]
    if noise is None:
        return np.zeros(n)
    d_full, d_empty = _anchor_sensitivity(parts)
    count_empty = obs.counts[obs.lookup(np.zeros(n, dtype=bool))]
    count_full = obs.counts[obs.lookup(np.ones(n, dtype=bool))]
    return noise * (d_empty**2 / count_empty + d_full**2 / count_full)
