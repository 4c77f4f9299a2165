"""Benchmark: can the values be trusted? The demo repeated over run seeds, with and without common random numbers.

For each mode (common random numbers on, and off) the demo's valuation runs once per run seed (``spec.seed``:
pruned-model fine-tuning, every coalition's fine-tuning and sampling, the replicate seeds). Every run values the
same trained model θ* (the first run trains it; the others load it as ``model.checkpoint``), because the values
are of a given model. Side by side, per mode, it measures:

* ``plantedLast``: the fraction of seeds in which every planted contributor is below every clean one (target 1);
* ``coverage``: over (contributor, seed), how often the reported 95% interval holds the mean value of the other
  seeds (target >= 0.9). That mean is itself noisy: with k seeds, a value minus the mean of the k - 1 others has
  sqrt(1 + 1/(k - 1)) times the standard deviation of the value alone, so the interval is widened by that factor
  (a correct interval then covers 95% for any k); ``coverageRaw`` is the same without the factor;
* ``halfwidthOverGap``: the median 95% half-width over the gap between the mean clean and the mean planted value
  (target <= 0.25);
* ``seedSpread``: each contributor's standard deviation of its value over seeds, and the ratio of the two modes.

Run ``python benchmarks/trust.py`` (the full demo, 5 seeds per mode; writes benchmarks/results/trust.json) or
``--quick`` (CI: the quick demo, 3 seeds per mode, results under a temporary folder unless ``--out`` is given).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.table import Table

from datacredit.demo import FULL, QUICK, build_demo, demo_manifest
from datacredit.local import execute
from datacredit.spec import parse_manifest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "trust.json"
Z95 = 1.959963984540054


def manifest_for(root: Path, quick: bool, seed: int, crn: bool, checkpoint: str | None) -> dict[str, Any]:
    """The demo manifest with run seed ``seed``, common random numbers on or off, θ* from ``checkpoint``."""
    doc = demo_manifest(root, quick=quick)
    doc["metadata"]["name"] = f"trust-{'crn' if crn else 'independent'}-s{seed}"
    spec = doc["spec"]
    spec["seed"] = seed
    spec["method"]["commonRandomNumbers"] = crn
    if checkpoint:
        spec["model"]["checkpoint"] = checkpoint
    return doc


def run_mode(root: Path, quick: bool, seeds: list[int], crn: bool, checkpoint: str | None,
             console: Console) -> tuple[list[dict[str, Any]], str | None]:
    """One valuation per seed; returns the results documents and θ*'s folder (for the next runs)."""
    docs = []
    for seed in seeds:
        t0 = time.monotonic()
        run = parse_manifest(manifest_for(root, quick, seed, crn, checkpoint))
        outcome = execute(run, console=Console(file=io.StringIO()))
        if checkpoint is None:  # the first run trained θ*; everyone else values that same model
            checkpoint = str(Path(outcome.run.uri) / "prepare" / "sparsified" / "full")
        docs.append(outcome.results)
        top = ", ".join(f"{r['name']} {r['value']:+.1f}±{Z95 * r['stderr']:.1f}"
                        for r in outcome.results["contributors"])
        console.print(f"{'crn' if crn else 'independent'} seed {seed}: {time.monotonic() - t0:.0f}s  {top}")
    return docs, checkpoint


