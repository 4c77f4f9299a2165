"""The reconcile pass with its I/O, without a cluster: local storage, a recording Job API, kopf's Patch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kopf
import numpy as np
import pytest

from datacredit import layout
from datacredit.ids import coalition_id
from datacredit.operator import handlers
from datacredit.operator.reconcile import job_views
from datacredit.storage import open_storage, read_json, write_json

UID = "0a1b2c3d-4e5f-6789-abcd-ef0123456789"
CONTRIBUTORS = [{"name": "ann", "id": "ann-1", "images": 3}, {"name": "bob", "id": "bob-2", "images": 3}]


class FakeBatch:
    """Records Job creations and deletions; 409 for a name created before."""

    created: list[dict[str, Any]] = []
    deleted: list[str] = []

    def create_namespaced_job(self, namespace: str, body: dict[str, Any]) -> None:
        from kubernetes.client.rest import ApiException

        if any(j["metadata"]["name"] == body["metadata"]["name"] for j in self.created):
            raise ApiException(status=409)
        self.created.append(body)

    def delete_namespaced_job(self, name: str, namespace: str, **_: Any) -> None:
        self.deleted.append(name)


@pytest.fixture()
def env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, Any]:
    FakeBatch.created, FakeBatch.deleted = [], []
    monkeypatch.setattr(handlers, "_memory", {})
    events: list[tuple[str, str]] = []
    monkeypatch.setattr(handlers.client, "BatchV1Api", FakeBatch)
    monkeypatch.setattr(handlers.kopf, "info", lambda body, reason, message: events.append((reason, message)))
    monkeypatch.setattr(handlers.kopf, "warn", lambda body, reason, message: events.append((reason, message)))
    body = {
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun",
        "metadata": {"name": "r", "namespace": "ns", "uid": UID, "generation": 1},
        "spec": {"dataset": {"images": "/data"}, "estimator": {"name": "exact", "budget": 4},
                 "execution": {"parallelism": 2}, "storage": {"uri": str(tmp_path / "runs")}},
    }
    return {"body": body, "events": events, "store": open_storage(str(tmp_path / "runs" / "ns" / "r-0a1b2c3d"))}


def _tick(env: dict[str, Any], status: dict[str, Any], jobs: list[dict[str, Any]]) -> dict[str, Any]:
    body = kopf.Body({**env["body"], "status": status})
    patch = kopf.Patch()
    views = [v for j in jobs for v in job_views(j)]
    handlers._reconcile(body, dict(body["metadata"]), status, UID, "r", "ns", patch, views,
                        handlers._remember(UID))
    return {**status, **dict(patch.get("status", {}))}


def _finished(job: dict[str, Any]) -> dict[str, Any]:
    return {**job, "status": {"conditions": [{"type": "Complete", "status": "True"}]}}


def test_a_run_from_prepare_to_results(env: dict[str, Any]) -> None:
    store = env["store"]
    status = _tick(env, {}, [])
    assert status["phase"] == "Preparing" and store.exists(layout.RUN)
    assert read_json(store, layout.RUN)["manifest"]["metadata"]["name"] == "r"
    (prepare,) = FakeBatch.created
    assert prepare["metadata"]["name"] == "r-0a1b2-prepare-a1"
    assert ("PrepareStarted", "Job r-0a1b2-prepare-a1 (attempt 1)") in env["events"]

    config_hash = read_json(store, layout.RUN)["configHash"]
    write_json(store, layout.MANIFEST, {"contributors": CONTRIBUTORS})
    write_json(store, layout.PREPARE_RESULT, {"summary": "ok"})
    status = _tick(env, status, [_finished(prepare)])
    assert status["phase"] == "Evaluating" and status["contributors"] == 2
    assert len(FakeBatch.created) == 3 and status["progress"] == "0/4"

    # every coalition finishes; its result.json is what counts, even with the Jobs gone (TTL)
    utilities = {(): 0.0, (0,): 1.0, (1,): 2.0, (0, 1): 4.0}
    for members, u in utilities.items():
        cid = coalition_id([CONTRIBUTORS[i]["id"] for i in members], config_hash)
        write_json(store, layout.coalition_result(cid), {"utility": u, "seconds": {"total": 1.0}})
    status = _tick(env, status, [])
    assert status["phase"] == "Succeeded", status
    doc = read_json(store, "results/shapley.json")
    values = {r["name"]: r["value"] for r in doc["contributors"]}
    np.testing.assert_allclose([values["ann"], values["bob"]], [1.5, 2.5])
    assert doc["vEmpty"] == 0.0 and doc["vFull"] == 4.0
    assert len(store.read_bytes(layout.UTILITIES).splitlines()) == 4
    assert status["top"][0]["contributor"] == "bob" and status["topContributor"] == "bob"
    assert any(reason == "Succeeded" for reason, _ in env["events"])
    assert len({j["metadata"]["name"] for j in FakeBatch.created}) == len(FakeBatch.created) == 3

    # a finished run is left alone
    created = len(FakeBatch.created)
    assert _tick(env, status, []) == status and len(FakeBatch.created) == created


def _run_to_the_end(env: dict[str, Any], utilities: dict[tuple[int, ...], float]) -> dict[str, Any]:
    """Prepare, then every coalition of the exact 2-player run, then the pass that writes the results."""
    store = env["store"]
    status = _tick(env, {}, [])
    config_hash = read_json(store, layout.RUN)["configHash"]
    write_json(store, layout.MANIFEST, {"contributors": CONTRIBUTORS})
    write_json(store, layout.PREPARE_RESULT, {"summary": "ok"})
    status = _tick(env, status, [_finished(FakeBatch.created[0])])
    for members, u in utilities.items():
        cid = coalition_id([CONTRIBUTORS[i]["id"] for i in members], config_hash)
        write_json(store, layout.coalition_result(cid), {"utility": u, "seconds": {"total": 1.0}})
    return _tick(env, status, [])


def test_spec_payout_is_paid_when_the_run_succeeds_and_summarised_in_the_status(env: dict[str, Any]) -> None:
    env["body"]["spec"]["payout"] = {"pool": "1000.01", "period": "2025-06"}
    status = _run_to_the_end(env, {(): 0.0, (0,): 1.0, (1,): 2.0, (0, 1): 4.0})  # values 1.5 and 2.5
    assert status["phase"] == "Succeeded", status
    assert status["payout"].pop("error", "absent") is None  # deleted by the merge patch, should one be there
    assert status["payout"] == {"period": "2025-06", "rule": "shapley", "currency": "USD", "total": "1000.01",
                                "paid": "1000.01", "escrow": "0.00",
                                "top": [{"contributor": "bob", "amount": "625.01"},
                                        {"contributor": "ann", "amount": "375.00"}]}
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["PaidOut"]["status"] == "True" and conds["Ready"]["status"] == "True"
    assert read_json(env["store"], "payouts/2025-06.json")["paidMinor"] == 100_001
    assert ("PaidOut", "1000.01 USD by shapley: payouts/2025-06.json") in env["events"]


def test_a_payout_that_cannot_be_made_does_not_fail_the_run(env: dict[str, Any]) -> None:
    env["body"]["spec"]["payout"] = {"pool": "100", "period": "2025-06"}
    status = _run_to_the_end(env, {(): 0.0, (0,): -1.0, (1,): -2.0, (0, 1): -3.0})  # nobody has a positive value
    assert status["phase"] == "Succeeded", status
    assert {k: v for k, v in status["payout"].items() if v is not None} == {
        "period": "2025-06", "error": "nothing to pay on: no contributor has a positive value"}
    assert status["payout"]["top"] is None and status["payout"]["total"] is None  # cleared: no stale summary
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["PaidOut"]["status"] == "False" and conds["PaidOut"]["reason"] == "PayoutFailed"
    assert status["top"] and env["store"].exists("results/shapley.json")  # the values stay
    assert [m for reason, m in env["events"] if reason == "PayoutFailed"] == [
        "no payout made (the values are kept): nothing to pay on: no contributor has a positive value"]
    assert not env["store"].exists("payouts/2025-06.json")


def test_failed_prepare_is_recorded_and_retried(env: dict[str, Any]) -> None:
    _tick(env, {}, [])
    failed = {**FakeBatch.created[0], "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded", "message": "exit 1"}]}}
    status = _tick(env, {}, [failed])
    assert env["store"].exists("prepare/attempt-1/failed.json")
    assert [j["metadata"]["name"] for j in FakeBatch.created] == ["r-0a1b2-prepare-a1", "r-0a1b2-prepare-a2"]
    assert ("AttemptFailed", "prepare attempt 1 failed (PodFailed): exit 1") in env["events"]
    assert status["phase"] == "Preparing"

    bad_input = {**FakeBatch.created[1], "status": {"conditions": [
        {"type": "Failed", "status": "True", "reason": "PodFailurePolicy", "message": "exit code 3"}]}}
    status = _tick(env, status, [failed, bad_input])
    assert status["phase"] == "Failed"
    cond = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert cond["reason"] == "PrepareFailed" and "BadInput" in cond["message"]
