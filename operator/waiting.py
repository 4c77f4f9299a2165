"""Why a run's Jobs are not running: the pod's own reason (image pull, missing Secret, unschedulable) or no pod.

Pure functions over JobViews and pods as Kubernetes returns them (camelCase dicts). A Job that waits longer
than a grace period is named in a visible `Waiting` condition, so a missing Secret, ServiceAccount or image
shows within a minute instead of as hours of `Queued`. Jobs Kueue keeps suspended are queued on purpose and
not reported.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from .reconcile import QUEUED, JobView

WAITING_AFTER_SECONDS = 60.0
# container waiting reasons that do not go away by themselves
STUCK = ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull",
         "CreateContainerConfigError", "CreateContainerError")
JOB_NAME_LABELS = ("batch.kubernetes.io/job-name", "job-name")


@dataclass(frozen=True)
class Waiting:
    """The `Waiting` condition's reason and message."""

    reason: str
    message: str


def _job_of(pod: Mapping[str, Any]) -> str:
    labels = (pod.get("metadata") or {}).get("labels") or {}
    return next((labels[k] for k in JOB_NAME_LABELS if k in labels), "")


def _pod_reason(pod: Mapping[str, Any]) -> tuple[str, str] | None:
    """(reason, message) of a pod that cannot start: a stuck container or an unschedulable pod."""
    status = pod.get("status") or {}
    for c in status.get("containerStatuses") or []:
        waiting = (c.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in STUCK:
            return waiting["reason"], waiting.get("message") or ""
    for cond in status.get("conditions") or []:
        if cond.get("type") == "PodScheduled" and cond.get("status") == "False":
            return cond.get("reason") or "Unschedulable", cond.get("message") or ""
    return None


def waiting_candidates(jobs: Iterable[JobView], now: float, after: float = WAITING_AFTER_SECONDS) -> list[JobView]:
    """Queued Jobs (not suspended by Kueue) created more than `after` seconds before `now`."""
    out = []
    for job in jobs:
        if job.state != QUEUED or job.suspended or not job.created:
            continue
        if now - dt.datetime.fromisoformat(job.created).timestamp() > after:
            out.append(job)
    return out


def waiting_of(candidates: list[JobView], pods: Iterable[Mapping[str, Any]],
               service_account: str = "") -> Waiting | None:
    """The first waiting Job's reason: its pod's (image, Secret, scheduling), or that it has no pod at all."""
    by_job: dict[str, list[Mapping[str, Any]]] = {}
    for pod in pods:
        by_job.setdefault(_job_of(pod), []).append(pod)
    for job in candidates:
        for pod in by_job.get(job.name, []):
            found = _pod_reason(pod)
            if found:
                reason, message = found
                pod_name = (pod.get("metadata") or {}).get("name", "")
                return Waiting(reason, f"Job {job.name}: pod {pod_name} cannot start: {reason}: {message}"
                               f"{_hint(reason)}")
    for job in candidates:
        if not by_job.get(job.name):
            sa = f"spec.execution.serviceAccountName {service_account!r}" if service_account else \
                "the namespace's default ServiceAccount"
            return Waiting("PodsNotCreated", f"Job {job.name} has created no pod yet: check that {sa} "
                           f"exists and the namespace's quota; `kubectl describe job {job.name}` shows the "
                           "FailedCreate events")
    return None


def _hint(reason: str) -> str:
    if reason == "CreateContainerConfigError":
        return " (a Secret or ConfigMap it references is missing: check spec.storage.credentialsSecret)"
    if reason in ("ImagePullBackOff", "ErrImagePull", "InvalidImageName", "ErrImageNeverPull"):
        return " (check spec.execution.image and the registry's pull secret)"
    if reason == "Unschedulable":
        return " (no node fits: check spec.execution.resources, nodeSelector and tolerations)"
    return ""
