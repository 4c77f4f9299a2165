"""The command line: validation errors name fields; estimate re-fits a stored table; Ctrl-C resumes."""

from __future__ import annotations

import json
import os
import re
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
from datacredit.storage import open_storage, write_json
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
    doc["spec"]["execution"]["coalitionsPerJob"] = 4  # packs of 4: results arrive 4 at a time, Ctrl-C between them
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
    # output to a pipe: plain lines of prepare's stages and training, then one line per finished coalition
    assert "prepare: data: 96 images of 4 contributors" in out and "train full model: step 30/30" in out, out
    assert PLAIN_COALITION.search(out) and "━" not in out, out  # no live bar

    res = subprocess.run(exe, env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout + res.stderr
    after = _results(store)
    assert len(after) == 16
    assert {k: after[k] for k in before} == before  # finished coalitions were not evaluated again
    assert "reused" in res.stdout + res.stderr
    lines = PLAIN_COALITION.findall(res.stderr)  # a line for each coalition evaluated now, none for those reused
    assert len(lines) == 16 - len(before), res.stderr
    assert any("{} (∅)" in line or "all 4" in line or "{ann" in line for line in lines), lines


#: ``coalition 12/16 {ann, noise} utility -12.3456 (4.1 s) eta 3m10s``
PLAIN_COALITION = re.compile(r"^coalition \d+/16 .+ utility -?\d+\.\d{4} \((?:\d+\.\d s|\d+ s|\d+m\d\ds)\) "
                             r"eta \S+$", re.M)


@pytest.mark.workload
def test_worker_logs_plain_progress_and_exit_codes_say_retry_or_not(tiny_data: TinyData, tmp_path: Path) -> None:
    """`kubectl logs` of a prepare Job: stdout is not a terminal, and each stage and tenth of training shows."""
    doc = tiny_manifest("tiny-prepare-log", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path)})
    vr = parse_manifest(doc)
    ref = open_run(vr)
    write_json(ref.store, "run.json", {"manifest": vr.to_manifest(), "configHash": vr.config_hash()})
    early = runner.invoke(app, ["worker", "coalition", "--run", ref.uri, "--members", "0"])
    assert early.exit_code == 1 and "not ready" in early.output, early.output  # transient: the Job retries it
    res = runner.invoke(app, ["worker", "prepare", "--run", ref.uri])
    assert res.exit_code == 0, res.output
    bad = runner.invoke(app, ["worker", "coalition", "--run", ref.uri, "--members", "0,9"])
    assert bad.exit_code == 3 and "bad input" in bad.output and "--members" in bad.output, bad.output
    lines = res.stdout.splitlines()
    for stage in ("prepare: data: 96 images of 4 contributors", "prepare: model: ddpm", "prune: ratio 0.3",
                  "prepare: property: fitted", "prepare: done: 4 contributors"):
        assert any(line.startswith(stage) for line in lines), (stage, res.stdout)
    assert sum(line.startswith("train full model: step ") for line in lines) == 10  # 30 steps, one line per 3
    assert sum(line.startswith("fine-tune pruned: step ") for line in lines) == 10


# ---------------------------------------------------------------- estimate: the method asked for, names, formats


def _write_table(path: Path, rows: list[tuple[list[int], float]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"members": m, "utility": u}) + "\n" for m, u in rows))
    return path


def _additive(n: int, weights: np.ndarray, keep: list[int] | None = None) -> list[tuple[list[int], float]]:
    rows = []
    for mask in range(2**n):
        members = [i for i in range(n) if mask >> i & 1]
        rows.append((members, float(weights[members].sum())))
    return [rows[k] for k in keep] if keep is not None else rows


