"""Tests of the run loop both executors share (datacredit.runloop), on a real planner."""

from __future__ import annotations

import numpy as np

from datacredit.ids import coalition_id
from datacredit.planner import Planner
from datacredit.runloop import Coalition, Missing, plan_rows, walk
from datacredit.shapley import estimate

IDS = ["a", "b", "c"]
HASH = "cfg"


def utility(members: tuple[int, ...]) -> float:
    return float(sum((i + 1) ** 2 for i in members)) + 0.5 * (0 in members and 2 in members)


def test_walk_starts_up_to_capacity_tells_what_is_stored_and_finishes_like_estimate() -> None:
    planner = Planner(3, 8, "exact", seed=0)
    first = walk(planner, IDS, HASH, 2, lambda _: None)
    assert [c.members for c in first.start] == [(), (0, 1, 2)]  # ∅ and the full set come first
    assert first.told == [] and not first.exhausted
    assert first.start[0].id == coalition_id([], HASH)

    store: dict[str, tuple[float, list[float]]] = {}
    in_flight = list(first.start)
    rounds = 0
    while in_flight:  # an executor: finish one coalition, store its result, walk again
        done = in_flight.pop(0)
        store[done.id] = (utility(done.members), [])
        planner.tell(done.mask, store[done.id][0])
        step = walk(planner, IDS, HASH, 2 - len(in_flight), store.get)
        in_flight += step.start
        rounds += 1
    assert rounds == 8 and planner.done
    rows = plan_rows(planner, IDS, HASH, {k: v[0] for k, v in store.items()}, {})
    assert [tuple(r["members"]) for r in rows] == [tuple(np.flatnonzero(z)) for z in planner.sequence]
    want = estimate(lambda Z: np.array([utility(tuple(np.flatnonzero(z))) for z in Z]), 3, 8, method="exact")
    assert np.allclose(planner.estimate().values, want.values)

    resumed = Planner(3, 8, "exact", seed=0)  # a restarted executor: everything comes from storage
    again = walk(resumed, IDS, HASH, 2, store.get)
    assert again.start == [] and len(again.told) == 8 and again.exhausted and resumed.done


def test_walk_counts_in_flight_work_and_skips_what_failed_for_good() -> None:
    planner = Planner(3, 8, "exact", seed=0)
    said: dict[str, Missing] = {}

    def missing(c: Coalition) -> Missing:
        said[c.id] = "failed" if c.members == (1,) else "active"
        return said[c.id]

    step = walk(planner, IDS, HASH, 3, lambda _: None, missing)
    assert len(step.active) == 3 and step.start == [] and step.skipped == []  # in flight: nothing new to start
    planner = Planner(3, 8, "exact", seed=0)
    step = walk(planner, IDS, HASH, 8, lambda _: None, missing)
    assert [c.members for c in step.skipped] == [(1,)] and len(step.active) == 7 and step.exhausted
    assert [tuple(np.flatnonzero(z)) for z in planner.skipped] == [(1,)]
