"""The reconcile decision and status, without a cluster: fake Jobs, a fake storage view, a scripted planner."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from datacredit.ids import coalition_id
from datacredit.operator.batch import batch_annotation, quantity_bytes, worker_args
from datacredit.operator.planners import PlannerCache
from datacredit.operator.reconcile import JobView, StoreView, decide, job_state, job_views
from datacredit.operator.status import StatusEstimate, build_status, set_condition
from datacredit.packing import MAX_PACK, coalitions_per_job
from datacredit.spec import parse_manifest

N = 3
CONTRIBUTORS = [{"name": n, "id": f"{n}-0000", "images": 4} for n in ("ann", "bob", "cy")]
SEQUENCE = [np.array([(i >> j) & 1 for j in range(N)], dtype=bool) for i in range(2**N)]


class ScriptedPlanner:
    """Walks a fixed sequence; estimate() = mean utility per member (enough to check the plumbing)."""

    def __init__(self, n: int) -> None:
        self.sequence = SEQUENCE
        self.pos = 0
        self.told: list[tuple[np.ndarray, float]] = []
        self.skipped: list[np.ndarray] = []

    def ask(self, k: int) -> list[np.ndarray]:
        out = self.sequence[self.pos : self.pos + k]
        self.pos += len(out)
        return out

    def tell(self, coalition: np.ndarray, utility: float, replicates: Any = ()) -> None:
        self.told.append((coalition, utility))

    def skip(self, coalition: np.ndarray) -> None:
        self.skipped.append(coalition)

    def estimate(self) -> Any:
        if len(self.told) < 2:
            raise ValueError("too few")
        vals = np.array([np.mean([u for c, u in self.told if c[i]] or [0.0]) for i in range(N)])
        return SimpleNamespace(values=vals, stderr=np.full(N, 0.1), n_evaluations=len(self.told),
                               converged=len(self.told) == len(SEQUENCE), stop_reason="budget")


def _run(**execution: Any) -> Any:
    return parse_manifest({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "r"},
        "spec": {"dataset": {"images": "s3://b/d"}, "estimator": {"name": "exact", "budget": 8},
                 "execution": {"parallelism": 2, "maxAttemptsPerCoalition": 2, "maxFailedCoalitions": 0,
                               **execution},
                 "storage": {"uri": "s3://b/runs"}},
    })


RUN = _run()


def cid(i: int, run: Any = RUN) -> str:
    return coalition_id([CONTRIBUTORS[j]["id"] for j in np.flatnonzero(SEQUENCE[i])], run.config_hash())


def job(key: str, attempt: int, state: str, reason: str = "") -> JobView:
    step = "prepare" if key == "prepare" else "coalition"
    return JobView(f"r-{key}-a{attempt}", step, key, attempt, state, reason, "boom" if reason else "")


def prepared(done: range | list[int] = (), **kw: Any) -> StoreView:
    return StoreView(True, CONTRIBUTORS, {cid(i): float(i) for i in done}, **kw)


def test_job_state_from_conditions() -> None:
    def j(conds: list[tuple[str, str]], **status: Any) -> dict[str, Any]:
        return {"spec": {}, "status": {"conditions": [{"type": t, "status": "True", "reason": r} for t, r in conds],
                                       **status}}

    assert job_state(j([("SuccessCriteriaMet", ""), ("Complete", "")]))[0] == "Succeeded"
    assert job_state(j([("FailureTarget", "PodFailurePolicy"), ("Failed", "PodFailurePolicy")]))[:2] == (
        "Failed", "BadInput")
    storage = {"spec": {}, "status": {"conditions": [{
        "type": "Failed", "status": "True", "reason": "PodFailurePolicy",
        "message": "Container worker for pod ns/p failed with exit code 4 matching FailJob rule at index 2"}]}}
    assert job_state(storage)[:2] == ("Failed", "StorageUnavailable")  # an outage: retried, not bad input
    assert job_state(j([("Failed", "DeadlineExceeded")]))[1] == "DeadlineExceeded"
    assert job_state(j([("Failed", "BackoffLimitExceeded")]))[1] == "PodFailed"
    assert job_state(j([], active=1, ready=1))[0] == "Running"
    assert job_state(j([], active=1, ready=0))[0] == "Queued"
    assert job_state({"spec": {"suspend": True}, "status": {}})[0] == "Queued"  # Kueue: queued, not failed
    [view] = job_views({"metadata": {"name": "x", "labels": {"datacredit.dev/step": "coalition",
                                                             "datacredit.dev/coalition": "c1",
                                                             "datacredit.dev/attempt": "2"}}, "status": {}})
    assert (view.key, view.attempt, view.state) == ("c1", 2, "Queued")
    assert job_views({"metadata": {"name": "other"}}) == []
    # a packed Job: one view per coalition, each with its own attempt, all in the Job's state
    labels = {"datacredit.dev/step": "coalition", "datacredit.dev/coalition": "b1", "datacredit.dev/attempt": "2"}
    packed = job_views({"metadata": {"name": "p", "labels": labels,
                                     "annotations": {"datacredit.dev/batch": "c1:0,2:1;c2::2"}},
                        "status": {"active": 1, "ready": 1}})
    assert [(v.key, v.attempt, v.members, v.state, v.name) for v in packed] == [
        ("c1", 1, "0,2", "Running", "p"), ("c2", 2, "", "Running", "p")]


def test_prepare_first_then_retry_then_fail() -> None:
    plan, planner = decide(RUN, [], StoreView(), ScriptedPlanner)
    assert plan.phase == "Preparing" and planner is None
    assert [(r.step, r.attempt) for r in plan.create] == [("prepare", 1)]

    plan, _ = decide(RUN, [job("prepare", 1, "Running")], StoreView(), ScriptedPlanner)
    assert plan.create == []

    plan, _ = decide(RUN, [job("prepare", 1, "Failed", "PodFailed")], StoreView(), ScriptedPlanner)
    assert [(r.step, r.attempt) for r in plan.create] == [("prepare", 2)]
    assert [(f.key, f.attempt, f.reason) for f in plan.record] == [("prepare", 1, "PodFailed")]

    failures = {"prepare": {1: "PodFailed", 2: "PodFailed"}}
    plan, _ = decide(RUN, [], StoreView(failures=failures), ScriptedPlanner)
    assert plan.phase == "Failed" and plan.reason == "PrepareFailed" and plan.create == []


def test_bad_input_is_not_retried() -> None:
    plan, _ = decide(RUN, [job("prepare", 1, "Failed", "BadInput")], StoreView(), ScriptedPlanner)
    assert plan.phase == "Failed" and "BadInput" in plan.message and plan.record[0].reason == "BadInput"


def test_walks_the_sequence_with_parallelism() -> None:
    plan, _ = decide(RUN, [], prepared(), ScriptedPlanner)
    assert plan.phase == "Evaluating"
    assert [r.cid for r in plan.create] == [cid(0), cid(1)]
    assert [r.members for r in plan.create] == [(), (0,)]
    assert plan.counts.planned == 8 and plan.counts.queued == 2

    # 0 done, 1 running: one slot opens for coalition 2
    plan, planner = decide(RUN, [job(cid(1), 1, "Running")], prepared([0]), ScriptedPlanner)
    assert [r.cid for r in plan.create] == [cid(2)]
    assert planner is not None and len(planner.told) == 1
    assert (plan.counts.succeeded, plan.counts.running, plan.counts.queued) == (1, 1, 1)

    # an existing Job is never created again, even if the index has not seen it yet (409 is handled)
    plan, _ = decide(RUN, [job(cid(1), 1, "Running"), job(cid(2), 1, "Queued")], prepared([0]), ScriptedPlanner)
    assert plan.create == []


def test_done_when_the_planner_is_exhausted() -> None:
    plan, planner = decide(RUN, [], prepared(range(8)), ScriptedPlanner)
    assert plan.phase == "Succeeded" and plan.done and plan.create == []
    assert planner is not None and len(planner.told) == 8


def test_retry_then_fail_for_good_names_the_coalition() -> None:
    first = decide(RUN, [job(cid(0), 1, "Failed", "PodFailed")], prepared(), ScriptedPlanner)[0]
    assert [(r.cid, r.attempt) for r in first.create] == [(cid(0), 2), (cid(1), 1)]
    assert first.record[0].key == cid(0)

    # attempt 2 failed too: maxAttemptsPerCoalition=2, maxFailedCoalitions=0 -> the run fails
    jobs = [job(cid(0), 2, "Failed", "DeadlineExceeded"), job(cid(1), 1, "Running")]
    plan, _ = decide(RUN, jobs, prepared(failures={cid(0): {1: "PodFailed"}}), ScriptedPlanner)
    assert plan.phase == "Failed" and plan.reason == "CoalitionsFailed"
    assert cid(0) in plan.message and "DeadlineExceeded" in plan.message and "{}" in plan.message
    assert plan.delete == [f"r-{cid(1)}-a1"] and plan.create == []

    # tolerated with maxFailedCoalitions=1: the run goes on without it
    lenient = _run(maxFailedCoalitions=1)
    failures = {coalition_id([], lenient.config_hash()): {1: "PodFailed", 2: "PodFailed"}}
    store = StoreView(True, CONTRIBUTORS, {}, failures)
    plan, _ = decide(lenient, [], store, ScriptedPlanner)
    assert plan.phase == "Evaluating" and plan.counts.failed == 1 and len(plan.create) == 2


def test_job_gone_without_verdict_is_recreated_and_no_result_counts_as_failure() -> None:
    plan, _ = decide(RUN, [job(cid(0), 1, "Succeeded")], prepared(), ScriptedPlanner)
    assert plan.record[0].reason == "NoResult"
    assert (plan.create[0].cid, plan.create[0].attempt) == (cid(0), 2)
    # the marker of attempt 1 exists, attempt 2's Job vanished (deleted by hand): attempt 2 again
    plan, _ = decide(RUN, [], prepared(failures={cid(0): {1: "PodFailed"}}), ScriptedPlanner)
    assert (plan.create[0].cid, plan.create[0].attempt) == (cid(0), 2)


def test_attempts_are_counted_from_storage_so_jobs_that_vanish_unseen_are_retried_a_bounded_number_of_times() -> None:
    """A Job deleted before any pass saw how it ended (TTL 0, operator down) used to be recreated as the same
    attempt forever; with created markers it counts as a failed attempt (JobLost) once the grace is over."""
    created = {cid(0): {1: 100.0}}
    plan, _ = decide(RUN, [], prepared(created=created), ScriptedPlanner, now=110.0, lost_after=60.0)
    assert plan.record == [] and (plan.create[0].cid, plan.create[0].attempt) == (cid(0), 1)  # not seen yet

    plan, _ = decide(RUN, [job(cid(0), 1, "Running")], prepared(created=created), ScriptedPlanner, now=1000.0,
                     lost_after=60.0)
    assert plan.record == [] and plan.create[0].cid == cid(1)  # observed: running, not lost

    plan, _ = decide(RUN, [], prepared(created=created), ScriptedPlanner, now=1000.0, lost_after=60.0)
    assert [(f.key, f.attempt, f.reason) for f in plan.record] == [(cid(0), 1, "JobLost")]
    assert (plan.create[0].cid, plan.create[0].attempt) == (cid(0), 2)

    # attempt 2 vanished too: maxAttemptsPerCoalition=2 -> failed for good, and maxFailedCoalitions=0 fails the run
    store = prepared(created={cid(0): {1: 100.0, 2: 200.0}}, failures={cid(0): {1: "JobLost"}})
    plan, _ = decide(RUN, [], store, ScriptedPlanner, now=1000.0, lost_after=60.0)
    assert [(f.attempt, f.reason) for f in plan.record] == [(2, "JobLost")]
    assert plan.phase == "Failed" and plan.reason == "CoalitionsFailed" and "JobLost" in plan.message
    assert all(r.attempt <= 2 for r in plan.create)

    # a finished coalition's old marker is not a lost Job
    plan, _ = decide(RUN, [], prepared([0], created=created), ScriptedPlanner, now=1000.0, lost_after=60.0)
    assert plan.record == []

    # prepare too
    plan, _ = decide(RUN, [], StoreView(created={"prepare": {1: 0.0}}), ScriptedPlanner, now=1000.0)
    assert [(f.key, f.reason) for f in plan.record] == [("prepare", "JobLost")]
    assert [(r.step, r.attempt) for r in plan.create] == [("prepare", 2)]


def test_a_job_the_api_server_refused_is_not_retried() -> None:
    plan, _ = decide(RUN, [], prepared(failures={cid(0): {1: "JobRejected"}}), ScriptedPlanner)
    assert plan.phase == "Failed" and plan.failed_for_good == [cid(0)] and "JobRejected" in plan.message
    plan, _ = decide(RUN, [], StoreView(failures={"prepare": {1: "JobRejected"}}), ScriptedPlanner)
    assert plan.phase == "Failed" and plan.reason == "PrepareFailed" and plan.create == []


def test_suspend_starts_nothing() -> None:
    run = _run()
    run = run.model_copy(update={"spec": run.spec.model_copy(update={"suspend": True})})
    plan, _ = decide(run, [], prepared(), ScriptedPlanner)
    assert plan.phase == "Suspended" and plan.create == []
    plan, _ = decide(run, [], StoreView(), ScriptedPlanner)
    assert plan.phase == "Suspended" and plan.create == []


def test_status_is_bounded_and_conditions_keep_transition_times() -> None:
    plan, planner = decide(RUN, [job(cid(3), 1, "Running")], prepared([0, 1, 2]), ScriptedPlanner)
    est = StatusEstimate([f"p{i}" for i in range(15)], [float(i) for i in range(15)], [0.1] * 15, 3, False, "budget")
    status = build_status(plan, est, {}, generation=1, results_uri="s3://b/r/results/", contributors=15,
                          now="2026-01-01T00:00:00Z")
    assert status["phase"] == "Evaluating" and status["progress"] == "3/8"
    assert len(status["top"]) == 10 and status["top"][0] == {"contributor": "p14", "value": 14.0, "stderr": 0.1}
    assert status["topContributor"] == "p14" and status["estimate"]["maxStderr"] == pytest.approx(0.1)
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Prepared"]["status"] == "True" and conds["Ready"]["status"] == "False"
    assert conds["Converged"]["status"] == "False"

    later = set_condition(status["conditions"], "Prepared", True, "PrepareSucceeded", "x", 1, "2026-02-02T00:00:00Z")
    assert {c["type"]: c for c in later}["Prepared"]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    flipped = set_condition(later, "Ready", True, "Succeeded", "done", 1, "2026-02-02T00:00:00Z")
    assert {c["type"]: c for c in flipped}["Ready"]["lastTransitionTime"] == "2026-02-02T00:00:00Z"

    plan.phase, plan.reason, plan.message = "Failed", "CoalitionsFailed", "coalition c1 failed"
    failed = build_status(plan, None, status, generation=2, results_uri="", contributors=15)
    conds = {c["type"]: c for c in failed["conditions"]}
    assert conds["Failed"]["status"] == "True" and conds["Failed"]["reason"] == "CoalitionsFailed"
    assert failed["completionTime"] and failed["startTime"] == "2026-01-01T00:00:00Z"


def _factory(run: Any, store: StoreView, cache: PlannerCache | None) -> Any:
    """What handlers pass to decide(): a fork of the kept planner (or, with no cache, a planner rebuilt)."""
    from datacredit.runstate import planner_for

    return (lambda k: cache.fork(run, store)) if cache is not None else (lambda k: planner_for(run, k))


@pytest.mark.parametrize("cached", [True, False], ids=["kept-planner", "rebuilt-planner"])
@pytest.mark.parametrize(("method", "budget", "parallelism"), [("exact", 16, 3), ("kernel", 12, 2), ("kernel", 40, 3)])
def test_simulated_run_matches_the_sequential_estimate(method: str, budget: int, parallelism: int,
                                                       cached: bool) -> None:
    """Ticks of decide() with Jobs finishing out of order give the estimate of a plain sequential walk."""
    from datacredit.runstate import planner_for

    n = 4
    contributors = [{"name": f"p{i}", "id": f"p{i}-0000", "images": 1} for i in range(n)]
    run = parse_manifest({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "sim"},
        "spec": {"dataset": {"images": "s3://b/d"}, "estimator": {"name": method, "budget": budget, "seed": 3},
                 "execution": {"parallelism": parallelism}, "storage": {"uri": "s3://b/runs"}},
    })
    weights = np.array([0.5, -0.2, 0.1, 0.3])

    def utility(members: tuple[int, ...]) -> float:
        return float(weights[list(members)].sum()) + 0.05 * len(members) ** 2

    store = StoreView(True, contributors, {})
    cache = PlannerCache() if cached else None
    running: list[JobView] = []
    rng = np.random.default_rng(0)
    created: list[str] = []
    for _ in range(200):
        plan, planner = decide(run, running, store, _factory(run, store, cache))
        if plan.done:
            break
        for r in plan.create:
            created.append(r.cid)
            members = ",".join(map(str, r.members))
            running.append(JobView(r.cid, "coalition", r.cid, r.attempt, "Running", members=members))
        if running:  # one random Job finishes per tick
            done = running.pop(int(rng.integers(len(running))))
            store.utilities[done.key] = utility(tuple(int(m) for m in done.members.split(",") if m))
    assert plan.done and planner is not None
    assert len(created) == len(set(created)), "a coalition was started twice"

    reference = planner_for(run, n)
    while len(batch := reference.ask(1)):
        reference.tell(batch[0], utility(tuple(int(i) for i in np.flatnonzero(batch[0]))))
    np.testing.assert_allclose(planner.estimate().values, reference.estimate().values, atol=1e-12)
    assert planner.estimate().n_evaluations == reference.estimate().n_evaluations


def test_jobs_of_coalitions_with_results_do_not_hold_the_run() -> None:
    jobs = [job(cid(6), 1, "Running"), job(cid(7), 1, "Queued")]
    plan, _ = decide(RUN, jobs, prepared(range(8)), ScriptedPlanner)
    assert plan.phase == "Succeeded" and plan.delete == []


@pytest.mark.parametrize("cached", [True, False], ids=["kept-planner", "rebuilt-planner"])
def test_a_coalition_failed_for_good_is_skipped_as_the_local_runner_does(cached: bool) -> None:
    """With a stopping rule, a coalition that failed for good must not hold (or end) the run: the operator skips
    it in the planner, and its walk gives the local runner's estimate, stop reason and number of evaluations."""
    from datacredit.runstate import planner_for

    n = 6
    contributors = [{"name": f"p{i}", "id": f"p{i}-0000", "images": 1} for i in range(n)]
    run = parse_manifest({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "skip"},
        "spec": {"dataset": {"images": "s3://b/d"},
                 "estimator": {"name": "kernel", "budget": 48, "seed": 1, "tolerance": 0.05},
                 "execution": {"parallelism": 2, "maxAttemptsPerCoalition": 1, "maxFailedCoalitions": 2},
                 "storage": {"uri": "s3://b/runs"}},
    })
    rng = np.random.default_rng(0)
    noise = {}

    def utility(members: tuple[int, ...]) -> float:
        noise.setdefault(members, float(rng.normal(0, 0.05)))
        return float(np.linspace(-0.5, 1, n)[list(members)].sum()) + noise[members]

    store = StoreView(True, contributors, {}, {})
    cache = PlannerCache() if cached else None
    running: list[JobView] = []
    doomed: tuple[int, ...] | None = None
    for _ in range(400):
        plan, planner = decide(run, running, store, _factory(run, store, cache))
        if cache is not None and planner is not None:
            cache.skip(plan.failed_for_good)  # as handlers do
        if plan.done:
            break
        for r in plan.create:
            running.append(JobView(r.cid, "coalition", r.cid, r.attempt, "Running",
                                   members=",".join(map(str, r.members))))
        if running:
            done = running.pop(0)
            members = tuple(int(m) for m in done.members.split(",") if m)
            if doomed is None and len(members) not in (0, n):  # the first proper coalition fails for good
                doomed = members
            if members == doomed:
                store.failures[done.key] = {1: "PodFailed"}
            else:
                store.utilities[done.key] = utility(members)
    assert plan.done and planner is not None and plan.counts.failed == 1 and doomed is not None

    reference = planner_for(run, n)  # the local runner's walk: tell in order, skip the failed coalition
    while len(batch := reference.ask(1)):
        members = tuple(int(i) for i in np.flatnonzero(batch[0]))
        if members == doomed:
            reference.skip(batch[0])
        else:
            reference.tell(batch[0], utility(members))
    ours, theirs = planner.estimate(), reference.estimate()
    assert ours.stop_reason == theirs.stop_reason != "running"
    assert ours.n_evaluations == theirs.n_evaluations and plan.counts.succeeded == len(store.utilities)
    np.testing.assert_allclose(ours.values, theirs.values, atol=1e-12)