def test_estimate_refuses_a_method_the_table_cannot_give_instead_of_printing_kernel_numbers(tmp_path: Path) -> None:
    w = np.array([3.0, 1.0, -2.0])
    part = _write_table(tmp_path / "part.jsonl", _additive(3, w, keep=[0, 7, 1, 2, 4, 3]))  # 6 of 8 coalitions
    res = runner.invoke(app, ["estimate", "--table", str(part), "--method", "exact"])
    assert res.exit_code == 3 and "exact needs all 2^3 = 8 coalitions; the table has 6" in res.output, res.output
    res = runner.invoke(app, ["estimate", "--table", str(part), "--method", "permutation"])
    assert res.exit_code == 3 and "permutation needs the permutation chains" in res.output, res.output
    res = runner.invoke(app, ["estimate", "--table", str(part), "--method", "loo"])  # has {0,1} only
    assert res.exit_code == 3 and "missing for 0, 1" in res.output, res.output
    res = runner.invoke(app, ["estimate", "--table", str(part), "--method", "kernel"])
    assert res.exit_code == 0 and "kernel regression over 6 coalitions" in res.output, res.output
    full = _write_table(tmp_path / "full.jsonl", _additive(3, w))
    for method in ("exact", "permutation", "kernel"):  # every coalition: the exact values, and it says so
        res = runner.invoke(app, ["estimate", "--table", str(full), "--method", method])
        assert res.exit_code == 0 and "exact Shapley (all 8 coalitions" in res.output, res.output
        assert "+3.00000" in res.output and "-2.00000" in res.output
    res = runner.invoke(app, ["estimate", "--table", str(full), "--method", "banzhaf"])
    assert res.exit_code == 0 and "exact Banzhaf" in res.output
    rows = [json.loads(line) for line in full.read_text().splitlines()]
    for k, extra in ((0, [0.5, -0.4]), (3, [2.5, 4.4]), (5, [1.5, 0.4])):  # utilities under replicate seeds
        rows[k]["replicates"] = extra
    full.write_text("".join(json.dumps(r) + "\n" for r in rows))
    res = runner.invoke(app, ["estimate", "--table", str(full), "--method", "exact", "--json"])
    assert all(c["stderr"] > 0 for c in json.loads(res.stdout)["contributors"])  # the between-seed part


