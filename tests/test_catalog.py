"""Finding runs in storage (local and operator folders alike) and comparing two runs' values."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from datacredit import layout
from datacredit.catalog import AmbiguousRun, compare, find_run, list_runs
from datacredit.cli import app
from datacredit.results import build_results, save_results
from datacredit.runstate import run_uri
from datacredit.spec import ValuationRun, parse_manifest
from datacredit.storage import open_storage, write_json

runner = CliRunner()


def _manifest(tmp_path: Path, name: str = "art", steps: int = 10) -> dict:
    return {"apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": name},
            "spec": {"dataset": {"images": str(tmp_path / "images")}, "method": {"finetune": {"steps": steps}},
                     "storage": {"uri": str(tmp_path / "runs")}}}


def _place(run: ValuationRun, uri: str, values: dict[str, float] | None) -> str:
    """A run folder at ``uri`` as either executor leaves it: run.json, and results when ``values`` are given."""
    store = open_storage(uri)
    write_json(store, layout.RUN, {"manifest": run.to_manifest(), "configHash": run.config_hash()})
    if values is not None:
        names = list(values)
        doc = build_results([{"name": n, "id": n, "images": 3} for n in names], np.array([values[n] for n in names]),
                            np.full(len(names), 0.1), run_name=run.metadata.name, property_name="quality",
                            method="kernel", v_empty=0.0, v_full=sum(values.values()), evaluations=12,
                            converged=False, stop_reason="budget", wall_seconds=1.0)
        save_results(store, doc)
    return uri


def _operator_uri(run: ValuationRun, uid: str) -> str:
    return run_uri(run, uid)  # the operator names the folder by the CR's uid


def test_list_runs_finds_local_and_operator_folders_with_their_state(tmp_path: Path) -> None:
    run = parse_manifest(_manifest(tmp_path))
    local = _place(run, run_uri(run), {"a": 1.0, "b": 2.0})
    cluster = _place(run, _operator_uri(run, "0f3c9a7e-1111-2222-3333-444455556666"), None)
    found = list_runs(open_storage(run.spec.storage.uri))
    assert [(e.uri, e.finished, e.evaluations, e.contributors) for e in found] == sorted(
        [(local, True, 12, 2), (cluster, False, None, None)])
    assert {(e.namespace, e.name, e.config_hash) for e in found} == {("default", "art", run.config_hash())}


def test_a_manifest_finds_the_operator_run_of_its_settings_and_says_when_several_match(tmp_path: Path) -> None:
    run = parse_manifest(_manifest(tmp_path))
    other = parse_manifest(_manifest(tmp_path, steps=20))  # same name, other settings
    assert find_run(run) == run_uri(run)  # nothing yet: where `datacredit run` would write
    _place(other, _operator_uri(other, "aaaaaaaa-0000"), {"a": 1.0})
    assert find_run(run) == run_uri(run)
    cluster = _place(run, _operator_uri(run, "bbbbbbbb-0000"), {"a": 1.0})
    assert find_run(run) == cluster
    _place(run, _operator_uri(run, "cccccccc-0000"), None)
    with pytest.raises(AmbiguousRun, match="2 runs of default/art"):
        find_run(run)
    own = _place(run, run_uri(run), None)  # this machine's own run wins
    assert find_run(run) == own


def test_compare_lines_up_contributors_by_name_and_flags_real_changes() -> None:
    def doc(values: dict[str, float], stderr: float) -> dict:
        names = list(values)
        return build_results([{"name": n, "id": n} for n in names], np.array([values[n] for n in names]),
                             np.full(len(names), stderr), run_name="r", property_name="quality", method="kernel",
                             v_empty=0.0, v_full=1.0, evaluations=8, converged=False, stop_reason="budget",
                             wall_seconds=1.0)

    a = doc({"alice": 3.0, "bob": 2.0, "carol": 1.0, "dave": 0.0}, 0.1)
    b = doc({"alice": 3.05, "bob": 0.5, "carol": 1.1, "erin": 9.0}, 0.1)
    out = compare(a, b)
    rows = {r["name"]: r for r in out["contributors"]}
    assert out["common"] == 3 and list(rows) == ["alice", "bob", "carol", "dave", "erin"]
    assert rows["bob"]["delta"] == pytest.approx(-1.5) and rows["bob"]["significant"]
    assert not rows["alice"]["significant"] and rows["alice"]["rankA"] == 1 and rows["alice"]["rankB"] == 2
    assert rows["dave"]["b"] is None and rows["erin"]["a"] is None and rows["erin"]["rankB"] == 1
    assert out["spearman"] == pytest.approx(0.5) and -1 <= out["pearson"] <= 1


def test_cli_runs_compare_and_report_from_a_manifest(tmp_path: Path) -> None:
    doc = _manifest(tmp_path)
    run = parse_manifest(doc)
    manifest = tmp_path / "art.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    cluster = _place(run, _operator_uri(run, "dddddddd-0000"), {"alice": 1.0, "bob": -1.0, "carol": 0.5})
    shown = runner.invoke(app, ["report", str(manifest)])
    assert shown.exit_code == 0, shown.output
    assert "alice" in shown.output and "+1.0000" in shown.output
    listed = runner.invoke(app, ["runs", str(manifest), "--json"])
    assert listed.exit_code == 0 and [e["uri"] for e in json.loads(listed.stdout)] == [cluster]
    local = _place(run, run_uri(run), {"alice": 1.0, "bob": 2.0, "carol": 0.5})
    table = runner.invoke(app, ["compare", cluster, str(manifest)])  # the manifest now names the local run
    assert table.exit_code == 0, table.output
    assert "+3.0000 *" in table.output and "Spearman -0.500" in table.output  # bob: -1 -> 2
    assert runner.invoke(app, ["compare", cluster, str(tmp_path / "runs")]).exit_code == 1  # not a run
    assert runner.invoke(app, ["runs", str(tmp_path / "empty")]).exit_code == 0
    assert local in runner.invoke(app, ["runs", str(tmp_path / "runs")]).stdout
