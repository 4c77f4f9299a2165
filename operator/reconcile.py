"""The reconcile decision, as pure functions: (spec, planner, storage view, observed Jobs) -> what to do.

Nothing here talks to Kubernetes or storage; `handlers` gathers the inputs and carries out the `Decision`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from datacredit.ids import coalition_id
from datacredit.packing import batches, coalitions_per_job
from datacredit.runloop import AskTell, Coalition, Missing, walk
from datacredit.spec import ValuationRun
from datacredit.vocabulary import ACTIVE_STATES as ACTIVE
from datacredit.vocabulary import NOT_RETRIED, AttemptFailure, JobState, Phase, RunFailure

from .batch import (
    ANNOTATION_BATCH,
    ANNOTATION_MEMBERS,
    COALITION,
    EXIT_STORAGE,
    LABEL_ATTEMPT,
    LABEL_COALITION,
    LABEL_STEP,
    PREPARE,
    BatchItem,
    JobRequest,
    coalition_request,
    parse_batch,
    quantity_bytes,
)

QUEUED, RUNNING, SUCCEEDED, FAILED = JobState
BAD_INPUT, DEADLINE, POD_FAILED = AttemptFailure.BAD_INPUT, AttemptFailure.DEADLINE, AttemptFailure.POD_FAILED
NO_RESULT, LOST, REJECTED, STORAGE = (AttemptFailure.NO_RESULT, AttemptFailure.LOST, AttemptFailure.REJECTED,
                                      AttemptFailure.STORAGE)
LOST_AFTER_SECONDS = 120.0  # a created Job absent this long after its created marker was written is lost


@dataclass(frozen=True)
class JobView:
    """One of the run's Jobs, reduced to what decisions need."""

    name: str
    step: str
    key: str  # "prepare" or the coalition id
    attempt: int
    state: str  # Queued | Running | Succeeded | Failed
    reason: str = ""  # for Failed: BadInput | DeadlineExceeded | PodFailed
    message: str = ""
    created: str = ""
    members: str = ""
    suspended: bool = False  # spec.suspend: Kueue has not admitted it (queued on purpose)


def _failure_reason(reason: str, message: str) -> str:
    if reason == "PodFailurePolicy":  # "... failed with exit code 4 matching FailJob rule at index 2"
        return STORAGE if f"exit code {EXIT_STORAGE} " in message else BAD_INPUT
    return DEADLINE if reason == "DeadlineExceeded" else POD_FAILED


def job_state(job: Mapping[str, Any]) -> tuple[str, str, str]:
    """(state, failure reason, message) of a batch/v1 Job; a Job suspended (again) by Kueue is Queued."""
    status = job.get("status") or {}
    true = {c.get("type"): c for c in status.get("conditions") or [] if c.get("status") == "True"}
    if "Complete" in true or "SuccessCriteriaMet" in true:
        return SUCCEEDED, "", ""
    failed = true.get("Failed") or true.get("FailureTarget")
    if failed is not None:
        return FAILED, _failure_reason(failed.get("reason", ""), failed.get("message", "")), failed.get("message", "")
    if (job.get("spec") or {}).get("suspend"):
        return QUEUED, "", ""
    running = status.get("ready") if "ready" in status else status.get("active")
    return (RUNNING if running else QUEUED), "", ""


def job_views(job: Mapping[str, Any]) -> list[JobView]:
    """The JobViews of one of our Jobs: one per coalition it evaluates (a packed Job has several; they share its
    state), one for prepare, none for a Job without our labels."""
    meta = job.get("metadata") or {}
    lab = meta.get("labels") or {}
    annotations = meta.get("annotations") or {}
    step = lab.get(LABEL_STEP)
    if step not in (PREPARE, COALITION):
        return []
    try:
        attempt = int(lab.get(LABEL_ATTEMPT, "1"))
    except ValueError:
        return []
    state, reason, message = job_state(job)
    name, created = meta.get("name", ""), meta.get("creationTimestamp", "")
    suspended = bool((job.get("spec") or {}).get("suspend"))
    if step == COALITION and ANNOTATION_BATCH in annotations:
        return [JobView(name, step, i.cid, i.attempt, state, reason, message, created,
                        ",".join(map(str, i.members)), suspended) for i in parse_batch(annotations[ANNOTATION_BATCH])]
    key = PREPARE if step == PREPARE else lab.get(LABEL_COALITION, "")
    return [JobView(name, step, key, attempt, state, reason, message, created, annotations.get(ANNOTATION_MEMBERS, ""),
                    suspended)]


