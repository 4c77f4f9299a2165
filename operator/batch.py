"""Job naming and rendering: pure functions from a ValuationRun to batch/v1 Job manifests."""

from __future__ import annotations

import hashlib
import os
import shlex
from dataclasses import dataclass, field
from typing import Any

from kubernetes.utils import parse_quantity

from datacredit import layout
from datacredit.spec import API_VERSION, KIND, ValuationRun
from datacredit.vocabulary import ExitCode

LABEL_RUN = "datacredit.dev/run"
LABEL_RUN_UID = "datacredit.dev/run-uid"
LABEL_STEP = "datacredit.dev/step"
LABEL_COALITION = "datacredit.dev/coalition"
LABEL_ATTEMPT = "datacredit.dev/attempt"
ANNOTATION_MEMBERS = "datacredit.dev/members"
ANNOTATION_BATCH = "datacredit.dev/batch"  # a packed Job's coalitions: see batch_annotation
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PREPARE = layout.PREPARE_STEP
COALITION = "coalition"
CONTAINER = "worker"
EXIT_BAD_INPUT, EXIT_STORAGE = int(ExitCode.BAD_INPUT), int(ExitCode.STORAGE)  # their own pod-failure rules
WORKER_COMMAND_ENV = "DATACREDIT_WORKER_COMMAND"
RUN_AS_USER = 10001  # the worker image's user (images/worker.Dockerfile)
MAX_NAME = 63  # Job names become label values: at most 63 characters


@dataclass(frozen=True)
class BatchItem:
    """A coalition of a coalition Job: its id, member indices and attempt."""

    cid: str
    members: tuple[int, ...]
    attempt: int


@dataclass(frozen=True)
class JobRequest:
    """One Job to run: the prepare step, a coalition (its id and member indices) at an attempt, or a packed batch
    of coalitions (``batch``; each with its own attempt, ``attempt`` the highest)."""

    step: str
    attempt: int
    cid: str = ""
    members: tuple[int, ...] = field(default_factory=tuple)
    batch: tuple[BatchItem, ...] = field(default_factory=tuple)

    @property
    def key(self) -> str:
        """`prepare`, the coalition id, or for a batch `b` + a digest of its coalitions: what names the Job."""
        if self.batch:
            return "b" + hashlib.sha256(batch_annotation(self.batch).encode()).hexdigest()[:15]
        return self.cid or PREPARE

    @property
    def items(self) -> tuple[BatchItem, ...]:
        """The coalitions this Job evaluates (none for prepare)."""
        if self.batch:
            return self.batch
        return (BatchItem(self.cid, self.members, self.attempt),) if self.cid else ()


def coalition_request(items: list[BatchItem]) -> JobRequest:
    """The Job of one coalition (named by its id, as before packing) or of a packed batch."""
    if len(items) == 1:
        return JobRequest(COALITION, items[0].attempt, items[0].cid, items[0].members)
    return JobRequest(COALITION, max(i.attempt for i in items), batch=tuple(items))


def batch_annotation(items: tuple[BatchItem, ...]) -> str:
    """``cid:0,2:1;cid:3:2``: each coalition's id, members and attempt (the ``datacredit.dev/batch`` annotation)."""
    return ";".join(f"{i.cid}:{','.join(map(str, i.members))}:{i.attempt}" for i in items)


def parse_batch(annotation: str) -> list[BatchItem]:
    """The items of a :func:`batch_annotation` (malformed parts are dropped)."""
    items = []
    for part in annotation.split(";"):
        cid, _, rest = part.partition(":")
        members, _, attempt = rest.partition(":")
        try:
            items.append(BatchItem(cid, tuple(int(m) for m in members.split(",") if m), int(attempt)))
        except ValueError:
            continue
    return [i for i in items if i.cid]


@dataclass(frozen=True)
class Owner:
    """The run object's identity as the API server knows it."""

    name: str
    namespace: str
    uid: str


def job_name(run: Owner, key: str, attempt: int) -> str:
    """`<run>-<uid5>-<prepare|coalition id>-a<attempt>`, shortened to 63 characters and unique per run.

    The same (run, key, attempt) always gives the same name, so a Job is never created twice.
    """
    suffix = f"-{run.uid.replace('-', '')[:5]}-{key}-a{attempt}"
    stem = run.name[: MAX_NAME - len(suffix)].rstrip("-")
    if len(stem) < len(run.name):  # keep truncated names of different runs apart
        digest = hashlib.sha256(run.name.encode()).hexdigest()[:4]
        stem = f"{stem[: MAX_NAME - len(suffix) - 5].rstrip('-')}-{digest}"
    return f"{stem}{suffix}"


def quantity_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``32Gi``, ``512M``, ``1e9``) in bytes, by the kubernetes client's parser."""
    try:
        return int(parse_quantity(quantity))
    except ValueError as e:
        raise ValueError(f"not a memory quantity: {quantity!r} ({e}); for example 32Gi") from None


def worker_command() -> list[str]:
    """The command prefix of the worker container: `datacredit`, or $DATACREDIT_WORKER_COMMAND (tests)."""
    override = os.environ.get(WORKER_COMMAND_ENV, "").strip()
    return shlex.split(override) if override else ["datacredit"]


