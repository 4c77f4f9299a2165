"""Job rendering: names, labels, ownership, failure policy, security, pass-through of execution settings."""

from __future__ import annotations

from typing import Any

import pytest

from datacredit.operator.batch import (
    KUEUE_QUEUE_LABEL,
    LABEL_RUN_UID,
    WORKER_COMMAND_ENV,
    JobRequest,
    Owner,
    job_name,
    render_job,
)
from datacredit.spec import parse_manifest

REF = Owner("cifar20-quality", "team-a", "1a2b3c4d-0000-1111-2222-333344445555")
URI = "s3://bucket/runs/team-a/cifar20-quality-1a2b3c4d"


def _run(**execution: Any) -> Any:
    return parse_manifest({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun",
        "metadata": {"name": REF.name, "namespace": REF.namespace},
        "spec": {"dataset": {"images": "s3://bucket/data/"},
                 "execution": {"resources": {"gpu": 2, "cpu": "4", "memory": "16Gi"}, **execution},
                 "storage": {"uri": "s3://bucket/runs", "endpoint": "http://minio:9000", "region": "eu-1",
                             "credentialsSecret": "s3-creds"}},
    })


def test_names_are_stable_short_and_distinct() -> None:
    assert job_name(REF, "prepare", 1) == "cifar20-quality-1a2b3-prepare-a1"
    assert job_name(REF, "c0123456789abcde", 3) == "cifar20-quality-1a2b3-c0123456789abcde-a3"
    long_a = Owner("a" * 63, "ns", REF.uid)
    long_b = Owner("a" * 62 + "b", "ns", REF.uid)
    names = {job_name(r, "c0123456789abcde", 20) for r in (long_a, long_b)}
    assert len(names) == 2 and all(len(n) <= 63 for n in names)
    assert all(n[0].isalnum() and n[-1].isalnum() for n in names)


def test_coalition_job(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(WORKER_COMMAND_ENV, raising=False)
    job = render_job(_run(nodeSelector={"gpu": "a100"}, tolerations=[{"key": "gpu", "operator": "Exists"}],
                          priorityClassName="batch-low", serviceAccountName="worker"),
                     REF, URI, JobRequest("coalition", 2, "c0123456789abcde", (0, 2, 5)))
    meta, spec = job["metadata"], job["spec"]
    assert meta["name"] == "cifar20-quality-1a2b3-c0123456789abcde-a2"
    assert meta["labels"][LABEL_RUN_UID] == REF.uid and KUEUE_QUEUE_LABEL not in meta["labels"]
    assert meta["ownerReferences"] == [{"apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun",
                                        "name": REF.name, "uid": REF.uid, "controller": True,
                                        "blockOwnerDeletion": True}]
    assert spec["backoffLimit"] == 0 and spec["suspend"] is False
    assert spec["activeDeadlineSeconds"] == 7200 and spec["ttlSecondsAfterFinished"] == 3600
    rules = spec["podFailurePolicy"]["rules"]
    assert rules[0] == {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]}
    assert rules[1]["action"] == "FailJob" and rules[1]["onExitCodes"]["values"] == [3]
    assert rules[2]["action"] == "FailJob" and rules[2]["onExitCodes"]["values"] == [4]  # named in the message
    pod = spec["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["nodeSelector"] == {"gpu": "a100"} and pod["tolerations"][0]["key"] == "gpu"
    assert pod["priorityClassName"] == "batch-low" and pod["serviceAccountName"] == "worker"
    assert pod["securityContext"]["runAsNonRoot"]
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    (c,) = pod["containers"]
    assert c["command"] == ["datacredit", "worker", "coalition", "--run", URI, "--members", "0,2,5", "--attempt", "2",
                            "--endpoint", "http://minio:9000", "--region", "eu-1"]
    assert c["resources"]["requests"] == c["resources"]["limits"] == {"cpu": "4", "memory": "16Gi",
                                                                       "nvidia.com/gpu": "2"}
    assert c["envFrom"] == [{"secretRef": {"name": "s3-creds"}}]
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert c["env"][0] == {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    assert env["DATACREDIT_WORK_DIR"] == "/tmp/$(POD_NAME)"
    assert env["AWS_ENDPOINT_URL_S3"] == "http://minio:9000" and env["AWS_REGION"] == "eu-1"
    assert env["HOME"].startswith("/tmp")
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"]
    assert spec["template"]["metadata"]["labels"]["datacredit.dev/coalition"] == "c0123456789abcde"


def test_prepare_job_with_kueue_and_command_override(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(WORKER_COMMAND_ENV, "/venv/bin/python -m datacredit.cli")
    job = render_job(_run(queueName="gpu-queue", resources={"gpu": 0}), REF, URI, JobRequest("prepare", 1))
    assert job["metadata"]["labels"][KUEUE_QUEUE_LABEL] == "gpu-queue"
    assert job["spec"]["suspend"] is True
    (c,) = job["spec"]["template"]["spec"]["containers"]
    assert c["command"][:5] == ["/venv/bin/python", "-m", "datacredit.cli", "worker", "prepare"]
    assert "--members" not in c["command"]
    assert "nvidia.com/gpu" not in c["resources"]["limits"]