@dataclass
class StoreView:
    """What storage says about the run."""

    prepared: bool = False
    contributors: list[dict[str, Any]] = field(default_factory=list)
    utilities: dict[str, float] = field(default_factory=dict)  # coalition id -> utility
    failures: dict[str, dict[int, str]] = field(default_factory=dict)  # key -> {attempt: reason}
    replicates: dict[str, list[float]] = field(default_factory=dict)  # coalition id -> replicate-seed utilities
    created: dict[str, dict[int, float]] = field(default_factory=dict)  # key -> {attempt: when its Job was created}
    messages: dict[str, dict[int, str]] = field(default_factory=dict)  # key -> {attempt: failure message}
    created_batches: dict[str, dict[int, str]] = field(default_factory=dict)  # coalition -> {attempt: its batch}
    prepare_result: dict[str, Any] = field(default_factory=dict)  # prepare/result.json: sizes packs


@dataclass(frozen=True)
class Failure:
    """A failed attempt the operator has not recorded in storage yet."""

    key: str
    attempt: int
    reason: str
    message: str
    job: str


@dataclass
class Counts:
    """Coalition counts for the status and metrics."""

    planned: int = 0
    succeeded: int = 0
    running: int = 0
    queued: int = 0
    failed: int = 0
    failed_attempts: int = 0


@dataclass
class Decision:
    """The outcome of one reconcile: the phase and what to change."""

    phase: str
    create: list[JobRequest] = field(default_factory=list)
    delete: list[str] = field(default_factory=list)
    record: list[Failure] = field(default_factory=list)
    counts: Counts = field(default_factory=Counts)
    failed_for_good: list[str] = field(default_factory=list)  # keys, in planner order
    failure_messages: dict[str, str] = field(default_factory=dict)  # key -> last failure
    reason: str = ""
    message: str = ""
    done: bool = False  # every coalition the planner wants is evaluated (or failed for good)


@dataclass
class _Attempts:
    """Attempts of one key (prepare or a coalition), from Jobs and failure markers."""

    latest: int = 0
    active: JobView | None = None
    failed: dict[int, tuple[str, str]] = field(default_factory=dict)  # attempt -> (reason, message)


def _attempts(jobs: Iterable[JobView], store: StoreView, results: set[str], now: float, lost_after: float) -> tuple[
        dict[str, _Attempts], list[Failure]]:
    """Attempts per key, counted from storage (created and failure markers) and the Jobs still there.

    Storage is what bounds retries: a Job deleted before a pass saw how it ended (TTL 0, an operator down
    longer than the TTL) still counts as an attempt, so it is never recreated as the same attempt forever.
    """
    per: dict[str, _Attempts] = {}
    for key, marks in store.failures.items():
        a = per.setdefault(key, _Attempts())
        for attempt, reason in marks.items():
            a.failed[attempt] = (reason, store.messages.get(key, {}).get(attempt, ""))
            a.latest = max(a.latest, attempt)
    for key, created in store.created.items():
        a = per.setdefault(key, _Attempts())
        a.latest = max(a.latest, *created)
    new: list[Failure] = []
    jobs = list(jobs)
    seen = {(job.key, job.attempt) for job in jobs}
    for key, created in store.created.items():
        a = per[key]
        attempt = a.latest
        done_ok = key in results or (key == PREPARE and store.prepared)
        if (attempt in created and (key, attempt) not in seen and attempt not in a.failed and not done_ok
                and now - created[attempt] > lost_after):
            message = (f"the Job of attempt {attempt} is gone (deleted, or removed by its TTL) and no pass saw how "
                       "it ended")
            a.failed[attempt] = (LOST, message)
            new.append(Failure(key, attempt, LOST, message, ""))
    for job in jobs:
        a = per.setdefault(job.key, _Attempts())
        a.latest = max(a.latest, job.attempt)
        if job.state in ACTIVE:
            a.active = job
        done_ok = job.key in results or (job.key == PREPARE and store.prepared)
        if job.state == SUCCEEDED and not done_ok:
            job = JobView(job.name, job.step, job.key, job.attempt, FAILED, NO_RESULT,
                          "the Job completed but wrote no result.json", job.created, job.members)
        if job.state == FAILED and not done_ok:
            recorded = job.attempt in store.failures.get(job.key, {})
            a.failed[job.attempt] = (a.failed.get(job.attempt, (job.reason, ""))[0], job.message)
            if not recorded:
                new.append(Failure(job.key, job.attempt, job.reason, job.message, job.name))
    return per, new