def worker_args(run: ValuationRun, run_uri: str, request: JobRequest) -> list[str]:
    """`worker prepare|coalition --run URI [--members 0,2] [--attempt K] [--endpoint E] [--region R]`."""
    args = ["worker", request.step, "--run", run_uri]
    for item in request.items:  # a packed batch repeats them, one pair per coalition
        args += ["--members", ",".join(str(m) for m in item.members), "--attempt", str(item.attempt)]
    storage = run.spec.storage
    if storage.endpoint:
        args += ["--endpoint", storage.endpoint]
    if storage.region:
        args += ["--region", storage.region]
    return args


def labels(run: Owner, request: JobRequest) -> dict[str, str]:
    """Labels of the Job and its pods; the operator's Job index selects on LABEL_RUN_UID."""
    out = {
        "app.kubernetes.io/name": "datacredit",
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/managed-by": "datacredit-operator",
        LABEL_RUN: run.name,
        LABEL_RUN_UID: run.uid,
        LABEL_STEP: request.step,
        LABEL_ATTEMPT: str(request.attempt),
    }
    if request.items:
        out[LABEL_COALITION] = request.key
    return out


def _resources(run: ValuationRun) -> dict[str, Any]:
    r = run.spec.execution.resources
    amounts = {"cpu": r.cpu, "memory": r.memory}
    if r.gpu:
        amounts["nvidia.com/gpu"] = str(r.gpu)
    return {"requests": dict(amounts), "limits": dict(amounts)}  # requests == limits: Guaranteed, GPUs whole


def _env(run: ValuationRun) -> list[dict[str, str]]:
    storage = run.spec.storage
    env = {
        "HOME": "/tmp",
        "XDG_CACHE_HOME": "/tmp/.cache",
        "MPLCONFIGDIR": "/tmp/.config/matplotlib",
        "DATACREDIT_WORK_DIR": "/tmp/$(POD_NAME)",  # one per pod, even where pods share a /tmp
        "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
        "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
    }
    if storage.endpoint:
        env["AWS_ENDPOINT_URL_S3"] = storage.endpoint
    if storage.region:
        env["AWS_REGION"] = storage.region
    pod_name = {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}}
    return [pod_name, *({"name": k, "value": v} for k, v in env.items())]


def job_annotations(request: JobRequest) -> dict[str, str]:
    """The members of a coalition Job, or every coalition of a packed one."""
    if request.batch:
        return {ANNOTATION_BATCH: batch_annotation(request.batch)}
    return {ANNOTATION_MEMBERS: ",".join(str(m) for m in request.members)} if request.cid else {}


def render_job(run: ValuationRun, ref: Owner, run_uri: str, request: JobRequest) -> dict[str, Any]:
    """The batch/v1 Job of one worker step (prepare, a coalition attempt or a packed batch of coalitions)."""
    ex = run.spec.execution
    job_labels = labels(ref, request)
    pod_labels = dict(job_labels)
    if ex.queue_name:
        job_labels[KUEUE_QUEUE_LABEL] = ex.queue_name
    container: dict[str, Any] = {
        "name": CONTAINER,
        "image": ex.image,
        "command": [*worker_command(), *worker_args(run, run_uri, request)],
        "env": _env(run),
        "resources": _resources(run),
        "securityContext": {
            "allowPrivilegeEscalation": False,
            "readOnlyRootFilesystem": True,
            "runAsNonRoot": True,
            "capabilities": {"drop": ["ALL"]},
        },
        "volumeMounts": [{"name": "tmp", "mountPath": "/tmp"}],
    }
    if run.spec.storage.credentials_secret:
        container["envFrom"] = [{"secretRef": {"name": run.spec.storage.credentials_secret}}]
    pod_spec: dict[str, Any] = {
        "restartPolicy": "Never",
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "tmp", "emptyDir": {}}],
    }
    if ex.node_selector:
        pod_spec["nodeSelector"] = dict(ex.node_selector)
    if ex.tolerations:
        pod_spec["tolerations"] = [dict(t) for t in ex.tolerations]
    if ex.priority_class_name:
        pod_spec["priorityClassName"] = ex.priority_class_name
    if ex.service_account_name:
        pod_spec["serviceAccountName"] = ex.service_account_name
    annotations = job_annotations(request)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {
            "name": job_name(ref, request.key, request.attempt),
            "namespace": ref.namespace,
            "labels": job_labels,
            "annotations": annotations,
            "ownerReferences": [{
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": ref.name,
                "uid": ref.uid,
                "controller": True,
                "blockOwnerDeletion": True,
            }],
        },
        "spec": {
            "suspend": bool(ex.queue_name),  # Kueue admits (unsuspends) it
            "backoffLimit": 0,  # retries are the operator's, one Job per attempt
            "activeDeadlineSeconds": ex.active_deadline_seconds,
            "ttlSecondsAfterFinished": ex.ttl_seconds_after_finished,
            "podFailurePolicy": {
                "rules": [
                    {"action": "Ignore", "onPodConditions": [{"type": "DisruptionTarget"}]},
                    {"action": "FailJob",
                     "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_BAD_INPUT]}},
                    {"action": "FailJob",  # its own rule, so the Job's message names the exit code
                     "onExitCodes": {"containerName": CONTAINER, "operator": "In", "values": [EXIT_STORAGE]}},
                ]
            },
            "template": {"metadata": {"labels": pod_labels, "annotations": annotations}, "spec": pod_spec},
        },
    }
