"""kopf wiring: a Job index and one reconcile timer per ValuationRun (the only writer of its status).

The timer gathers (spec, storage, observed Jobs), asks `reconcile.decide` what to do, does it, and writes the
status, Kubernetes Events and metrics. Everything it needs is rebuilt from storage and the Job index, so an
operator restart resumes a run without repeating finished coalitions or creating a Job twice.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import os
import threading
import time
from typing import Any

import kopf
import numpy as np
from kubernetes import client
from kubernetes.client.rest import ApiException

from datacredit import layout
from datacredit.crd import GROUP, PLURAL, VERSION
from datacredit.runloop import finish
from datacredit.runstate import open_run
from datacredit.spec import SpecError, ValuationRun, parse_manifest
from datacredit.storage import StorageError
from datacredit.vocabulary import TERMINAL_PHASES, Phase, RunFailure

from . import metrics
from .batch import LABEL_RUN_UID, PREPARE, JobRequest, Owner, batch_annotation, job_name, render_job
from .reconcile import LOST_AFTER_SECONDS, REJECTED, RUNNING, Decision, decide, job_views
from .runstore import RunMemory, ensure_run_json, read_store, record_created, record_failure
from .status import (
    StatusEstimate,
    build_status,
    estimate_of,
    failed_note,
    now_iso,
    payout_patch,
    set_condition,
    status_fidelity,
    status_payout,
)
from .waiting import WAITING_AFTER_SECONDS, Waiting, waiting_candidates, waiting_of

INTERVAL_ENV = "DATACREDIT_RECONCILE_INTERVAL"
RECONCILE_INTERVAL = float(os.environ.get(INTERVAL_ENV, "5"))
LOST_AFTER_ENV = "DATACREDIT_JOB_LOST_AFTER"  # seconds before an unseen, vanished Job counts as a failed attempt
LOST_AFTER = float(os.environ.get(LOST_AFTER_ENV, str(LOST_AFTER_SECONDS)))
WAITING_AFTER_ENV = "DATACREDIT_WAITING_AFTER"  # seconds a Job may sit without a running pod before it is named
WAITING_AFTER = float(os.environ.get(WAITING_AFTER_ENV, str(WAITING_AFTER_SECONDS)))

log = logging.getLogger("datacredit.operator")
_memory: dict[str, RunMemory] = {}
_memory_lock = threading.Lock()


def _remember(uid: str) -> RunMemory:
    with _memory_lock:
        return _memory.setdefault(uid, RunMemory())


@kopf.index("batch", "v1", "jobs", labels={LABEL_RUN_UID: kopf.PRESENT})
def jobs_by_run(body: kopf.Body, labels: kopf.Labels, **_: Any) -> dict[str, dict[str, Any]]:
    """Index the operator's Jobs by the uid of their ValuationRun (no handlers, no annotations on Jobs)."""
    meta = body.get("metadata", {})
    return {labels[LABEL_RUN_UID]: {
        "metadata": {k: meta.get(k) for k in ("name", "labels", "annotations", "creationTimestamp")},
        "spec": {"suspend": body.get("spec", {}).get("suspend", False)},
        "status": dict(body.get("status") or {}),
    }}


@kopf.timer(GROUP, VERSION, PLURAL, interval=RECONCILE_INTERVAL, initial_delay=0.5)
def reconcile_timer(body: kopf.Body, meta: kopf.Meta, status: kopf.Status, uid: str, name: str, namespace: str,
                    patch: kopf.Patch, jobs_by_run: kopf.Index, **_: Any) -> None:
    """One level-based reconcile pass of a ValuationRun."""
    started = time.monotonic()
    memory = _remember(uid)
    ok = True
    try:
        jobs = [v for j in jobs_by_run.get(uid, []) for v in job_views(j)]
        _reconcile(body, dict(meta), dict(status), uid, name, namespace, patch, jobs, memory)
        memory.last_error = ""
    except (StorageError, ApiException, OSError) as error:
        ok = False
        _report_error(body, status, patch, memory, meta.get("generation", 0), f"{type(error).__name__}: {error}")
    except Exception as error:  # a bug must not stop the other runs; it is logged, counted and shown
        ok = False
        log.exception("reconcile of %s/%s failed", namespace, name)
        _report_error(body, status, patch, memory, meta.get("generation", 0), f"{type(error).__name__}: {error}")
    finally:
        metrics.reconciled(ok, time.monotonic() - started)


