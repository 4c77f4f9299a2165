"""The ValuationRun status carries the calibration fidelity of a finished run, bounded and schema-valid."""

from __future__ import annotations

from typing import Any

from datacredit.crd import status_schema
from datacredit.operator.reconcile import Decision
from datacredit.operator.status import build_status, status_fidelity


def _results(pearson: float | None, ok: bool) -> dict[str, Any]:
    return {"contributors": [], "fidelity": {
        "pearson": {"value": pearson, "ci95": [0.1, 0.9], "n": 8}, "spearman": {"value": 0.7, "ci95": [0.0, 0.9]},
        "coalitions": 8, "ok": ok, "ratio": 0.3, "steps": 60, "interval": "Fisher z ..." * 50,
        "recommended": {"ratio": 0.2, "steps": 60, "met": True}}}


def test_status_has_the_fidelity_numbers_only() -> None:
    assert status_fidelity({"contributors": []}) is None and status_fidelity(None) is None
    fid = status_fidelity(_results(0.61234567, ok=False))
    assert fid == {"pearson": 0.6123, "spearman": 0.7, "coalitions": 8, "ok": False}
    assert "pearson" not in (status_fidelity(_results(None, ok=False)) or {})  # undefined: left out, not 0

    plan = Decision(phase="Succeeded")
    status = build_status(plan, None, {}, generation=1, results_uri="s3://b/r/results/", contributors=4,
                          fidelity=fid, now="2026-01-01T00:00:00Z")
    assert status["fidelity"] == fid
    schema = status_schema()["properties"]["fidelity"]
    assert set(status["fidelity"]) <= set(schema["properties"])  # nothing the API server would prune
    assert "fidelity" not in build_status(plan, None, {}, generation=1, results_uri="", contributors=4)
