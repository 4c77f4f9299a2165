"""Optional experiment tracking: log a finished run to MLflow (``datacredit run --mlflow URI``).

One MLflow run per valuation run: the manifest's settings as parameters, every evaluated coalition's utility as the
``utility`` metric (step = its position in the plan), each contributor's value and standard error, the summary
(v(full), v(∅), the sum of the values, wall-clock seconds) and the results files as artifacts. Needs the
``tracking`` extra (``pip install 'datacredit[tracking]'``); any MLflow tracking URI works (``sqlite:///mlflow.db``,
``http://mlflow:5000``).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from . import layout
from .spec import ValuationRun
from .storage import Storage

BATCH, PARAM_BATCH = 1000, 100  # the most metrics and parameters MLflow takes in one log_batch call
_UNSAFE = re.compile(r"[^A-Za-z0-9_\-. /]")


class TrackingError(RuntimeError):
    """MLflow is missing or the tracking server refused the run; the valuation's results are kept regardless."""


def metric_key(prefix: str, name: str) -> str:
    """An MLflow metric key for a contributor (MLflow allows letters, digits, ``_ - . /`` and spaces)."""
    return f"{prefix}/{_UNSAFE.sub('_', name)}"


def flat_params(doc: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Scalar leaves of a nested manifest as ``dotted.key`` -> string (lists as JSON)."""
    for key, value in doc.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, Mapping):
            yield from flat_params(value, dotted + ".")
        elif value is not None:
            yield dotted, json.dumps(value) if isinstance(value, list) else str(value)


def artifact_root(tracking_uri: str) -> str | None:
    """Where a new experiment keeps artifacts: beside a local SQLite database (MLflow's default, ``./mlruns``,
    would land wherever the command runs); a tracking server decides for itself (None)."""
    if not tracking_uri.startswith("sqlite:///"):
        return None
    return (Path(tracking_uri.removeprefix("sqlite:///")).expanduser().resolve().parent / "mlartifacts").as_uri()


def log_run(tracking_uri: str, run: ValuationRun, store: Storage, results: Mapping[str, Any],
            experiment: str = "datacredit") -> str:
    """Log the finished run in ``store`` to MLflow at ``tracking_uri``; returns the MLflow run id."""
    try:
        from mlflow.entities import Metric, Param
        from mlflow.tracking import MlflowClient
    except ImportError:
        raise TrackingError("--mlflow needs MLflow: pip install 'datacredit[tracking]'") from None
    try:
        client = MlflowClient(tracking_uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found else client.create_experiment(
            experiment, artifact_location=artifact_root(tracking_uri))
        tags = {"datacredit.configHash": run.config_hash(), "datacredit.runUri": store.uri,
                "mlflow.runName": run.metadata.name}
        mlrun = client.create_run(experiment_id, tags=tags)
        rid, now = mlrun.info.run_id, int(time.time() * 1000)
        params = [Param(k, v[:6000]) for k, v in flat_params(run.to_manifest()["spec"], "spec.")]
        table = store.read_bytes(layout.UTILITIES).decode()  # read once: metrics and the artifact
        rows = [json.loads(line) for line in table.splitlines() if line]
        metrics = [Metric("utility", float(r["utility"]), now, step) for step, r in enumerate(rows)]
        metrics += [Metric("coalition_size", float(len(r["members"])), now, step) for step, r in enumerate(rows)]
        for c in results["contributors"]:
            metrics.append(Metric(metric_key("value", c["name"]), float(c["value"]), now, 0))
            if c.get("stderr") is not None:
                metrics.append(Metric(metric_key("stderr", c["name"]), float(c["stderr"]), now, 0))
        for key, name in (("vFull", "v_full"), ("vEmpty", "v_empty"), ("sumOfValues", "sum_of_values"),
                          ("wallClockSeconds", "wall_clock_seconds"), ("evaluations", "evaluations")):
            if isinstance(results.get(key), int | float):
                metrics.append(Metric(name, float(results[key]), now, 0))
        for lo in range(0, len(params), PARAM_BATCH):
            client.log_batch(rid, params=params[lo:lo + PARAM_BATCH])
        for lo in range(0, len(metrics), BATCH):
            client.log_batch(rid, metrics=metrics[lo:lo + BATCH])
        client.log_dict(rid, dict(results), "results/shapley.json")
        client.log_text(rid, table, "results/utilities.jsonl")
        client.set_terminated(rid)
    except TrackingError:
        raise
    except Exception as e:  # noqa: BLE001 - any MLflow failure is reported, never loses the computed values
        raise TrackingError(f"MLflow at {tracking_uri}: {type(e).__name__}: {e}") from None
    return rid