def test_a_budget_too_small_for_the_contributors_fails_the_run_naming_the_field() -> None:
    from datacredit.runstate import planner_for

    small = parse_manifest({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "r"},
        "spec": {"dataset": {"images": "s3://b/d"}, "estimator": {"name": "exact", "budget": 4},
                 "storage": {"uri": "s3://b/runs"}},
    })
    plan, planner = decide(small, [], prepared(), lambda k: planner_for(small, k))
    assert plan.phase == "Failed" and plan.reason == "InvalidPlan" and planner is None and plan.create == []
    assert "spec.estimator" in plan.message and "2^3 = 8" in plan.message


def test_status_stays_small_with_very_long_contributor_names() -> None:
    import json

    names = ["studio " * 1500 + str(i) for i in range(15)]  # ~10 KB each, equal but for the end
    plan, _ = decide(RUN, [], prepared([0, 1, 2]), ScriptedPlanner)
    plan.phase, plan.reason, plan.message = "Failed", "CoalitionsFailed", "; ".join(names)
    est = StatusEstimate(names, [float(i) for i in range(15)], [0.1] * 15, 3, False, "budget")
    status = build_status(plan, est, {}, generation=1, results_uri="s3://b/r/results/", contributors=15,
                          now="2026-01-01T00:00:00Z")
    assert len(json.dumps(status).encode()) < 64 * 1024
    shown = [row["contributor"] for row in status["top"]]
    assert all(len(s) <= 63 for s in shown) and len(set(shown)) == len(shown) == 10
    assert status["topContributor"] == shown[0] and shown[0].startswith("studio studio")


