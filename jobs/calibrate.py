"""`datacredit calibrate`: how well sparsified-FT utilities track retraining, over prune ratios × steps k.

For a handful of coalitions (drawn like the LDS test coalitions of ``datacredit evaluate``, at sizes
⌊α·n⌋ for α = 0.25, 0.5, 0.75, so the two commands share their retrains):

1. retrain each from scratch (``GroundTruth`` kind ``retrain``, stored in ``evaluation/retrain.jsonl``);
2. for each prune ratio, a sparsified model: the run's own for the manifest's ratio, else the run's full model
   pruned at that ratio and fine-tuned on all data as prepare does (stored in ``calibration/sparsified/``);
3. for each k, fine-tune it k steps on each coalition with the run's seeds and sampler, score with the run's
   property (stored in ``calibration/sweep.jsonl``);
4. per (ratio, k): Pearson and Spearman with the retrained utilities (95% Fisher-z intervals), cost per
   coalition (counted work and seconds), and the recommendation (``datacredit.calibration.RULE``), written to
   ``calibration/report.json``.
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from datacredit import calibration as cal
from datacredit import evaluation as ev
from datacredit import layout
from datacredit.ids import coalition_id, contributor_id
from datacredit.progress import ProgressBar, progress_for
from datacredit.progress import console as adaptive_console
from datacredit.seeds import coalition_seeds
from datacredit.storage import S3Options, open_storage, read_json, upload_dir, write_json

from .device import set_threads
from .evaluate import GroundTruth
from .pipeline import finetune_and_sample, prepare_sparsified
from .train import Checkpoint
from .truth_models import EvaluationError, UNetTruth
from .worker import load_run, local_copy

CALIBRATED_FAMILIES = ("ddpm",)  # the families `datacredit calibrate` sweeps
CALIBRATION_SIZES = (0.25, 0.5, 0.75)  # the LDS alphas of `datacredit evaluate`: its test coalitions come first


@dataclass
class CalibrationSettings:
    """The grid and how many coalitions to retrain."""

    coalitions: int = 8
    steps: str = cal.DEFAULT_STEPS  # multiples (0.5x) of spec.method.finetune.steps, or step counts
    ratios: str = ""  # prune ratios; "": the manifest's with one lower and one higher
    seeds: int = 1  # retraining seeds per coalition (the retrained utility is their mean)
    threshold: float = cal.THRESHOLD


def calibration_coalitions(n: int, count: int, seed: int) -> list[tuple[int, ...]]:
    """``count`` distinct coalitions, round-robin over the sizes ⌊α·n⌋ of :data:`CALIBRATION_SIZES`, each
    size's in the order :func:`datacredit.evaluation.datamodel_subsets` draws them (as evaluate's LDS does)."""
    per_size = {a: ev.datamodel_subsets(n, a, count, seed=seed) for a in CALIBRATION_SIZES}
    out: list[tuple[int, ...]] = []
    for j in range(count):
        for a in CALIBRATION_SIZES:
            s = per_size[a][j]
            if s not in out and len(out) < count:
                out.append(s)
    return out


class Sweep:
    """The sparsified-FT utilities of the grid: read from and appended to ``calibration/sweep.jsonl``."""

    def __init__(self, gt: GroundTruth, progress: ProgressBar | None):
        self.gt, self.progress, self.store = gt, progress, gt.store
        if not isinstance(gt.model, UNetTruth):
            raise EvaluationError(f"calibrate: not supported for family {gt.family!r}")
        self.unet = gt.model
        s = gt.p.run.spec
        self.config = ev.config_digest({"run": gt.p.manifest["configHash"], "lr": s.method.finetune.learning_rate,
                                        "batch": s.method.finetune.batch_size, "samples": s.property.samples,
                                        "sampler": s.method.sampler.steps, "property": s.property.name,
                                        "prune": s.method.prune.model_dump()})
        text = self.store.read_bytes(cal.SWEEP).decode() if self.store.exists(cal.SWEEP) else ""
        self.rows = cal.parse_sweep(text, f"{self.store.uri}/{cal.SWEEP}")
        self.computed = 0
        self._models: dict[float, Checkpoint] = {}

    # ------------------------------------------------------------ sparsified models per ratio

    def _prefix(self, ratio: float) -> str:
        return f"calibration/sparsified/r{ratio:g}"

    def model_info(self, ratio: float) -> dict[str, Any]:
        """Parameters and seconds of the sparsified model at ``ratio`` (built and stored when missing)."""
        s = self.gt.p.run.spec
        if np.isclose(ratio, s.method.prune.ratio):
            prep = read_json(self.store, layout.PREPARE_RESULT)
            sec = prep.get("seconds", {})
            return {"ratio": ratio, "paramsPruned": int(prep["paramsPruned"]), "source": layout.SPARSIFIED,
                    "seconds": round(float(sec.get("prune", 0.0) + sec.get("prune_finetune", 0.0)), 2)}
        key = f"{self._prefix(ratio)}/info.json"
        if not self.store.exists(key):
            self._build(ratio)
        return read_json(self.store, key)

    def _build(self, ratio: float) -> None:
        s = self.gt.p.run.spec
        task = self.progress.add_task(f"prune at ratio {ratio:g} + fine-tune on all data", total=1) \
            if self.progress else None
        t0 = time.perf_counter()
        prepared = prepare_sparsified(self.unet.train, full=self.unet.full_model(),
                                      batch_size=s.model.train.batch_size, prune_ratio=ratio,
                                      importance=s.method.prune.importance,
                                      finetune_steps=s.method.prune.finetune_steps,
                                      finetune_lr=s.method.finetune.learning_rate, seed=s.seed)
        seconds = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as d:
            prepared.sparsified.save(Path(d) / "checkpoint")
            upload_dir(self.store, f"{self._prefix(ratio)}/checkpoint", Path(d) / "checkpoint")
        write_json(self.store, f"{self._prefix(ratio)}/info.json",
                   {"ratio": ratio, "paramsPruned": int(prepared.info["params_pruned"]),
                    "paramsFull": int(prepared.info["params_full"]), "prune": prepared.info["prune"],
                    "seconds": round(seconds, 2), "source": f"{self._prefix(ratio)}/checkpoint"})
        self._models[ratio] = prepared.sparsified
        if task is not None and self.progress:
            self.progress.advance(task)

    def model(self, ratio: float) -> Checkpoint:
        """The sparsified model at ``ratio`` (the run's own at the manifest's ratio)."""
        if np.isclose(ratio, self.gt.p.run.spec.method.prune.ratio):
            return self.gt.p.state[0]  # ddpm: (sparsified, data)
        info = self.model_info(ratio)  # builds the model when it is not stored yet
        if ratio not in self._models:
            tag = "calib-" + contributor_id(self.store.uri + json.dumps(info, sort_keys=True))
            self._models[ratio] = Checkpoint.load(local_copy(self.store, f"{self._prefix(ratio)}/checkpoint", tag))
        return self._models[ratio]

    # ------------------------------------------------------------ utilities

    def _seeds(self, members: tuple[int, ...]) -> Any:
        """The seeds the run gives this coalition (so the manifest's cell is the run's own utility)."""
        p = self.gt.p
        ids = [p.manifest["contributors"][m]["id"] for m in members]
        cid = coalition_id(ids, p.manifest["configHash"])
        return coalition_seeds(p.run.spec.seed, cid, 0, p.run.spec.method.common_random_numbers)

    def get(self, cells: list[tuple[float, int]], coalitions: list[tuple[int, ...]]) -> dict[tuple[float, int],
                                                                                               list[cal.SweepRow]]:
        """The sweep rows of every cell and coalition, computing (and storing) only the missing ones."""
        keyed = {(r, k, m): cal.sweep_key(r, k, m, self._seeds(m).data, self.config)
                 for r, k in cells for m in coalitions}
        todo = [c for c, key in keyed.items() if key not in self.rows]
        task = self.progress.add_task("sparsified-FT sweep", total=len(todo)) if self.progress and todo else None
        for ratio, steps, members in todo:
            row = self._compute(ratio, steps, members)
            self.rows[row.key] = row
            self.computed += 1
            self.store.write_bytes(cal.SWEEP, cal.format_sweep(self.rows.values()).encode())
            if task is not None and self.progress:
                self.progress.advance(task)
        return {(r, k): [self.rows[keyed[(r, k, m)]] for m in coalitions] for r, k in cells}

    def _compute(self, ratio: float, steps: int, members: tuple[int, ...]) -> cal.SweepRow:
        s = self.gt.p.run.spec
        ft, seeds = s.method.finetune, self._seeds(members)
        samples, seconds, _ = finetune_and_sample(
            self.model(ratio), self.unet.images_of(members), steps=steps, lr=ft.learning_rate, batch_size=ft.batch_size,
            n_samples=s.property.samples, ddim_steps=s.method.sampler.steps, seed=seeds.data, noise_seed=seeds.noise)
        utility = self.gt.score(samples, f"ratio {ratio:g}, k={steps} on {list(members)}")
        return cal.SweepRow(ratio, steps, members, seeds.data, self.config, utility,
                            float(seconds.get("finetune", 0.0) + seconds.get("sample", 0.0)))


def _cell(ratio: float, steps: int, rows: list[cal.SweepRow], retrained: list[float], sizes: list[int],
          work: float) -> dict[str, Any]:
    """The fidelity and cost of one grid cell."""
    utilities = [r.utility for r in rows]
    within = ev.pearson_within(utilities, retrained, sizes)
    return {"ratio": ratio, "steps": steps, "coalitions": len(rows),
            "pearson": ev.pearson_ci(utilities, retrained).to_dict(),
            "spearman": ev.spearman_ci(utilities, retrained).to_dict(),
            "pearsonWithinSize": within if np.isfinite(within) else None,
            "work": round(work, 1), "seconds": round(float(np.mean([r.seconds for r in rows])), 3),
            "utilities": utilities}


def _grid(run: Any, settings: CalibrationSettings) -> tuple[tuple[float, int], list[tuple[float, int]]]:
    """The manifest's own (ratio, k) and the grid of the options (errors name the option)."""
    if settings.coalitions < 4:
        raise cal.CalibrationError(f"--coalitions {settings.coalitions}: need at least 4 for a correlation interval")
    if settings.seeds < 1:
        raise cal.CalibrationError(f"--seeds {settings.seeds}: need at least 1 retraining seed")
    s = run.spec
    own = (round(float(s.method.prune.ratio), 6), int(s.method.finetune.steps))
    return own, cal.grid(cal.parse_ratios(settings.ratios, own[0]), cal.parse_steps(settings.steps, own[1]), own)


