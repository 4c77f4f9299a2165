"""Prometheus metrics of the operator, on a port of their own. Names are a contract with the dashboards."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector, start_http_server

from datacredit import __version__
from datacredit.vocabulary import AttemptFailure, JobState, Phase

REGISTRY = CollectorRegistry()
ProcessCollector(registry=REGISTRY)  # process_resident_memory_bytes, process_cpu_seconds_total
COALITION_PHASES = ("Planned", *(str(s) for s in JobState))
RUN_PHASES = tuple(str(p) for p in Phase)
ATTEMPT_REASONS = ("Started", "Retried", *(str(f) for f in AttemptFailure))  # the attempts counter's `reason`
STAGES = ("finetune", "sample", "property", "total")
_SECONDS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400, 28800)

BUILD_INFO = Gauge("datacredit_build_info", "Operator build; the value is always 1.", ["version"], registry=REGISTRY)
RUNS = Gauge("datacredit_runs", "ValuationRuns by phase.", ["namespace", "phase"], registry=REGISTRY)
COALITIONS = Gauge("datacredit_coalitions", "Coalitions of a run by phase.", ["namespace", "name", "phase"],
                   registry=REGISTRY)
PROGRESS = Gauge("datacredit_run_progress_ratio", "Evaluated / planned coalitions.", ["namespace", "name"],
                 registry=REGISTRY)
ETA = Gauge("datacredit_run_eta_seconds", "Estimated seconds until the planned coalitions are evaluated.",
            ["namespace", "name"], registry=REGISTRY)
TOP_VALUE = Gauge("datacredit_run_top_value", "Shapley value of the top contributors (rank 1 = highest).",
                  ["namespace", "name", "rank", "contributor"], registry=REGISTRY)
MAX_STDERR = Gauge("datacredit_run_max_stderr", "Largest standard error of the current estimate.",
                   ["namespace", "name"], registry=REGISTRY)
ATTEMPTS = Counter("datacredit_coalition_attempts", "Worker Job attempts started and failed, by reason "
                   f"({'|'.join(ATTEMPT_REASONS)}).", ["namespace", "reason"], registry=REGISTRY)
COMPLETED = Counter("datacredit_coalitions_completed", "Coalitions finished, by result (succeeded|failed).",
                    ["namespace", "result"], registry=REGISTRY)
DURATION = Histogram("datacredit_coalition_duration_seconds", "Seconds per coalition stage, from result.json.",
                     ["stage"], buckets=_SECONDS, registry=REGISTRY)
DEVICE_SECONDS = Counter("datacredit_run_device_seconds", "Device seconds the run's coalitions took (result.json "
                         "deviceSeconds: a packed Job's time shared among its coalitions); divide by contributors "
                         "for the cost per contributor.", ["namespace", "name"], registry=REGISTRY)
QUEUE_WAIT = Histogram("datacredit_coalition_queue_wait_seconds", "Seconds from Job creation to a running pod.",
                       buckets=_SECONDS, registry=REGISTRY)
LAST_SUCCESS = Gauge("datacredit_run_last_success_timestamp_seconds", "When the run succeeded (Unix time).",
                     ["namespace", "name"], registry=REGISTRY)
RECONCILES = Counter("datacredit_reconcile", "Reconcile passes by result (success|error).", ["result"],
                     registry=REGISTRY)
for _result in ("success", "error"):  # both series exist from the start: "no errors" reads 0, not "no data"
    RECONCILES.labels(_result)
RECONCILE_SECONDS = Histogram("datacredit_reconcile_duration_seconds", "Seconds per reconcile pass.",
                              registry=REGISTRY)

_lock = threading.Lock()
_run_phase: dict[tuple[str, str], str] = {}  # (namespace, name) -> phase
_top_labels: dict[tuple[str, str], set[tuple[str, str]]] = {}  # (namespace, name) -> {(rank, contributor)}


def start(port: int) -> None:
    """Serve /metrics on `port` (0: off) and set the build info."""
    BUILD_INFO.labels(version=__version__).set(1)
    if port:
        start_http_server(port, registry=REGISTRY)


def _publish_run_phases(*also: str) -> None:
    counts: dict[tuple[str, str], int] = {}
    namespaces = {ns for ns, _ in _run_phase} | set(also)
    for (ns, _), phase in _run_phase.items():
        counts[(ns, phase)] = counts.get((ns, phase), 0) + 1
    for ns in namespaces:
        for phase in RUN_PHASES:
            RUNS.labels(namespace=ns, phase=phase).set(counts.get((ns, phase), 0))


def observe_run(namespace: str, name: str, status: Mapping[str, Any], eta_seconds: float | None) -> None:
    """Set a run's gauges from its status."""
    key = (namespace, name)
    counts = status.get("coalitions") or {}
    planned = int(counts.get("planned", 0))
    done = {p: int(counts.get(p.lower(), 0)) for p in ("Queued", "Running", "Succeeded", "Failed")}
    with _lock:
        _run_phase[key] = status.get("phase", "Pending")
        _publish_run_phases()
        for phase, n in done.items():
            COALITIONS.labels(namespace, name, phase).set(n)
        COALITIONS.labels(namespace, name, "Planned").set(max(planned - sum(done.values()), 0))
        if planned:
            PROGRESS.labels(namespace, name).set((done["Succeeded"] + done["Failed"]) / planned)
        if eta_seconds is not None and math.isfinite(eta_seconds):
            ETA.labels(namespace, name).set(eta_seconds)
        est = status.get("estimate") or {}
        if "maxStderr" in est:
            MAX_STDERR.labels(namespace, name).set(float(est["maxStderr"]))
        labels = {(str(rank), row["contributor"]) for rank, row in enumerate(status.get("top") or [], start=1)}
        for stale in _top_labels.get(key, set()) - labels:
            TOP_VALUE.remove(namespace, name, *stale)
        for rank, row in enumerate(status.get("top") or [], start=1):
            TOP_VALUE.labels(namespace, name, str(rank), row["contributor"]).set(float(row["value"]))
        _top_labels[key] = labels


