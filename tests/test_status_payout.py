"""The ValuationRun status carries a bounded summary of the payout spec.payout asked for, schema-valid."""

from __future__ import annotations

from typing import Any

from datacredit.crd import status_schema
from datacredit.operator.reconcile import Decision
from datacredit.operator.status import build_status, payout_patch, status_payout


def _document(n: int = 5) -> dict[str, Any]:
    """A payouts/<period>.json document as make_payout builds it (contributors largest amount first)."""
    names = ["x" * 80, "bob", "carol", "dan", "eve"][:n]
    amounts = [5000, 3000, 1500, 500, 0][:n]
    return {"period": "2025-06", "rule": "lower-bound", "currency": "EUR", "pool": "120.00", "paid": "100.00",
            "escrow": "20.00", "poolMinor": 12000, "contributors": [
                {"name": name, "amountMinor": a, "amount": f"{a // 100}.{a % 100:02d}", "why": "w" * 500}
                for name, a in zip(names, amounts, strict=True)]}


def test_the_summary_is_bounded_exact_and_in_the_schema() -> None:
    assert status_payout(None) is None
    summary = status_payout({"document": _document(), "written": ["payouts/2025-06.json"]})
    assert summary is not None
    assert {k: summary[k] for k in ("period", "rule", "currency", "total", "paid", "escrow")} == {
        "period": "2025-06", "rule": "lower-bound", "currency": "EUR", "total": "120.00", "paid": "100.00",
        "escrow": "20.00"}
    assert [t["amount"] for t in summary["top"]] == ["50.00", "30.00", "15.00"]  # the 3 largest
    assert len(summary["top"][0]["contributor"]) == 63 and "~" in summary["top"][0]["contributor"]  # display_name
    schema = status_schema()["properties"]["payout"]
    assert set(summary) <= set(schema["properties"])  # nothing the API server would prune
    assert all(set(t) <= set(schema["properties"]["top"]["items"]["properties"]) for t in summary["top"])
    nobody = status_payout({"document": {**_document(2), "contributors": [
        {"name": "a", "amountMinor": 0, "amount": "0.00"}]}})
    assert nobody is not None and nobody["top"] == []  # nobody paid (all in escrow): no top entry of 0


def test_the_status_shows_the_payout_and_a_paid_out_condition() -> None:
    plan = Decision(phase="Succeeded")
    summary = status_payout({"document": _document(), "written": []})
    status = build_status(plan, None, {}, generation=2, results_uri="s3://b/r/results/", contributors=5,
                          payout=summary, now="2026-01-01T00:00:00Z")
    assert status["payout"] == summary and status["phase"] == "Succeeded"
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["PaidOut"]["status"] == "True" and conds["PaidOut"]["reason"] == "PayoutWritten"
    assert conds["PaidOut"]["message"] == "120.00 EUR by lower-bound in payouts/2025-06.json"
    assert "payout" not in build_status(plan, None, {}, generation=2, results_uri="", contributors=5)
    assert "PaidOut" not in {c["type"] for c in build_status(plan, None, {}, generation=2, results_uri="",
                                                             contributors=5)["conditions"]}


def test_a_failed_payout_is_a_condition_and_a_message_not_a_failed_run() -> None:
    failed = status_payout({"error": "nothing to pay on: " + "z" * 5000, "period": "2025-06"})
    assert failed is not None and failed["period"] == "2025-06" and len(failed["error"]) == 4000
    status = build_status(Decision(phase="Succeeded"), None, {}, generation=1, results_uri="s3://b/r/results/",
                          contributors=2, payout=failed, now="2026-01-01T00:00:00Z")
    conds = {c["type"]: c for c in status["conditions"]}
    assert status["phase"] == "Succeeded" and conds["Ready"]["status"] == "True"
    assert conds["PaidOut"]["status"] == "False" and conds["PaidOut"]["reason"] == "PayoutFailed"
    assert conds["PaidOut"]["message"].startswith("nothing to pay on")
    assert set(status["payout"]) <= set(status_schema()["properties"]["payout"]["properties"])


def test_the_merge_patch_clears_what_an_earlier_payout_left() -> None:
    failed = {"period": "2025-06", "error": "no"}
    patch = payout_patch(failed)
    assert patch["error"] == "no" and patch["top"] is None and patch["total"] is None
    ok = status_payout({"document": _document(), "written": []})
    assert ok is not None and payout_patch(ok)["error"] is None and payout_patch(ok)["top"] == ok["top"]
    assert set(payout_patch(ok)) <= set(status_schema()["properties"]["payout"]["properties"])

