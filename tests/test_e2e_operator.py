"""The operator end to end on a real control plane: apply -> Jobs -> pods (local processes) -> S3 -> status.

etcd + kube-apiserver + kube-controller-manager (the Job controller and the garbage collector are real),
MinIO for run storage, the fake GPU node agent running each pod's `datacredit worker ...` command, and the
operator itself as a subprocess (`datacredit operator`), so it can be killed and restarted.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from kubernetes import client
from kubernetes.client.rest import ApiException

from datacredit import layout
from datacredit.crd import GROUP, NAME, PLURAL, VERSION
from datacredit.runstate import run_uri
from datacredit.shapley import make_plan
from datacredit.spec import parse_manifest
from datacredit.storage import S3Options, S3Storage, read_json
from tests.infra.controlplane import ControlPlane
from tests.infra.nodeagent import NodeAgent
from tests.infra.process import ManagedProcess, free_port, wait_until
from tests.infra.s3server import S3Server
from tests.tiny import CONTRIBUTORS, TinyData, tiny_manifest, with_change

pytestmark = pytest.mark.controlplane

NS = "vrun-e2e"
BUCKET = "datacredit-e2e"
ROOT = Path(__file__).resolve().parents[1]
CRD_FILE = ROOT / "crds" / "valuationruns.datacredit.dev.yaml"
RUN_TIMEOUT_S = 900.0  # a worker process spends 10-40 s importing torch on a busy 2-core machine
FAULTS_ENV = "DATACREDIT_TEST_FAULTS"


class Operator:
    """`datacredit operator` as a child process against the test control plane."""

    def __init__(self, plane: ControlPlane, s3: S3Server, log_dir: Path) -> None:
        self.env = {
            **os.environ,
            **s3.env(),
            "KUBECONFIG": str(plane.kubeconfig),
            "DATACREDIT_RECONCILE_INTERVAL": "1",
            "DATACREDIT_JOB_LOST_AFTER": "4",
            "DATACREDIT_WAITING_AFTER": "3",
            "PYTHONUNBUFFERED": "1",
        }
        self.log_dir = log_dir
        self.metrics_port = free_port()
        self.process: ManagedProcess | None = None
        self.starts = 0

    def start(self) -> None:
        self.starts += 1
        argv = [str(Path(sys.executable).parent / "datacredit"), "operator", "--namespace", NS,
                "--metrics-port", str(self.metrics_port), "--liveness-port", str(free_port())]
        self.process = ManagedProcess("operator", argv, self.log_dir / f"operator-{self.starts}.log", env=self.env)
        wait_until(lambda: b"datacredit_build_info" in self.metrics(), "operator metrics endpoint", 60,
                   process=self.process)

    def kill(self) -> None:
        """SIGKILL: a crash, not a graceful stop (no finalizer or status clean-up happens)."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.stop(grace=1)
        self.process = None

    def metrics(self) -> bytes:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return bytes(r.read())

    def log(self) -> str:
        return self.process.log_tail(20000) if self.process else ""


@pytest.fixture(scope="module")
def api(control_plane: ControlPlane) -> Iterator[client.ApiClient]:
    """An admin client, the test namespace and the CRD (Established)."""
    control_plane.ensure_namespace(NS)
    with control_plane.api_client() as api_client:
        ext = client.ApiextensionsV1Api(api_client)
        try:
            ext.create_custom_resource_definition(yaml.safe_load(CRD_FILE.read_text()))
        except ApiException as error:
            if error.status != 409:
                raise

        def established() -> bool:
            conds = ext.read_custom_resource_definition(NAME).status.conditions or []
            return any(c.type == "Established" and c.status == "True" for c in conds)

        wait_until(established, "CRD Established", 60)
        yield api_client


@pytest.fixture(scope="module")
def s3_env(s3_server: S3Server, api: client.ApiClient) -> Iterator[dict[str, str]]:
    """The bucket, and the Secret the Jobs take their S3 keys from."""
    s3_server.make_bucket(BUCKET)
    secret = {"metadata": {"name": "s3-creds"},
              "stringData": {"AWS_ACCESS_KEY_ID": s3_server.access_key,
                             "AWS_SECRET_ACCESS_KEY": s3_server.secret_key}}
    try:
        client.CoreV1Api(api).create_namespaced_secret(NS, secret)
    except ApiException as error:
        if error.status != 409:
            raise
    yield s3_server.env()


@pytest.fixture(scope="module")
def agent(node_agent: NodeAgent) -> Iterator[NodeAgent]:
    """The node agent with one torch thread per pod (2 pods share 2 cores), restored afterwards."""
    saved = dict(node_agent.extra_env), dict(node_agent.executables)
    node_agent.extra_env.update({"OMP_NUM_THREADS": "1", "DATACREDIT_THREADS": "1"})
    yield node_agent
    node_agent.extra_env.clear()
    node_agent.extra_env.update(saved[0])
    node_agent.executables.clear()
    node_agent.executables.update(saved[1])


@pytest.fixture(scope="module")
def operator(control_plane: ControlPlane, s3_server: S3Server, s3_env: dict[str, str], agent: NodeAgent,
             tmp_path_factory: pytest.TempPathFactory) -> Iterator[Operator]:
    op = Operator(control_plane, s3_server, tmp_path_factory.mktemp("operator"))
    op.start()
    yield op
    if op.process is not None:
        op.process.stop()