def _not_retained(spec: kopf.Spec, **_: Any) -> bool:
    return (spec.get("storage") or {}).get("retain") is False


@kopf.on.delete(GROUP, VERSION, PLURAL, when=_not_retained)
def delete_storage(body: kopf.Body, uid: str, name: str, namespace: str, **_: Any) -> None:
    """spec.storage.retain: false: delete the run's folder. Not optional: kopf retries it on storage errors and
    holds the run's finalizer until it succeeds, also for a run deleted while the operator was down."""
    try:
        run = _parse(body, name, namespace)
    except SpecError as error:  # an invalid spec names no folder; keeping the finalizer would block deletion
        log.warning("%s/%s: storage not deleted, the spec is invalid: %s", namespace, name, error)
        return
    ref = open_run(run, uid, patience=0.0)
    deleted = ref.store.delete_all()  # a storage error is raised: kopf retries, the finalizer stays
    log.info("%s/%s: deleted %d object(s) of %s (storage.retain: false)", namespace, name, deleted, ref.uri)


@kopf.on.delete(GROUP, VERSION, PLURAL, optional=True)
def forget_run(uid: str, name: str, namespace: str, **_: Any) -> None:
    """Drop a deleted run's metric series and cache; its Jobs go with it (ownerReferences)."""
    metrics.forget_run(namespace, name)
    with _memory_lock:
        _memory.pop(uid, None)


def _report_error(body: kopf.Body, status: kopf.Status, patch: kopf.Patch, memory: RunMemory, generation: int,
                  message: str) -> None:
    """Show a (probably transient) reconcile error as Ready=False and one Event per distinct message."""
    if message != memory.last_error:
        kopf.warn(body, reason="ReconcileError", message=message[:1000])
        log.warning("%s: %s", body.get("metadata", {}).get("name"), message)
    memory.last_error = message
    conds = set_condition(list(status.get("conditions") or []), "Ready", False, "ReconcileError", message,
                          generation, now_iso())
    patch.status["conditions"] = conds


def _parse(body: kopf.Body, name: str, namespace: str) -> ValuationRun:
    return parse_manifest({"apiVersion": body.get("apiVersion"), "kind": body.get("kind"),
                           "metadata": {"name": name, "namespace": namespace}, "spec": dict(body.get("spec", {}))},
                          f"{namespace}/{name}")


