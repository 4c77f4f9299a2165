"""Dashboards as code: the committed JSON is the generator's output, follows the conventions, and every dashboard
query and alert works on a real Prometheus scraping the operator's metric contract.

The Prometheus tests scrape the operator's metrics registry (datacredit.operator.metrics), fed through its
API, so the queries and alerts are checked against the metrics the operator really exposes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import yaml

from tests.infra.binaries import find_binary
from tests.infra.controlplane import ControlPlane
from tests.infra.nodeagent import NodeAgent
from tests.infra.process import ManagedProcess, free_port, wait_until
from tests.infra.s3server import S3Server
from tests.tiny import TinyData, tiny_manifest

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "datacredit"
DASHBOARDS = sorted((CHART / "dashboards").glob("*.json"))
JOB = "dc-datacredit-metrics"  # the metrics Service of release "dc", as a ServiceMonitor names the job
RATE_INTERVAL = "10s"
KUBE_VERSION = "1.34.0"

# The operator's metric contract: name -> (type, labels).
CONTRACT: dict[str, tuple[str, tuple[str, ...]]] = {
    "datacredit_build_info": ("gauge", ("version",)),
    "datacredit_runs": ("gauge", ("namespace", "phase")),
    "datacredit_coalitions": ("gauge", ("namespace", "name", "phase")),
    "datacredit_run_progress_ratio": ("gauge", ("namespace", "name")),
    "datacredit_run_eta_seconds": ("gauge", ("namespace", "name")),
    "datacredit_run_top_value": ("gauge", ("namespace", "name", "rank", "contributor")),
    "datacredit_run_max_stderr": ("gauge", ("namespace", "name")),
    "datacredit_run_last_success_timestamp_seconds": ("gauge", ("namespace", "name")),
    "datacredit_run_device_seconds_total": ("counter", ("namespace", "name")),
    "datacredit_coalition_attempts_total": ("counter", ("namespace", "reason")),
    "datacredit_coalitions_completed_total": ("counter", ("namespace", "result")),
    "datacredit_reconcile_total": ("counter", ("result",)),
    "datacredit_coalition_duration_seconds": ("histogram", ("stage",)),
    "datacredit_coalition_queue_wait_seconds": ("histogram", ()),
    "datacredit_reconcile_duration_seconds": ("histogram", ()),
}
PROCESS_METRICS = {"process_resident_memory_bytes", "process_cpu_seconds_total"}


def load_generator() -> ModuleType:
    """Import dashboards/generate.py (a script, not a package)."""
    spec = importlib.util.spec_from_file_location("dashboards_generate", REPO / "dashboards" / "generate.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def panels(dashboard: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, rows included (the generator keeps rows expanded, so panels are not nested)."""
    return list(dashboard["panels"])


def queries(dashboard: dict[str, Any]) -> list[str]:
    return [t["expr"] for p in panels(dashboard) for t in p.get("targets", [])]


def variables(dashboard: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in dashboard["templating"]["list"]}


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def substitute(expr: str, job: str = JOB) -> str:
    """Replace the Grafana variables as Grafana would with "All" selected."""
    return (
        expr.replace("$__rate_interval", RATE_INTERVAL)
        .replace("$namespace", ".*")
        .replace("$run", ".*")
        .replace("$job", job)
    )


def metric_names(expr: str) -> set[str]:
    return set(re.findall(r"\b(?:datacredit|process)_[a-z_]+\b", expr))


