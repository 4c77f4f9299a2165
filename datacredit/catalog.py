"""Runs in storage: list the runs under a storage URI, find a manifest's run whichever executor made it, and
compare the values of two runs.

A local run lives in ``<namespace>/<name>-<config hash 8>`` and an operator run in ``<namespace>/<name>-<uid 8>``;
both hold ``run.json`` with the manifest and its config hash, which is what a manifest is matched by.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

from . import layout
from .runstate import run_uri, s3_options
from .spec import ValuationRun, load_manifest
from .storage import S3Options, Storage, open_storage, read_json

_RUN_JSON = re.compile(rf"^([^/]+)/([^/]+)/{re.escape(layout.RUN)}$")
_RESULTS = f"{layout.RESULTS}/shapley.json"


@dataclass(frozen=True)
class RunEntry:
    """One run found in storage."""

    uri: str
    namespace: str
    name: str
    folder: str
    config_hash: str
    finished: bool
    property: str
    method: str
    evaluations: int | None
    contributors: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def list_runs(store: Storage) -> list[RunEntry]:
    """Every run below ``store`` (a storage URI's root), by namespace and name. Reads each run's run.json and,
    when finished, its results."""
    keys = store.list()
    finished = {k.removesuffix(_RESULTS).rstrip("/") for k in keys if k.endswith(_RESULTS)}
    entries = []
    for key in keys:
        match = _RUN_JSON.match(key)
        if not match:
            continue
        namespace, folder = match.groups()
        prefix = f"{namespace}/{folder}"
        doc = read_json(store, key)
        spec = doc.get("manifest", {}).get("spec", {})
        done = prefix in finished
        results = read_json(store, f"{prefix}/{_RESULTS}") if done else {}
        entries.append(RunEntry(
            uri=layout.join_uri(store.uri, prefix), namespace=namespace,
            name=doc.get("manifest", {}).get("metadata", {}).get("name", folder), folder=folder,
            config_hash=str(doc.get("configHash", "")), finished=done,
            property=str(spec.get("property", {}).get("name", "")),
            method=str(spec.get("estimator", {}).get("name", "")),
            evaluations=results.get("evaluations"), contributors=len(results["contributors"]) if done else None,
        ))
    return sorted(entries, key=lambda e: (e.namespace, e.name, e.folder))


class AmbiguousRun(ValueError):
    """Several runs match a manifest (the operator ran it more than once)."""


def find_run(run: ValuationRun, options: S3Options | None = None) -> str:
    """The URI of the run ``run``'s manifest made: this machine's folder (named by the config hash) when it holds
    a run, else the one run of the same namespace, name and config hash in the storage (an operator run, named
    by its uid). With none, this machine's folder (where ``datacredit run`` would write). AmbiguousRun when
    several operator runs match."""
    own = run_uri(run)
    options = options or s3_options(run)
    if open_storage(own, options).exists(layout.RUN):
        return own
    ns, name, config = run.metadata.namespace, run.metadata.name, run.config_hash()
    same = [e for e in list_runs(open_storage(run.spec.storage.uri, options))
            if (e.namespace, e.name, e.config_hash) == (ns, name, config)]
    if len(same) > 1:
        raise AmbiguousRun(f"{len(same)} runs of {ns}/{name} with these settings: "
                           f"{', '.join(e.uri for e in same)}; give one of their URIs")
    return same[0].uri if same else own


def compare(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any]:
    """Two results documents (shapley.json) side by side: per contributor both values, the change and both
    ranks (in ``a``'s order, then those only in ``b``), and the Pearson and Spearman correlations of the values
    of the contributors both runs have."""
    in_b = {r["name"]: r for r in b["contributors"]}
    in_a = {r["name"] for r in a["contributors"]}
    rows = []
    for r in a["contributors"]:
        o = in_b.get(r["name"])
        rows.append({"name": r["name"], "a": r["value"], "b": o["value"] if o else None,
                     "delta": o["value"] - r["value"] if o else None, "rankA": r["rank"],
                     "rankB": o["rank"] if o else None,
                     "significant": bool(o) and abs(o["value"] - r["value"]) > 1.96 * float(
                         np.hypot(r["stderr"], o["stderr"]))})
    rows += [{"name": r["name"], "a": None, "b": r["value"], "delta": None, "rankA": None, "rankB": r["rank"],
              "significant": False} for r in b["contributors"] if r["name"] not in in_a]
    both = [(r["a"], r["b"]) for r in rows if r["a"] is not None and r["b"] is not None]
    pearson = spearman = None
    if len(both) >= 3 and np.ptp([x for x, _ in both]) > 0 and np.ptp([y for _, y in both]) > 0:
        xs, ys = zip(*both, strict=True)
        pearson = float(stats.pearsonr(xs, ys).statistic)
        spearman = float(stats.spearmanr(xs, ys).statistic)
    return {"a": {"run": a["run"], "property": a["property"], "evaluations": a["evaluations"]},
            "b": {"run": b["run"], "property": b["property"], "evaluations": b["evaluations"]},
            "common": len(both), "pearson": pearson, "spearman": spearman, "contributors": rows}


def open_target(target: str) -> Storage:
    """The storage of a run given as its URI (path or s3://) or as the manifest that made it (see
    :func:`find_run`). SpecError for an invalid manifest, AmbiguousRun as in find_run."""
    path = Path(target.removeprefix("file://"))
    if "://" not in target.removeprefix("file://") and path.is_file():
        run = load_manifest(path)
        options = s3_options(run)
        return open_storage(find_run(run, options), options)
    return open_storage(target)
