"""MLflow logging against a real local tracking store (SQLite, MLflow's own schema and client)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient
from typer.testing import CliRunner

from datacredit.cli import app
from datacredit.tracking import flat_params, metric_key
from tests.tiny import TinyData, tiny_manifest


def test_flat_params_and_metric_keys() -> None:
    assert dict(flat_params({"a": {"b": 1, "c": [1, 2], "d": None}, "e": "x"})) == {"a.b": "1", "a.c": "[1, 2]",
                                                                                   "e": "x"}
    assert metric_key("value", "anne (ü)") == "value/anne ___"


@pytest.mark.workload
def test_run_logs_settings_utilities_and_values_to_mlflow(tiny_data: TinyData, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # nothing may land in the working folder (MLflow's default ./mlruns)
    doc = tiny_manifest("tiny-mlflow", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path / "r")},
                        estimator="exact", budget=16)
    manifest = tmp_path / "run.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    res = CliRunner().invoke(app, ["run", str(manifest), "--mlflow", uri])
    assert res.exit_code == 0, res.output
    run_id = res.stdout.split("mlflow: logged as run ")[1].split()[0]

    client = MlflowClient(uri)
    logged = client.get_run(run_id)
    assert logged.info.status == "FINISHED" and logged.data.tags["mlflow.runName"] == "tiny-mlflow"
    assert logged.data.params["spec.estimator.name"] == "exact" and logged.data.params["spec.model.family"] == "ddpm"
    results_dir = next((tmp_path / "r").rglob("results"))
    shapley = json.loads((results_dir / "shapley.json").read_text())
    rows = [json.loads(line) for line in (results_dir / "utilities.jsonl").read_text().splitlines()]
    history = client.get_metric_history(run_id, "utility")
    assert [m.step for m in history] == list(range(16)) == list(range(len(rows)))
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == pytest.approx([r["utility"] for r in rows])
    for c in shapley["contributors"]:
        assert logged.data.metrics[metric_key("value", c["name"])] == pytest.approx(c["value"])
    assert logged.data.metrics["v_full"] == pytest.approx(shapley["vFull"])
    artifacts = {a.path for a in client.list_artifacts(run_id, "results")}
    assert artifacts == {"results/shapley.json", "results/utilities.jsonl"}
    assert (tmp_path / "mlartifacts").is_dir() and not (tmp_path / "mlruns").exists()  # beside the database

    # an unreachable server: the values are still stored and printed, and the exit code says logging failed
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # MLflow's own settings: fail at once, not in minutes
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "5")
    again = CliRunner().invoke(app, ["run", str(manifest), "--mlflow", "http://127.0.0.1:9/"])
    assert again.exit_code == 1 and "not logged to MLflow" in again.output and "results:" in again.output
