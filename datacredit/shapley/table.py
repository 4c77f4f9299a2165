"""The table of evaluated coalitions: every estimator reads from it, duplicates are averaged.

Rows are stored as JSONL, one ``{"members": [player indices...], "utility": float}`` per line,
so a run can be re-estimated offline with any method.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np


class Row(NamedTuple):
    """One utility evaluation: the coalition's member indices and the measured utility."""

    members: tuple[int, ...]
    utility: float


RowLike = Row | tuple[Sequence[int] | np.ndarray, float] | Mapping[str, object]


def as_mask(coalition: Sequence[int] | np.ndarray, n_players: int) -> np.ndarray:
    """A coalition as a boolean membership vector; accepts a bool mask or member indices."""
    arr = np.asarray(coalition)
    if arr.dtype == bool:
        if arr.shape != (n_players,):
            raise ValueError(f"coalition mask has shape {arr.shape}, expected ({n_players},)")
        return arr.copy()
    mask = np.zeros(n_players, dtype=bool)
    idx = arr.astype(int).ravel()
    if idx.size and (idx.min() < 0 or idx.max() >= n_players):
        raise ValueError(f"member index out of range for {n_players} players: {idx.tolist()}")
    mask[idx] = True
    return mask


def as_row(row: RowLike) -> Row:
    """Normalise a ``Row``, a ``(coalition, utility)`` tuple or a ``{"members", "utility"}`` dict."""
    members, utility = (row["members"], row["utility"]) if isinstance(row, Mapping) else row
    arr = np.asarray(members)
    idx = np.flatnonzero(arr) if arr.dtype == bool else arr.astype(int).ravel()
    return Row(tuple(int(i) for i in idx), float(utility))


def coalition_key(mask: np.ndarray) -> bytes:
    """Hashable key of a boolean coalition mask."""
    return np.packbits(mask).tobytes()


def infer_n_players(rows: Iterable[RowLike]) -> int:
    """Number of players implied by a table: one more than the largest member index."""
    return 1 + max((max(r.members) for r in map(as_row, rows) if r.members), default=-1)


def write_jsonl(path: str | Path, rows: Iterable[RowLike]) -> None:
    """Write rows as JSONL, one ``{"members": [...], "utility": float}`` object per line."""
    with Path(path).open("w") as f:
        for row in map(as_row, rows):
            f.write(json.dumps({"members": list(row.members), "utility": row.utility}) + "\n")


def read_jsonl(path: str | Path) -> list[Row]:
    """Read rows written by :func:`write_jsonl` (extra keys are ignored, blank lines skipped)."""
    with Path(path).open() as f:
        return [as_row(json.loads(line)) for line in f if line.strip()]


class Table:
    """Distinct coalitions with the running sum, count and sum of squares of their utilities."""

    def __init__(self, members: np.ndarray):
        self.members = np.asarray(members, dtype=bool)
        m, self.n_players = self.members.shape
        self.index = {coalition_key(z): j for j, z in enumerate(self.members)}
        if len(self.index) != m:
            raise ValueError("table coalitions must be distinct")
        self.total = np.zeros(m)
        self.sq = np.zeros(m)
        self.count = np.zeros(m, dtype=int)

    @classmethod
    def from_rows(cls, rows: Iterable[RowLike], n_players: int) -> Table:
        """Table of the distinct coalitions in ``rows`` (first-seen order), duplicates averaged."""
        rows = [as_row(r) for r in rows]
        masks = [as_mask(list(r.members), n_players) for r in rows]
        order: dict[bytes, np.ndarray] = {}
        for z in masks:
            order.setdefault(coalition_key(z), z)
        table = cls(np.array(list(order.values()), dtype=bool).reshape(len(order), n_players))
        for z, r in zip(masks, rows, strict=True):
            table.add(table.position(z), r.utility)
        return table

    def copy(self) -> Table:
        """An independent copy of the counts; the coalitions and their index are shared (never changed)."""
        twin = object.__new__(Table)
        twin.members, twin.n_players, twin.index = self.members, self.n_players, self.index
        twin.total, twin.sq, twin.count = self.total.copy(), self.sq.copy(), self.count.copy()
        return twin

    def position(self, mask: np.ndarray) -> int:
        """Row of a coalition; raises ``KeyError`` for a coalition not in the table."""
        try:
            return self.index[coalition_key(mask)]
        except KeyError:
            raise KeyError(f"coalition {np.flatnonzero(mask).tolist()} is not in the plan") from None

    def add(self, position: int, utility: float) -> None:
        """Record one evaluation of the coalition at ``position``."""
        utility = float(utility)
        if not np.isfinite(utility):
            raise ValueError(f"utility must be finite, got {utility}")
        self.total[position] += utility
        self.sq[position] += utility * utility
        self.count[position] += 1

    @property
    def observed(self) -> np.ndarray:
        """Mask of rows evaluated at least once."""
        return self.count > 0

    @property
    def mean(self) -> np.ndarray:
        """Mean utility per row (NaN where unobserved)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(self.observed, self.total / np.maximum(self.count, 1), np.nan)

    def noise_variance(self, rows: np.ndarray | None = None) -> float | None:
        """Pooled variance of repeated evaluations of a coalition (over ``rows``); None without repeats."""
        rep = self.count > 1
        if rows is not None:
            rep &= rows
        dof = int((self.count[rep] - 1).sum())
        if dof == 0:
            return None
        ss = self.sq[rep] - self.total[rep] ** 2 / self.count[rep]
        return float(max(ss.sum(), 0.0) / dof)


class Observations(NamedTuple):
    """Observed rows handed to an estimator: distinct coalitions, mean utilities, counts."""

    members: np.ndarray
    values: np.ndarray
    counts: np.ndarray
    noise_var: float | None

    @classmethod
    def of(cls, table: Table, upto: int | None = None) -> Observations:
        """Observed rows among the first ``upto`` rows of ``table`` (all rows if None)."""
        keep = table.observed.copy()
        if upto is not None:
            keep[upto:] = False
        sub = np.flatnonzero(keep)
        return cls(table.members[sub], table.mean[sub], table.count[sub], table.noise_variance(keep))

    def lookup(self, mask: np.ndarray) -> int | None:
        """Row of an exact coalition, or None."""
        hit = np.flatnonzero((self.members == mask).all(axis=1))
        return int(hit[0]) if hit.size else None