def metrics(docs: list[dict[str, Any]], planted: set[str]) -> dict[str, Any]:
    """The trust measures of one mode's runs (see the module docstring)."""
    names = sorted(r["name"] for r in docs[0]["contributors"])
    values = np.array([[{r["name"]: r["value"] for r in d["contributors"]}[n] for n in names] for d in docs])
    half = Z95 * np.array([[{r["name"]: r["stderr"] for r in d["contributors"]}[n] for n in names] for d in docs])
    bad = np.array([n in planted for n in names])
    k = len(docs)
    others = (values.sum(axis=0, keepdims=True) - values) / (k - 1)
    deviation = np.abs(values - others)
    covered = deviation <= half * np.sqrt(1 + 1 / (k - 1))
    gap = float(values[:, ~bad].mean() - values[:, bad].mean())
    last = [bool(v[bad].max() < v[~bad].min()) for v in values]
    crossing = int(((values[:, bad] - half[:, bad] < 0) & (values[:, bad] + half[:, bad] > 0)).sum())
    return {
        "seeds": k,
        "plantedLast": float(np.mean(last)),
        "plantedLastPerSeed": last,
        "coverage": float(covered.mean()),
        "coverageRaw": float((deviation <= half).mean()),
        "coveragePerContributor": {n: float(c) for n, c in zip(names, covered.mean(axis=0), strict=True)},
        "medianHalfwidth": float(np.median(half)),
        "gapCleanMinusPlanted": gap,
        "halfwidthOverGap": float(np.median(half) / gap) if gap > 0 else None,
        "plantedIntervalsCrossingZero": crossing,
        "seedSpread": {n: float(s) for n, s in zip(names, values.std(axis=0, ddof=1), strict=True)},
        "meanValue": {n: float(v) for n, v in zip(names, values.mean(axis=0), strict=True)},
        "seedStderrMedian": float(np.median([r.get("seedStderr", 0.0) for d in docs for r in d["contributors"]])),
        "valuationSeconds": [d["wallClockSeconds"] for d in docs],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="the quick demo, 3 seeds per mode (CI)")
    parser.add_argument("--seeds", type=int, default=None, help="run seeds per mode (default 5, --quick 3)")
    parser.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"results JSON (default {RESULTS.relative_to(ROOT)}; --quick: the work folder)")
    args = parser.parse_args(argv)
    console = Console()
    seeds = list(range(args.seeds or (3 if args.quick else 5)))
    if len(seeds) < 2:
        parser.error("--seeds: at least 2 (coverage is measured against the other seeds)")
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.dir or Path(tmp)).resolve()
        build_demo(root, quick=args.quick)
        planted = set((QUICK if args.quick else FULL)["bad"])
        t0 = time.monotonic()
        crn_docs, checkpoint = run_mode(root, args.quick, seeds, True, None, console)
        ind_docs, _ = run_mode(root, args.quick, seeds, False, checkpoint, console)
        modes = {"commonRandomNumbers": metrics(crn_docs, planted), "independent": metrics(ind_docs, planted)}
        a, b = modes["commonRandomNumbers"]["seedSpread"], modes["independent"]["seedSpread"]
        report = {
            "demo": "quick" if args.quick else "full",
            "planted": sorted(planted),
            "modes": modes,
            "seedSpreadRatio": {n: a[n] / b[n] if b[n] > 0 else None for n in a},
            "targets": {"plantedLast": 1.0, "coverage": 0.9, "halfwidthOverGap": 0.25},
            "wallSeconds": round(time.monotonic() - t0, 1),
        }
        out = args.out or (root / "trust.json" if args.quick else RESULTS)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1))
    table = Table(title=f"trust: the {report['demo']} demo over {len(seeds)} run seeds")
    for col in ("mode", "planted last", "coverage", "coverage (raw)", "median ±95%", "clean−planted gap", "±/gap"):
        table.add_column(col, justify="right")
    for mode, m in modes.items():
        ratio = m["halfwidthOverGap"]
        table.add_row(mode, f"{m['plantedLast']:.2f}", f"{m['coverage']:.3f}", f"{m['coverageRaw']:.3f}",
                      f"{m['medianHalfwidth']:.2f}",
                      f"{m['gapCleanMinusPlanted']:.2f}", "n/a" if ratio is None else f"{ratio:.3f}")
    console.print(table)
    ratios = [r for r in report["seedSpreadRatio"].values() if r is not None]
    console.print(f"seed-to-seed spread of the values, CRN / independent: median {np.median(ratios):.2f} "
                  f"(per contributor {min(ratios):.2f}..{max(ratios):.2f}); results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