def _retrained(gt: GroundTruth, coalitions: list[tuple[int, ...]], seeds: list[int]
               ) -> tuple[list[float], list[ev.TruthRow]]:
    """The retrained utility of each coalition (mean over ``seeds``), retraining what is not stored yet."""
    truth = gt.get("retrain", [(m, sd) for sd in seeds for m in coalitions], "calibration retrains")
    per = len(coalitions)
    return [float(np.mean([truth[k * per + j].utility for k in range(len(seeds))])) for j in range(per)], truth


def calibrate(run_uri: str, settings: CalibrationSettings, *, options: S3Options | None = None,
              console: Console | None = None, on_truth: Callable[[GroundTruth], None] | None = None
              ) -> dict[str, Any]:
    """Calibrate a prepared run (module docstring); writes ``calibration/report.json`` and returns it.
    ``on_truth`` sees the ground-truth object at the end (tests count retrains)."""
    options = options or S3Options()
    console = console or adaptive_console(stderr=True)
    store = open_storage(run_uri, options)
    own, cells = _grid(load_run(store), settings)  # bad options fail before any model is loaded
    set_threads()
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("eta"), TimeRemainingColumn()]
    with progress_for(console, *columns) as bar:  # plain lines when not a terminal
        gt = GroundTruth(run_uri, options, bar)
        if gt.family not in CALIBRATED_FAMILIES:  # its sweep fine-tunes and samples in pixel space
            raise EvaluationError(f"calibrate: not supported yet for family {gt.family!r} (supported: "
                                  f"{', '.join(CALIBRATED_FAMILIES)})")
        run, manifest = gt.p.run, gt.p.manifest
        n = len(manifest["contributors"])
        coalitions = calibration_coalitions(n, settings.coalitions, run.spec.seed)
        if len(coalitions) < 4:
            raise EvaluationError(f"{run_uri}: {n} contributors give only {len(coalitions)} distinct calibration "
                                  f"coalitions; calibration needs at least 4 (more contributors)")
        seeds = [run.spec.seed + k for k in range(settings.seeds)]
        retrained, truth = _retrained(gt, coalitions, seeds)
        sweep = Sweep(gt, bar)
        rows = sweep.get(cells, coalitions)
        models = {r: sweep.model_info(r) for r in sorted({c[0] for c in cells})}

    work = ev.WorkModel.from_run(run, read_json(store, layout.PREPARE_RESULT))
    sizes = [len(m) for m in coalitions]
    out_cells = [_cell(r, k, rows[(r, k)], retrained, sizes,
                       float(np.mean([work.coalition("sparsified", z, steps=k, params=models[r]["paramsPruned"])
                                      for z in sizes])))
                 for r, k in cells]
    own_cell = next(c for c in out_cells if (c["ratio"], c["steps"]) == own)
    report = {
        "run": run_uri,
        "configHash": manifest["configHash"],
        "property": run.spec.property.name,
        "coalitions": [list(m) for m in coalitions],
        "retrained": retrained,
        "retrainSeeds": seeds,
        "retrainSeconds": round(float(np.mean([r.seconds for r in truth])), 3),
        "retrainWork": round(float(np.mean([work.coalition("retrain", z) for z in sizes])), 1),
        "grid": {"ratios": sorted({c[0] for c in cells}), "steps": sorted({c[1] for c in cells})},
        "models": {f"{r:g}": info for r, info in models.items()},
        "cells": out_cells,
        "interval": cal.INTERVAL,
        "threshold": settings.threshold,
        "workUnit": "full-model forward passes per coalition (a training image counts 3: forward and backward)",
        "secondsUnit": "fine-tuning + sampling per coalition, measured in this process",
        "recommendation": cal.recommend(out_cells, settings.threshold),
        "manifest": {"ratio": own[0], "steps": own[1], **{k: own_cell[k] for k in ("pearson", "spearman",
                                                                                  "coalitions")}},
        "retrainedNow": gt.trained,
        "sweptNow": sweep.computed,
    }
    write_json(store, cal.REPORT, report)
    if on_truth:
        on_truth(gt)
    return report


