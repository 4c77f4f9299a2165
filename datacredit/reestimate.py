"""`datacredit estimate`: values from a stored utilities table, by the method asked for or not at all.

:func:`datacredit.shapley.estimate_from_table` quietly falls back to the kernel regression where a method needs
more than a table holds (``exact`` on an incomplete table, ``permutation`` without its chains). Here a method
is either computed as asked, or :class:`CannotEstimate` says why and what would work. Contributor names (and,
for ``permutation``, the run's plan) come from the run that made the table: its folder or URI, its
``results/shapley.json``, or the ``results/`` folder the table lies in.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .shapley import Estimate, estimate_from_table, method_names
from .shapley.design import make_plan
from .shapley.permutation import permutation_shapley
from .shapley.result import Z95
from .shapley.table import Table, as_mask, as_row


class CannotEstimate(ValueError):
    """The method asked for cannot be computed from this table (the message says why and what would work)."""


@dataclass(frozen=True)
class RunInfo:
    """What the run that made a table tells about it: names in player order, and its estimator's plan."""

    source: str  # where it was read, for messages
    names: list[str] | None = None
    method: str | None = None
    budget: int | None = None
    seed: int | None = None


@dataclass(frozen=True)
class Reestimate:
    """Values re-estimated from a table: ``method`` as asked, ``computed`` says how (e.g. exact, regression)."""

    method: str
    computed: str
    estimate: Estimate
    rows: int
    n_players: int
    names: list[str] | None = None

    def name(self, i: int) -> str:
        """Contributor ``i``'s name, or its player index when no names are known."""
        return self.names[i] if self.names else str(i)


def read_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a utilities.jsonl as dicts (``replicates`` kept: they add the between-seed noise)."""
    rows = []
    for k, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            as_row(row)
        except (ValueError, KeyError, TypeError) as e:
            raise CannotEstimate(f"line {k} is not a {{\"members\": [...], \"utility\": ...}} row: {e}") from None
        rows.append(row)
    if not rows:
        raise CannotEstimate("the table has no rows")
    return rows


def _names_by_index(contributors: list[dict[str, Any]]) -> list[str] | None:
    """Names in player order from shapley.json rows (sorted by value; ``index`` gives the player)."""
    if not contributors or not all(isinstance(c.get("index"), int) for c in contributors):
        return None
    names: list[str | None] = [None] * len(contributors)
    for c in contributors:
        if 0 <= c["index"] < len(names):
            names[c["index"]] = str(c["name"])
    return None if any(n is None for n in names) else [str(n) for n in names]


def _from_manifest(doc: dict[str, Any], source: str) -> RunInfo:
    planner = doc.get("planner") or {}
    return RunInfo(source, [str(c["name"]) for c in doc.get("contributors", [])] or None,
                   planner.get("method"), planner.get("budget"), planner.get("seed"))


def _from_results(doc: dict[str, Any], source: str, manifest: dict[str, Any] | None) -> RunInfo:
    est = doc.get("estimator") or {}
    info = RunInfo(source, _names_by_index(doc.get("contributors", [])), doc.get("method"), est.get("budget"),
                   est.get("seed"))
    if manifest is not None:  # older results: no player indices or budget; the run's manifest.json has them
        more = _from_manifest(manifest, source)
        info = RunInfo(source, info.names or more.names, info.method or more.method,
                       info.budget if info.budget is not None else more.budget,
                       info.seed if info.seed is not None else more.seed)
    return info


def run_info(source: str) -> RunInfo:
    """Names and plan from ``source``: a results/shapley.json file, or a run's folder or URI (path or s3://).

    Raises :class:`CannotEstimate` when ``source`` holds neither manifest.json nor results/shapley.json, and
    :class:`~datacredit.storage.StorageError` when its storage cannot be read.
    """
    from .storage import open_storage, read_json

    path = Path(source)
    if "://" not in source and path.is_file():
        try:
            doc = json.loads(path.read_text())
        except ValueError as e:
            raise CannotEstimate(f"--names {source}: not JSON ({e})") from None
        if "contributors" not in doc:
            raise CannotEstimate(f"--names {source}: no contributors in it (expected results/shapley.json or "
                                 "manifest.json)")
        if "planner" in doc:
            return _from_manifest(doc, source)
        sibling = path.parent.parent / layout.MANIFEST if path.parent.name == layout.RESULTS else None
        manifest = json.loads(sibling.read_text()) if sibling is not None and sibling.is_file() else None
        return _from_results(doc, source, manifest)
    if "://" not in source and not path.is_dir():
        raise CannotEstimate(f"--names {source}: no such file or run folder")
    store = open_storage(source)
    results_key = f"{layout.RESULTS}/shapley.json"
    manifest = read_json(store, layout.MANIFEST) if store.exists(layout.MANIFEST) else None
    if store.exists(results_key):
        return _from_results(read_json(store, results_key), source, manifest)
    if manifest is not None:
        return _from_manifest(manifest, source)
    raise CannotEstimate(f"--names {source}: no run there (neither {layout.MANIFEST} nor {results_key})")


def run_info_near(table: Path) -> RunInfo | None:
    """The run of a table that lies in a run's results/ folder (next to its shapley.json), else None."""
    shapley = table.parent / "shapley.json"
    if table.parent.name != layout.RESULTS or not shapley.is_file():
        return None
    try:
        return run_info(str(shapley))
    except (CannotEstimate, ValueError, OSError):
        return None


