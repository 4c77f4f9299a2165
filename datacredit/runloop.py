"""The run loop both executors share: walk the planner against stored results, then finish the run.

The local executor calls :func:`walk` each time a worker is free, the operator once per reconcile pass; both
write ``run.json`` with :func:`write_run_json` and finish with :func:`finish` (results in plan order). A new
executor, or one that packs several coalitions per worker, changes what it does with :attr:`Walk.start` only.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol

import numpy as np

from . import layout
from .finish import finish_run
from .ids import coalition_id
from .planner import Planner
from .runstate import member_indices, utility_row
from .spec import ValuationRun
from .storage import Storage, write_json

#: What an executor says about a planned coalition that has no stored utility: start an attempt, one is in
#: flight already, or it failed for good (the planner skips it and the walk goes on).
Missing = Literal["start", "active", "failed"]


class AskTell(Protocol):
    """What the loop needs of a planner (:class:`~datacredit.planner.Planner`, or a scripted one in tests)."""

    def ask(self, k: int) -> Any: ...
    def tell(self, coalition: Any, utility: float, replicates: Any = ()) -> None: ...
    def skip(self, coalition: Any) -> None: ...
    @property
    def skipped(self) -> Any: ...


@dataclass(frozen=True)
class Coalition:
    """A planned coalition: its boolean mask, member indices and id."""

    mask: np.ndarray
    members: tuple[int, ...]
    id: str


@dataclass
class Walk:
    """What one walk found: coalitions to start, in flight, told from storage, skipped; and whether the planner
    has nothing more to ask (the run is done once nothing is in flight)."""

    start: list[Coalition] = field(default_factory=list)
    active: list[Coalition] = field(default_factory=list)
    told: list[Coalition] = field(default_factory=list)
    skipped: list[Coalition] = field(default_factory=list)
    exhausted: bool = False


def write_run_json(store: Storage, run: ValuationRun) -> bool:
    """Write ``run.json``, the spec snapshot the workers read, unless it is there; True when written now."""
    return write_json(store, layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()},
                      if_absent=True)


def walk(planner: AskTell, ids: Sequence[str], config_hash: str, capacity: int,
         stored: Callable[[str], tuple[float, Sequence[float]] | None],
         missing: Callable[[Coalition], Missing] = lambda _: "start") -> Walk:
    """Ask ``planner`` for coalitions in plan order until ``capacity`` of them need work (or it asks nothing).

    A coalition with a stored utility (``stored(id)`` gives it and its replicate-seed utilities) is told; one
    without is started or counted in flight (both take capacity) or, when ``missing`` says it failed for good,
    skipped. The planner's checkpoints make this deterministic: what is asked does not depend on timing.
    """
    out = Walk()
    while len(out.start) + len(out.active) < capacity:
        batch = planner.ask(1)
        if len(batch) == 0:
            out.exhausted = True
            break
        mask = np.asarray(batch[0], dtype=bool)
        members = tuple(member_indices(mask))
        coalition = Coalition(mask, members, coalition_id([ids[i] for i in members], config_hash))
        found = stored(coalition.id)
        if found is not None:
            planner.tell(mask, found[0], found[1])
            out.told.append(coalition)
            continue
        step = missing(coalition)
        if step == "failed":
            planner.skip(mask)  # checkpoints and stopping rules stop waiting for it; the run goes on without it
            out.skipped.append(coalition)
        else:
            (out.start if step == "start" else out.active).append(coalition)
    return out


def plan_rows(planner: Planner, ids: Sequence[str], config_hash: str, utilities: Mapping[str, float],
              replicates: Mapping[str, Sequence[float]]) -> list[dict[str, Any]]:
    """``results/utilities.jsonl`` rows, in plan order, of the coalitions that have a utility."""
    rows = []
    for mask in planner.sequence:
        members = member_indices(mask)
        cid = coalition_id([ids[i] for i in members], config_hash)
        if cid in utilities:
            rows.append(utility_row(members, utilities[cid], list(replicates.get(cid, ()))))
    return rows


def finish(store: Storage, run: ValuationRun, planner: Planner, contributors: list[dict[str, Any]],
           utilities: Mapping[str, float], replicates: Mapping[str, Sequence[float]],
           wall_seconds: float) -> dict[str, Any]:
    """Write the run's results (:func:`~datacredit.finish.finish_run`) from the utilities by coalition id."""
    rows = plan_rows(planner, [c["id"] for c in contributors], run.config_hash(), utilities, replicates)
    return finish_run(store, run, planner, contributors, rows, wall_seconds)
