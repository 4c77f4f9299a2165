"""A fake GPU node for the test control plane: binds pods to itself and runs them as local processes.

There is no scheduler and no kubelet. `NodeAgent` registers a Ready Node (cpu, memory, pods and
`nvidia.com/gpu`), binds every unscheduled pod to it through `pods/binding`, runs the first container's
command + args as a local process (env, envFrom, secret/configMap references and workingDir resolved
from the API), reports Running and then Succeeded/Failed with the exit code through `pods/status`, keeps
the node heartbeat (Lease + Ready condition), and kills the process when the pod is deleted.

Not modelled: images (see `executables` / `image_commands`), volumes, init and sidecar containers,
probes, container restarts (`restartPolicy` is treated as Never) and resource isolation.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import os
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubernetes import client
from kubernetes.client.rest import ApiException

from .process import ManagedProcess

log = logging.getLogger(__name__)

NODE_LEASE_NAMESPACE = "kube-node-lease"
LEASE_DURATION_S = 40
# Deleted pods get this long after SIGTERM before SIGKILL (the agent loop waits for it).
MAX_KILL_GRACE_S = 5.0
_VAR_REF = re.compile(r"\$\$|\$\(([-._a-zA-Z][-._a-zA-Z0-9]*)\)")
_FIELD_PATHS: dict[str, Callable[[Any], str | None]] = {
    "metadata.name": lambda pod: pod.metadata.name,
    "metadata.namespace": lambda pod: pod.metadata.namespace,
    "metadata.uid": lambda pod: pod.metadata.uid,
    "spec.nodeName": lambda pod: pod.spec.node_name,
    "spec.serviceAccountName": lambda pod: pod.spec.service_account_name,
    "status.podIP": lambda pod: "127.0.0.1",
    "status.hostIP": lambda pod: "127.0.0.1",
}
_LABEL_FIELD = re.compile(r"metadata\.(labels|annotations)\['([^']+)'\]")


class _ConfigPending(Exception):
    """The container's config references something that does not exist yet (kubelet retries)."""


class _StartError(Exception):
    """The container cannot be started at all; the pod fails."""