def _corr(d: dict[str, Any]) -> str:
    from rich.markup import escape

    v, (lo, hi) = d["value"], d["ci95"]
    if v is None:
        return "n/a"
    band = f"[{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else "[undefined]"
    return escape(f"{v:.2f} {band}")


def report_table(report: dict[str, Any]) -> Any:
    """A rich table of a calibration report: fidelity and cost per (ratio, k); the manifest's row in bold and
    the recommended one marked."""
    from rich import box
    from rich.table import Table

    rec, own = report["recommendation"], report["manifest"]
    t = Table(title=f"Sparsified-FT vs. retrained utilities on {len(report['coalitions'])} coalitions, property "
                    f"{report['property']}", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False,
              padding=(0, 1, 0, 0))
    for col in ("ratio", "k", "Pearson [95%]", "Spearman [95%]", "r|size", "work", "sec", ""):
        t.add_column(col, justify="left" if col == "" else "right", no_wrap=col.endswith("]"))
    for c in report["cells"]:
        mine = (c["ratio"], c["steps"]) == (own["ratio"], own["steps"])
        chosen = (c["ratio"], c["steps"]) == (rec.get("ratio"), rec.get("steps"))
        note = "+".join(x for x, on in (("manifest", mine), ("chosen", chosen)) if on)
        within = c.get("pearsonWithinSize")
        t.add_row(f"{c['ratio']:g}", str(c["steps"]), _corr(c["pearson"]), _corr(c["spearman"]),
                  f"{within:.2f}" if within is not None else "n/a", f"{c['work']:,.0f}", f"{c['seconds']:.2f}",
                  note, style="bold" if mine else ("green" if chosen else ""))
    t.caption = (f"95% Fisher-z intervals; r|size: Pearson within coalitions of one size; work and sec per "
                 f"coalition (work: full-model forward passes, a training image counts 3; sec: fine-tuning + "
                 f"sampling); a retrain costs {report['retrainWork']:,.0f} work, {report['retrainSeconds']:.2f} s")
    return t


def recommendation_text(report: dict[str, Any]) -> str:
    """What to put in the manifest, and the rule that chose it."""
    rec = report["recommendation"]
    if rec.get("ratio") is None:
        return f"no recommendation: no setting has a Pearson r (constant utilities?). Rule: {rec['rule']}."
    cell = next(c for c in report["cells"] if (c["ratio"], c["steps"]) == (rec["ratio"], rec["steps"]))
    r = f"Pearson {_corr(cell['pearson'])} over {cell['coalitions']} coalitions"
    head = (f"recommended ({r}, ≥ {rec['threshold']:g}):" if rec["met"] else
            f"no setting reaches Pearson {rec['threshold']:g}; the closest ({r}):")
    low = cell["pearson"]["ci95"][0]
    if low is None or low < rec["threshold"]:
        head += f"\n  its interval reaches below {rec['threshold']:g}: retrain more coalitions (--coalitions) to tell"
    return f"{head}\n{rec['snippet']}rule: {rec['rule']}."
