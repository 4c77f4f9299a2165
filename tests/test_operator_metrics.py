"""Operator metrics: the exact names the dashboards use, per-run series set from status and removed on delete."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import generate_latest

from datacredit.operator import metrics

STATUS = {
    "phase": "Evaluating",
    "coalitions": {"planned": 16, "succeeded": 6, "running": 2, "queued": 1, "failed": 1},
    "estimate": {"maxStderr": 0.02},
    "top": [{"contributor": "ann", "value": 0.3}, {"contributor": "bob", "value": 0.1}],
}


def _text() -> str:
    return generate_latest(metrics.REGISTRY).decode()


def test_names_and_run_series() -> None:
    metrics.start(0)
    metrics.observe_run("ns1", "r1", STATUS, 120.0)
    metrics.attempt("ns1", "Started")
    metrics.completed("ns1", "succeeded", {"finetune": 3.0, "sample": 1.0, "property": 0.5, "total": 4.5})
    metrics.queue_wait(2.0)
    metrics.run_succeeded("ns1", "r1", 1.7e9)
    metrics.reconciled(True, 0.01)
    metrics.reconciled(False, 0.02)
    text = _text()
    for line in (
        'datacredit_build_info{version="',
        'datacredit_runs{namespace="ns1",phase="Evaluating"} 1.0',
        'datacredit_runs{namespace="ns1",phase="Succeeded"} 0.0',
        'datacredit_coalitions{name="r1",namespace="ns1",phase="Planned"} 6.0',
        'datacredit_coalitions{name="r1",namespace="ns1",phase="Succeeded"} 6.0',
        'datacredit_run_progress_ratio{name="r1",namespace="ns1"} 0.4375',
        'datacredit_run_eta_seconds{name="r1",namespace="ns1"} 120.0',
        'datacredit_run_top_value{contributor="ann",name="r1",namespace="ns1",rank="1"} 0.3',
        'datacredit_run_max_stderr{name="r1",namespace="ns1"} 0.02',
        'datacredit_coalition_attempts_total{namespace="ns1",reason="Started"}',
        'datacredit_coalitions_completed_total{namespace="ns1",result="succeeded"}',
        'datacredit_coalition_duration_seconds_bucket{le="5.0",stage="total"}',
        "datacredit_coalition_queue_wait_seconds_count",
        'datacredit_run_last_success_timestamp_seconds{name="r1",namespace="ns1"}',
        'datacredit_reconcile_total{result="error"}',
        "datacredit_reconcile_duration_seconds_bucket",
    ):
        assert line in text, line

    # a new leader replaces the old rank-1 series instead of adding one
    metrics.observe_run("ns1", "r1", {**STATUS, "top": [{"contributor": "bob", "value": 0.4}]}, None)
    text = _text()
    assert 'contributor="ann"' not in text and 'contributor="bob",name="r1",namespace="ns1",rank="1"} 0.4' in text

    metrics.forget_run("ns1", "r1")
    text = _text()
    assert 'name="r1"' not in text
    assert 'datacredit_runs{namespace="ns1",phase="Evaluating"} 0.0' in text


def test_docs_name_every_attempt_reason() -> None:
    """docs/operator.md lists every reason the attempts counter can carry (each failure of the vocabulary)."""
    docs = (Path(__file__).resolve().parents[1] / "docs" / "operator.md").read_text()
    listed = docs.split("`datacredit_coalition_attempts_total{namespace,reason}` (", 1)[1].split(")", 1)[0]
    assert sorted(r.strip() for r in listed.replace("\n", " ").split(",")) == sorted(metrics.ATTEMPT_REASONS)
