"""Leave-one-out values v(N) - v(N \\ {i})."""

from __future__ import annotations

import numpy as np

from datacredit.shapley.table import Observations


def leave_one_out(obs: Observations) -> tuple[np.ndarray, np.ndarray]:
    """LOO values (NaN for players whose leave-one-out coalition is missing).

    Standard errors come from the replicate noise variance (zero when nothing was repeated).
    """
    n = obs.members.shape[1]
    full = obs.lookup(np.ones(n, dtype=bool))
    if full is None:
        raise ValueError("leave-one-out needs the utility of the full coalition")
    values, stderr = np.full(n, np.nan), np.full(n, np.nan)
    noise = obs.noise_var or 0.0
    for i in range(n):
        row = obs.lookup(np.arange(n) != i)
        if row is not None:
            values[i] = obs.values[full] - obs.values[row]
            stderr[i] = np.sqrt(noise * (1 / obs.counts[full] + 1 / obs.counts[row]))
    return values, stderr
