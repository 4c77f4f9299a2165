"""What the operator reads from and writes to a run's storage, cached per run (results never change)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from datacredit import layout
from datacredit.runloop import write_run_json
from datacredit.runstate import replicate_utilities
from datacredit.spec import ValuationRun
from datacredit.storage import Storage, read_json, write_json

from .planners import PlannerCache
from .reconcile import POD_FAILED, StoreView


def failure_key(key: str, attempt: int) -> str:
    """Where the operator records that an attempt failed (survives Job TTL deletion and restarts)."""
    return layout.attempt_marker(key, attempt, layout.FAILED_MARKER)


def created_key(key: str, attempt: int) -> str:
    """Where the operator records that it created the Job of an attempt: attempts are counted from storage."""
    return layout.attempt_marker(key, attempt, layout.CREATED_MARKER)


@dataclass
class RunMemory:
    """Per-run cache of immutable storage facts and of what metrics were already counted."""

    run_json_written: bool = False
    listed_once: bool = False
    prepared: bool = False
    contributors: list[dict[str, Any]] = field(default_factory=list)
    utilities: dict[str, float] = field(default_factory=dict)
    replicates: dict[str, list[float]] = field(default_factory=dict)
    failures: dict[str, dict[int, str]] = field(default_factory=dict)
    created: dict[str, dict[int, float]] = field(default_factory=dict)
    created_batches: dict[str, dict[int, str]] = field(default_factory=dict)  # coalition -> {attempt: its batch}
    messages: dict[str, dict[int, str]] = field(default_factory=dict)
    prepare_result: dict[str, Any] = field(default_factory=dict)
    coalition_seconds: list[float] = field(default_factory=list)
    running_seen: set[str] = field(default_factory=set)
    failed_counted: set[str] = field(default_factory=set)
    last_error: str = ""
    last_waiting: str = ""
    planners: PlannerCache = field(default_factory=PlannerCache)


def ensure_run_json(store: Storage, run: ValuationRun, memory: RunMemory) -> None:
    """Write run.json (the spec snapshot the workers read) once."""
    if not memory.run_json_written:
        write_run_json(store, run)
        memory.run_json_written = True


def _parse_markers(store: Storage, keys: list[str], memory: RunMemory, finished: set[str]) -> None:
    """Failure and created markers among `keys` not parsed before (markers are written once, never changed);
    the created markers of `finished` keys are not read (one GET per coalition after a restart, for nothing)."""
    for k in keys:
        marker = layout.parse_attempt_marker(k)
        if marker is None:
            continue
        owner, attempt, name = marker
        table: dict[str, dict[int, Any]] = memory.failures if name == layout.FAILED_MARKER else memory.created
        if attempt in table.get(owner, {}):
            continue
        if name == layout.CREATED_MARKER and owner in finished:  # its time only matters while there is no result
            memory.created.setdefault(owner, {})[attempt] = 0.0
            continue
        try:
            doc = read_json(store, k)
        except (FileNotFoundError, ValueError):
            doc = {}
        if name == layout.FAILED_MARKER:
            memory.failures.setdefault(owner, {})[attempt] = str(doc.get("reason", POD_FAILED))
            memory.messages.setdefault(owner, {})[attempt] = str(doc.get("message", ""))[:2000]
        else:
            memory.created.setdefault(owner, {})[attempt] = float(doc.get("time", 0.0))
            if doc.get("batch"):
                memory.created_batches.setdefault(owner, {})[attempt] = str(doc["batch"])


def read_store(store: Storage, memory: RunMemory) -> tuple[StoreView, dict[str, dict[str, Any]]]:
    """The StoreView of a run, and the results (result.json) that appeared since the last call."""
    if not memory.prepared:
        keys = store.list(layout.PREPARE_STEP)
        finished = {layout.PREPARE_STEP} if layout.PREPARE_RESULT in keys else set()
        _parse_markers(store, keys, memory, finished)
        if store.exists(layout.PREPARE_RESULT):
            memory.contributors = read_json(store, layout.MANIFEST)["contributors"]
            memory.prepare_result = read_json(store, layout.PREPARE_RESULT)
            memory.prepared = True
    fresh: dict[str, dict[str, Any]] = {}
    if memory.prepared:
        keys = store.list("coalitions")
        results = {cid: k for k in keys if (cid := layout.parse_coalition_result(k)) is not None}
        _parse_markers(store, keys, memory, set(results))
        for cid, k in results.items():
            if cid not in memory.utilities:
                doc = read_json(store, k)
                memory.utilities[cid] = float(doc["utility"])
                if replicate_utilities(doc):
                    memory.replicates[cid] = replicate_utilities(doc)
                seconds = doc.get("seconds") or {}
                if "total" in seconds:
                    memory.coalition_seconds.append(float(seconds["total"]))
                if memory.listed_once:
                    fresh[cid] = doc
        memory.listed_once = True
    view = StoreView(memory.prepared, memory.contributors, dict(memory.utilities),
                     replicates=dict(memory.replicates), failures={k: dict(v) for k, v in memory.failures.items()},
                     created={k: dict(v) for k, v in memory.created.items()},
                     messages={k: dict(v) for k, v in memory.messages.items()},
                     created_batches={k: dict(v) for k, v in memory.created_batches.items()},
                     prepare_result=dict(memory.prepare_result))
    return view, fresh


def record_failure(store: Storage, key: str, attempt: int, reason: str, message: str, job: str) -> bool:
    """Write the failure marker of an attempt; False when it was already there."""
    doc = {"reason": reason, "message": message, "job": job, "time": time.time()}
    return write_json(store, failure_key(key, attempt), doc, if_absent=True)


def record_created(store: Storage, key: str, attempt: int, job: str, batch: str = "") -> None:
    """Write the created marker of an attempt (kept if there: the first creation time counts); a coalition of a
    packed Job records its batch, so a pass that does not see the Job yet asks for the same one again."""
    doc: dict[str, Any] = {"job": job, "time": time.time()}
    if batch:
        doc["batch"] = batch
    write_json(store, created_key(key, attempt), doc, if_absent=True)
