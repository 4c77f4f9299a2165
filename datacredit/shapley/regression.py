"""Size-stratified weighted least squares with a design-based (sandwich) variance.

Shared by the Shapley (kernel) and Banzhaf regressions. Rows are grouped into *units* (a coalition
and its complement form one unit, since they were sampled together) and units into *strata*
(size classes, sampled independently). Each row's weight is its stratum's mass under the target
measure divided by the number of rows drawn from the stratum, so a fully enumerated stratum gets
its exact weights. The variance is the linearisation (sandwich) estimator for stratified sampling:
per-unit influences, centred within strata, with a degrees-of-freedom correction.
"""

from __future__ import annotations

import warnings
from typing import NamedTuple

import numpy as np
from scipy import linalg, sparse, stats

from datacredit.shapley.result import Z95
from datacredit.shapley.sizes import MAX_SIZE_BASIS, size_basis, size_class


class Fit(NamedTuple):
    """Values ``T beta`` of a weighted regression with their design-based variance."""

    values: np.ndarray
    var: np.ndarray  # sandwich variance of each value
    dof: int  # units minus free parameters; < 1 means under-determined
    solve: np.ndarray  # (n, p [+ 1]): values = solve @ [X^T W y; constraint rhs]
    resid: np.ndarray  # (k,) residual of each row
    hat: np.ndarray  # (n, k): values = hat @ y + solve[:, p:] @ constraint rhs; hat * resid = influences


def t_stderr(var: np.ndarray, dof: int) -> np.ndarray:
    """Standard errors scaled by t_{0.975, dof} / z so ``± 1.96 se`` is a t interval; inf if dof < 1."""
    if dof < 1:
        return np.full(var.shape, np.inf)
    return np.sqrt(var) * stats.t.ppf(0.975, dof) / Z95


def pair_units(members: np.ndarray) -> np.ndarray:
    """Unit id per row (0 .. U-1): a row and its complement share one id."""
    if len(members) == 0:
        return np.zeros(0, dtype=int)
    packed = np.packbits(members ^ members[:, :1], axis=1)  # the pair member without player 0
    keys = np.ascontiguousarray(packed).view(np.dtype((np.void, packed.shape[1]))).ravel()
    return np.unique(keys, return_inverse=True)[1]


def class_weights(classes: np.ndarray, class_mass: np.ndarray) -> np.ndarray:
    """Row weights: mass of the row's class over the number of rows observed in that class."""
    _, inverse, counts = np.unique(classes, return_inverse=True, return_counts=True)
    return class_mass / counts[inverse]


def basis_for(sizes: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Size-curve columns for the regression adjustment and their powers of u = 2|S|/n - 1.

    Odd powers capture the part of the size trend that differs between a coalition and its
    complement; even powers capture the rest. Each kind is limited by the number of size classes
    observed, so the curve never absorbs the within-class variation that identifies the values.
    """
    classes = np.unique(size_class(sizes, n))
    classes = classes[classes > 0]
    n_even = min(MAX_SIZE_BASIS // 2, len(classes))
    n_odd = min(MAX_SIZE_BASIS // 2, int(np.sum(2 * classes != n)))
    powers = np.concatenate([2 * np.arange(n_even), 2 * np.arange(n_odd) + 1])
    return size_basis(sizes, n, powers), powers


def stratified_wls(
    X: np.ndarray,
    y: np.ndarray,
    weights: np.ndarray,
    strata: np.ndarray,
    units: np.ndarray,
    transform: np.ndarray,
    constraint: tuple[np.ndarray, float] | None = None,
) -> Fit:
    """Solve min sum_j w_j (y_j - X_j beta)^2 (s.t. a^T beta = d); values are ``transform @ beta``.

    ``units`` and ``strata`` are integer labels per row (units numbered 0 .. U-1, each inside one
    stratum). Under-determined systems get the minimum-norm solution (and ``dof < 1``).
    """
    k, p = X.shape
    n_con = 0 if constraint is None else 1
    kkt = np.zeros((p + n_con, p + n_con))
    kkt[:p, :p] = X.T @ (weights[:, None] * X)
    rhs = np.zeros(p + n_con)
    rhs[:p] = X.T @ (weights * y)
    if constraint is not None:
        a, d = constraint
        kkt[:p, p] = kkt[p, :p] = a
        rhs[p] = d
    inverse, rank = _inverse(kkt)
    beta = inverse[:p] @ rhs
    solve = transform @ inverse[:p]
    resid = y - X @ beta
    hat = solve[:, :p] @ (X.T * weights)
    var, dof = design_variance(hat * resid, strata, units, rank - 2 * n_con)
    return Fit(transform @ beta, var, dof, solve, resid, hat)


def design_variance(
    influence: np.ndarray, strata: np.ndarray, units: np.ndarray, n_free: int
) -> tuple[np.ndarray, int]:
    """Sandwich variance of linearised values from per-row influences, and its degrees of freedom.

    Influences are summed per unit, centred within strata and scaled by units / (units - n_free).
    """
    deviations, dof = unit_deviations(influence, strata, units, n_free)
    return (deviations**2).sum(axis=1), dof


def unit_deviations(
    influence: np.ndarray, strata: np.ndarray, units: np.ndarray, n_free: int
) -> tuple[np.ndarray, int]:
    """Per-unit influences (values x units), centred within strata and scaled so that ``D @ D.T`` is the
    sandwich covariance of the values (its diagonal :func:`design_variance`), and the degrees of freedom."""
    k = influence.shape[1]
    n_units = int(units.max()) + 1 if k else 0
    per_unit = (sparse.csr_matrix((np.ones(k), (units, np.arange(k))), shape=(n_units, k)) @ influence.T).T
    per_unit = np.asarray(per_unit, dtype=float)
    unit_stratum = np.zeros(n_units, dtype=int)
    unit_stratum[units] = strata
    for h in np.unique(unit_stratum):
        in_h = unit_stratum == h
        m_h = int(in_h.sum())
        if m_h > 1:
            block = per_unit[:, in_h]
            per_unit[:, in_h] = np.sqrt(m_h / (m_h - 1)) * (block - block.mean(axis=1, keepdims=True))
    dof = n_units - n_free
    if dof >= 1:
        per_unit *= np.sqrt(n_units / dof)
    return per_unit, dof


def _inverse(matrix: np.ndarray) -> tuple[np.ndarray, int]:
    """Inverse and rank of a symmetric matrix; the pseudo-inverse when it is (nearly) singular."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", linalg.LinAlgWarning)
            return linalg.solve(matrix, np.eye(len(matrix)), assume_a="sym"), len(matrix)
    except (linalg.LinAlgError, linalg.LinAlgWarning):
        u, sv, vt = np.linalg.svd(matrix)
        rank = int(np.sum(sv > sv.max(initial=0.0) * max(matrix.shape) * np.finfo(float).eps))
        return (vt[:rank].T / sv[:rank]) @ u[:, :rank].T, rank
