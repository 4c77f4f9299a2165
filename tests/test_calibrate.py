"""`datacredit calibrate`: correlation intervals, the recommendation rule, fidelity into results, end to end."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
import yaml
from rich.console import Console

from datacredit import calibration as cal
from datacredit import evaluation as ev
from datacredit.results import build_results, results_table
from datacredit.spec import parse_manifest
from datacredit.storage import open_storage, write_json
from tests.tiny import CONTRIBUTORS, TinyData, tiny_manifest

# ---------------------------------------------------------------- correlation intervals


def test_fisher_interval_matches_the_formula_and_covers_at_95_percent() -> None:
    lo, hi = ev.fisher_interval(0.5, 28)
    se = 1 / math.sqrt(25)
    assert (lo, hi) == pytest.approx((math.tanh(math.atanh(0.5) - 1.959964 * se),
                                      math.tanh(math.atanh(0.5) + 1.959964 * se)), abs=1e-6)
    rank_lo, rank_hi = ev.fisher_interval(0.5, 28, rank=True)
    assert rank_lo < lo and rank_hi > hi  # Spearman's variance is 1.06/(n-3)
    assert all(math.isnan(x) for x in ev.fisher_interval(0.9, 3))  # n < 4: undefined
    assert all(math.isnan(x) for x in ev.fisher_interval(1.0, 10))  # atanh(1) is infinite

    rng = np.random.default_rng(0)
    rho, n, hits, trials = 0.6, 20, 0, 600
    cov = [[1, rho], [rho, 1]]
    for _ in range(trials):
        x, y = rng.multivariate_normal([0, 0], cov, n).T
        c = ev.pearson_ci(x, y)
        hits += c.low <= rho <= c.high
    assert 0.92 <= hits / trials <= 0.98


def test_pearson_ci_and_spearman_ci_are_json_safe() -> None:
    good = ev.pearson_ci([1, 2, 3, 4, 5], [1.1, 2.3, 2.9, 4.2, 5.1])
    assert good.value > 0.98 and good.low < good.value < good.high and good.n == 5
    flat = ev.spearman_ci([1, 1, 1, 1], [1, 2, 3, 4]).to_dict()
    assert flat == {"value": None, "ci95": [None, None], "n": 4}


def test_pearson_within_removes_what_size_alone_explains() -> None:
    rng = np.random.default_rng(1)
    sizes = np.repeat([1, 2, 3], 10)
    x = 10 * sizes + rng.normal(size=30)
    y = 10 * sizes + rng.normal(size=30)  # independent of x beyond the size
    assert ev.pearson(x, y) > 0.9
    assert abs(ev.pearson_within(x, y, sizes)) < 0.5
    assert ev.pearson_within(x, x + 5 * sizes, sizes) == pytest.approx(1.0)
    # 4 pairs in 3 groups leave one residual degree of freedom: r would be ±1 whatever the data
    assert math.isnan(ev.pearson_within([1, 2, 3, 4], [4, 1, 3, 2], [1, 1, 2, 3]))
    with pytest.raises(ValueError, match="equal lengths"):
        ev.pearson_within([1, 2], [1, 2], [1])


# ---------------------------------------------------------------- grid and recommendation


def test_steps_and_ratios_options() -> None:
    assert cal.parse_steps("0.25x,0.5x,1x,2x", 8) == (2, 4, 8, 16)
    assert cal.parse_steps("40, 1x, 40", 8) == (8, 40)
    assert cal.parse_steps("0.01x", 8) == (1,)
    with pytest.raises(cal.CalibrationError, match="--steps"):
        cal.parse_steps("fast", 8)
    with pytest.raises(cal.CalibrationError, match="≥ 1 step"):
        cal.parse_steps("0", 8)
    assert cal.parse_ratios("", 0.3) == (0.2, 0.3, 0.5)
    assert cal.parse_ratios("0.5,0.2", 0.3) == (0.2, 0.5)
    with pytest.raises(cal.CalibrationError, match=r"--ratios.*\(0, 1\)"):
        cal.parse_ratios("0.2,1.5", 0.3)
    assert all(0 < r < 1 for r in cal.default_ratios(0.9) + cal.default_ratios(0.05))
    # the manifest's own setting is always in the grid
    assert cal.grid((0.5,), (4,), (0.3, 8)) == [(0.3, 8), (0.5, 4)]


def _cell(ratio: float, steps: int, r: float | None, work: float, seconds: float = 1.0) -> dict:
    return {"ratio": ratio, "steps": steps, "pearson": {"value": r, "ci95": [None, None], "n": 8}, "work": work,
            "seconds": seconds}


def test_recommendation_is_the_cheapest_setting_reaching_the_threshold() -> None:
    cells = [_cell(0.3, 8, 0.95, work=300), _cell(0.5, 4, 0.82, work=100), _cell(0.5, 2, 0.79, work=50),
             _cell(0.2, 2, None, work=10)]
    rec = cal.recommend(cells)
    assert rec["met"] and (rec["ratio"], rec["steps"]) == (0.5, 4)
    snippet = yaml.safe_load(rec["snippet"])
    assert snippet == {"spec": {"method": {"prune": {"ratio": 0.5}, "finetune": {"steps": 4}}}}
    # ties on work go to fewer measured seconds
    tie = cal.recommend([_cell(0.3, 8, 0.9, 100, seconds=2.0), _cell(0.5, 8, 0.9, 100, seconds=1.0)])
    assert tie["ratio"] == 0.5
    # nothing reaches 0.8: the highest r, flagged as not met
    low = cal.recommend([_cell(0.3, 8, 0.6, 300), _cell(0.5, 4, 0.7, 100)])
    assert not low["met"] and (low["ratio"], low["steps"], low["pearson"]) == (0.5, 4, 0.7)
    none = cal.recommend([_cell(0.3, 8, None, 300)])
    assert none["ratio"] is None and not none["met"]


# ---------------------------------------------------------------- fidelity into results


def _run(tmp_path: Path, ratio: float = 0.3, steps: int = 8):
    m = tiny_manifest("fid", str(tmp_path), str(tmp_path), {"uri": str(tmp_path / "runs")})
    m["spec"]["method"]["prune"]["ratio"] = ratio
    m["spec"]["method"]["finetune"]["steps"] = steps
    return parse_manifest(m)


def _report(run, own_r: float, rec: tuple[float, int, bool] = (0.5, 4, True)) -> dict:
    cells = [{**_cell(0.3, 8, own_r, 300), "coalitions": 8,
              "spearman": {"value": own_r - 0.05, "ci95": [0.1, 0.9], "n": 8}},
             {**_cell(0.5, 4, 0.9, 100), "coalitions": 8, "spearman": {"value": 0.9, "ci95": [0.5, 0.98], "n": 8}}]
    cells[0]["pearson"]["ci95"] = [own_r - 0.4, min(own_r + 0.1, 0.99)]
    return {"configHash": run.config_hash(), "cells": cells, "threshold": 0.8, "interval": cal.INTERVAL,
            "recommendation": {"ratio": rec[0], "steps": rec[1], "met": rec[2]}}


def test_fidelity_of_reads_the_runs_own_setting(tmp_path: Path) -> None:
    run = _run(tmp_path)
    store = open_storage(str(tmp_path / "store"))
    assert cal.fidelity_of(store, run) is None  # not calibrated
    write_json(store, cal.REPORT, _report(run, 0.62))
    fid = cal.fidelity_of(store, run)
    assert fid is not None and (fid["ratio"], fid["steps"], fid["coalitions"]) == (0.3, 8, 8)
    assert fid["pearson"]["value"] == 0.62 and fid["spearman"]["value"] == pytest.approx(0.57) and not fid["ok"]
    assert cal.fidelity_of(store, run.spec) == fid  # a bare spec works too
    # a report made for other settings is not this run's fidelity
    assert cal.fidelity_of(store, _run(tmp_path, steps=9)) is None
    write_json(store, cal.REPORT, {**_report(run, 0.62), "configHash": ""})
    assert cal.fidelity_of(store, _run(tmp_path, steps=9)) is None  # no cell for k=9

    warning = cal.fidelity_warning(fid)
    assert warning and "Pearson 0.62" in warning and "below 0.8" in warning
    assert "method.prune.ratio: 0.5" in warning and "method.finetune.steps: 4" in warning
    write_json(store, cal.REPORT, _report(run, 0.62, rec=(0.3, 8, False)))
    assert "raise method.finetune.steps" in (cal.fidelity_warning(cal.fidelity_of(store, run)) or "")
    write_json(store, cal.REPORT, _report(run, 0.91))
    good = cal.fidelity_of(store, run)
    assert good and good["ok"] and cal.fidelity_warning(good) is None
    assert cal.fidelity_warning(None) is None


def test_build_results_carries_fidelity_warning_and_caption(tmp_path: Path) -> None:
    run = _run(tmp_path)
    store = open_storage(str(tmp_path / "store"))
    contributors = [{"name": n, "id": n, "images": 3} for n in CONTRIBUTORS]
    kw = {"run_name": "r", "property_name": "quality", "method": "exact", "v_empty": 0.0, "v_full": 4.0,
          "evaluations": 16, "converged": True, "stop_reason": "budget", "wall_seconds": 1.0}
    values, stderr = np.array([1.0, 2.0, 0.5, 0.5]), np.full(4, 0.1)
    plain = build_results(contributors, values, stderr, **kw)
    assert "fidelity" not in plain and "warnings" not in plain

    write_json(store, cal.REPORT, _report(run, 0.62))
    low = build_results(contributors, values, stderr, fidelity=cal.fidelity_of(store, run), **kw)
    assert low["fidelity"]["pearson"]["value"] == 0.62
    assert len(low["warnings"]) == 1 and "below 0.8" in low["warnings"][0]
    console = Console(record=True, width=200)
    console.print(results_table(low))
    text = " ".join(console.export_text().split())  # the caption wraps at the table's width
    assert "fidelity vs retraining: Pearson 0.62 [0.22, 0.72]" in text and "below 0.8" in text

    write_json(store, cal.REPORT, _report(run, 0.91))
    good = build_results(contributors, values, stderr, fidelity=cal.fidelity_of(store, run), **kw)
    assert good["fidelity"]["ok"] and "warnings" not in good


def test_cli_refuses_a_missing_manifest_and_bad_options(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from datacredit.cli import app

    res = CliRunner().invoke(app, ["calibrate", str(tmp_path / "nope.yaml")])
    assert res.exit_code == 3 and "no such manifest" in res.output
    res = CliRunner().invoke(app, ["calibrate", str(tmp_path), "--coalitions", "2"])
    assert res.exit_code == 2 and "--coalitions" in res.output


# ---------------------------------------------------------------- end to end


@pytest.mark.workload
def test_calibrate_stores_reuses_and_recommends(tiny_data: TinyData, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from datacredit.cli import app
    from datacredit.jobs.calibrate import CalibrationSettings, calibrate
    from datacredit.jobs.evaluate import GroundTruth
    from datacredit.jobs.worker import run_coalition
    from datacredit.runstate import open_run

    manifest = tiny_manifest("tiny-calib", str(tiny_data.images), str(tiny_data.reference),
                             {"uri": str(tmp_path / "runs")})
    manifest["spec"]["model"]["train"].update(steps=12, batchSize=16)  # every retrain trains this from scratch
    manifest["spec"]["method"]["finetune"]["steps"] = 4
    path = tmp_path / "manifest.yaml"
    path.write_text(yaml.safe_dump(manifest))
    run = parse_manifest(manifest)
    ref = open_run(run)

    # the CLI prepares the run (nothing ran yet), then calibrates: 2 ratios x 2 k, 4 coalitions
    args = ["calibrate", str(path), "--coalitions", "4", "--steps", "0.5x,1x", "--ratios", "0.3,0.5"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert ref.store.exists("prepare/result.json") and ref.store.exists(cal.REPORT)
    assert "Pearson" in res.output and "retrained now: 4" in res.output and "rule:" in res.output
    # not a terminal: a plain line per finished step, not a live bar
    assert re.search(r"^calibration retrains \d+/4 \(.+\) eta \S+$", res.output, re.M), res.output
    assert re.search(r"^sparsified-FT sweep \d+/\d+ \(.+\) eta \S+$", res.output, re.M), res.output

    seen: list[GroundTruth] = []
    report = calibrate(ref.uri, CalibrationSettings(coalitions=4, steps="0.5x,1x", ratios="0.3,0.5"),
                       on_truth=seen.append)
    assert seen[0].trained == 0 and report["retrainedNow"] == 0 and report["sweptNow"] == 0  # all reused
    assert report["grid"] == {"ratios": [0.3, 0.5], "steps": [2, 4]}
    assert len(report["coalitions"]) == 4 and len(set(map(tuple, report["coalitions"]))) == 4
    assert {len(m) for m in report["coalitions"]} == {1, 2, 3}  # sizes of alpha = 0.25, 0.5, 0.75 of 4
    lds_tests = {s for a in (0.25, 0.5, 0.75) for s in ev.datamodel_subsets(4, a, 2, seed=run.spec.seed)}
    assert {tuple(m) for m in report["coalitions"]} <= lds_tests  # evaluate's first test coalitions: shared
    assert len(report["cells"]) == 4
    for c in report["cells"]:
        assert c["coalitions"] == 4 and len(c["utilities"]) == 4 and c["seconds"] > 0
        r = c["pearson"]
        assert r["value"] is None or (r["ci95"][0] <= r["value"] <= r["ci95"][1] and -1 <= r["value"] <= 1)
    work = {(c["ratio"], c["steps"]): c["work"] for c in report["cells"]}
    assert work[(0.5, 4)] < work[(0.3, 4)] and work[(0.3, 2)] < work[(0.3, 4)]  # fewer params, fewer steps
    assert report["models"]["0.5"]["paramsPruned"] < report["models"]["0.3"]["paramsPruned"]
    assert (report["manifest"]["ratio"], report["manifest"]["steps"]) == (0.3, 4)
    rec = report["recommendation"]
    assert rec["rule"] == cal.RULE and (rec["ratio"] is None or (rec["ratio"], rec["steps"]) in work)

    # stored ground truth: retrain rows evaluate reuses, sweep rows keyed by (ratio, k, members, seed)
    truth = ev.parse_truth(ref.store.read_bytes("evaluation/retrain.jsonl").decode())
    cfg = seen[0].configs["retrain"]
    for members, u in zip(report["coalitions"], report["retrained"], strict=True):
        assert truth[ev.truth_key("retrain", members, run.spec.seed, cfg)].utility == pytest.approx(u)
    sweep = cal.parse_sweep(ref.store.read_bytes(cal.SWEEP).decode())
    assert len(sweep) == 16 and ref.store.exists("calibration/sparsified/r0.5/info.json")

    # the manifest's own cell is exactly what the run measures for that coalition
    own = next(c for c in report["cells"] if (c["ratio"], c["steps"]) == (0.3, 4))
    assert run_coalition(ref.uri, report["coalitions"][0])["utility"] == pytest.approx(own["utilities"][0])

    fid = cal.fidelity_of(ref.store, run)
    assert fid is not None and fid["coalitions"] == 4 and fid["pearson"] == report["manifest"]["pearson"]
