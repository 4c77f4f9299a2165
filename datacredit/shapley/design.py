"""Deterministic evaluation plans: the ordered sequence of coalitions each method evaluates.

A plan depends only on (n_players, budget, method, seed), so every executor that walks it in order
evaluates the same coalitions. Every plan starts with ∅ and the full set. Any prefix that ends at
one of ``Plan.boundaries`` is itself a valid (anytime) design; convergence checks happen there.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np

from datacredit.shapley.hadamard import orthogonal_coalitions
from datacredit.shapley.registry import get_method
from datacredit.shapley.result import StopReason
from datacredit.shapley.sizes import (
    n_classes,
    pairs_in_class,
    uniform_class_mass,
)
from datacredit.shapley.table import coalition_key

MAX_EXACT_PLAYERS = 20
#: A size class with at most this many complement pairs is enumerated and shuffled, not rejection-sampled.
ENUMERATE_CLASS_LIMIT = 20_000
#: Share of a kernel plan's pairs drawn from Hadamard blocks (the rest follow the size quota).
ORTHOGONAL_SHARE = 0.5


@dataclass(frozen=True)
class Plan:
    """The ordered coalitions of one run and the structure estimators need to read them."""

    method: str
    n_players: int
    budget: int
    seed: int
    sequence: np.ndarray  # (m, n) bool, distinct coalitions, ∅ and the full set first
    boundaries: np.ndarray  # increasing positions where a design unit (pair, permutation pair) ends
    end_reason: StopReason  # why the sequence ends where it does
    chains: np.ndarray | None = None  # permutation only: (P, n + 1) positions of each prefix

    def checkpoints(self, min_evaluations: int, check_every: int) -> list[int]:
        """Unit boundaries, before the end, at which the stopping rule is evaluated."""
        out: list[int] = []
        target = min_evaluations
        for b in self.boundaries.tolist():
            if b >= len(self.sequence):
                break
            if b >= target:
                out.append(b)
                target = b + check_every
        return out


class _Sequence:
    """Append-only list of distinct coalitions."""

    def __init__(self, n: int):
        self.n = n
        self.rows: list[np.ndarray] = []
        self.index: dict[bytes, int] = {}

    def add(self, mask: np.ndarray) -> int:
        """Position of ``mask``, appending it if new."""
        key = coalition_key(mask)
        if key not in self.index:
            self.index[key] = len(self.rows)
            self.rows.append(mask)
        return self.index[key]

    def __contains__(self, mask: np.ndarray) -> bool:
        return coalition_key(mask) in self.index

    def __len__(self) -> int:
        return len(self.rows)

    def array(self) -> np.ndarray:
        return np.array(self.rows, dtype=bool).reshape(len(self.rows), self.n)


def make_plan(n_players: int, budget: int, method: str = "kernel", seed: int = 0) -> Plan:
    """Build the deterministic plan of ``method`` (a name in :mod:`datacredit.shapley.registry`) for
    ``n_players`` within ``budget`` evaluations."""
    if n_players < 1:
        raise ValueError("n_players must be >= 1")
    if budget < 2:
        raise ValueError("budget must be >= 2 (∅ and the full set)")
    plan = get_method(method).plan(n_players, budget, seed)
    return plan if plan.method == method else replace(plan, method=method)  # a method may reuse another's design


def _start(n: int) -> _Sequence:
    """A sequence holding ∅ and the full set, which every plan evaluates first."""
    seq = _Sequence(n)
    seq.add(np.zeros(n, dtype=bool))
    seq.add(np.ones(n, dtype=bool))
    return seq


def loo_plan(n: int, budget: int, seed: int) -> Plan:
    """∅, the full set and the n leave-one-out coalitions."""
    return _loo_plan(_start(n), budget, seed)


def permutation_plan(n: int, budget: int, seed: int) -> Plan:
    """Antithetic permutation pairs within the budget."""
    return _permutation_plan(_start(n), budget, seed, np.random.default_rng(seed))


def paired_plan(n: int, budget: int, seed: int, weighting: str = "kernel") -> Plan:
    """Complement pairs over size classes, weighted as ``weighting`` (``kernel``: Shapley kernel mass, with
    leave-one-out pairs and Hadamard blocks first; ``banzhaf``: uniform over coalitions)."""
    return _paired_plan(_start(n), budget, weighting, seed, np.random.default_rng(seed))


def _finish(
    seq: _Sequence,
    method: str,
    budget: int,
    seed: int,
    boundaries: list[int],
    end_reason: StopReason,
    chains: np.ndarray | None = None,
) -> Plan:
    if 2**seq.n == len(seq):
        end_reason = StopReason.ALL_COALITIONS
    return Plan(method, seq.n, budget, seed, seq.array(), np.array(boundaries, dtype=int), end_reason, chains)


def exact_plan(n: int, budget: int, seed: int) -> Plan:
    """Every coalition: ∅, the full set, then the rest in binary order."""
    if n > MAX_EXACT_PLAYERS:
        raise ValueError(f"exact needs 2^n evaluations; n = {n} > {MAX_EXACT_PLAYERS} is not supported")
    if budget < 2**n:
        raise ValueError(f"exact needs a budget of 2^{n} = {2**n}, got {budget}")
    order = np.concatenate([[0, 2**n - 1], np.arange(1, 2**n - 1)])
    sequence = (order[:, None] >> np.arange(n) & 1).astype(bool)
    return Plan("exact", n, budget, seed, sequence, np.array([2**n]), StopReason.ALL_COALITIONS)


def _loo_plan(seq: _Sequence, budget: int, seed: int) -> Plan:
    n = seq.n
    if budget < n + 2:
        raise ValueError(f"loo needs a budget of n + 2 = {n + 2}, got {budget}")
    for i in range(n):
        mask = np.ones(n, dtype=bool)
        mask[i] = False
        seq.add(mask)
    return _finish(seq, "loo", budget, seed, [len(seq)], StopReason.DESIGN_COMPLETE)


def _class_targets(n: int, method: str) -> np.ndarray:
    """Share of quota-sampled pairs per size class 1 .. n // 2.

    kernel: equal per coalition size (the leverage-score design of Musco & Witter 2025; the
    Hadamard pairs already crowd the middle sizes, so the quota mostly fills the outer classes);
    banzhaf: the Binomial(n, 1/2) share of each class, i.e. Bernoulli(1/2) membership stratified by size.
    """
    c = np.arange(1, n_classes(n) + 1)
    share = np.where(2 * c == n, 1.0, 2.0) if method == "kernel" else uniform_class_mass(n, c)
    return share / share.sum()


def _pair_key(mask: np.ndarray) -> np.ndarray:
    """The pair representative of a coalition: its size-c member, with player 0 when 2c == n."""
    size, n = int(mask.sum()), len(mask)
    return ~mask if 2 * size > n or (2 * size == n and not mask[0]) else mask


def _orthogonal_pairs(n: int, rng: np.random.Generator, taken: _Sequence) -> Iterator[np.ndarray]:
    """Pair representatives from Hadamard blocks, skipping pairs already taken; ends after 4(n + 1)
    taken rows in a row (small n, where the blocks exhaust the middle classes)."""
    patience = 4 * (n + 1)
    misses = 0
    for row in orthogonal_coalitions(n, rng):
        mask = _pair_key(row)
        if mask in taken:
            misses += 1
            if misses >= patience:
                return
            continue
        misses = 0
        yield mask


def _class_pairs(n: int, c: int, rng: np.random.Generator, taken: _Sequence) -> Iterator[np.ndarray]:
    """Distinct pair representatives (the size-c member; with player 0 when 2c == n), in random order."""
    half = 2 * c == n
    if pairs_in_class(n, c) <= ENUMERATE_CLASS_LIMIT:
        others = range(1, n) if half else range(n)
        combos = np.array(list(combinations(others, c - 1 if half else c)), dtype=int)
        for row in combos[rng.permutation(len(combos))]:
            mask = np.zeros(n, dtype=bool)
            mask[row] = True
            mask[0] |= half
            if mask not in taken:
                yield mask
        return
    while True:  # the class is far larger than any budget: rejection sampling rarely repeats
        mask = np.zeros(n, dtype=bool)
        mask[rng.choice(n, c, replace=False)] = True
        mask = _pair_key(mask)
        if mask not in taken:
            yield mask


def _paired_plan(seq: _Sequence, budget: int, method: str, seed: int, rng: np.random.Generator) -> Plan:
    """Complement pairs without replacement, allocated to size classes by a deterministic quota.

    ``kernel`` with budget >= 4n + 2 enumerates the border class first (singletons and leave-one-out
    coalitions: the sizes with the most Shapley-kernel weight, so ``loo`` also comes for free).
    Then it takes a pair from Hadamard blocks (an orthogonal design: the least noise on the
    additive part of a game) whenever their share lags ``ORTHOGONAL_SHARE``; every other pair, and
    every ``banzhaf`` pair, comes from the open size class whose count lags its target share most
    (the Hadamard pairs count too, so the quota fills the outer sizes). Every prefix is close to the
    intended allocation.
    """
    n = seq.n
    boundaries = [len(seq)]
    classes = np.arange(1, n_classes(n) + 1)
    caps = [pairs_in_class(n, int(c)) for c in classes]
    counts = np.zeros(len(classes), dtype=int)
    max_pairs = (budget - len(seq)) // 2

    def add_pair(mask: np.ndarray, k: int) -> None:
        seq.add(mask)
        seq.add(~mask)
        counts[k] += 1
        boundaries.append(len(seq))

    kernel = method == "kernel" and n >= 3
    if kernel and budget >= 4 * n + 2:
        for i in rng.permutation(n):
            add_pair(np.arange(n) == i, 0)
    targets = _class_targets(n, method)
    samplers = [_class_pairs(n, int(c), rng, seq) for c in classes]
    orthogonal = _orthogonal_pairs(n, rng, seq) if kernel else iter(())
    n_orthogonal = 0
    while counts.sum() < max_pairs:
        mask = next(orthogonal, None) if n_orthogonal < ORTHOGONAL_SHARE * (counts.sum() + 1) else None
        if mask is not None:  # None also once the blocks are exhausted: the quota takes over
            add_pair(mask, int(mask.sum()) - 1)
            n_orthogonal += 1
            continue
        open_ = np.array([counts[k] < caps[k] for k in range(len(classes))])
        if not open_.any():
            break
        share = np.where(open_, targets, 0.0)
        deficit = share / share.sum() * (counts[open_].sum() + 1) - counts
        k = int(np.argmax(np.where(open_, deficit, -np.inf)))
        add_pair(next(samplers[k]), k)
    return _finish(seq, method, budget, seed, boundaries, StopReason.BUDGET)


def _permutation_plan(seq: _Sequence, budget: int, seed: int, rng: np.random.Generator) -> Plan:
    """Antithetic permutation pairs (a permutation and its reverse); repeated prefixes are reused."""
    n = seq.n
    chains: list[list[int]] = []
    boundaries = [len(seq)]
    while len(seq) < 2**n:
        order = rng.permutation(n)
        pair_masks = [np.tri(n + 1, n, -1, dtype=bool)[:, np.argsort(perm)] for perm in (order, order[::-1])]
        new = {coalition_key(m) for masks in pair_masks for m in masks if m not in seq}
        if len(seq) + len(new) > budget:
            break
        chains.extend([seq.add(m) for m in masks] for masks in pair_masks)
        boundaries.append(len(seq))
    if not chains and len(seq) < 2**n:
        raise ValueError(f"permutation needs a budget of about 2n = {2 * n} for one antithetic pair, got {budget}")
    chain_array = np.array(chains, dtype=int).reshape(-1, n + 1)
    return _finish(seq, "permutation", budget, seed, boundaries, StopReason.BUDGET, chain_array)