def test_packed_jobs_count_coalitions_and_retry_only_the_missing_ones_alone() -> None:
    packed = _run(coalitionsPerJob=3)  # parallelism 2: up to 2 Jobs of 3 coalitions in flight
    ids = [cid(i, packed) for i in range(8)]
    plan, _ = decide(packed, [], prepared(), ScriptedPlanner)
    assert [[i.cid for i in r.items] for r in plan.create] == [ids[0:3], ids[3:6]]
    assert plan.counts.queued == 6 and all(r.key.startswith("b") for r in plan.create)
    first = plan.create[0]
    assert "--members" in worker_args(packed, "s3://b/runs/r", first)
    assert worker_args(packed, "s3://b/runs/r", first).count("--members") == 3

    def view(request: Any, state: str, reason: str = "") -> list[JobView]:
        return [JobView(f"r-{request.key}-a{request.attempt}", "coalition", i.cid, i.attempt, state, reason,
                        "boom" if reason else "", "", ",".join(map(str, i.members))) for i in request.items]

    # the first Job failed after storing coalition 1; the second runs: 0 and 2 are retried, each alone
    jobs = view(plan.create[0], "Failed", "PodFailed") + view(plan.create[1], "Running")
    store = StoreView(True, CONTRIBUTORS, {ids[1]: 1.0})
    again, _ = decide(packed, jobs, store, ScriptedPlanner)
    retried = [r for r in again.create if r.attempt == 2]
    assert sorted(r.cid for r in retried) == sorted([ids[0], ids[2]])  # one Job each
    assert [[i.cid for i in r.items] for r in again.create if r.attempt == 1] == [[ids[6]]]  # the free slot
    assert {f.key for f in again.record} == {ids[0], ids[2]}  # the stored one did not fail
    assert (again.counts.running, again.counts.succeeded) == (3, 1)

    # a packed Job created in an earlier pass but not in the index yet is asked for again under its own name
    created = {i.cid: {1: 100.0} for i in first.items}
    batches = {i.cid: {1: batch_annotation(first.items)} for i in first.items}
    plan2, _ = decide(packed, view(plan.create[1], "Running"), prepared(created=created, created_batches=batches),
                      ScriptedPlanner, now=110.0)
    assert plan2.create[0].key == first.key and plan2.create[0].items == first.items


def test_pack_size_follows_model_size_and_memory() -> None:
    prepared_result = {"paramsPruned": 20_000_000, "resolution": 32}
    small = coalitions_per_job(_run(), {"paramsPruned": 400_000, "resolution": 8}, quantity_bytes("32Gi"))
    big = coalitions_per_job(_run(), prepared_result, quantity_bytes("32Gi"))
    tight = coalitions_per_job(_run(), prepared_result, quantity_bytes("2Gi"))
    assert small == MAX_PACK and 1 <= tight < big <= MAX_PACK
    assert coalitions_per_job(_run(coalitionsPerJob=5), prepared_result, 1) == 5  # the manifest's wins
    assert coalitions_per_job(_run(), {}, quantity_bytes("32Gi")) == 1  # nothing known: no packing
    assert quantity_bytes("512Mi") == 512 * 2**20 and quantity_bytes("1e9") == 10**9
    with pytest.raises(ValueError, match="memory quantity"):
        quantity_bytes("lots")
