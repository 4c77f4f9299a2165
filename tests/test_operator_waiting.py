"""Why Jobs wait: the pod's own reason, or no pod at all (pure logic over pods as the API returns them)."""

from __future__ import annotations

from typing import Any

from datacredit.operator.reconcile import Decision, JobView
from datacredit.operator.status import build_status
from datacredit.operator.waiting import waiting_candidates, waiting_of

T0 = 1_700_000_000.0
CREATED = "2023-11-14T22:13:20+00:00"  # T0


def job(name: str, state: str = "Queued", suspended: bool = False) -> JobView:
    return JobView(name, "coalition", name, 1, state, created=CREATED, suspended=suspended)


def pod(job_name: str, waiting: dict[str, str] | None = None,
        scheduled: dict[str, str] | None = None) -> dict[str, Any]:
    status: dict[str, Any] = {}
    if waiting:
        status["containerStatuses"] = [{"name": "worker", "state": {"waiting": waiting}}]
    if scheduled:
        status["conditions"] = [{"type": "PodScheduled", "status": "False", **scheduled}]
    return {"metadata": {"name": f"{job_name}-x1", "labels": {"batch.kubernetes.io/job-name": job_name}},
            "status": status}


def test_only_jobs_queued_past_the_grace_and_not_held_by_kueue_are_candidates() -> None:
    jobs = [job("a"), job("b", "Running"), job("c", suspended=True)]
    assert waiting_candidates(jobs, T0 + 30, after=60) == []
    assert [j.name for j in waiting_candidates(jobs, T0 + 90, after=60)] == ["a"]


def test_the_pods_own_reason_is_named_with_what_to_check() -> None:
    secret = pod("a", {"reason": "CreateContainerConfigError", "message": 'secret "s3-creds" not found'})
    found = waiting_of([job("a")], [secret])
    assert found is not None and found.reason == "CreateContainerConfigError"
    assert 's3-creds" not found' in found.message and "credentialsSecret" in found.message
    image = pod("a", {"reason": "ImagePullBackOff", "message": "Back-off pulling image"})
    assert waiting_of([job("a")], [image]).reason == "ImagePullBackOff"  # type: ignore[union-attr]
    full = pod("a", scheduled={"reason": "Unschedulable", "message": "0/3 nodes: Insufficient nvidia.com/gpu"})
    found = waiting_of([job("a")], [full])
    assert found is not None and found.reason == "Unschedulable" and "nvidia.com/gpu" in found.message
    assert waiting_of([job("a")], [pod("a", {"reason": "ContainerCreating"})]) is None  # on its way


def test_a_job_without_pods_points_at_the_service_account() -> None:
    found = waiting_of([job("a")], [pod("other", {"reason": "ErrImagePull"})], service_account="trainer")
    assert found is not None and found.reason == "PodsNotCreated" and "'trainer'" in found.message


def test_the_waiting_condition_is_set_and_cleared() -> None:
    found = waiting_of([job("a")], [])
    status = build_status(Decision(phase="Evaluating"), None, {}, generation=1, results_uri="", contributors=3,
                          waiting=found)
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Waiting"]["status"] == "True" and conds["Waiting"]["reason"] == "PodsNotCreated"
    later = build_status(Decision(phase="Evaluating"), None, status, generation=1, results_uri="", contributors=3)
    assert {c["type"]: c for c in later["conditions"]}["Waiting"]["status"] == "False"
    fresh = build_status(Decision(phase="Evaluating"), None, {}, generation=1, results_uri="", contributors=3)
    assert "Waiting" not in {c["type"] for c in fresh["conditions"]}
