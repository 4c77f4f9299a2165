"""The seeds of a coalition evaluation, and common random numbers (CRN) across the coalitions of a run.

A coalition's utility is noisy: which images each fine-tuning step draws, the timesteps and noise ε of
every step, and the initial noise of sampling. Only the first depends on the coalition's data. Under
common random numbers every coalition of a run shares the rest (one ``noise`` seed per replicate), so
two coalitions differ by their data, not by their luck: differences v(S ∪ i) − v(S), which Shapley
values are made of, lose most of the sampling noise. Replicate ``r > 0`` re-draws everything, as a run
with another seed would: it is how the between-seed part of the intervals is measured.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


def derived_seed(seed: int, *stream: object) -> int:
    """A 31-bit seed for the named random stream of ``seed`` (stable across versions and platforms)."""
    key = ":".join(str(p) for p in (seed, *stream))
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:4], "little") & 0x7FFF_FFFF


@dataclass(frozen=True)
class Seeds:
    """``data``: which images each fine-tuning batch holds; ``noise``: timesteps and ε of fine-tuning and
    the initial sampling noise (shared by all coalitions of a replicate under common random numbers)."""

    data: int
    noise: int


def coalition_seeds(run_seed: int, coalition: str, replicate: int = 0, common: bool = True) -> Seeds:
    """The seeds of ``coalition`` (its id) in ``replicate`` of a run seeded ``run_seed``."""
    data = derived_seed(run_seed, "data", coalition, replicate)
    noise = derived_seed(run_seed, "noise", replicate) if common else derived_seed(run_seed, "noise", coalition,
                                                                                    replicate)
    return Seeds(data, noise)