def reestimate(rows: list[dict[str, Any]], method: str, *, n_players: int | None = None,
               run: RunInfo | None = None) -> Reestimate:
    """Estimate ``method`` from ``rows`` exactly as asked, or raise :class:`CannotEstimate`.

    ``exact`` needs all 2^n coalitions; ``loo`` the full set and every leave-one-out coalition; ``permutation``
    either all 2^n coalitions (its target, the Shapley values, is then known exactly) or the run's permutation
    plan (``run``, from a permutation run) whose antithetic chains the table completes at least once.
    ``kernel`` and ``banzhaf`` regress over whatever the table holds (exact once it is complete).
    """
    if method not in method_names():
        raise CannotEstimate(f"unknown method {method!r}; choose one of {', '.join(method_names())}")
    names = run.names if run else None
    table_n = 1 + max((max(as_row(r).members, default=-1) for r in rows), default=-1)
    n = n_players or (len(names) if names else table_n)
    if table_n > n:
        raise CannotEstimate(f"the table has player index {table_n - 1}, more than the {n} contributors"
                             + (f" of {run.source}" if names and run else ""))
    if names is not None and len(names) != n:
        raise CannotEstimate(f"--players {n} but {run.source if run else 'the run'} names {len(names)} contributors")
    if method == "permutation":
        return _permutation(rows, n, run, names)
    try:
        est = estimate_from_table(rows, n_players=n, method=method)
    except (ValueError, KeyError) as e:
        raise CannotEstimate(str(e)) from None
    complete = est.n_coalitions == 2**n
    if method == "exact" and not complete:
        raise CannotEstimate(f"exact needs all 2^{n} = {2**n} coalitions; the table has {est.n_coalitions}: use "
                             "--method kernel (or banzhaf, loo) for an estimate from these")
    if method == "loo":
        missing = [names[i] if names else str(i) for i in np.flatnonzero(np.isnan(est.values))]
        if missing:
            raise CannotEstimate(f"loo needs the coalition of everyone but each contributor; missing for "
                                 f"{', '.join(missing)}")
        computed = "leave-one-out"
    elif method == "exact":
        computed = f"exact Shapley (all {2**n} coalitions)"
    else:
        label = "Shapley" if method == "kernel" else "Banzhaf"
        computed = (f"exact {label} (all {2**n} coalitions)" if complete
                    else f"{method} regression over {est.n_coalitions} coalitions")
    return Reestimate(method, computed, est, len(rows), n, names)


def _permutation(rows: list[dict[str, Any]], n: int, run: RunInfo | None, names: list[str] | None) -> Reestimate:
    """Permutation sampling from the run's chains; exact when the table holds every coalition."""
    from .planner import Planner

    if len({tuple(sorted(as_row(r).members)) for r in rows}) == 2**n:
        est = estimate_from_table(rows, n_players=n, method="exact")
        return Reestimate("permutation", f"exact Shapley (all {2**n} coalitions: what permutation sampling "
                          "estimates)", est, len(rows), n, names)
    if run is None or run.method != "permutation" or run.budget is None or run.seed is None:
        made = f" ({run.source} used {run.method})" if run and run.method else ""
        raise CannotEstimate("permutation needs the permutation chains of the run that made the table, which a "
                             f"table alone does not hold{made}: pass the permutation run with --names, or use "
                             "--method kernel (the regression over these coalitions)")
    plan = make_plan(n, run.budget, "permutation", run.seed)
    table = Table(plan.sequence)
    planner = Planner(n_players=n, budget=run.budget, method="permutation", seed=run.seed)
    try:
        for row in rows:
            r = as_row(row)
            table.add(table.position(as_mask(list(r.members), n)), r.utility)
            planner.tell(list(r.members), r.utility, row.get("replicates") or ())
    except KeyError as e:
        raise CannotEstimate(f"{e.args[0]} of {run.source} (budget {run.budget}, seed {run.seed}): the table is "
                             "not that run's") from None
    if permutation_shapley(table, plan.chains, len(plan.sequence)) is None:
        raise CannotEstimate("the table completes no antithetic pair of the run's permutations yet: use --method "
                             "kernel")
    pairs = int(table.observed[plan.chains.reshape(-1, 2, n + 1)].all(axis=(1, 2)).sum())
    return Reestimate("permutation", f"permutation sampling over {pairs} antithetic pair(s) of the run's plan",
                      planner.estimate(), len(rows), n, names)


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


def to_rows(result: Reestimate) -> list[dict[str, Any]]:
    """One dict per contributor in player order: index, name, value, stderr and 95% interval (None: unknown)."""
    est = result.estimate
    out = []
    for i in range(result.n_players):
        v, s = float(est.values[i]), float(est.stderr[i])
        out.append({"index": i, "name": result.name(i), "value": _finite(v), "stderr": _finite(s),
                    "ci95": [_finite(v - Z95 * s), _finite(v + Z95 * s)]})
    return out


def to_json(result: Reestimate, table: str) -> str:
    """The re-estimate as a JSON document (NaN and infinite numbers as null)."""
    doc = {"table": table, "method": result.method, "computed": result.computed, "rows": result.rows,
           "coalitions": result.estimate.n_coalitions, "nPlayers": result.n_players,
           "contributors": to_rows(result)}
    return json.dumps(doc, indent=2) + "\n"


def to_csv(result: Reestimate) -> str:
    """The re-estimate as CSV, one row per contributor in player order."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["index", "contributor", "value", "stderr", "ci95_low", "ci95_high"])
    for r in to_rows(result):
        w.writerow([r["index"], r["name"], *("" if x is None else f"{x:.6g}" for x in
                                             (r["value"], r["stderr"], *r["ci95"]))])
    return buf.getvalue()
