"""A run's place in storage and the state both executors rebuild from it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from . import layout
from .planner import Planner
from .spec import ValuationRun
from .storage import S3Options, Storage, open_storage, read_json


@dataclass
class RunRef:
    """Where a run lives: its URI, an open storage and the hash naming its coalitions."""

    uri: str
    store: Storage
    options: S3Options
    config_hash: str


def s3_options(run: ValuationRun, patience: float | None = None) -> S3Options:
    """S3 connection settings from spec.storage; `patience`: how long an outage is waited out (None: default)."""
    s = run.spec.storage
    return S3Options(endpoint=s.endpoint, region=s.region, path_style=s.path_style, patience=patience)


def run_uri(run: ValuationRun, uid: str | None = None) -> str:
    """`<storage.uri>/<namespace>/<run>-<uid8>`. Locally the uid is the config hash, so reruns resume."""
    prefix = layout.run_prefix(run.metadata.namespace, run.metadata.name, uid or run.config_hash())
    return layout.join_uri(run.spec.storage.uri, prefix)


def open_run(run: ValuationRun, uid: str | None = None, patience: float | None = None) -> RunRef:
    """Open the run's storage (`patience` as in :func:`s3_options`)."""
    options = s3_options(run, patience)
    uri = run_uri(run, uid)
    return RunRef(uri, open_storage(uri, options), options, run.config_hash())


def read_manifest(store: Storage) -> dict[str, Any]:
    """manifest.json, written by prepare."""
    return read_json(store, layout.MANIFEST)


def planner_for(run: ValuationRun, n_players: int) -> Planner:
    """The planner for a run: the same coalitions in the same order for the same spec and seed."""
    e = run.spec.estimator
    replicated = e.replicates.coalitions if e.replicates.seeds > 0 else 0
    return Planner(n_players=n_players, budget=e.budget, method=e.name, seed=e.seed, tolerance=e.tolerance,
                   question=e.stop, k=e.top_k,
                   replicate_coalitions=replicated)


def replicate_utilities(result: dict[str, Any]) -> list[float]:
    """The utilities a coalition's result.json holds under replicate seeds (none for most coalitions)."""
    return [float(r["utility"]) for r in result.get("replicates") or []]


def member_indices(coalition: np.ndarray) -> list[int]:
    """Indices of the members of a boolean coalition vector."""
    return [int(i) for i in np.flatnonzero(coalition)]


def utility_row(members: list[int], utility: float, replicates: list[float]) -> dict[str, Any]:
    """One line of results/utilities.jsonl (replicate-seed utilities where the coalition has them)."""
    row: dict[str, Any] = {"members": members, "utility": utility}
    if replicates:
        row["replicates"] = replicates
    return row