@pytest.fixture()
def faults(agent: NodeAgent, tmp_path: Path) -> Iterator[dict[tuple[str, str], str]]:
    """Route pods' `datacredit` through a wrapper that fails `worker coalition` of chosen runs on demand.

    Set `faults[(run name, "0,2")] = "N"` (fail attempts 1..N of that coalition) or `"always"`.
    """
    real = str(Path(sys.executable).parent / "datacredit")
    wrapper = tmp_path / "datacredit-faulty"
    wrapper.write_text(f"""#!{sys.executable}
import os, sys
args = sys.argv[1:]
if args[:2] == ["worker", "coalition"]:
    uri, members = args[args.index("--run") + 1], args[args.index("--members") + 1]
    attempt = int(args[args.index("--attempt") + 1])
    for rule in filter(None, os.environ.get("{FAULTS_ENV}", "").split(";")):
        run, who, times = rule.split("|")
        if f"/{{run}}-" in uri and who == members and (times == "always" or attempt <= int(times)):
            print(f"injected failure: {{run}} members {{members}} attempt {{attempt}}", file=sys.stderr)
            sys.exit(1)
os.execv({real!r}, [{real!r}, *args])
""")
    wrapper.chmod(0o755)
    agent.executables["datacredit"] = str(wrapper)

    class Rules(dict):  # type: ignore[type-arg]
        def __setitem__(self, key: tuple[str, str], value: str) -> None:
            super().__setitem__(key, value)
            agent.extra_env[FAULTS_ENV] = ";".join(f"{r}|{m}|{t}" for (r, m), t in self.items())

    yield Rules()
    agent.executables.pop("datacredit", None)
    agent.extra_env.pop(FAULTS_ENV, None)


def _manifest(tiny: TinyData, s3: S3Server, name: str, estimator: str = "kernel", budget: int = 8,
              **execution: Any) -> dict[str, Any]:
    storage = {"uri": f"s3://{BUCKET}/runs", "endpoint": s3.endpoint, "region": s3.region,
               "credentialsSecret": "s3-creds"}
    doc = tiny_manifest(name, str(tiny.images), str(tiny.reference), storage, estimator=estimator, budget=budget)
    doc["metadata"]["namespace"] = NS
    doc["spec"]["execution"].update({"coalitionsPerJob": 1, **execution})  # one Job per coalition unless asked
    return doc


def _custom(api: client.ApiClient) -> client.CustomObjectsApi:
    return client.CustomObjectsApi(api)


def _create(api: client.ApiClient, doc: dict[str, Any]) -> dict[str, Any]:
    return _custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, doc, field_validation="Strict")


def _get(api: client.ApiClient, name: str) -> dict[str, Any]:
    return _custom(api).get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)


def _wait_phase(api: client.ApiClient, name: str, phases: tuple[str, ...], op: Operator,
                timeout: float = RUN_TIMEOUT_S) -> dict[str, Any]:
    def reached() -> bool:
        return (_get(api, name).get("status") or {}).get("phase") in phases

    try:
        wait_until(reached, f"{name} phase in {phases}", timeout, interval=1.0,
                   process=op.process)
    except TimeoutError as error:
        raise AssertionError(f"{error}\nstatus: {_get(api, name).get('status')}\noperator log:\n{op.log()}") from None
    return _get(api, name)


def _jobs(api: client.ApiClient, uid: str) -> list[Any]:
    return client.BatchV1Api(api).list_namespaced_job(NS, label_selector=f"datacredit.dev/run-uid={uid}").items


def _store(run: dict[str, Any], s3: S3Server) -> S3Storage:
    spec = {k: v for k, v in run["spec"].items()}
    vr = parse_manifest({"apiVersion": run["apiVersion"], "kind": run["kind"],
                         "metadata": {"name": run["metadata"]["name"], "namespace": NS}, "spec": spec})
    uri = run_uri(vr, uid=run["metadata"]["uid"])
    return S3Storage(uri, S3Options(endpoint=s3.endpoint, region=s3.region), client=s3.client())


def _values(doc: dict[str, Any]) -> dict[str, float]:
    return {r["name"]: r["value"] for r in doc["contributors"]}


def _delete(api: client.ApiClient, name: str) -> None:
    try:
        _custom(api).delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, name)
    except ApiException as error:
        if error.status != 404:
            raise


# ---------------------------------------------------------------- (1) values, (6) columns, (5) deletion