def _next_step(a: _Attempts | None, max_attempts: int) -> tuple[Missing, int]:
    """("active"|"start"|"failed", attempt) for a key that has no result yet."""
    if a is None or a.latest == 0:
        return "start", 1
    if a.active is not None and a.active.attempt == a.latest:
        return "active", a.latest
    if a.latest in a.failed:
        reason = a.failed[a.latest][0]
        if reason in NOT_RETRIED or a.latest >= max_attempts:
            return "failed", a.latest
        return "start", a.latest + 1
    return "start", a.latest  # created, not seen yet (or before created markers): (re)create it, a 409 is fine


def _describe(key: str, a: _Attempts | None, names: str | None = None) -> str:
    """`prepare` or `coalition <id> {members}`, with how often and why it failed."""
    who = key if names is None else f"coalition {key} {{{names}}}"
    if a is None or not a.failed:
        return who
    reason, message = a.failed[max(a.failed)]
    return f"{who} failed {len(a.failed)} time(s), last: {reason}{': ' + message if message else ''}"


def coalition_jobs(start: list[Coalition], attempts: Mapping[str, int],
                   created_batches: Mapping[str, Mapping[int, str]], pack: int) -> list[JobRequest]:
    """The Jobs of the coalitions to start. One whose attempt was created in a packed Job that no pass has seen
    yet is asked for in that same Job again (its name, so a 409 if it exists); a retry runs alone (a coalition
    that breaks its pack then fails alone); the rest go in batches of up to ``pack``, in plan order."""
    again: dict[str, list[BatchItem]] = {}
    retries: list[list[BatchItem]] = []
    fresh: list[BatchItem] = []
    for c in start:
        item = BatchItem(c.id, c.members, attempts[c.id])
        recorded = created_batches.get(c.id, {}).get(item.attempt)
        if recorded:
            again[recorded] = parse_batch(recorded)
        elif item.attempt > 1:
            retries.append([item])
        else:
            fresh.append(item)
    return [coalition_request(items) for items in (*again.values(), *retries, *batches(fresh, pack))]


