"""The CR status is a typed model: what build_status writes is a RunStatus, and the CRD's schema comes from it."""

from __future__ import annotations

import pydantic
import pytest

from datacredit.crd import status_schema
from datacredit.operator.reconcile import Counts, Decision
from datacredit.operator.status import StatusEstimate, build_status
from datacredit.run_status import RunStatus
from datacredit.vocabulary import Phase


def test_build_status_writes_a_run_status_whose_fields_are_all_in_the_crd() -> None:
    est = StatusEstimate(["a", "b"], [0.5, -0.25], [0.1, 0.2], 6, True, "converged")
    decision = Decision(phase=Phase.SUCCEEDED, counts=Counts(planned=6, succeeded=6))
    status = build_status(decision, est, {}, generation=2, results_uri="s3://b/run/results/", contributors=2,
                          now="2026-12-03T00:00:00Z", fidelity={"pearson": 0.9, "coalitions": 5, "ok": True})
    assert status["phase"] == "Succeeded" and status["topContributor"] == "a"
    assert status["coalitions"] == {"planned": 6, "succeeded": 6, "running": 0, "queued": 0, "failed": 0,
                                    "failedAttempts": 0}
    assert RunStatus.model_validate(status).to_status() == status  # a fixed point: nothing lost or added
    schema = status_schema()

    def check(doc: object, node: dict, path: str) -> None:  # every field written is declared in the CRD
        if isinstance(doc, dict):
            for key, value in doc.items():
                assert key in node["properties"], f"{path}.{key} is not in the CRD's status schema"
                check(value, node["properties"][key], f"{path}.{key}")
        elif isinstance(doc, list):
            assert len(doc) <= node.get("maxItems", len(doc))
            for item in doc:
                check(item, node["items"], path + "[]")

    check(status, schema, "status")
    assert schema["properties"]["phase"]["enum"] == [str(p) for p in Phase]
    assert schema["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_a_status_field_the_crd_does_not_know_is_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="extra"):
        RunStatus.model_validate({"phase": "Evaluating", "coalitions": {"planned": 3, "planed": 3}})
    with pytest.raises(pydantic.ValidationError):
        RunStatus.model_validate({"phase": "Exploding"})