def _reconcile(body: kopf.Body, meta: dict[str, Any], old: dict[str, Any], uid: str, name: str, namespace: str,
               patch: kopf.Patch, jobs: list[Any], memory: RunMemory) -> None:
    generation = int(meta.get("generation") or 0)
    if old.get("phase") in TERMINAL_PHASES and old.get("observedGeneration") == generation:
        metrics.observe_run(namespace, name, old, None)
        return
    try:
        run = _parse(body, name, namespace)
    except SpecError as error:
        plan = Decision(phase=Phase.FAILED, reason=RunFailure.INVALID_SPEC, message=str(error))
        _finish(body, patch, old, plan, None, generation, "", 0, namespace, name)
        return

    ref = open_run(run, uid, patience=0.0)  # an outage fails this pass at once (shown, retried next pass)
    results_uri = layout.join_uri(ref.uri, layout.RESULTS) + "/"
    ensure_run_json(ref.store, run, memory)
    view, fresh = read_store(ref.store, memory)  # after the Job snapshot: a Complete Job's result is visible
    plan, planner = decide(run, jobs, view, lambda n: memory.planners.fork(run, view), lost_after=LOST_AFTER)
    if planner is not None:
        memory.planners.skip(plan.failed_for_good)
    owner = Owner(name, namespace, uid)

    for failure in plan.record:
        if record_failure(ref.store, failure.key, failure.attempt, failure.reason, failure.message, failure.job):
            metrics.attempt(namespace, failure.reason)
            what = "prepare" if failure.key == PREPARE else f"coalition {failure.key}"
            kopf.warn(body, reason="AttemptFailed", message=f"{what} attempt {failure.attempt} failed "
                      f"({failure.reason}): {failure.message}"[:1000])
    for request in plan.create:
        _create_job(body, run, owner, ref, request, namespace)
    for job in plan.delete:
        _delete_job(job, namespace)
    for cid, result in fresh.items():
        metrics.completed(namespace, "succeeded", result.get("seconds"), result.get("deviceSeconds"), name)
        log.info("%s/%s: coalition %s done", namespace, name, cid)
    for key in plan.failed_for_good:
        if key not in memory.failed_counted:
            memory.failed_counted.add(key)
            metrics.completed(namespace, "failed")
    now = time.time()
    for job in jobs:
        if job.state == RUNNING and job.name not in memory.running_seen:
            memory.running_seen.add(job.name)
            if job.created:
                metrics.queue_wait(now - dt.datetime.fromisoformat(job.created).timestamp())

    names = [c["name"] for c in view.contributors]
    estimate = estimate_of(lambda: memory.planners.estimate(planner), names) if planner is not None else None
    fidelity = payout = None
    if plan.done and planner is not None:
        started = old.get("startTime")
        wall = now - dt.datetime.fromisoformat(started).timestamp() if started else 0.0
        try:
            doc = finish(ref.store, run, planner, view.contributors, view.utilities, view.replicates, wall)
            fidelity = status_fidelity(doc)
            payout = status_payout(doc.get("payout"))  # spec.payout, made by finish_run after the results
            for warning in doc.get("warnings", []):
                log.warning("%s/%s: %s", namespace, name, warning)
            _report_payout(body, payout, namespace, name)
            metrics.run_succeeded(namespace, name, now)
        except (ValueError, np.linalg.LinAlgError) as error:  # e.g. v(∅) failed for good: nothing to fit
            plan.phase, plan.reason, plan.done = Phase.FAILED, RunFailure.ESTIMATE_FAILED, False
            plan.message = f"cannot estimate Shapley values: {error}; {failed_note(plan)}"
    eta = _eta(plan, memory, run.spec.execution.parallelism)
    waiting = _waiting(body, run, jobs, uid, namespace, memory, now)
    _finish(body, patch, old, plan, estimate, generation, results_uri, len(view.contributors), namespace, name,
            eta, fidelity, payout, waiting)


def _waiting(body: kopf.Body, run: ValuationRun, jobs: list[Any], uid: str, namespace: str, memory: RunMemory,
             now: float) -> Waiting | None:
    """Why Jobs queued longer than WAITING_AFTER have no running pod; one Warning Event per new reason.

    Pods are only listed while some Job has waited that long, so a healthy run costs no extra API calls.
    """
    candidates = waiting_candidates(jobs, now, WAITING_AFTER)
    waiting = None
    if candidates:
        response = client.CoreV1Api().list_namespaced_pod(namespace, label_selector=f"{LABEL_RUN_UID}={uid}",
                                                          _preload_content=False)  # the API's own camelCase
        pods = json.loads(response.data)["items"]
        waiting = waiting_of(candidates, pods, run.spec.execution.service_account_name)
    message = waiting.message if waiting else ""
    if waiting is not None and message != memory.last_waiting:
        kopf.warn(body, reason="Waiting", message=message[:1000])
        log.warning("%s: %s", body.get("metadata", {}).get("name"), message)
    memory.last_waiting = message
    return waiting


def _report_payout(body: kopf.Body, payout: dict[str, Any] | None, namespace: str, name: str) -> None:
    """An Event for the payout spec.payout asked for: PaidOut, or PayoutFailed (the run still succeeds)."""
    if payout is None:
        return
    if "error" in payout:
        log.warning("%s/%s: payout failed: %s", namespace, name, payout["error"])
        kopf.warn(body, reason="PayoutFailed", message=f"no payout made (the values are kept): "
                  f"{payout['error']}"[:1000])
    else:
        kopf.info(body, reason="PaidOut", message=f"{payout['total']} {payout['currency']} by {payout['rule']}: "
                  f"payouts/{payout['period']}.json"[:1000])


