"""The command line: validation errors name fields; estimate re-fits a stored table; Ctrl-C resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from datacredit.cli import app
from datacredit.runstate import open_run
from datacredit.spec import parse_manifest
from tests.tiny import TinyData, tiny_manifest

runner = CliRunner()
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_validate_reports_fields_and_exit_code(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "x"},
        "spec": {"dataset": {"images": "./d"}, "estimator": {"budget": 1}, "method": {"prune": {"ratio": 2}}},
    }))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 3
    assert "spec.estimator.budget" in res.output and "spec.method.prune.ratio" in res.output
    assert runner.invoke(app, ["run", str(bad)]).exit_code == 3


@pytest.mark.parametrize("uri", ["s3://", "s3://bucket/runs?v=1", "s3://bucket/runs#top"])
def test_storage_uris_that_lose_the_run_prefix_are_refused_before_anything_is_written(
    tmp_path: Path, uri: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "x"},
        "spec": {"dataset": {"images": "./d"}, "storage": {"uri": uri}},
    }))
    for command in ("validate", "run"):
        res = runner.invoke(app, [command, str(bad)])
        assert res.exit_code == 3 and "spec.storage.uri" in res.output, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]  # no ./s3: folder


@pytest.mark.parametrize("example", sorted(p.name for p in EXAMPLES.glob("*.yaml")))
def test_every_example_manifest_validates(example: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # where `datacredit demo --data-only` has written the digits data
    for folder in ("demo-run/data/images", "demo-run/data/reference"):
        (tmp_path / folder).mkdir(parents=True)
    res = runner.invoke(app, ["validate", str(EXAMPLES / example)])
    assert res.exit_code == 0, res.output


def test_validate_names_missing_folders_and_property_fields_before_any_training(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "bad"},
        "spec": {"dataset": {"images": "./no-such-folder"}, "storage": {"uri": "./runs"},
                 "property": {"name": "fid", "clusters": 4, "weights": "s3://models/inception.pth"}}}))
    res = runner.invoke(app, ["validate", str(bad)])
    assert res.exit_code == 3 and "spec.dataset.images: ./no-such-folder does not exist" in res.output, res.output
    assert "spec.property.clusters: property 'fid' does not use it" in res.output
    res = runner.invoke(app, ["validate", "--no-paths", str(bad)])
    assert res.exit_code == 3 and "spec.dataset.images" not in res.output and "spec.property.clusters" in res.output
    res = runner.invoke(app, ["run", str(bad)])  # refused before prepare: nothing trained, no run folder
    assert res.exit_code == 3 and "spec.dataset.images" in res.output, res.output
    assert not (tmp_path / "runs").exists()


def test_estimate_from_a_stored_table(tmp_path: Path) -> None:
    weights = np.array([3.0, 1.0, -2.0])
    rows = []
    for mask in range(8):
        members = [i for i in range(3) if mask >> i & 1]
        rows.append(json.dumps({"members": members, "utility": float(weights[members].sum())}))
    table = tmp_path / "utilities.jsonl"
    table.write_text("\n".join(rows) + "\n")
    res = runner.invoke(app, ["estimate", "--table", str(table), "--method", "exact"])
    assert res.exit_code == 0, res.output
    assert "+3.00000" in res.output and "-2.00000" in res.output
    assert runner.invoke(app, ["estimate", "--table", str(tmp_path / "missing.jsonl")]).exit_code == 3


def _results(store) -> dict[str, int]:
    return {k: (store.root / k).stat().st_mtime_ns for k in store.list("coalitions") if k.endswith("result.json")}


@pytest.mark.workload
def test_ctrl_c_leaves_a_run_that_resumes(tiny_data: TinyData, tmp_path: Path) -> None:
    doc = tiny_manifest("tiny-interrupt", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path)})
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    store = open_run(parse_manifest(doc)).store
    exe = [str(Path(sys.executable).parent / "datacredit"), "run", str(manifest), "--workers", "1"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(exe, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    deadline = time.monotonic() + 600
    while len(_results(store)) < 3 and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.5)
    assert proc.poll() is None, proc.communicate()[0]
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole process group
    out = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, out
    assert "rerun the same command to resume" in out
    before = _results(store)
    assert 3 <= len(before) < 16

    res = subprocess.run(exe, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    after = _results(store)
    assert len(after) == 16
    assert {k: after[k] for k in before} == before  # finished coalitions were not evaluated again
    assert "reused" in res.stdout + res.stderr
