"""Banzhaf values from the MSR design: every evaluation informs every player.

The design draws complement pairs with Bernoulli(1/2) membership, stratified by size. The estimator
is MSR with a control variate: ordinary least squares under the uniform measure on coalitions
(Hammer-Holzman / Kernel Banzhaf) on membership plus a size curve g(|S|), whose Banzhaf value is
added back. With all coalitions observed it reproduces the exact Banzhaf values.
"""

from __future__ import annotations

import numpy as np

from datacredit.shapley.regression import basis_for, class_weights, pair_units, stratified_wls, t_stderr
from datacredit.shapley.sizes import banzhaf_of_size_basis, size_class, uniform_class_mass
from datacredit.shapley.table import Observations


def banzhaf(obs: Observations) -> tuple[np.ndarray, np.ndarray]:
    """Banzhaf values and standard errors from observed coalitions (uniform within each size)."""
    n = obs.members.shape[1]
    sizes = obs.members.sum(axis=1)
    classes = size_class(sizes, n)
    basis, powers = basis_for(sizes, n)
    X = np.hstack([np.ones((len(sizes), 1)), obs.members.astype(float), basis])
    transform = np.zeros((n, X.shape[1]))
    transform[:, 1 : n + 1] = np.eye(n)
    transform[:, n + 1 :] = banzhaf_of_size_basis(n, powers)
    fit = stratified_wls(
        X,
        obs.values,
        class_weights(classes, uniform_class_mass(n, classes)),
        classes,
        pair_units(obs.members),
        transform,
    )
    return fit.values, t_stderr(fit.var, fit.dof)