def test_dashboards_up_to_date() -> None:
    stale = load_generator().stale_files(CHART / "dashboards")
    assert not stale, f"{stale} differ from the generator: run `python dashboards/generate.py` and commit"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_conventions(path: Path) -> None:
    dashboard = load(path)
    assert path.stat().st_size < 64 * 1024, "keep dashboards small (ConfigMaps, client-side apply annotations)"
    assert dashboard["uid"] == path.stem and "datacredit" in dashboard["tags"]
    found = variables(dashboard)
    assert found["datasource"]["type"] == "datasource" and found["datasource"]["query"] == "prometheus"
    for variable in found.values():
        if variable["type"] == "query":
            assert variable["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)) and 0 not in ids
    for panel in panels(dashboard):
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        assert panel.get("description"), f"panel {panel['title']!r} has no description"
    for expr in queries(dashboard):
        for name in metric_names(expr):
            base = re.sub(r"_(bucket|sum|count)$", "", name)
            assert base in CONTRACT or name in PROCESS_METRICS, f"{name} is not in the operator's metrics"
        for label in re.findall(r"\$(\w+)", expr):
            assert label.startswith("__") or label in found, f"undefined variable ${label} in {expr}"


def test_runs_dashboard_filters_by_namespace_and_run() -> None:
    dashboard = load(CHART / "dashboards" / "datacredit-runs.json")
    assert {"datasource", "namespace", "run"} <= variables(dashboard).keys()
    titles = {p["title"] for p in panels(dashboard)}
    for wanted in (
        "Runs by phase",
        "Coalitions by phase",
        "Progress",
        "ETA",
        "Coalitions completed per hour",
        "Failures and retries per hour",
        "Coalition duration by stage",
        "Queue wait",
        "Top contributors",
    ):
        assert wanted in titles
    per_run = [e for e in queries(dashboard) if "datacredit_run_" in e or "datacredit_coalitions{" in e]
    assert per_run and all('name=~"$run"' in e and 'namespace=~"$namespace"' in e for e in per_run)


def test_every_metric_is_on_a_dashboard() -> None:
    shown = {
        re.sub(r"_(bucket|sum|count)$", "", n) for p in DASHBOARDS for e in queries(load(p)) for n in metric_names(e)
    }
    assert set(CONTRACT) | PROCESS_METRICS <= shown


def rendered_rules(tmp_path: Path, release: str = "dc", namespace: str = "datacredit") -> Path:
    """The chart's PrometheusRule (monitoring ci values) for `release` in `namespace`, as a rule file."""
    values = CHART / "ci" / "monitoring-values.yaml"
    argv = [find_binary("helm"), "template", release, CHART, "-n", namespace, "--kube-version", KUBE_VERSION]
    argv += ["-f", values, "--show-only", "templates/prometheusrule.yaml"]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    path = tmp_path / "alerts.yaml"
    path.write_text(yaml.safe_dump({"groups": yaml.safe_load(result.stdout)["spec"]["groups"]}))
    return path


@pytest.mark.observability
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every dashboard query (each as a recording rule)."""
    rules = [
        {"record": f"dashboard:query_{i}", "expr": substitute(expr)}
        for i, expr in enumerate(e for path in DASHBOARDS for e in queries(load(path)))
    ]
    path = tmp_path / "queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboards", "rules": rules}]}))
    result = subprocess.run([find_binary("promtool"), "check", "rules", path], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


class OperatorMetrics:
    """The operator's own metrics (datacredit.operator.metrics), fed through its API and served over HTTP:
    two runs in namespace `obs`, coalitions completing (30% failing), Jobs queued, reconciles counted."""

    RUNS = ("cifar", "digits")

    def __init__(self) -> None:
        from datacredit.operator import metrics

        self.metrics = metrics
        metrics.start(0)
        for name, phase, done in (("cifar", "Evaluating", 120), ("digits", "Succeeded", 200)):
            status = {
                "phase": phase,
                "coalitions": {"planned": 200, "queued": 4, "running": 8, "succeeded": done - 2, "failed": 2},
                "estimate": {"maxStderr": 0.01},
                "top": [{"contributor": f"contributor-{rank}", "value": 0.1 / rank} for rank in range(1, 11)],
            }
            metrics.observe_run("obs", name, status, eta_seconds=3600.0 * (200 - done) / 200)
        metrics.run_succeeded("obs", "digits", time.time())
        self._stop = threading.Event()

    def tick(self) -> None:
        seconds = {"finetune": 40.0, "sample": 20.0, "property": 5.0, "total": 65.0}
        for result, count in (("succeeded", 7), ("failed", 3)):
            for _ in range(count):
                if result == "succeeded":
                    self.metrics.completed("obs", result, seconds, device_seconds=65.0, name="digits")
                else:
                    self.metrics.completed("obs", result)
        for reason in ("Started", "Retried", "PodFailed", "JobLost"):
            self.metrics.attempt("obs", reason)
        self.metrics.queue_wait(12.0)
        self.metrics.reconciled(True, 0.05)

    def serve(self) -> int:
        from prometheus_client import start_http_server

        port = free_port()
        self.server, _ = start_http_server(port, addr="127.0.0.1", registry=self.metrics.REGISTRY)
        threading.Thread(target=self._run, daemon=True).start()
        return port

    def _run(self) -> None:
        while not self._stop.wait(0.25):
            self.tick()

    def stop(self) -> None:
        self._stop.set()
        self.server.shutdown()
        for name in self.RUNS:
            self.metrics.forget_run("obs", name)


class Prometheus:
    """A Prometheus server on loopback scraping `target` every second, with `rule_file` loaded.

    Like a ServiceMonitor scrape: job = the metrics Service name, the target's namespace label, honor_labels.
    """

    def __init__(
        self, work_dir: Path, target: str, rule_file: Path, job: str = JOB, namespace: str = "datacredit"
    ) -> None:
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(rule_file)],
            "scrape_configs": [
                {
                    "job_name": job,
                    "honor_labels": True,
                    "static_configs": [{"targets": [target], "labels": {"namespace": namespace}}],
                }
            ],
        }
        (work_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
        self.url = f"http://127.0.0.1:{free_port()}"
        self.process = ManagedProcess(
            "prometheus",
            [
                find_binary("prometheus"),
                f"--config.file={work_dir / 'prometheus.yml'}",
                f"--storage.tsdb.path={work_dir / 'data'}",
                f"--web.listen-address={self.url[7:]}",
                "--log.level=warn",
            ],
            work_dir / "prometheus.log",
        )
        wait_until(lambda: self.get("/-/ready", raw=True) is not None, "prometheus ready", 60, process=self.process)

    def get(self, path: str, raw: bool = False, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        with urllib.request.urlopen(f"{self.url}{path}{query}", timeout=10) as response:
            body = response.read()
        return body if raw else json.loads(body)["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        return list(self.get("/api/v1/query", query=expr)["result"])


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prometheus]:
    work_dir = tmp_path_factory.mktemp("prometheus")
    exporter = OperatorMetrics()
    port = exporter.serve()
    server = Prometheus(work_dir, f"127.0.0.1:{port}", rendered_rules(work_dir))
    try:
        # Rates over RATE_INTERVAL need a few scrapes of moving counters.
        wait_until(
            lambda: bool(server.query(f"rate(datacredit_reconcile_total[{RATE_INTERVAL}]) > 0")),
            "a rate over the scraped counters",
            60,
        )
        yield server
    finally:
        server.process.stop()
        exporter.stop()


@pytest.mark.observability
@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_queries_return_data(prometheus: Prometheus, path: Path) -> None:
    dashboard = load(path)
    for name, variable in variables(dashboard).items():
        if variable["type"] == "query":
            metric, label = re.fullmatch(r"label_values\((.+), (\w+)\)", variable["query"]).groups()
            assert prometheus.query(f"count by ({label}) ({substitute(metric)})"), f"variable {name} has no values"
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            assert prometheus.query(substitute(target["expr"])), f"{panel['title']}: no data for {target['expr']}"


@pytest.mark.observability
def test_alerts_evaluate(prometheus: Prometheus) -> None:
    """Every alert evaluates cleanly; with 30% of coalitions failing, the failure-ratio alert is pending."""

    def alert_states() -> dict[str, str]:
        rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        return {r["name"]: r["state"] for r in rules}

    wait_until(
        lambda: alert_states()["DatacreditCoalitionFailureRatioHigh"] == "pending",
        "the failure-ratio alert to be pending",
        30,
    )
    states = alert_states()
    assert states == {
        "DatacreditOperatorDown": "inactive",
        "DatacreditReconcileStalled": "inactive",
        "DatacreditRunStalled": "inactive",
        "DatacreditCoalitionFailureRatioHigh": "pending",
    }


@pytest.mark.observability
def test_operator_exports_the_contract(prometheus: Prometheus) -> None:
    """The scraped operator metrics carry the contract's names, types and labels, and the process metrics."""
    scraped = {
        m["metric"]: m["type"] for m in prometheus.get("/api/v1/targets/metadata", match_target=f'{{job="{JOB}"}}')
    }
    for name, (kind, labels) in CONTRACT.items():
        family = name.removesuffix("_total") if kind == "counter" else name
        assert scraped.get(family) == kind, f"{name}: scraped as {scraped.get(family)}, contract says {kind}"
        series = name + ("_count" if kind == "histogram" else "")
        found = {label for s in prometheus.get("/api/v1/series", **{"match[]": series}) for label in s}
        # Series without a `namespace` label of their own get the scrape target's (the operator's namespace).
        assert found - {"__name__", "job", "instance"} == set(labels) | {"namespace"}, name
    missing = sorted(PROCESS_METRICS - {f"{m}_total" if t == "counter" else m for m, t in scraped.items()})
    assert not missing, f"the operator does not export {missing}: register a ProcessCollector on its registry"


E2E_RELEASE, E2E_NAMESPACE, E2E_RUNS = "obs", "datacredit-obs", "obs-runs"
E2E_IMAGE = "registry.example.com/datacredit-operator"
# Panels that stay empty for a run without failures.
EMPTY_WITHOUT_FAILURES = {"Failures and retries per hour", "Failure ratio"}


def service_account_kubeconfig(plane: ControlPlane, namespace: str, name: str, path: Path) -> Path:
    """A kubeconfig that authenticates as ServiceAccount `namespace/name` (a TokenRequest token)."""
    from kubernetes import client

    with plane.api_client() as api_client:
        request = {"spec": {"expirationSeconds": 7200}}
        token = client.CoreV1Api(api_client).create_namespaced_service_account_token(name, namespace, request)
    config = yaml.safe_load(plane.kubeconfig.read_text())
    config["users"] = [{"name": name, "user": {"token": token.status.token}}]
    config["contexts"][0]["context"]["user"] = name
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.observability
@pytest.mark.controlplane
def test_chart_operator_run_on_dashboards(
    control_plane: ControlPlane, node_agent: NodeAgent, s3_server: S3Server, tiny_data: TinyData, tmp_path: Path
) -> None:
    """helm install runs the operator (as a pod of the node agent, with the chart's ServiceAccount and RBAC);
    a ValuationRun succeeds; Prometheus scrapes the operator as the ServiceMonitor would, and every dashboard
    query and alert evaluates on the data of that run."""
    from kubernetes import client

    from datacredit.crd import GROUP, PLURAL, VERSION

    for namespace in (E2E_NAMESPACE, E2E_RUNS):
        control_plane.ensure_namespace(namespace)
    bucket = "datacredit-obs"
    s3_server.make_bucket(bucket)
    keys = {k: v for k, v in s3_server.env().items() if k.startswith("AWS_") and k.endswith(("_ID", "_KEY"))}
    with control_plane.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        for namespace in (E2E_NAMESPACE, E2E_RUNS):  # the operator reads results, the Jobs write them
            secret = {"metadata": {"name": "s3-creds"}, "stringData": keys}
            core.create_namespaced_secret(namespace, secret)
        core.create_namespaced_service_account(E2E_NAMESPACE, {"metadata": {"name": "obs-operator"}})
        extensions = client.ApiextensionsV1Api(api_client)
        if not extensions.list_custom_resource_definition(
            field_selector="metadata.name=valuationruns.datacredit.dev"
        ).items:
            extensions.create_custom_resource_definition(
                yaml.safe_load((CHART / "crds-src" / "valuationruns.yaml").read_text())
            )

    kubeconfig = service_account_kubeconfig(control_plane, E2E_NAMESPACE, "obs-operator", tmp_path / "sa.kubeconfig")
    metrics_port, liveness_port = free_port(), free_port()
    plain_env = {"KUBECONFIG": str(kubeconfig), "DATACREDIT_RECONCILE_INTERVAL": "1", "PYTHONUNBUFFERED": "1"}
    plain_env |= {k: v for k, v in s3_server.env().items() if k not in keys}
    values = {
        "watchNamespaces": [E2E_RUNS],
        "image": {"repository": E2E_IMAGE},
        "serviceAccount": {"create": False, "name": "obs-operator"},
        "crds": {"install": False},
        "operator": {
            "metricsPort": metrics_port,
            "livenessPort": liveness_port,
            "env": [{"name": k, "value": v} for k, v in plain_env.items()],
            "envFrom": [{"secretRef": {"name": "s3-creds"}}],
        },
    }
    (tmp_path / "values.yaml").write_text(yaml.safe_dump(values))
    helm_env = {**os.environ, "KUBECONFIG": str(control_plane.kubeconfig)}
    helm_env |= {f"HELM_{kind}_HOME": str(tmp_path / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}

    prometheus = Prometheus(
        tmp_path,
        f"127.0.0.1:{metrics_port}",
        rendered_rules(tmp_path, E2E_RELEASE, E2E_NAMESPACE),
        job=f"{E2E_RELEASE}-datacredit-metrics",
        namespace=E2E_NAMESPACE,
    )
    saved_env = dict(node_agent.extra_env)
    node_agent.image_commands[E2E_IMAGE] = [str(Path(sys.executable).parent / "datacredit")]
    node_agent.extra_env.update({"OMP_NUM_THREADS": "1", "DATACREDIT_THREADS": "1"})
    helm = find_binary("helm")
    try:
        install = [helm, "install", E2E_RELEASE, CHART, "-n", E2E_NAMESPACE, "-f", tmp_path / "values.yaml"]
        result = subprocess.run(install, capture_output=True, text=True, env=helm_env, timeout=120)
        assert result.returncode == 0, result.stderr
        wait_until(lambda: prometheus.query("up == 1"), "Prometheus to scrape the operator pod", 120)
        with urllib.request.urlopen(f"http://127.0.0.1:{liveness_port}/healthz", timeout=5) as response:
            assert response.status == 200  # what the chart's liveness probe asks

        with control_plane.api_client() as api_client:
            custom = client.CustomObjectsApi(api_client)
            storage = {
                "uri": f"s3://{bucket}/runs",
                "endpoint": s3_server.endpoint,
                "region": s3_server.region,
                "credentialsSecret": "s3-creds",
            }
            run = tiny_manifest(
                "obs-run", str(tiny_data.images), str(tiny_data.reference), storage, estimator="kernel", budget=8
            )
            custom.create_namespaced_custom_object(GROUP, VERSION, E2E_RUNS, PLURAL, run)

            def phase() -> str | None:
                status = custom.get_namespaced_custom_object(GROUP, VERSION, E2E_RUNS, PLURAL, "obs-run").get("status")
                return (status or {}).get("phase")

            try:
                wait_until(lambda: phase() in ("Succeeded", "Failed"), "the run to finish", 420, interval=1.0)
            finally:
                pods = core_pods(api_client, E2E_NAMESPACE)
                operator_log = "\n".join(node_agent.pod_log(E2E_NAMESPACE, pod) for pod in pods)
            assert phase() == "Succeeded", operator_log[-5000:]
        assert "Forbidden" not in operator_log and " 403" not in operator_log, operator_log[-5000:]

        # Let a few scrapes see the finished run, then evaluate every dashboard query and alert.
        time.sleep(5)
        job = f"{E2E_RELEASE}-datacredit-metrics"
        for path in DASHBOARDS:
            for panel in panels(load(path)):
                for target in panel.get("targets", []):
                    expr = substitute(target["expr"], job)
                    if panel["title"] not in EMPTY_WITHOUT_FAILURES:
                        assert prometheus.query(expr), f"{path.name} {panel['title']}: no data for {expr}"
        rules = [r for g in prometheus.get("/api/v1/rules")["groups"] for r in g["rules"]]
        assert all(r["health"] == "ok" for r in rules), [(r["name"], r.get("lastError")) for r in rules]
        assert {r["name"]: r["state"] for r in rules}["DatacreditOperatorDown"] == "inactive"
    finally:
        subprocess.run([helm, "uninstall", E2E_RELEASE, "-n", E2E_NAMESPACE], env=helm_env, timeout=120)
        node_agent.image_commands.pop(E2E_IMAGE, None)
        node_agent.extra_env.clear()
        node_agent.extra_env.update(saved_env)
        prometheus.process.stop()


def core_pods(api_client: Any, namespace: str) -> list[str]:
    """Names of the pods in `namespace`."""
    from kubernetes import client

    return [pod.metadata.name for pod in client.CoreV1Api(api_client).list_namespaced_pod(namespace).items]