def _now() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _now_micro() -> str:
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def expand_vars(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes `$(VAR)` expansion: defined variables are substituted, `$$` becomes `$`."""

    def replace(match: re.Match[str]) -> str:
        name = match.group(1)
        if name is None:
            return "$"
        return env.get(name, match.group(0))

    return _VAR_REF.sub(replace, text)


def _state(kind: str, detail: dict[str, Any]) -> dict[str, Any]:
    """A container `state` with exactly one of waiting/running/terminated set."""
    state: dict[str, Any] = {"waiting": None, "running": None, "terminated": None}
    state[kind] = detail
    return state


@dataclass
class _PodRecord:
    """What the agent knows about one pod bound to its node."""

    namespace: str
    name: str
    uid: str
    container: str
    image: str
    process: ManagedProcess | None = None
    started_at: str | None = None
    deadline: float | None = None
    reported: str = ""  # the last state written to the API: "waiting: <why>", "running" or "terminated"
    retry_at: float = 0.0


class NodeAgent:
    """Runs the pods bound to one fake node as local processes, from a background thread."""

    def __init__(
        self,
        api_client_factory: Callable[[], Any],
        log_dir: Path,
        *,
        node_name: str = "datacredit-gpu-node",
        path: str | None = None,
        executables: Mapping[str, str] | None = None,
        image_commands: Mapping[str, Sequence[str]] | None = None,
        extra_env: Mapping[str, str] | None = None,
        gpus: int = 8,
        poll_interval: float = 0.25,
        heartbeat_interval: float = 10.0,
    ) -> None:
        """
        Args:
            api_client_factory: returns a `kubernetes.client.ApiClient` (e.g. `ControlPlane.api_client`).
            log_dir: each pod's stdout+stderr goes to `<log_dir>/<namespace>_<pod>_<uid8>.log`; its
                working directory (and HOME) defaults to the directory of the same name.
            path: the PATH given to the processes and used to resolve commands; default: this
                interpreter's bin directory, then the current PATH.
            executables: command (as written in the pod, or its basename) -> local executable,
                e.g. {"datacredit": "/venv/bin/datacredit"}.
            image_commands: image (with or without tag) -> local command line for containers that set
                no `command` (what the image's ENTRYPOINT would be).
            extra_env: environment given to every process, below the pod's own env.
        """
        self.node_name = node_name
        self.log_dir = log_dir
        self.path = path or os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        self.executables = dict(executables or {})
        self.image_commands = {image: list(cmd) for image, cmd in (image_commands or {}).items()}
        self.extra_env = dict(extra_env or {})
        self.gpus = gpus
        self.poll_interval = poll_interval
        self.heartbeat_interval = heartbeat_interval
        self._api_client = api_client_factory()
        self._core = client.CoreV1Api(self._api_client)
        self._coordination = client.CoordinationV1Api(self._api_client)
        self._pods: dict[str, _PodRecord] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started_at = _now()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> NodeAgent:
        """Register the node and start the agent thread; returns self."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._register_node()
        self._thread = threading.Thread(target=self._run, name=f"node-agent-{self.node_name}", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop the thread, kill every local process and delete the Node and its Lease."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        with self._lock:
            records = list(self._pods.values())
            self._pods.clear()
        for record in records:
            if record.process is not None:
                record.process.stop(grace=MAX_KILL_GRACE_S)
        for delete in (
            lambda: self._core.delete_node(self.node_name),
            lambda: self._coordination.delete_namespaced_lease(self.node_name, NODE_LEASE_NAMESPACE),
        ):
            try:
                delete()
            except ApiException as error:
                if error.status != 404:
                    log.warning("node agent cleanup failed: %s", error)
        self._api_client.close()

    def __enter__(self) -> NodeAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def local_processes(self) -> dict[str, int]:
        """`namespace/pod` -> pid of each local process that is still running."""
        with self._lock:
            return {
                f"{r.namespace}/{r.name}": r.process.pid
                for r in self._pods.values()
                if r.process is not None and r.process.poll() is None
            }

    def pod_log(self, namespace: str, name: str) -> str:
        """The captured stdout+stderr of the newest pod `namespace/name` ("" if it never ran)."""
        logs = sorted(self.log_dir.glob(f"{namespace}_{name}_*.log"), key=lambda p: p.stat().st_mtime)
        return logs[-1].read_text(errors="replace") if logs else ""

    def _run(self) -> None:
        next_heartbeat = 0.0
        while not self._stop.is_set():
            try:
                if time.monotonic() >= next_heartbeat:
                    self._heartbeat()
                    next_heartbeat = time.monotonic() + self.heartbeat_interval
                self._bind_unscheduled_pods()
                self._sync_pods()
            except Exception:  # keep the node alive across API hiccups; the next pass retries
                log.warning("node agent pass failed", exc_info=True)
            self._stop.wait(self.poll_interval)

    # ---------------------------------------------------------------- node

    def _node_status(self) -> dict[str, Any]:
        now = _now()
        resources = {
            "cpu": str(os.cpu_count() or 2),
            "memory": "64Gi",
            "pods": "110",
            "ephemeral-storage": "100Gi",
            "nvidia.com/gpu": str(self.gpus),
        }
        conditions = [
            ("Ready", "True", "KubeletReady", "node agent is posting ready status"),
            ("MemoryPressure", "False", "KubeletHasSufficientMemory", "no memory pressure"),
            ("DiskPressure", "False", "KubeletHasNoDiskPressure", "no disk pressure"),
            ("PIDPressure", "False", "KubeletHasSufficientPID", "no PID pressure"),
        ]
        return {
            "capacity": resources,
            "allocatable": resources,
            "conditions": [
                {
                    "type": t,
                    "status": s,
                    "reason": r,
                    "message": m,
                    "lastHeartbeatTime": now,
                    "lastTransitionTime": self._started_at,
                }
                for t, s, r, m in conditions
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.node_name},
            ],
            "nodeInfo": {
                "architecture": "amd64",
                "bootID": "",
                "containerRuntimeVersion": "datacredit-node-agent://0",
                "kernelVersion": os.uname().release,
                "kubeProxyVersion": "",
                "kubeletVersion": "v1.34.0",
                "machineID": "",
                "operatingSystem": "linux",
                "osImage": "local processes",
                "systemUUID": "",
            },
        }

    def _register_node(self) -> None:
        node = {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {
                "name": self.node_name,
                "labels": {
                    "kubernetes.io/hostname": self.node_name,
                    "kubernetes.io/os": "linux",
                    "kubernetes.io/arch": "amd64",
                    "nvidia.com/gpu.present": "true",
                },
            },
            "status": self._node_status(),
        }
        try:
            self._core.create_node(node)
        except ApiException as error:
            if error.status != 409:
                raise
        self._heartbeat()

    def _heartbeat(self) -> None:
        """Renew the node Lease and re-post the Ready condition, as a kubelet does."""
        self._core.patch_node_status(self.node_name, {"status": self._node_status()})
        spec = {
            "holderIdentity": self.node_name,
            "leaseDurationSeconds": LEASE_DURATION_S,
            "renewTime": _now_micro(),
        }
        try:
            self._coordination.patch_namespaced_lease(self.node_name, NODE_LEASE_NAMESPACE, {"spec": spec})
        except ApiException as error:
            if error.status != 404:
                raise
            node_uid = self._core.read_node(self.node_name).metadata.uid
            owner = {"apiVersion": "v1", "kind": "Node", "name": self.node_name, "uid": node_uid}
            lease = {"metadata": {"name": self.node_name, "ownerReferences": [owner]}, "spec": spec}
            self._coordination.create_namespaced_lease(NODE_LEASE_NAMESPACE, lease)

    # ---------------------------------------------------------------- pods

    def _bind_unscheduled_pods(self) -> None:
        pods = self._core.list_pod_for_all_namespaces(field_selector="spec.nodeName=").items
        for pod in pods:
            if pod.metadata.deletion_timestamp or pod.status.phase not in (None, "Pending"):
                continue
            binding = {
                "apiVersion": "v1",
                "kind": "Binding",
                "metadata": {"name": pod.metadata.name, "uid": pod.metadata.uid},
                "target": {"apiVersion": "v1", "kind": "Node", "name": self.node_name},
            }
            try:
                # The generated client cannot deserialize the Status this returns; skip decoding it.
                self._core.create_namespaced_pod_binding(
                    pod.metadata.name, pod.metadata.namespace, binding, _preload_content=False
                )
            except ApiException as error:
                if error.status not in (404, 409):  # deleted meanwhile / already bound
                    raise

    def _sync_pods(self) -> None:
        pods = self._core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={self.node_name}").items
        present = {pod.metadata.uid for pod in pods}
        with self._lock:
            gone = [uid for uid in self._pods if uid not in present]
            for uid in gone:
                record = self._pods.pop(uid)
                if record.process is not None:
                    record.process.stop(grace=0)
        for pod in pods:
            try:
                self._sync_pod(pod)
            except ApiException as error:
                if error.status not in (404, 409):
                    raise

    def _sync_pod(self, pod: Any) -> None:
        uid = pod.metadata.uid
        record = self._pods.get(uid)
        if pod.metadata.deletion_timestamp is not None:
            self._finish_deletion(pod, record)
            return
        if record is None:
            if pod.status.phase in ("Succeeded", "Failed"):
                return
            container = pod.spec.containers[0]
            record = _PodRecord(pod.metadata.namespace, pod.metadata.name, uid, container.name, container.image)
            with self._lock:
                self._pods[uid] = record
        if record.reported == "terminated":
            return
        if record.process is None:
            if time.monotonic() >= record.retry_at:
                self._start(pod, record)
            return
        exit_code = record.process.poll()
        if exit_code is not None:
            self._report_terminated(record, exit_code)
        elif record.deadline is not None and time.monotonic() > record.deadline:
            record.process.stop(grace=MAX_KILL_GRACE_S)
            self._report_terminated(
                record,
                137,
                reason="DeadlineExceeded",
                message="Pod was active on the node longer than the specified deadline",
            )

    def _finish_deletion(self, pod: Any, record: _PodRecord | None) -> None:
        """Graceful deletion: kill the process, post a terminal status, then delete with grace 0."""
        if pod.metadata.deletion_grace_period_seconds == 0:
            return  # already released; waiting for finalizers
        if record is not None and record.process is not None and record.reported != "terminated":
            grace = min(float(pod.metadata.deletion_grace_period_seconds or 0), MAX_KILL_GRACE_S)
            exit_code = record.process.stop(grace=grace)
            self._report_terminated(record, 128 + signal.SIGKILL if exit_code is None else exit_code)
        # With a DeleteOptions body the apiserver ignores query parameters: the grace period goes in it.
        options = {"gracePeriodSeconds": 0, "preconditions": {"uid": pod.metadata.uid}}
        self._core.delete_namespaced_pod(pod.metadata.name, pod.metadata.namespace, body=options)

    def _start(self, pod: Any, record: _PodRecord) -> None:
        container = pod.spec.containers[0]
        stem = f"{record.namespace}_{record.name}_{record.uid[:8]}"
        home = self.log_dir / stem
        try:
            env = self._container_env(pod, container, home)
            argv = self._argv(container, env)
            home.mkdir(parents=True, exist_ok=True)
            cwd = Path(container.working_dir) if container.working_dir else home
            if not cwd.is_dir():
                raise _StartError(f"workingDir {cwd} does not exist on this machine")
            record.started_at = _now()
            try:
                record.process = ManagedProcess(stem, argv, self.log_dir / f"{stem}.log", env=env, cwd=cwd)
            except OSError as error:
                raise _StartError(f"cannot run {argv[0]}: {error}") from error
        except _ConfigPending as error:
            record.retry_at = time.monotonic() + 1.0
            self._report_waiting(record, "CreateContainerConfigError", str(error))
            return
        except _StartError as error:
            log.warning("pod %s/%s cannot start: %s", record.namespace, record.name, error)
            self._report_terminated(record, 128, reason="StartError", message=str(error))
            return
        if pod.spec.active_deadline_seconds:
            record.deadline = time.monotonic() + pod.spec.active_deadline_seconds
        log.info("pod %s/%s running as pid %d: %s", record.namespace, record.name, record.process.pid, argv)
        self._report_running(record)

    def _argv(self, container: Any, env: Mapping[str, str]) -> list[str]:
        command = list(container.command or [])
        if not command:
            image = container.image or ""
            command = self.image_commands.get(image) or self.image_commands.get(image.rsplit(":", 1)[0], [])
            if not command:
                raise _StartError(
                    f"container {container.name!r} sets no command and image {image!r} is not in the node "
                    "agent's image_commands"
                )
        argv = [expand_vars(part, env) for part in [*command, *(container.args or [])]]
        program = argv[0]
        local = (
            self.executables.get(program)
            or self.executables.get(os.path.basename(program))
            or (program if os.sep in program else shutil.which(program, path=self.path))
        )
        if not local:
            raise _StartError(f"executable {program!r} not found in node agent PATH {self.path!r}")
        return [local, *argv[1:]]

    # ---------------------------------------------------------------- env

    def _container_env(self, pod: Any, container: Any, home: Path) -> dict[str, str]:
        """The process environment: agent defaults, then envFrom, then env (later wins)."""
        namespace = pod.metadata.namespace
        env = {"PATH": self.path, "HOME": str(home), "HOSTNAME": pod.metadata.name, "LANG": "C.UTF-8"}
        env.update(self.extra_env)
        for source in container.env_from or []:
            prefix = source.prefix or ""
            if source.secret_ref is not None:
                data = self._secret(namespace, source.secret_ref.name, source.secret_ref.optional)
            elif source.config_map_ref is not None:
                data = self._config_map(namespace, source.config_map_ref.name, source.config_map_ref.optional)
            else:
                continue
            env.update({prefix + key: value for key, value in (data or {}).items()})
        for var in container.env or []:
            value = self._env_value(pod, var, env)
            if value is not None:
                env[var.name] = value
        return env

    def _env_value(self, pod: Any, var: Any, env: Mapping[str, str]) -> str | None:
        source = var.value_from
        if source is None:
            return expand_vars(var.value or "", env)
        namespace = pod.metadata.namespace
        if source.secret_key_ref is not None:
            ref = source.secret_key_ref
            return self._key(self._secret(namespace, ref.name, ref.optional), "Secret", namespace, ref)
        if source.config_map_key_ref is not None:
            ref = source.config_map_key_ref
            return self._key(self._config_map(namespace, ref.name, ref.optional), "ConfigMap", namespace, ref)
        if source.field_ref is not None:
            field_path = source.field_ref.field_path
            if field_path in _FIELD_PATHS:
                return _FIELD_PATHS[field_path](pod) or ""
            match = _LABEL_FIELD.fullmatch(field_path)
            if match:
                return (getattr(pod.metadata, match.group(1)) or {}).get(match.group(2), "")
            raise _StartError(f"env {var.name}: fieldRef {field_path!r} is not supported by the node agent")
        raise _StartError(f"env {var.name}: resourceFieldRef is not supported by the node agent")

    @staticmethod
    def _key(data: dict[str, str] | None, kind: str, namespace: str, ref: Any) -> str | None:
        if data is not None and ref.key in data:
            return data[ref.key]
        if ref.optional:
            return None
        raise _ConfigPending(f"couldn't find key {ref.key} in {kind} {namespace}/{ref.name}")

    def _secret(self, namespace: str, name: str, optional: bool | None) -> dict[str, str] | None:
        try:
            secret = self._core.read_namespaced_secret(name, namespace)
        except ApiException as error:
            if error.status == 404 and optional:
                return None
            if error.status == 404:
                raise _ConfigPending(f'secret "{name}" not found') from error
            raise
        return {k: base64.b64decode(v).decode(errors="replace") for k, v in (secret.data or {}).items()}

    def _config_map(self, namespace: str, name: str, optional: bool | None) -> dict[str, str] | None:
        try:
            config_map = self._core.read_namespaced_config_map(name, namespace)
        except ApiException as error:
            if error.status == 404 and optional:
                return None
            if error.status == 404:
                raise _ConfigPending(f'configmap "{name}" not found') from error
            raise
        return dict(config_map.data or {})

    # ---------------------------------------------------------------- status

    def _conditions(self, ready: bool, reason: str | None = None) -> list[dict[str, Any]]:
        now = _now()
        statuses = {
            "PodScheduled": True,
            "PodReadyToStartContainers": True,
            "Initialized": True,
            "ContainersReady": ready,
            "Ready": ready,
        }
        return [
            {
                "type": kind,
                "status": "True" if ok else "False",
                "reason": None if ok else reason,
                "lastProbeTime": None,
                "lastTransitionTime": now,
            }
            for kind, ok in statuses.items()
        ]

    def _patch_status(self, record: _PodRecord, status: dict[str, Any], state: str) -> None:
        status.update({"hostIP": "127.0.0.1", "hostIPs": [{"ip": "127.0.0.1"}]})
        self._core.patch_namespaced_pod_status(record.name, record.namespace, {"status": status})
        record.reported = state

    def _container_status(self, record: _PodRecord, state: dict[str, Any], ready: bool) -> dict[str, Any]:
        container_id = f"local://{record.process.pid}" if record.process else None
        return {
            "name": record.container,
            "image": record.image,
            "imageID": "",
            "containerID": container_id,
            "ready": ready,
            "started": ready,
            "restartCount": 0,
            "state": state,
        }

    def _report_waiting(self, record: _PodRecord, reason: str, message: str) -> None:
        if record.reported == f"waiting: {message}":
            return
        state = _state("waiting", {"reason": reason, "message": message})
        status = {
            "phase": "Pending",
            "conditions": self._conditions(False, "ContainersNotReady"),
            "containerStatuses": [self._container_status(record, state, False)],
        }
        self._patch_status(record, status, f"waiting: {message}")

    def _report_running(self, record: _PodRecord) -> None:
        state = _state("running", {"startedAt": record.started_at})
        status = {
            "phase": "Running",
            "startTime": record.started_at,
            "podIP": "127.0.0.1",
            "podIPs": [{"ip": "127.0.0.1"}],
            "conditions": self._conditions(True),
            "containerStatuses": [self._container_status(record, state, True)],
        }
        self._patch_status(record, status, "running")

    def _report_terminated(
        self, record: _PodRecord, exit_code: int, reason: str | None = None, message: str | None = None
    ) -> None:
        code = _exit_code(exit_code)
        container_id = f"local://{record.process.pid}" if record.process else None
        state = _state(
            "terminated",
            {
                "exitCode": code,
                "reason": reason or ("Completed" if code == 0 else "Error"),
                "message": message,
                "startedAt": record.started_at,
                "finishedAt": _now(),
                "containerID": container_id,
            },
        )
        status = {
            "phase": "Succeeded" if code == 0 else "Failed",
            "startTime": record.started_at or _now(),
            "conditions": self._conditions(False, "PodCompleted"),
            "containerStatuses": [self._container_status(record, state, False)],
        }
        if reason == "DeadlineExceeded":
            status.update({"reason": reason, "message": message})
        log.info("pod %s/%s terminated with exit code %d", record.namespace, record.name, code)
        self._patch_status(record, status, "terminated")


def _exit_code(returncode: int) -> int:
    """Popen's negative "killed by signal N" as a container runtime reports it (128 + N)."""
    return 128 - returncode if returncode < 0 else returncode
