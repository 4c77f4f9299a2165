"""Shapley values by paired, size-stratified, regression-adjusted KernelSHAP.

Constrained weighted least squares of v(S) - v(∅) on membership plus a size curve g(|S|)
(regression adjustment; g vanishes at 0 and n, so its Shapley value is 0 and nothing needs adding
back), with efficiency sum(phi) = v(N) - v(∅) exact. ∅ and the full set enter only as constraints.
With all coalitions observed the fit reproduces the exact Shapley values.
"""

from __future__ import annotations

import numpy as np

from datacredit.shapley.regression import Fit, basis_for, class_weights, pair_units, stratified_wls, t_stderr
from datacredit.shapley.sizes import shapley_class_mass, size_class
from datacredit.shapley.table import Observations


def anchors(obs: Observations) -> tuple[float, float]:
    """Utilities of ∅ and the full set; raises ``ValueError`` when either is missing."""
    n = obs.members.shape[1]
    empty, full = obs.lookup(np.zeros(n, dtype=bool)), obs.lookup(np.ones(n, dtype=bool))
    if empty is None or full is None:
        raise ValueError("an estimate needs the utilities of both ∅ and the full coalition")
    return float(obs.values[empty]), float(obs.values[full])


def kernel_shapley(obs: Observations) -> tuple[np.ndarray, np.ndarray]:
    """Shapley values and standard errors from any set of observed coalitions.

    Assumes coalitions were drawn uniformly within each size (true of every plan here); rows are
    weighted by their size class's Shapley-kernel mass over the number of rows seen in that class.
    """
    n = obs.members.shape[1]
    v0, v1 = anchors(obs)
    sizes = obs.members.sum(axis=1)
    inner = (sizes > 0) & (sizes < n)
    members, sizes = obs.members[inner], sizes[inner]
    classes = size_class(sizes, n)
    X = np.hstack([members.astype(float), basis_for(sizes, n)[0]])
    a = np.zeros(X.shape[1])
    a[:n] = 1.0
    transform = np.eye(n, X.shape[1])
    weights = class_weights(classes, shapley_class_mass(n, classes))
    fit = stratified_wls(
        X, obs.values[inner] - v0, weights, classes, pair_units(members), transform, constraint=(a, v1 - v0)
    )
    return fit.values, t_stderr(fit.var + _anchor_var(obs, fit, X, weights), fit.dof)


def _anchor_var(obs: Observations, fit: Fit, X: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Variance the noise of v(∅) and v(N) adds to every value (shared by all rows, so the sandwich
    misses it). The noise variance comes from repeated evaluations if any, otherwise from the
    residual variance (an upper bound: it also holds the lack of fit).
    """
    n = obs.members.shape[1]
    noise = obs.noise_var
    if noise is None:
        free = X.shape[1] - 1
        if len(fit.resid) <= free:
            return np.zeros(n)
        noise = float(fit.resid @ fit.resid) / (len(fit.resid) - free)
    d_full = fit.solve[:, -1]
    d_empty = -fit.solve[:, :-1] @ (X.T @ weights) - d_full
    count_empty = obs.counts[obs.lookup(np.zeros(n, dtype=bool))]
    count_full = obs.counts[obs.lookup(np.ones(n, dtype=bool))]
    return noise * (d_empty**2 / count_empty + d_full**2 / count_full)
