"""results/shapley.json says what made it; values.png stays readable for many contributors."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image

from datacredit import layout, package_version
from datacredit.finish import finish_run
from datacredit.results import PLOT_ALL_UP_TO, build_results, plot_png
from datacredit.runstate import member_indices, open_run, planner_for, utility_row
from datacredit.spec import parse_manifest
from datacredit.storage import read_json, write_json


def test_results_hold_version_estimator_settings_config_hash_and_player_index(tmp_path: Path) -> None:
    run = parse_manifest({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "tiny"},
        "spec": {"dataset": {"images": str(tmp_path / "images")},
                 "estimator": {"name": "exact", "budget": 8, "seed": 5, "tolerance": 0.05, "replicates": {"seeds": 0}},
                 "storage": {"uri": str(tmp_path / "runs")}}})
    store = open_run(run).store
    contributors = [{"name": n, "id": f"id-{n}", "images": 1} for n in ("alice", "bob", "carol")]
    write_json(store, layout.MANIFEST, {"contributors": contributors, "configHash": run.config_hash()})
    values = (1.0, 3.0, -0.5)
    planner = planner_for(run, 3)
    rows = []
    for coalition in planner.sequence:
        members = member_indices(coalition)
        planner.tell(coalition, sum(values[i] for i in members))
        rows.append(utility_row(members, sum(values[i] for i in members), []))
    finish_run(store, run, planner, contributors, rows, 12.5)
    doc = read_json(store, f"{layout.RESULTS}/shapley.json")
    assert doc["version"] == package_version()
    assert doc["estimator"] == {"budget": 8, "seed": 5, "tolerance": 0.05}
    assert doc["configHash"] == run.config_hash()
    assert doc["wallClockSeconds"] == 12.5
    # sorted by value, each row says which player it is in manifest.json and utilities.jsonl
    assert [(r["name"], r["index"]) for r in doc["contributors"]] == [("bob", 1), ("alice", 0), ("carol", 2)]


def _doc(n: int) -> dict:
    rng = np.random.default_rng(0)
    contributors = [{"name": f"contributor-{i:03d}", "id": str(i), "images": 5} for i in range(n)]
    return build_results(contributors, rng.normal(size=n), np.abs(rng.normal(size=n)) * 0.1, run_name="big",
                         property_name="quality", method="kernel", v_empty=0.0, v_full=1.0, evaluations=500,
                         converged=False, stop_reason="budget", wall_seconds=3.0)


def test_values_png_of_258_contributors_shows_the_ends_and_a_histogram_at_a_bounded_size() -> None:
    big = Image.open(io.BytesIO(plot_png(_doc(258)) or b""))
    assert big.height < 2000 and big.width < 1000, big.size
    at_limit = Image.open(io.BytesIO(plot_png(_doc(PLOT_ALL_UP_TO)) or b""))
    assert at_limit.height < 2200  # every bar up to the limit
    small = Image.open(io.BytesIO(plot_png(_doc(6)) or b""))
    assert small.height < big.height
    huge = Image.open(io.BytesIO(plot_png(_doc(2000)) or b""))
    assert huge.size == big.size  # 40 bars and a histogram, whatever the number of contributors