def _eta(plan: Decision, memory: RunMemory, parallelism: int) -> float | None:
    if plan.phase in TERMINAL_PHASES:
        return 0.0
    if not memory.coalition_seconds:
        return None
    c = plan.counts
    remaining = max(c.planned - c.succeeded - c.failed, 0)
    mean = sum(memory.coalition_seconds) / len(memory.coalition_seconds)
    return remaining * mean / max(min(parallelism, remaining), 1)


def _finish(body: kopf.Body, patch: kopf.Patch, old: dict[str, Any], plan: Decision, estimate: StatusEstimate | None,
            generation: int, results_uri: str, contributors: int, namespace: str, name: str,
            eta: float | None = None, fidelity: dict[str, Any] | None = None,
            payout: dict[str, Any] | None = None, waiting: Waiting | None = None) -> None:
    status = build_status(plan, estimate, old, generation=generation, results_uri=results_uri,
                          contributors=contributors, fidelity=fidelity, payout=payout, waiting=waiting)
    patch.status.update(status)
    if payout is not None:  # the status is merge-patched: clear what an earlier payout left
        patch.status["payout"] = payout_patch(payout)
    if old.get("phase") != plan.phase:
        message = plan.message or f"{status['progress']} coalitions evaluated"
        if plan.phase == Phase.FAILED:
            kopf.warn(body, reason="Failed", message=message[:1000])
        elif plan.phase == Phase.SUCCEEDED:
            top = status.get("topContributor", "")
            kopf.info(body, reason="Succeeded", message=f"{message}; top contributor {top}; {results_uri}")
        else:
            kopf.info(body, reason=plan.phase, message=f"phase {old.get('phase', '-')} -> {plan.phase}")
        log.info("%s/%s: phase %s -> %s%s", namespace, name, old.get("phase", "-"), plan.phase,
                 f": {plan.message}" if plan.message else "")
    metrics.observe_run(namespace, name, status, eta)


def _create_job(body: kopf.Body, run: ValuationRun, owner: Owner, ref: Any, request: JobRequest,
                namespace: str) -> None:
    """Create the Job of an attempt; its created marker goes to storage first (attempts are counted from there).

    A Job the API server refuses as invalid (400/422: a bad node selector, toleration or Secret name) is
    recorded as a failed attempt that is not retried, so the run fails naming the server's message instead of
    trying again every pass. Other errors (quota, throttling, outages) are raised: shown and retried.
    """
    manifest = render_job(run, owner, ref.uri, request)
    name = job_name(owner, request.key, request.attempt)
    keys = [(item.cid, item.attempt) for item in request.items] or [(request.key, request.attempt)]
    batch = batch_annotation(request.batch) if request.batch else ""
    for key, attempt in keys:  # attempts are per coalition, also in a packed Job
        record_created(ref.store, key, attempt, name, batch)
    try:
        client.BatchV1Api().create_namespaced_job(namespace, manifest)
    except ApiException as error:
        if error.status == 409:  # created by an earlier pass; the index has not caught up yet
            return
        if error.status in (400, 422):
            message = f"the API server refused Job {name}: {_api_message(error)}; fix spec.execution and apply again"
            if any([record_failure(ref.store, key, attempt, REJECTED, message, name) for key, attempt in keys]):
                metrics.attempt(namespace, REJECTED)
                kopf.warn(body, reason="JobRejected", message=message[:1000])
            return
        raise
    metrics.attempt(namespace, "Started")
    if request.attempt > 1:
        metrics.attempt(namespace, "Retried")
    if request.step == PREPARE:
        kopf.info(body, reason="PrepareStarted", message=f"Job {name} (attempt {request.attempt})")
    elif request.attempt > 1:
        kopf.info(body, reason="CoalitionRetried", message=f"Job {name}: coalition {request.cid} attempt "
                  f"{request.attempt}")
    log.info("%s: created Job %s (%d coalition(s))", owner.name, name, len(request.items))


def _api_message(error: ApiException) -> str:
    """The `message` of a Kubernetes Status in an ApiException's body, or its reason."""
    try:
        return str(json.loads(error.body or "{}").get("message") or error.reason)
    except ValueError:
        return str(error.reason)


def _delete_job(name: str, namespace: str) -> None:
    try:
        client.BatchV1Api().delete_namespaced_job(name, namespace, propagation_policy="Background")
    except ApiException as error:
        if error.status != 404:
            raise
