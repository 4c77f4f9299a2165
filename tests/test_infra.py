"""Smoke tests of the real-component fixtures: MinIO, the control plane and the fake GPU node."""

from __future__ import annotations

import os
import sys
from typing import Any

import pytest
from kubernetes import client

from tests.infra.controlplane import ControlPlane
from tests.infra.nodeagent import NodeAgent
from tests.infra.process import wait_until
from tests.infra.s3server import S3Server

NAMESPACE = "infra-smoke"
JOB_TIMEOUT_S = 120.0


@pytest.mark.s3
def test_s3_round_trip(s3_server: S3Server) -> None:
    s3 = s3_server.client()
    bucket = s3_server.make_bucket("infra-smoke")
    for i in range(3):
        s3.put_object(Bucket=bucket, Key=f"runs/r1/part-{i}.json", Body=f'{{"i": {i}}}'.encode())
    s3.put_object(Bucket=bucket, Key="other/x", Body=b"x")

    listed = s3.list_objects_v2(Bucket=bucket, Prefix="runs/r1/", MaxKeys=2)
    assert listed["IsTruncated"] and listed["KeyCount"] == 2
    rest = s3.list_objects_v2(Bucket=bucket, Prefix="runs/r1/", ContinuationToken=listed["NextContinuationToken"])
    keys = [o["Key"] for o in listed["Contents"] + rest["Contents"]]
    assert keys == [f"runs/r1/part-{i}.json" for i in range(3)]
    assert s3.get_object(Bucket=bucket, Key="runs/r1/part-2.json")["Body"].read() == b'{"i": 2}'

    s3.delete_object(Bucket=bucket, Key="other/x")
    assert "Contents" not in s3.list_objects_v2(Bucket=bucket, Prefix="other/")


def _job(name: str, command: list[str], **pod_spec: Any) -> dict[str, Any]:
    container = {"name": "main", "image": "datacredit/test:local", "command": command}
    container.update(pod_spec.pop("container", {}))
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {
            "backoffLimit": 0,
            "template": {"spec": {"restartPolicy": "Never", "containers": [container], **pod_spec}},
        },
    }


def _job_condition(batch: client.BatchV1Api, name: str) -> str | None:
    """ "Complete" or "Failed" once the Job controller has finished the Job, else None."""
    conditions = batch.read_namespaced_job_status(name, NAMESPACE).status.conditions or []
    done = [c.type for c in conditions if c.type in ("Complete", "Failed") and c.status == "True"]
    return done[0] if done else None


def _job_pods(core: client.CoreV1Api, name: str) -> list[Any]:
    return core.list_namespaced_pod(NAMESPACE, label_selector=f"batch.kubernetes.io/job-name={name}").items


@pytest.fixture(scope="module")
def k8s(control_plane: ControlPlane, node_agent: NodeAgent) -> Any:
    """An admin ApiClient with the smoke-test namespace in place."""
    control_plane.ensure_namespace(NAMESPACE)
    with control_plane.api_client() as api_client:
        yield api_client


@pytest.mark.controlplane
def test_jobs_complete_and_fail(k8s: Any, node_agent: NodeAgent) -> None:
    batch, core = client.BatchV1Api(k8s), client.CoreV1Api(k8s)
    batch.create_namespaced_job(NAMESPACE, _job("hello", [sys.executable, "-c", "print('hi')"]))
    batch.create_namespaced_job(NAMESPACE, _job("exit3", [sys.executable, "-c", "raise SystemExit(3)"]))

    wait_until(lambda: _job_condition(batch, "hello") == "Complete", "Job hello Complete", JOB_TIMEOUT_S)
    wait_until(lambda: _job_condition(batch, "exit3") == "Failed", "Job exit3 Failed", JOB_TIMEOUT_S)

    (hello,) = _job_pods(core, "hello")
    assert hello.status.phase == "Succeeded"
    assert node_agent.pod_log(NAMESPACE, hello.metadata.name).strip() == "hi"
    (failed,) = _job_pods(core, "exit3")
    assert failed.status.phase == "Failed"
    assert failed.status.container_statuses[0].state.terminated.exit_code == 3


@pytest.mark.controlplane
def test_gpu_pod_gets_secret_and_config_env(k8s: Any, node_agent: NodeAgent) -> None:
    core, batch = client.CoreV1Api(k8s), client.BatchV1Api(k8s)
    core.create_namespaced_secret(
        NAMESPACE, {"metadata": {"name": "s3-creds"}, "stringData": {"AWS_ACCESS_KEY_ID": "key-id"}}
    )
    core.create_namespaced_config_map(NAMESPACE, {"metadata": {"name": "settings"}, "data": {"MODE": "fast"}})
    script = "import os; print(os.environ['AWS_ACCESS_KEY_ID'], os.environ['CFG_MODE'], os.environ['POD'])"
    job = _job(
        "gpu-env",
        ["python", "-c", script],
        container={
            "resources": {"limits": {"nvidia.com/gpu": "2"}},
            "envFrom": [
                {"secretRef": {"name": "s3-creds"}},
                {"configMapRef": {"name": "settings"}, "prefix": "CFG_"},
            ],
            "env": [{"name": "POD", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}],
        },
    )
    batch.create_namespaced_job(NAMESPACE, job)

    wait_until(lambda: _job_condition(batch, "gpu-env") == "Complete", "Job gpu-env Complete", JOB_TIMEOUT_S)
    (pod,) = _job_pods(core, "gpu-env")
    assert node_agent.pod_log(NAMESPACE, pod.metadata.name).split() == ["key-id", "fast", pod.metadata.name]


@pytest.mark.controlplane
def test_deleting_a_job_collects_its_pods(k8s: Any, node_agent: NodeAgent) -> None:
    batch, core = client.BatchV1Api(k8s), client.CoreV1Api(k8s)
    batch.create_namespaced_job(NAMESPACE, _job("sleeper", [sys.executable, "-c", "import time; time.sleep(300)"]))

    def running_pid() -> int | None:
        return next((pid for key, pid in node_agent.local_processes().items() if "/sleeper-" in key), None)

    wait_until(lambda: running_pid() is not None, "the sleeper pod's process", JOB_TIMEOUT_S)
    pid = running_pid()
    assert pid is not None
    wait_until(lambda: all(p.status.phase == "Running" for p in _job_pods(core, "sleeper")), "sleeper Running", 30)

    batch.delete_namespaced_job("sleeper", NAMESPACE, propagation_policy="Background")
    wait_until(lambda: not _job_pods(core, "sleeper"), "garbage collection of the sleeper pods", JOB_TIMEOUT_S)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
