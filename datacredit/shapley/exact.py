"""Exact Shapley and Banzhaf values from a table holding all 2^n coalitions."""

from __future__ import annotations

import numpy as np
from scipy.special import gammaln

from datacredit.shapley.table import Observations


def _by_bitmask(obs: Observations) -> tuple[np.ndarray, np.ndarray] | None:
    """Mean utilities and counts indexed by coalition bitmask, or None if some coalition is missing."""
    n = obs.members.shape[1]
    if len(obs.values) != 2**n:
        return None
    idx = obs.members.astype(np.int64) @ (np.int64(1) << np.arange(n, dtype=np.int64))
    values, counts = np.empty(2**n), np.zeros(2**n, dtype=int)
    values[idx], counts[idx] = obs.values, obs.counts
    return values, counts


def is_complete(obs: Observations) -> bool:
    """Whether every one of the 2^n coalitions is observed."""
    return _by_bitmask(obs) is not None


def _semivalue(obs: Observations, weight_of_size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """sum_{S not containing i} p_|S| (v(S + i) - v(S)); stderr from the replicate noise variance."""
    table = _by_bitmask(obs)
    if table is None:
        raise ValueError("exact values need all 2^n coalitions")
    values, counts = table
    n = obs.members.shape[1]
    idx = np.arange(2**n)
    sizes = np.zeros(2**n, dtype=int)
    for bit in range(n):
        sizes += (idx >> bit) & 1
    phi, var = np.zeros(n), np.zeros(n)
    noise = obs.noise_var or 0.0
    for i in range(n):
        without = idx[(idx >> i) & 1 == 0]
        w = weight_of_size[sizes[without]]
        phi[i] = w @ (values[without | (1 << i)] - values[without])
        var[i] = noise * (w**2 @ (1 / counts[without | (1 << i)] + 1 / counts[without]))
    return phi, np.sqrt(var)


def semivalue_weights(n: int, kind: str) -> np.ndarray:
    """Weight of a marginal contribution v(S + i) - v(S) by |S|: Shapley |S|! (n - |S| - 1)! / n!, Banzhaf
    2^-(n-1)."""
    if kind == "banzhaf":
        return np.full(n, 2.0 ** -(n - 1))
    s = np.arange(n)
    return np.exp(gammaln(s + 1) + gammaln(n - s) - gammaln(n + 1))


def exact_shapley(obs: Observations) -> tuple[np.ndarray, np.ndarray]:
    """Shapley values by enumeration."""
    return _semivalue(obs, semivalue_weights(obs.members.shape[1], "shapley"))


def exact_banzhaf(obs: Observations) -> tuple[np.ndarray, np.ndarray]:
    """Banzhaf values by enumeration."""
    return _semivalue(obs, semivalue_weights(obs.members.shape[1], "banzhaf"))