def run_succeeded(namespace: str, name: str, timestamp: float) -> None:
    """Record the time of a run's success."""
    LAST_SUCCESS.labels(namespace, name).set(timestamp)


def forget_run(namespace: str, name: str) -> None:
    """Remove every series of a deleted run."""
    key = (namespace, name)
    with _lock:
        _run_phase.pop(key, None)
        _publish_run_phases(namespace)
        for phase in COALITION_PHASES:
            _remove(COALITIONS, namespace, name, phase)
        for gauge in (PROGRESS, ETA, MAX_STDERR, LAST_SUCCESS, DEVICE_SECONDS):
            _remove(gauge, namespace, name)
        for labels in _top_labels.pop(key, set()):
            _remove(TOP_VALUE, namespace, name, *labels)


def _remove(metric: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        metric.remove(*labels)


def attempt(namespace: str, reason: str) -> None:
    """Count a Job attempt event; `reason` is one of :data:`ATTEMPT_REASONS`."""
    ATTEMPTS.labels(namespace, reason).inc()


def completed(namespace: str, result: str, seconds: Mapping[str, float] | None = None,
              device_seconds: float | None = None, name: str = "") -> None:
    """Count a finished coalition; observe its stage durations and add its device seconds (result.json)."""
    COMPLETED.labels(namespace, result).inc()
    for stage in STAGES:
        if seconds and stage in seconds:
            DURATION.labels(stage).observe(float(seconds[stage]))
    if device_seconds is not None and name:
        DEVICE_SECONDS.labels(namespace, name).inc(float(device_seconds))


def queue_wait(seconds: float) -> None:
    """Observe how long a Job waited for a running pod."""
    QUEUE_WAIT.observe(max(seconds, 0.0))


def reconciled(ok: bool, seconds: float) -> None:
    """Count a reconcile pass."""
    RECONCILES.labels("success" if ok else "error").inc()
    RECONCILE_SECONDS.observe(seconds)
