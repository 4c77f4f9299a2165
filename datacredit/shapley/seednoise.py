"""The between-seed part of the intervals: what changes when a run is repeated with another seed.

Residuals do not see it: under common random numbers every coalition of a run shares its noise, and
``exact`` enumeration has no residuals at all. So a few coalitions of the plan (∅ and ``coalitions``
others, spread over sizes) are evaluated again under independent seeds (replicates), and a two-way
model of their utilities,

    u_r(S) = mu(S) + c_r + d_r(S)    (trained coalitions; r = 0 is the run's own evaluation)
    u_r(∅) = mu(∅) + e_r             (the untrained model shares nothing with the trained ones)

gives the variance of the idiosyncratic part d (``within``), of the shift c that every trained
coalition of a seed shares (``common``) and of the null model (``null``). The values are linear (or
nearly so) in the utilities, phi = J u, so the between-seed variance of phi_i is

    within * sum_{S != ∅} J_iS^2 / n_S + common * (sum_{S != ∅} J_iS)^2 + null * J_i∅^2 / n_∅.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from datacredit.shapley.registry import get_method
from datacredit.shapley.table import Observations


@dataclass(frozen=True)
class SeedNoise:
    """Variance components of the utilities between seeds (see the module docstring)."""

    within: float
    common: float
    null: float
    coalitions: int  # trained coalitions replicated
    seeds: int  # evaluations of each (the run's own plus replicates)

    @classmethod
    def fit(cls, replicated: Sequence[tuple[bool, Sequence[float]]]) -> SeedNoise | None:
        """From ``(is_empty, [u_0, u_1, ...])`` per replicated coalition; None without two trained seeds."""
        trained = [list(u) for empty, u in replicated if not empty and len(u) >= 2]
        nulls = [list(u) for empty, u in replicated if empty and len(u) >= 2]
        if not trained:
            return None
        k = min(len(u) for u in trained)
        u = np.asarray([row[:k] for row in trained], dtype=float)
        m = len(u)
        if m >= 2:
            resid = u - u.mean(axis=1, keepdims=True) - u.mean(axis=0, keepdims=True) + u.mean()
            within = float((resid**2).sum() / ((m - 1) * (k - 1)))
            seed_ms = m * float(((u.mean(axis=0) - u.mean()) ** 2).sum()) / (k - 1)
            common = max(0.0, (seed_ms - within) / m)
        else:  # one coalition cannot split the two: count it all as idiosyncratic
            within, common = float(u.var(ddof=1)), 0.0
        null = float(np.mean([np.var(row, ddof=1) for row in nulls])) if nulls else within
        return cls(within, common, null, m, k)

    def to_dict(self) -> dict[str, float | int]:
        return {"within": self.within, "common": self.common, "null": self.null, "coalitions": self.coalitions,
                "seeds": self.seeds}


def replicate_positions(sequence: np.ndarray, coalitions: int, horizon: int | None = None) -> list[int]:
    """Plan positions to replicate: ∅ and ``coalitions`` others among the first ``horizon`` rows (default
    all), spread evenly over their sizes; deterministic for a plan."""
    if coalitions <= 0 or len(sequence) == 0:
        return []
    rows = np.asarray(sequence[: horizon or len(sequence)], dtype=bool)
    sizes = rows.sum(axis=1)
    empty = [int(j) for j in np.flatnonzero(sizes == 0)[:1]]
    trained = np.flatnonzero(sizes > 0)
    trained = trained[np.argsort(sizes[trained], kind="stable")]
    if len(trained) <= coalitions:
        picked = trained
    else:
        picked = trained[np.round(np.linspace(0, len(trained) - 1, coalitions)).astype(int)]
    return empty + sorted(int(j) for j in picked)


def sensitivity(obs: Observations, method: str, values_of: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """J (n, rows): how each value moves with each observed row's mean utility.

    The method's closed form where it has one (``kernel`` at its fitted blend weight, complete enumeration);
    central differences of ``values_of`` (the estimator on modified utilities) otherwise.
    """
    closed = get_method(method).sensitivity
    J = closed(obs) if closed is not None else None
    if J is not None:
        return J
    n, rows = obs.members.shape[1], len(obs.values)
    scale = float(np.nanstd(obs.values)) or 1.0
    h = 1e-4 * scale
    out = np.zeros((n, rows))
    for j in range(rows):
        up, down = obs.values.copy(), obs.values.copy()
        up[j] += h
        down[j] -= h
        out[:, j] = (values_of(up) - values_of(down)) / (2 * h)
    return out


def semivalue_sensitivity(obs: Observations, weight_of_size: np.ndarray) -> np.ndarray:
    """J of sum_{S not containing i} p_|S| (v(S + i) - v(S)): +p_{|S|-1} where i is in S, -p_|S| elsewhere."""
    sizes = obs.members.sum(axis=1)
    inside = weight_of_size[np.clip(sizes - 1, 0, None)][None, :]
    outside = weight_of_size[np.clip(sizes, None, len(weight_of_size) - 1)][None, :]
    return np.where(obs.members.T, inside, -outside)


def seed_variance(noise: SeedNoise, obs: Observations, J: np.ndarray) -> np.ndarray:
    """Between-seed variance of each value (the module docstring's formula)."""
    empty = ~obs.members.any(axis=1)
    counts = np.maximum(obs.counts, 1)
    trained = J[:, ~empty]
    var = noise.within * (trained**2 / counts[~empty]).sum(axis=1) + noise.common * trained.sum(axis=1) ** 2
    if empty.any():
        var += noise.null * (J[:, empty] ** 2 / counts[empty]).sum(axis=1)
    return var
