"""What the operator reads from and writes to a run's storage, cached per run (results never change)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from datacredit import layout
from datacredit.finish import finish_run
from datacredit.ids import coalition_id
from datacredit.runstate import member_indices, replicate_utilities, utility_row
from datacredit.spec import ValuationRun
from datacredit.storage import Storage, read_json, write_json

from .jobs import PREPARE
from .planners import PlannerCache
from .reconcile import POD_FAILED, StoreView

FAILED_MARKER = "failed.json"  # written by the operator: attempt k of a coalition (or prepare) failed


def failure_key(key: str, attempt: int) -> str:
    """Where the operator records that an attempt failed (survives Job TTL deletion and restarts)."""
    base = "prepare" if key == PREPARE else f"coalitions/{key}"
    return f"{base}/attempt-{attempt}/{FAILED_MARKER}"


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
    coalition_seconds: list[float] = field(default_factory=list)
    running_seen: set[str] = field(default_factory=set)
    failed_counted: set[str] = field(default_factory=set)
    last_error: str = ""
    planners: PlannerCache = field(default_factory=PlannerCache)


def ensure_run_json(store: Storage, run: ValuationRun, memory: RunMemory) -> None:
    """Write run.json (the spec snapshot the workers read) once."""
    if not memory.run_json_written:
        write_json(store, layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()},
                   if_absent=True)
        memory.run_json_written = True


def _parse_failures(store: Storage, keys: list[str], memory: RunMemory, key_of: Any) -> None:
    for k in keys:
        parts = k.split("/")
        if parts[-1] != FAILED_MARKER or not parts[-2].startswith("attempt-"):
            continue
        owner, attempt = key_of(parts), int(parts[-2].removeprefix("attempt-"))
        if attempt in memory.failures.get(owner, {}):
            continue
        try:
            reason = str(read_json(store, k).get("reason", POD_FAILED))
        except (FileNotFoundError, ValueError):
            reason = POD_FAILED
        memory.failures.setdefault(owner, {})[attempt] = reason


def read_store(store: Storage, memory: RunMemory) -> tuple[StoreView, dict[str, dict[str, float]]]:
    """The StoreView of a run, and the stage seconds of results that appeared since the last call."""
    if not memory.prepared:
        _parse_failures(store, store.list("prepare"), memory, lambda parts: PREPARE)
        if store.exists(layout.PREPARE_RESULT):
            memory.contributors = read_json(store, layout.MANIFEST)["contributors"]
            memory.prepared = True
    fresh: dict[str, dict[str, float]] = {}
    if memory.prepared:
        keys = store.list("coalitions")
        _parse_failures(store, keys, memory, lambda parts: parts[1])
        for k in keys:
            parts = k.split("/")
            if len(parts) == 3 and parts[2] == "result.json" and parts[1] not in memory.utilities:
                doc = read_json(store, k)
                memory.utilities[parts[1]] = float(doc["utility"])
                if replicate_utilities(doc):
                    memory.replicates[parts[1]] = replicate_utilities(doc)
                seconds = doc.get("seconds") or {}
                if "total" in seconds:
                    memory.coalition_seconds.append(float(seconds["total"]))
                if memory.listed_once:
                    fresh[parts[1]] = seconds
        memory.listed_once = True
    view = StoreView(memory.prepared, memory.contributors, dict(memory.utilities),
                     replicates=dict(memory.replicates), failures={k: dict(v) for k, v in memory.failures.items()})
    return view, fresh


def record_failure(store: Storage, key: str, attempt: int, reason: str, message: str, job: str) -> bool:
    """Write the failure marker of an attempt; False when it was already there."""
    doc = {"reason": reason, "message": message, "job": job, "time": time.time()}
    return write_json(store, failure_key(key, attempt), doc, if_absent=True)


def write_results(store: Storage, run: ValuationRun, planner: Any, contributors: list[dict[str, Any]],
                  utilities: dict[str, float], wall_seconds: float,
                  replicates: dict[str, list[float]] | None = None) -> dict[str, Any]:
    """results/shapley.json, .csv (+ values.png) and utilities.jsonl, as the local executor writes them."""
    ids = [c["id"] for c in contributors]
    rows = []
    for coal in planner.sequence:
        members = member_indices(coal)
        cid = coalition_id([ids[i] for i in members], run.config_hash())
        if cid in utilities:
            rows.append(utility_row(members, utilities[cid], (replicates or {}).get(cid, [])))
    return finish_run(store, run, planner, contributors, rows, wall_seconds)