@pytest.mark.timeout(1800)
def test_run_succeeds_with_local_values_columns_and_cleanup(
    api: client.ApiClient, operator: Operator, s3_server: S3Server, tiny_data: TinyData, tmp_path: Path,
) -> None:
    doc = _manifest(tiny_data, s3_server, "tiny-kernel", estimator="kernel", budget=8, coalitionsPerJob=4)  # packed
    # paid when it succeeds; pro-rata (by image count) pays whatever the signs of this tiny run's values, which
    # can all be <= 0 (the rules on values are tested in test_payout.py and test_status_payout.py)
    doc["spec"]["payout"] = {"pool": "1000.00", "currency": "EUR", "period": "2025-06", "rule": "pro-rata"}
    started = time.monotonic()
    _create(api, doc)
    run = _wait_phase(api, "tiny-kernel", ("Succeeded", "Failed"), operator)
    elapsed = time.monotonic() - started
    status = run["status"]
    assert status["phase"] == "Succeeded", status
    print(f"\n[e2e] kernel run, 8 coalitions: Succeeded in {elapsed:.1f}s")

    assert status["progress"] == "8/8" and status["coalitions"]["succeeded"] == 8
    assert {t["contributor"] for t in status["top"]} == set(CONTRIBUTORS)
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["Ready"]["status"] == "True" and conds["Prepared"]["status"] == "True"
    assert status["startTime"] and status["completionTime"] and status["observedGeneration"] == 1

    store = _store(run, s3_server)
    assert status["results"].startswith(store.uri)
    shapley = read_json(store, "results/shapley.json")
    assert set(_values(shapley)) == set(CONTRIBUTORS) and shapley["evaluations"] == 8
    assert store.exists("results/shapley.csv")
    assert len(store.read_bytes(layout.UTILITIES).decode().splitlines()) == 8
    by_status = {t["contributor"]: t["value"] for t in status["top"]}
    for name, value in _values(shapley).items():
        assert by_status[name] == pytest.approx(value, abs=1e-7)

    # spec.payout: written next to the results by the operator, summarised in the status
    assert status["payout"].get("total") == "1000.00" and status["payout"]["currency"] == "EUR", status["payout"]
    assert status["payout"]["period"] == "2025-06" and conds["PaidOut"]["status"] == "True", conds
    assert store.exists("payouts/2025-06.json") and store.exists("payouts/2025-06.csv")
    paid = read_json(store, "payouts/2025-06.json")
    assert paid["pool"] == "1000.00" and paid["paidMinor"] + paid["escrowMinor"] == 100_000
    assert {e["name"] for e in paid["contributors"]} == set(CONTRIBUTORS)

    # `datacredit report` on the manifest finds the operator's run (its folder is named by the uid, not by the
    # config hash as a local run's is), and the operator wrote the HTML report too
    manifest = tmp_path / "tiny-kernel.yaml"
    manifest.write_text(yaml.safe_dump(doc))
    env = {**os.environ, **s3_server.env(), "OMP_NUM_THREADS": "1", "DATACREDIT_THREADS": "1"}
    exe = str(Path(sys.executable).parent / "datacredit")
    shown = subprocess.run([exe, "report", str(manifest)], env=env, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert f"report: {store.uri}/results/report.html" in shown.stdout and store.exists("results/report.html")

    # the same manifest, run by the local executor (`datacredit run`, one torch thread per process as in the
    # pods, so the floating-point work is the same), gives the same values
    local_started = time.monotonic()
    subprocess.run([exe, "run", str(manifest), "--workers", "2"],
                   env=env, check=True, timeout=RUN_TIMEOUT_S, stdout=subprocess.DEVNULL)
    print(f"[e2e] local executor (datacredit run), same manifest: {time.monotonic() - local_started:.1f}s")
    local_run = parse_manifest(doc)
    local_store = S3Storage(run_uri(local_run), S3Options(endpoint=s3_server.endpoint), client=s3_server.client())
    local = read_json(local_store, "results/shapley.json")
    names = sorted(CONTRIBUTORS)
    np.testing.assert_allclose([_values(shapley)[n] for n in names], [_values(local)[n] for n in names],
                               rtol=1e-6, atol=1e-9)
    assert read_json(local_store, "payouts/2025-06.json")["pool"] == "1000.00"  # the local executor pays too

    # `datacredit runs` lists both runs of the manifest in its storage; `compare` finds their values equal
    def cli_json(*args: str) -> object:
        done = subprocess.run([exe, *args, "--json"], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    listed = [e for e in cli_json("runs", str(manifest)) if (e["namespace"], e["name"]) == (NS, "tiny-kernel")]
    assert sorted(e["uri"] for e in listed) == sorted([store.uri, local_store.uri])
    assert all(e["finished"] and e["evaluations"] == 8 for e in listed)
    same = cli_json("compare", store.uri, local_store.uri)
    assert same["common"] == len(CONTRIBUTORS) and all(abs(r["delta"]) < 1e-6 for r in same["contributors"])

    # (6) printer columns, as `kubectl get valuationruns` shows them (the API's Table form)
    response = api.call_api(f"/apis/{GROUP}/{VERSION}/namespaces/{NS}/{PLURAL}", "GET",
                            header_params={"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io"},
                            auth_settings=["BearerToken"], _preload_content=False)
    table = json.loads(response[0].data)
    columns = [c["name"] for c in table["columnDefinitions"]]
    assert columns[:5] == ["Name", "Phase", "Ready", "Progress", "Top"] and "Age" in columns
    row = next(r["cells"] for r in table["rows"] if r["cells"][0] == "tiny-kernel")
    assert row[1:5] == ["Succeeded", "True", "8/8", status["topContributor"]]

    # the operator's metrics for this run
    text = operator.metrics().decode()
    assert 'datacredit_run_progress_ratio{name="tiny-kernel",namespace="vrun-e2e"} 1.0' in text
    assert 'datacredit_coalitions{name="tiny-kernel",namespace="vrun-e2e",phase="Succeeded"} 8.0' in text
    device = [line for line in text.splitlines()
              if line.startswith('datacredit_run_device_seconds_total{name="tiny-kernel"')]
    assert device and float(device[0].split()[-1]) > 0, device

    # (5) deleting the run deletes its Jobs (ownerReferences + the garbage collector) and its series
    uid = run["metadata"]["uid"]
    jobs = _jobs(api, uid)
    evaluated = []  # coalition ids, per Job: a packed one lists its coalitions, another names its one
    for j in jobs:
        batch = (j.metadata.annotations or {}).get("datacredit.dev/batch")
        if batch:
            evaluated += [part.split(":")[0] for part in batch.split(";")]
        elif j.metadata.labels["datacredit.dev/step"] == "coalition":
            evaluated.append(j.metadata.labels["datacredit.dev/coalition"])
    assert len(evaluated) == len(set(evaluated)) == 8, evaluated  # every coalition in one Job, none twice
    assert len(jobs) < 9, [j.metadata.name for j in jobs]  # coalitionsPerJob=4: fewer Jobs than coalitions
    results = [read_json(store, layout.coalition_result(c)) for c in evaluated]
    assert max(r["packedWith"] for r in results) > 1 and all(r["deviceSeconds"] > 0 for r in results)
    _delete(api, "tiny-kernel")
    wait_until(lambda: not _jobs(api, uid), "garbage collection of the run's Jobs", 120)
    wait_until(lambda: b'name="tiny-kernel"' not in operator.metrics(), "metric series removed", 30)


# ---------------------------------------------------------------- (2) operator restart


@pytest.mark.timeout(1800)
def test_operator_restart_resumes_without_repeating_work(
    api: client.ApiClient, operator: Operator, s3_server: S3Server, tiny_data: TinyData
) -> None:
    _create(api, _manifest(tiny_data, s3_server, "tiny-restart", budget=6))

    def some_done() -> bool:
        return ((_get(api, "tiny-restart").get("status") or {}).get("coalitions") or {}).get("succeeded", 0) >= 2

    wait_until(some_done, "2 coalitions of tiny-restart", RUN_TIMEOUT_S, interval=1.0, process=operator.process)
    uid = _get(api, "tiny-restart")["metadata"]["uid"]

    def in_flight() -> list[str]:
        return [j.metadata.labels["datacredit.dev/coalition"] for j in _jobs(api, uid)
                if (j.status.active or 0) > 0 and "datacredit.dev/coalition" in j.metadata.labels]

    wait_until(lambda: bool(in_flight()), "a coalition Job running", RUN_TIMEOUT_S, interval=0.2,
               process=operator.process)
    running_at_kill = in_flight()
    operator.kill()
    time.sleep(8)  # Jobs keep running and finishing while no operator watches
    operator.start()
    run = _wait_phase(api, "tiny-restart", ("Succeeded", "Failed"), operator)
    assert run["status"]["phase"] == "Succeeded", run["status"]

    store = _store(run, s3_server)
    keys = store.list("coalitions")
    results = [k for k in keys if k.endswith("/result.json")]
    attempts = {k.rsplit("/", 1)[0] for k in keys if "/attempt-" in k}
    assert len(results) == run["status"]["coalitions"]["succeeded"]
    assert len(attempts) == len(results), "a coalition was evaluated more than once"
    assert running_at_kill, "no work was in flight when the operator was killed"
    for cid in running_at_kill:  # finished while no operator watched, and not started again
        assert f"coalitions/{cid}/result.json" in keys
        assert [k for k in keys if k.startswith(f"coalitions/{cid}/attempt-")
                and k.endswith("/created.json")] == [f"coalitions/{cid}/attempt-1/created.json"]
    jobs = _jobs(api, run["metadata"]["uid"])
    per_coalition = [j.metadata.labels.get("datacredit.dev/coalition", "prepare") for j in jobs]
    assert len(per_coalition) == len(set(per_coalition)), "a Job was duplicated"
    _delete(api, "tiny-restart")


# ---------------------------------------------------------------- (7) every model family, models on S3


@pytest.fixture(scope="module")
def model_uris(s3_server: S3Server, s3_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
               ) -> dict[str, str]:
    """Tiny real models (diffusers / transformers folders, a torch state dict) uploaded to the bucket, as a
    user with offline clusters keeps them."""
    from datacredit.storage import upload_dir
    from tests.tiny_models import save_linear_head, save_tiny_clip, save_tiny_sd_pipeline, save_tiny_vqmodel

    root = tmp_path_factory.mktemp("models")
    store = S3Storage(f"s3://{BUCKET}/models", S3Options(endpoint=s3_server.endpoint, region=s3_server.region),
                      client=s3_server.client())
    upload_dir(store, "vqvae", save_tiny_vqmodel(root / "vqvae"))
    upload_dir(store, "sd", save_tiny_sd_pipeline(root / "sd"))
    upload_dir(store, "clip", save_tiny_clip(root / "clip"))
    store.write_bytes("aesthetic-head.pth", save_linear_head(root / "head.pth", seed=1).read_bytes())
    base = f"s3://{BUCKET}/models"
    return {"vqvae": f"{base}/vqvae/", "sd": f"{base}/sd/", "clip": f"{base}/clip/",
            "head": f"{base}/aesthetic-head.pth"}


FAMILIES = {
    "ldm": lambda m: {
        "model": {"family": "ldm", "autoencoder": m["vqvae"],
                  "architecture": {"sampleSize": 8, "blockOutChannels": [16, 32]},
                  "train": {"steps": 6, "learningRate": 2e-3, "batchSize": 16}},
        "property": {"name": "cluster-entropy", "weights": m["clip"], "clusters": 4, "samples": 8},
    },
    "sd-lora": lambda m: {
        "model": {"family": "sd-lora", "checkpoint": m["sd"], "prompt": "a digit",
                  "lora": {"rank": 4}, "train": {"steps": 4, "learningRate": 1e-3, "batchSize": 4}},
        "property": {"name": "aesthetic", "weights": m["clip"], "head": m["head"], "quantile": 0.9, "samples": 4},
    },
}


@pytest.mark.timeout(1800)
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_model_families_run_through_the_operator(
    api: client.ApiClient, operator: Operator, s3_server: S3Server, tiny_data: TinyData,
    model_uris: dict[str, str], family: str,
) -> None:
    name = f"tiny-{family}"
    doc = _manifest(tiny_data, s3_server, name, estimator="kernel", budget=6)
    spec = FAMILIES[family](model_uris)
    doc["spec"]["model"] = spec["model"]
    doc["spec"]["property"] = {**spec["property"], "reference": str(tiny_data.reference)}
    doc["spec"]["method"] = {"prune": {"ratio": 0.5, "finetuneSteps": 2},
                             "finetune": {"steps": 2, "learningRate": 1e-3, "batchSize": 4}, "sampler": {"steps": 2}}
    started = time.monotonic()
    _create(api, doc)
    run = _wait_phase(api, name, ("Succeeded", "Failed"), operator)
    assert run["status"]["phase"] == "Succeeded", run["status"]
    print(f"\n[e2e] {family} run, 6 coalitions, models from S3: Succeeded in {time.monotonic() - started:.1f}s")

    store = _store(run, s3_server)
    prepared = read_json(store, layout.PREPARE_RESULT)
    assert prepared["family"] == family and prepared["paramsPruned"] < prepared["paramsFull"]
    shapley = read_json(store, "results/shapley.json")
    values = _values(shapley)
    assert set(values) == set(CONTRIBUTORS) and all(np.isfinite(list(values.values())))
    assert sum(values.values()) == pytest.approx(shapley["vFull"] - shapley["vEmpty"], abs=1e-6)
    utilities = [json.loads(line) for line in store.read_bytes(layout.UTILITIES).decode().splitlines()]
    assert len(utilities) == 6 and len({round(u["utility"], 9) for u in utilities}) > 1
    _delete(api, name)


# ---------------------------------------------------------------- (3) retries and failure


@pytest.mark.timeout(1800)
def test_failed_pod_is_retried_and_persistent_failure_fails_the_run(
    api: client.ApiClient, operator: Operator, s3_server: S3Server, tiny_data: TinyData,
    faults: dict[tuple[str, str], str],
) -> None:
    plan = make_plan(len(CONTRIBUTORS), 8, "kernel", seed=0).sequence  # the manifest's estimator
    retried, dropped = [str(int(np.flatnonzero(z)[0])) for z in plan if z.sum() == 1][:2]  # two singletons
    faults[("tiny-retry", retried)] = "1"  # fails its first attempt, then succeeds
    faults[("tiny-retry", dropped)] = "always"  # never succeeds: tolerated (maxFailedCoalitions=3)
    faults[("tiny-doomed", "0,1,2,3")] = "always"  # the full coalition never succeeds: not tolerated
    _create(api, _manifest(tiny_data, s3_server, "tiny-retry", budget=8, maxAttemptsPerCoalition=2))
    _create(api, _manifest(tiny_data, s3_server, "tiny-doomed", budget=6, maxAttemptsPerCoalition=2,
                           maxFailedCoalitions=0))

    run = _wait_phase(api, "tiny-retry", ("Succeeded", "Failed"), operator)
    status = run["status"]
    assert status["phase"] == "Succeeded", status
    assert status["coalitions"]["failed"] == 1 and status["coalitions"]["failedAttempts"] == 3
    assert f"{{{CONTRIBUTORS[int(dropped)]}}}" in {c["type"]: c for c in status["conditions"]}["Failed"]["message"]
    jobs = {j.metadata.name: j for j in _jobs(api, run["metadata"]["uid"])}
    again = [j for j in jobs.values() if (j.metadata.annotations or {}).get("datacredit.dev/members") == retried]
    assert sorted(j.metadata.labels["datacredit.dev/attempt"] for j in again) == ["1", "2"]
    store = _store(run, s3_server)
    cid = again[0].metadata.labels["datacredit.dev/coalition"]
    assert store.exists(f"coalitions/{cid}/attempt-1/failed.json")
    assert store.exists(f"coalitions/{cid}/result.json")
    events = client.CoreV1Api(api).list_namespaced_event(
        NS, field_selector=f"involvedObject.name=tiny-retry,involvedObject.uid={run['metadata']['uid']}").items
    assert any(e.reason == "AttemptFailed" for e in events)

    doomed = _wait_phase(api, "tiny-doomed", ("Succeeded", "Failed"), operator)
    status = doomed["status"]
    assert status["phase"] == "Failed"
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["status"] == "True" and failed["reason"] == "CoalitionsFailed"
    assert "{ann, bob, cy, noise}" in failed["message"] and "2 time(s)" in failed["message"]
    assert not [j for j in _jobs(api, doomed["metadata"]["uid"]) if not (j.status.succeeded or j.status.failed)]
    _delete(api, "tiny-retry")
    _delete(api, "tiny-doomed")


def test_an_evicted_coalition_pod_is_replaced_without_using_an_attempt(
    api: client.ApiClient, operator: Operator, s3_server: S3Server, tiny_data: TinyData,
) -> None:
    """Preemption for real: the Eviction API marks a running coalition pod DisruptionTarget and deletes it; the
    Job's pod failure policy ignores it, the Job controller starts a replacement in the same Job, and the
    coalition finishes as attempt 1 with no failure recorded."""
    _create(api, _manifest(tiny_data, s3_server, "tiny-evict", budget=6))
    uid = _get(api, "tiny-evict")["metadata"]["uid"]
    core = client.CoreV1Api(api)

    def running() -> list[Any]:
        pods = core.list_namespaced_pod(NS, label_selector=f"datacredit.dev/run-uid={uid},"
                                        "datacredit.dev/step=coalition").items
        return [p for p in pods if p.status.phase == "Running" and not p.metadata.deletion_timestamp]

    wait_until(lambda: bool(running()), "a running coalition pod", RUN_TIMEOUT_S, interval=0.5,
               process=operator.process)
    victim = running()[0]
    job = victim.metadata.labels["batch.kubernetes.io/job-name"]
    cid = victim.metadata.labels["datacredit.dev/coalition"]
    core.create_namespaced_pod_eviction(victim.metadata.name, NS, client.V1Eviction(
        metadata=client.V1ObjectMeta(name=victim.metadata.name, namespace=NS)))

    run = _wait_phase(api, "tiny-evict", ("Succeeded", "Failed"), operator)
    assert run["status"]["phase"] == "Succeeded", run["status"]
    assert run["status"]["coalitions"]["failedAttempts"] == 0
    pods = core.list_namespaced_pod(NS, label_selector=f"batch.kubernetes.io/job-name={job}").items
    done = [p.metadata.name for p in pods if p.status.phase == "Succeeded"]
    assert len(done) == 1 and done[0] != victim.metadata.name, done  # a replacement pod finished the work
    keys = _store(run, s3_server).list(f"coalitions/{cid}")
    assert {f"coalitions/{cid}/result.json", f"coalitions/{cid}/attempt-1/created.json"} <= set(keys), keys
    assert not [k for k in keys if k.endswith("failed.json") or "/attempt-2/" in k], keys
    _delete(api, "tiny-evict")


def test_jobs_that_vanish_unseen_use_up_attempts_and_the_run_fails_in_bounded_time(
    api: client.ApiClient, operator: Operator, s3_server: S3Server, tiny_data: TinyData,
    faults: dict[tuple[str, str], str],
) -> None:
    """Every Job of the full coalition is deleted as soon as it shows up (as TTL 0 or an operator down longer
    than the TTL would do): attempts are counted from storage, so the run fails after maxAttemptsPerCoalition."""
    faults[("tiny-vanish", "0,1,2,3")] = "always"  # and if one survives long enough to run, it fails
    _create(api, _manifest(tiny_data, s3_server, "tiny-vanish", budget=6, maxAttemptsPerCoalition=2,
                           maxFailedCoalitions=0))
    uid = _get(api, "tiny-vanish")["metadata"]["uid"]
    batch = client.BatchV1Api(api)
    deleted: set[str] = set()

    def delete_full_coalition_jobs() -> bool:
        for j in _jobs(api, uid):
            if (j.metadata.annotations or {}).get("datacredit.dev/members") == "0,1,2,3":
                with contextlib.suppress(ApiException):
                    batch.delete_namespaced_job(j.metadata.name, NS, propagation_policy="Background")
                deleted.add(j.metadata.name)
        return (_get(api, "tiny-vanish").get("status") or {}).get("phase") in ("Succeeded", "Failed")

    wait_until(delete_full_coalition_jobs, "tiny-vanish to end", RUN_TIMEOUT_S, interval=0.2,
               process=operator.process)
    status = _get(api, "tiny-vanish")["status"]
    assert status["phase"] == "Failed", status
    failed = {c["type"]: c for c in status["conditions"]}["Failed"]
    assert failed["reason"] == "CoalitionsFailed" and "JobLost" in failed["message"], failed
    assert {n.rsplit("-a", 1)[1] for n in deleted} == {"1", "2"}, deleted  # attempts 1 and 2, never a third
    store = _store(_get(api, "tiny-vanish"), s3_server)
    markers = [k for k in store.list("coalitions") if k.endswith(("created.json", "failed.json"))]
    full = {k.split("/")[1] for k in markers if k.endswith("attempt-2/created.json")}
    assert len(full) == 1 and not [k for k in markers if "/attempt-3/" in k], markers
    _delete(api, "tiny-vanish")


def test_a_job_the_api_server_refuses_fails_the_run_with_its_message(
    api: client.ApiClient, operator: Operator, s3_server: S3Server, tiny_data: TinyData,
) -> None:
    """A nodeSelector key the API server rejects (422) used to be retried every pass forever."""
    _create(api, _manifest(tiny_data, s3_server, "tiny-rejected", nodeSelector={"not a key!": "x"}))
    run = _wait_phase(api, "tiny-rejected", ("Succeeded", "Failed"), operator, timeout=120)
    failed = {c["type"]: c for c in run["status"]["conditions"]}["Failed"]
    assert failed["reason"] == "PrepareFailed" and "JobRejected" in failed["message"], failed
    assert "nodeSelector" in failed["message"], failed  # the API server's own words
    assert _jobs(api, run["metadata"]["uid"]) == []
    events = client.CoreV1Api(api).list_namespaced_event(
        NS, field_selector=f"involvedObject.name=tiny-rejected,involvedObject.uid={run['metadata']['uid']}").items
    assert any(e.reason == "JobRejected" for e in events)
    _delete(api, "tiny-rejected")


def test_a_missing_secret_or_service_account_is_named_in_a_waiting_condition(
    api: client.ApiClient, operator: Operator, s3_server: S3Server, tiny_data: TinyData,
) -> None:
    """The prepare pod of a run whose S3 Secret does not exist cannot start, and a Job whose ServiceAccount does
    not exist gets no pod at all: both used to sit in Preparing for hours with the cause never named."""
    no_secret = _manifest(tiny_data, s3_server, "tiny-nosecret")
    no_secret["spec"]["storage"]["credentialsSecret"] = "no-such-secret"
    _create(api, no_secret)
    _create(api, _manifest(tiny_data, s3_server, "tiny-nosa", serviceAccountName="no-such-sa"))

    def waiting(name: str) -> dict[str, Any] | None:
        conds = {c["type"]: c for c in (_get(api, name).get("status") or {}).get("conditions") or []}
        return conds["Waiting"] if conds.get("Waiting", {}).get("status") == "True" else None

    wait_until(lambda: waiting("tiny-nosecret") is not None and waiting("tiny-nosa") is not None,
               "Waiting conditions", 180, interval=1.0, process=operator.process)
    secret, sa = waiting("tiny-nosecret"), waiting("tiny-nosa")
    assert secret is not None and secret["reason"] == "CreateContainerConfigError", secret
    assert "no-such-secret" in secret["message"] and "credentialsSecret" in secret["message"], secret
    assert sa is not None and sa["reason"] == "PodsNotCreated" and "'no-such-sa'" in sa["message"], sa
    assert _get(api, "tiny-nosa")["status"]["phase"] == "Preparing"
    events = client.CoreV1Api(api).list_namespaced_event(NS, field_selector="involvedObject.name=tiny-nosecret").items
    assert any(e.reason == "Waiting" for e in events)
    _delete(api, "tiny-nosecret")
    _delete(api, "tiny-nosa")


def test_retain_false_deletes_the_run_folder_even_when_deleted_while_the_operator_is_down(
    api: client.ApiClient, operator: Operator, s3_server: S3Server, tiny_data: TinyData,
) -> None:
    """Every run carries the operator's finalizer (kopf's timers need it): deleted while the operator is down, a
    run waits with a deletionTimestamp until the operator is back, which then deletes the run's folder only with
    storage.retain: false."""
    names = {"tiny-noretain": False, "tiny-retain": True}
    stores = {}
    for name, retain in names.items():
        doc = _manifest(tiny_data, s3_server, name, nodeSelector={"not a key!": "x"})  # Failed at once
        doc["spec"]["storage"]["retain"] = retain
        _create(api, doc)
    for name in names:
        run = _wait_phase(api, name, ("Failed",), operator, timeout=120)
        assert "datacredit.dev/finalizer" in run["metadata"].get("finalizers", []), run["metadata"]
        stores[name] = _store(run, s3_server)
        assert stores[name].exists("run.json")

    operator.kill()
    try:
        for name in names:
            _delete(api, name)
        time.sleep(2)
        assert all(_get(api, name)["metadata"].get("deletionTimestamp") for name in names)  # held, not gone
    finally:
        operator.start()

    def gone(name: str) -> bool:
        try:
            _get(api, name)
        except ApiException as error:
            return error.status == 404
        return False

    wait_until(lambda: all(gone(n) for n in names), "both runs deleted", 120, interval=1.0,
               process=operator.process)
    assert stores["tiny-noretain"].list() == []
    assert stores["tiny-retain"].exists("run.json")


# ---------------------------------------------------------------- (4) admission


GOOD = {
    "apiVersion": f"{GROUP}/{VERSION}",
    "kind": "ValuationRun",
    "metadata": {"name": "bad"},
    "spec": {"dataset": {"images": "s3://b/data/"}, "storage": {"uri": "s3://b/runs"}},
}
INVALID = [
    ("spec.dataset", None, "spec.dataset"),
    ("spec.storage", None, "spec.storage"),
    ("spec.dataset.images", "", "spec.dataset.images"),
    ("spec.dataset.contributors", {"by": "artist"}, "spec.dataset.contributors.by"),
    ("spec.dataset.contributors", {"by": "manifest"}, "spec.dataset.contributors.manifest"),
    ("spec.dataset.channels", 2, "spec.dataset.channels"),
    ("spec.model", {"family": "gan"}, "spec.model.family"),
    ("spec.model", {"family": "ldm"}, "spec.model.autoencoder"),
    ("spec.model", {"family": "sd-lora"}, "spec.model.checkpoint"),
    ("spec.model", {"lora": {"rank": 0}}, "spec.model.lora.rank"),
    ("spec.model", {"lora": {"rank": 4}}, "spec.model.lora"),  # another family's field (sd-lora's)
    ("spec.model", {"family": "ddpm", "autoencoder": "s3://b/vq"}, "spec.model.autoencoder"),
    ("spec.property", {"quantile": 1.5}, "spec.property.quantile"),
    ("spec.model", {"architecture": {"blockOutChannels": []}}, "spec.model.architecture.blockOutChannels"),
    ("spec.model", {"architecture": {"blockOutChannels": [12]}}, "spec.model.architecture.blockOutChannels"),
    ("spec.method", {"prune": {"ratio": 1.5}}, "spec.method.prune.ratio"),
    ("spec.method", {"prune": {"ratio": 0}}, "spec.method.prune.ratio"),
    ("spec.method", {"finetune": {"steps": 0}}, "spec.method.finetune.steps"),
    ("spec.method", {"finetune": {"learningRate": -1}}, "spec.method.finetune.learningRate"),
    ("spec.estimator", {"budget": 1}, "spec.estimator.budget"),
    ("spec.estimator", {"name": "tmc"}, "spec.estimator.name"),
    ("spec.estimator", {"tolerance": 0}, "spec.estimator.tolerance"),
    ("spec.estimator", {"name": "exact", "budget": 3}, "spec.estimator.budget"),
    ("spec.estimator", {"bugdet": 10}, "spec.estimator.bugdet"),
    ("spec.execution", {"parallelism": 0}, "spec.execution.parallelism"),
    ("spec.execution", {"resources": {"memory": "lots"}}, "spec.execution.resources.memory"),
    ("spec.execution", {"queueName": "Bad_Queue"}, "spec.execution.queueName"),
    ("spec.storage", {"uri": "gs://bucket/x"}, "spec.storage.uri"),
    ("spec.storage", {"uri": "./runs"}, "spec.storage.uri"),
    ("spec.storage", {"uri": "s3://b/runs?x=1"}, "spec.storage.uri"),
    ("spec.storage", {"uri": "s3://b/runs#a"}, "spec.storage.uri"),
    ("spec.storage", {"uri": "s3://"}, "spec.storage.uri"),
    ("spec.property", {"samples": 2}, "spec.property.samples"),
    ("spec.seed", -1, "spec.seed"),
    ("spec.payout", {"pool": "0"}, "spec.payout.pool"),
    ("spec.payout", {"pool": 0}, "spec.payout.pool"),
    ("spec.payout", {"pool": 10.5}, "spec.payout.pool"),  # a YAML float is not exact money: quote it
    ("spec.payout", {"pool": "10", "floor": "-1"}, "spec.payout.floor"),
    ("spec.payout", {"pool": "10", "rule": "equal"}, "spec.payout.rule"),
    ("spec.payout", {"pool": "10", "alpha": 0.5}, "spec.payout.alpha"),
    ("spec.payout", {"pool": "10", "period": "../x"}, "spec.payout.period"),
    ("spec.payout", {"rule": "shapley"}, "spec.payout.pool"),
    ("metadata.name", "n" * 64, "metadata.name"),
]


def test_invalid_manifests_are_refused_naming_the_field(api: client.ApiClient) -> None:
    assert len(INVALID) >= 15
    problems = []
    for path, value, field in INVALID:
        try:
            _create(api, with_change(GOOD, path, value))
            problems.append(f"{path}={value!r}: accepted")
            _delete(api, "bad")
        except ApiException as error:
            message = json.loads(error.body).get("message", "")
            # 422: schema or CEL; 400: strict field validation (an unknown field)
            if error.status not in (400, 422) or field not in message:
                problems.append(f"{path}={value!r}: {error.status} {message}")
    assert not problems, "\n".join(problems)


def test_payout_amounts_are_integers_or_decimal_strings(api: client.ApiClient) -> None:
    for payout in ({"pool": 100, "floor": 5}, {"pool": "0.01"}, {"pool": "10000.50", "floor": "0", "rule": "blend",
                                                                "alpha": 0.5, "period": "2025-06"}):
        doc = with_change(GOOD, "spec.payout", payout)
        created = _custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, doc, dry_run="All",
                                                               field_validation="Strict")
        assert created["spec"]["payout"]["pool"] == payout["pool"]  # as written: no float ever stands for money
        assert created["spec"]["payout"]["currency"] == "USD" and created["spec"]["payout"]["rule"]


def test_spec_fields_that_name_the_coalitions_are_immutable(api: client.ApiClient) -> None:
    doc = with_change(GOOD, "spec.suspend", True)
    doc["metadata"]["name"] = "immutable"
    _create(api, doc)
    try:
        with pytest.raises(ApiException) as error:
            _custom(api).patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "immutable",
                                                        {"spec": {"dataset": {"images": "s3://b/other/"}}})
        assert error.value.status == 422 and "spec.dataset cannot change" in error.value.body
        _custom(api).patch_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "immutable",
                                                    {"spec": {"execution": {"parallelism": 5}}})
    finally:
        _delete(api, "immutable")


@pytest.mark.parametrize("example", sorted(p.name for p in (ROOT / "examples").glob("*.yaml")
                                            if "uri: s3://" in p.read_text()))
def test_example_manifest_is_accepted(api: client.ApiClient, example: str) -> None:
    doc = yaml.safe_load((ROOT / "examples" / example).read_text())
    doc["metadata"]["namespace"] = NS
    created = _custom(api).create_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, doc, dry_run="All",
                                                           field_validation="Strict")
    assert created["spec"]["execution"]["maxAttemptsPerCoalition"] == 3  # defaults filled in by the schema
