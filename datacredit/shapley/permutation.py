"""Antithetic permutation sampling: marginal contributions along a permutation and its reverse."""

from __future__ import annotations

import numpy as np
from scipy import stats

from datacredit.shapley.result import Z95
from datacredit.shapley.table import Table


def permutation_shapley(table: Table, chains: np.ndarray, upto: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean marginal contributions over the complete antithetic pairs among the first ``upto`` rows.

    ``chains`` holds, per permutation, the table rows of its n + 1 prefixes; consecutive chains
    (2k, 2k + 1) are a permutation and its reverse, whose average is one i.i.d. unit. Returns None
    when no pair is complete yet.
    """
    observed = table.observed.copy()
    observed[upto:] = False
    pairs = chains.reshape(-1, 2, chains.shape[1])
    complete = observed[pairs].all(axis=(1, 2))
    if not complete.any():
        return None
    pairs = pairs[complete]
    values = table.mean[pairs]  # (units, 2, n + 1)
    players = np.argmax(table.members[pairs[:, :, 1:]] & ~table.members[pairs[:, :, :-1]], axis=-1)
    marginals = np.zeros(pairs.shape[:2] + (table.n_players,))
    np.put_along_axis(marginals, players, np.diff(values, axis=-1), axis=-1)
    units = marginals.mean(axis=1)
    if len(units) < 2:
        return units[0], np.full(table.n_players, np.inf)
    se = units.std(axis=0, ddof=1) / np.sqrt(len(units))
    return units.mean(axis=0), se * stats.t.ppf(0.975, len(units) - 1) / Z95