def test_estimate_permutation_from_the_runs_own_chains(tmp_path: Path) -> None:
    """A permutation run's table is estimated from its antithetic chains (the plan rebuilt from shapley.json)."""
    from datacredit.shapley.design import make_plan

    n, w = 5, np.array([3.0, 1.0, -2.0, 0.5, 0.25])
    plan = make_plan(n, 26, "permutation", 7)
    rows = [(m, float(w[m].sum() + 0.1 * len(m) ** 2)) for m in (list(np.flatnonzero(z)) for z in plan.sequence)]
    table = _write_table(tmp_path / "run" / "results" / "utilities.jsonl", [([int(i) for i in m], u) for m, u in rows])
    shapley = {"method": "permutation", "estimator": {"budget": 26, "seed": 7, "tolerance": 0.02},
               "contributors": [{"name": f"c{i}", "id": str(i), "index": i} for i in range(n)]}
    (table.parent / "shapley.json").write_text(json.dumps(shapley))
    res = runner.invoke(app, ["estimate", "--table", str(table), "--method", "permutation", "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["computed"].startswith("permutation sampling over") and "antithetic pair" in doc["computed"]
    assert [c["name"] for c in doc["contributors"]] == [f"c{i}" for i in range(n)]
    np.testing.assert_allclose([c["value"] for c in doc["contributors"]], w + 0.5)  # symmetric part split evenly
    (table.parent / "shapley.json").write_text(json.dumps({**shapley, "method": "kernel"}))
    res = runner.invoke(app, ["estimate", "--table", str(table), "--method", "permutation"])
    assert res.exit_code == 3 and "used kernel" in res.output, res.output


def test_estimate_names_contributors_and_prints_json_or_csv(tmp_path: Path) -> None:
    w = np.array([3.0, 1.0, -2.0])
    run = tmp_path / "run"
    table = _write_table(run / "results" / "utilities.jsonl", _additive(3, w))
    names = ["alice-with-a-name-longer-than-a-terminal-line-would-hold-in-a-table-of-values", "bob", "carol"]
    write_json(open_storage(str(run)), "manifest.json", {"contributors": [{"name": x, "id": x} for x in names],
                                                          "planner": {"method": "exact", "budget": 8, "seed": 0}})
    moved = _write_table(tmp_path / "elsewhere.jsonl", _additive(3, w))
    res = runner.invoke(app, ["estimate", "--table", str(moved), "--names", str(run)])  # the run folder
    assert res.exit_code == 0, res.output
    assert any(names[0] in line and "+3.00000" in line for line in res.output.splitlines()), res.output
    assert runner.invoke(app, ["estimate", "--table", str(table)]).exit_code == 0  # no results/shapley.json yet
    (run / "results" / "shapley.json").write_text(json.dumps({"method": "exact", "contributors": [
        {"name": "bob", "id": "b", "index": 1}, {"name": "alice", "id": "a", "index": 0},
        {"name": "carol", "id": "c", "index": 2}]}))
    res = runner.invoke(app, ["estimate", "--table", str(table), "--csv"])  # names from the shapley.json next to it
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines() == ["index,contributor,value,stderr,ci95_low,ci95_high", "0,alice,3,0,3,3",
                                       "1,bob,1,0,1,1", "2,carol,-2,0,-2,-2"]
    res = runner.invoke(app, ["estimate", "--table", str(moved), "--names", str(run / "results" / "shapley.json"),
                              "--method", "exact", "--json"])
    doc = json.loads(res.stdout)
    assert doc["method"] == "exact" and doc["coalitions"] == 8 and doc["nPlayers"] == 3
    assert [(c["name"], c["value"]) for c in doc["contributors"]] == [("alice", 3.0), ("bob", 1.0), ("carol", -2.0)]
    assert runner.invoke(app, ["estimate", "--table", str(table), "--json", "--csv"]).exit_code == 2
    res = runner.invoke(app, ["estimate", "--table", str(table), "--names", str(tmp_path / "nowhere")])
    assert res.exit_code == 3 and "no such file or run folder" in res.output
    res = runner.invoke(app, ["estimate", "--table", str(table), "--players", "4"])
    assert res.exit_code == 3 and "names 3 contributors" in res.output


# ---------------------------------------------------------------- report, --version, --help


def _finished(run: Path, names: list[str]) -> None:
    from datacredit.results import build_results, save_results

    store = open_storage(str(run))
    write_json(store, "run.json", {"manifest": {}, "configHash": "cfg"})
    contributors = [{"name": x, "id": f"id{i}", "images": 3} for i, x in enumerate(names)]
    save_results(store, build_results(contributors, np.arange(len(names), dtype=float), np.zeros(len(names)),
                                      run_name="r", property_name="quality", method="exact", v_empty=0.0,
                                      v_full=1.0, evaluations=8, converged=True, stop_reason="all_coalitions",
                                      wall_seconds=1.0))


def test_report_says_what_is_wrong_without_a_traceback(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    res = runner.invoke(app, ["report", str(tmp_path / "no-such-run")])
    assert res.exit_code == 3 and "no run at" in res.output and "is the run finished" not in res.output
    (tmp_path / "empty").mkdir()
    res = runner.invoke(app, ["report", str(tmp_path / "empty")])
    assert res.exit_code == 3 and "no run at" in res.output and "run.json" in res.output, res.output
    started = tmp_path / "started"
    write_json(open_storage(str(started)), "run.json", {"manifest": {}, "configHash": "cfg"})
    res = runner.invoke(app, ["report", str(started)])
    assert res.exit_code == 1 and "no results yet" in res.output, res.output
    long_name = "a-contributor-whose-name-is-much-longer-than-eighty-columns-of-a-terminal-would-show-whole"
    _finished(tmp_path / "done", [long_name, "bob"])
    res = runner.invoke(app, ["report", str(tmp_path / "done")])  # not a terminal: nothing wrapped or cut
    assert res.exit_code == 0 and any(long_name in line for line in res.output.splitlines()), res.output
    res = runner.invoke(app, ["report", str(tmp_path / "done" / "results")])
    assert res.exit_code == 3 and f"did you mean {tmp_path / 'done'}" in res.output.replace("\n", ""), res.output

    for key in [k for k in os.environ if k.startswith("AWS_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    res = runner.invoke(app, ["report", "s3://some-bucket/runs/default/r-1234abcd"])
    assert res.exit_code == 4, res.output
    assert "AWS_ACCESS_KEY_ID" in res.output and "AWS_SECRET_ACCESS_KEY" in res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert "Traceback" not in res.output


def test_version_exit_codes_and_help_texts(tmp_path: Path) -> None:
    from importlib.metadata import version

    res = runner.invoke(app, ["--version"])
    assert res.exit_code == 0 and res.output.strip() == f"datacredit {version('datacredit')}"
    text = " ".join(runner.invoke(app, ["--help"]).output.split())
    assert "Exit codes:" in text
    for code in ("0 done", "1 failed", "2 usage", "3 bad input", "4 storage unavailable", "130 interrupted"):
        assert code in text, code
    coalition = " ".join(runner.invoke(app, ["worker", "coalition", "--help"]).output.split())
    assert "coalitions/<id>/result.json" in coalition and "coalitions//" not in coalition
    for command in (["demo"], ["validate"], ["payout"], ["estimate"], ["--help"]):
        shown = runner.invoke(app, [*command, "--help"] if command != ["--help"] else command).output
        assert "<bool>" not in shown, (command, shown)
    demo = runner.invoke(app, ["demo", "--help"]).output
    assert "--no-quick" in demo and "--no-data-only" in demo
    assert "--no-overwrite" in runner.invoke(app, ["payout", "--help"]).output
    res = runner.invoke(app, ["demo", "--quick", "--no-data-only", "--data-only", "--dir", str(tmp_path / "d")])
    assert res.exit_code == 0 and (tmp_path / "d" / "digits-quick.yaml").is_file(), res.output