def decide(
    run: ValuationRun,
    jobs: list[JobView],
    store: StoreView,
    planner_factory: Callable[[int], AskTell],
    now: float | None = None,
    lost_after: float = LOST_AFTER_SECONDS,
) -> tuple[Decision, AskTell | None]:
    """Desired state: which Jobs to start or stop, which failures to record, and the run's phase.

    Walks the planner's sequence exactly as the local executor does: finished coalitions are told in
    sequence order, at most `parallelism` coalitions are in flight, failed ones are retried up to
    `maxAttemptsPerCoalition` times, and the run ends when the planner asks for nothing more. A Job created
    more than `lost_after` seconds before `now` that is neither observed nor finished counts as a failed attempt.
    """
    ex = run.spec.execution
    suspended = run.spec.suspend
    now = time.time() if now is None else now
    per, new_failures = _attempts(jobs, store, set(store.utilities), now, lost_after)
    plan = Decision(phase=Phase.PENDING, record=new_failures)
    plan.counts.failed_attempts = sum(len(a.failed) for k, a in per.items() if k != PREPARE)

    if not store.prepared:
        step, attempt = _next_step(per.get(PREPARE), ex.max_attempts_per_coalition)
        if step == "failed":
            plan.phase, plan.reason = Phase.FAILED, RunFailure.PREPARE_FAILED
            plan.message = f"the prepare step failed for good: {_describe(PREPARE, per.get(PREPARE))}"
            plan.failed_for_good = [PREPARE]
        elif suspended:
            plan.phase = Phase.SUSPENDED
        else:
            plan.phase = Phase.PREPARING
            if step == "start":
                plan.create.append(JobRequest(PREPARE, attempt))
        return plan, None

    contributors = store.contributors
    ids = [c["id"] for c in contributors]
    names = [c["name"] for c in contributors]
    try:
        planner = planner_factory(len(ids))
    except ValueError as e:  # a budget too small for this many contributors: known only after prepare
        plan.phase, plan.reason = Phase.FAILED, RunFailure.INVALID_PLAN
        plan.message = f"spec.estimator cannot plan {len(ids)} contributors: {e}; fix the estimator and apply again"
        return plan, None
    plan.counts.planned = len(getattr(planner, "sequence", ())) or run.spec.estimator.budget

    def failed_for_good(cid: str, members: tuple[int, ...]) -> None:
        plan.failed_for_good.append(cid)
        plan.failure_messages[cid] = _describe(cid, per.get(cid), ", ".join(names[i] for i in members))

    for coal in planner.skipped:  # skipped in an earlier pass (a kept planner): the walk will not meet them
        members = tuple(int(i) for i in np.flatnonzero(coal))
        failed_for_good(coalition_id([ids[i] for i in members], run.config_hash()), members)

    next_attempt: dict[str, int] = {}

    def missing(coalition: Coalition) -> Missing:
        step, attempt = _next_step(per.get(coalition.id), ex.max_attempts_per_coalition)
        if step == "failed":
            failed_for_good(coalition.id, coalition.members)
        next_attempt[coalition.id] = attempt
        return step

    def stored(cid: str) -> tuple[float, Any] | None:
        return (store.utilities[cid], store.replicates.get(cid, ())) if cid in store.utilities else None

    pack = coalitions_per_job(run, store.prepare_result, quantity_bytes(ex.resources.memory))
    walked = walk(planner, ids, run.config_hash(), ex.parallelism * pack, stored, missing)
    if not suspended:
        plan.create += coalition_jobs(walked.start, next_attempt, store.created_batches, pack)
    exhausted = walked.exhausted

    # a Job whose coalition has its result already (a pod slow to exit) does not hold the run
    active = [j for j in jobs if j.step == COALITION and j.state in ACTIVE and j.key not in store.utilities]
    plan.counts.succeeded = len(store.utilities)
    plan.counts.running = sum(j.state == RUNNING for j in active)
    plan.counts.queued = sum(j.state == QUEUED for j in active) + sum(len(r.items) for r in plan.create)
    plan.counts.failed = len(plan.failed_for_good)

    if len(plan.failed_for_good) > ex.max_failed_coalitions:
        plan.phase, plan.reason = Phase.FAILED, RunFailure.COALITIONS_FAILED
        listed = "; ".join(plan.failure_messages[c] for c in plan.failed_for_good[:5])
        more = f" (and {len(plan.failed_for_good) - 5} more)" if len(plan.failed_for_good) > 5 else ""
        plan.message = (f"{len(plan.failed_for_good)} coalition(s) failed after up to "
                        f"{ex.max_attempts_per_coalition} attempt(s), more than execution.maxFailedCoalitions="
                        f"{ex.max_failed_coalitions}: {listed}{more}")
        plan.create = []
        plan.delete = sorted({j.name for j in active})
        return plan, planner
    if exhausted and not active and not plan.create:
        plan.phase, plan.done = Phase.SUCCEEDED, True
        return plan, planner
    plan.phase = Phase.SUSPENDED if suspended else Phase.EVALUATING
    return plan, planner
