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
    pair_units,
    stratified_wls,
    t_stderr,
    unit_deviations,
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
    parts = _fit(obs)
    anchor = _anchor_effects(obs, parts.blend, parts.noise)
    var = (parts.deviations**2).sum(axis=1) + parts.extra_var + (anchor**2).sum(axis=1)
    return KernelFit(parts.values, t_stderr(var, parts.dof), parts.blend[0][1].values, parts.blend[1][1].values,
                     parts.blend[1][0], parts.sensitivity)


def kernel_covariance(obs: Observations) -> np.ndarray:
    """Covariance matrix of :func:`kernel_fit`'s values, scaled like its standard errors (the diagonal is
    ``stderr**2``). Errors of the values are correlated (they share the anchors, the efficiency constraint and
    every sampled coalition), so the variance of a difference of two values is not the sum of theirs: questions
    about differences (who is in the top k) read it from here."""
    parts = _fit(obs)
    anchor = _anchor_effects(obs, parts.blend, parts.noise)
    cov = parts.deviations @ parts.deviations.T + np.diag(parts.extra_var) + anchor @ anchor.T
    scale = t_stderr(np.ones(1), parts.dof)[0]
    return cov * scale**2


class _Parts(NamedTuple):
    values: np.ndarray
    deviations: np.ndarray  # centred per-unit influences: deviations @ deviations.T is the design covariance
    extra_var: np.ndarray  # lam^2 times the estimated squared bias of phi_E
    noise: float | None
    blend: list[tuple[float, Fit]]  # [(1 - lam, kernel fit), (lam, equal-weight fit)]
    dof: int
    sensitivity: np.ndarray


def _fit(obs: Observations) -> _Parts:
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
    noise = _noise_var(obs, kern, counts, units, X.shape[1] - 1)
    lam, bias2 = _blend(kern, eff)
    values = kern.values + lam * (eff.values - kern.values)
    influence = (1 - lam) * kern.hat * kern.resid + lam * eff.hat * eff.resid
    deviations, dof = unit_deviations(influence, classes, units, X.shape[1] - 1)
    blend = [(1 - lam, kern), (lam, eff)]
    jac = np.zeros((n, len(obs.values)))
    jac[:, inner] = (1 - lam) * kern.hat + lam * eff.hat
    d_full, d_empty = _anchor_sensitivity(blend)
    jac[:, obs.lookup(np.ones(n, dtype=bool))] += d_full
    jac[:, obs.lookup(np.zeros(n, dtype=bool))] += d_empty
    return _Parts(values, deviations, lam**2 * bias2, noise, blend, min(dof, kern.dof), jac)


def _noise_var(obs: Observations, fit: Fit, counts: np.ndarray, units: np.ndarray, n_free: int) -> float | None:
    """Per-evaluation noise variance: from repeated evaluations if any, else from the fit's residuals
    (None without spare rows).

    Where coalitions come with their complements, only the difference of each pair's residuals is used: a
    coalition and its complement share the even part of the game's non-additivity (pairwise synergies,
    redundancy), so the difference holds the noise and odd interactions of order three and up only. That is
    still an upper bound, but far closer than the residuals themselves, which hold all the non-additivity
    the size curve leaves (ten times the noise on a game with pairwise synergies).
    """
    if obs.noise_var is not None:
        return obs.noise_var
    spare = len(fit.resid) - n_free
    if spare < 1:
        return None
    order = np.argsort(units, kind="stable")  # a unit is one coalition, or one with its complement
    same = np.flatnonzero(units[order][1:] == units[order][:-1])
    a, b = order[same], order[same + 1]
    if len(a) > n_free:
        diff2 = (fit.resid[a] - fit.resid[b]) ** 2
        return float(diff2.sum() / (1 / counts[a] + 1 / counts[b]).sum()) * len(a) / (len(a) - n_free)
    return float(counts @ fit.resid**2) / spare


def _blend(kern: Fit, eff: Fit) -> tuple[float, np.ndarray]:
    """Weight ``lam`` on the equal-weight fit, and the estimated squared bias of each of its values.

    Positive-part James-Stein shrinkage of the unbiased ``phi_K`` towards ``phi_E`` (Green &
    Strawderman 1991): lam = (p - 2) / p * tr Var(phi_K) / |phi_E - phi_K|^2, capped at 1, with
    p = n - 1 free dimensions (efficiency fixes the sum) and Var(phi_K) the design-based variance.
    When the difference is no larger than ``phi_K``'s own noise, ``phi_E`` is taken whole.

    The squared bias is the positive part of each ``d_i^2 - Var(phi_K)_i``. Pooling it over contributors
    (James-Stein again) was tried: it narrows the intervals of nearly additive games, but at n = 64 with 8n
    coalitions, where the bias is spread thin over many contributors, coverage fell to 0.875-0.897
    (benchmarks/peers.py), so it is not used.
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


def _anchor_effects(obs: Observations, parts: list[tuple[float, Fit]], noise: float | None) -> np.ndarray:
    """How the noise of v(∅) and v(N) moves every value, as (n, 2) columns ``E`` with covariance ``E @ E.T``
    (shared by all rows, so the sandwich misses it), for the blend ``sum(coef * fit)``: v(N) enters through the
    efficiency constraint, v(∅) through the constraint and as an offset of every row."""
    n = obs.members.shape[1]
    if noise is None:
        return np.zeros((n, 0))
    d_full, d_empty = _anchor_sensitivity(parts)
    count_empty = obs.counts[obs.lookup(np.zeros(n, dtype=bool))]
    count_full = obs.counts[obs.lookup(np.ones(n, dtype=bool))]
    return np.sqrt(noise) * np.column_stack([d_empty / np.sqrt(count_empty), d_full / np.sqrt(count_full)])
