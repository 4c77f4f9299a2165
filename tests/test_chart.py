"""Chart tier: helm lint and template over the ci/ values, kubeconform, promtool, and the chart on a real API server.

The binaries (helm, kubeconform, promtool, kubectl) come from `hack/build-binaries.sh`; a missing one fails with
the command that builds it. kubeconform validates offline against the Kubernetes JSON schemas that the
`kubernetes-validate` package ships, made standalone here (kubeconform cannot follow their shared $refs).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from tests.infra.binaries import find_binary
from tests.infra.controlplane import ControlPlane
from tests.infra.process import wait_until

pytestmark = pytest.mark.chart

REPO = Path(__file__).resolve().parents[1]
CHART = REPO / "charts" / "datacredit"
CI_VALUES = sorted((CHART / "ci").glob("*-values.yaml"))
KUBE_VERSION = "1.34.0"
RELEASE, NAMESPACE = "dc", "datacredit"
MONITORING_KINDS = {"ServiceMonitor", "PrometheusRule"}

Manifest = dict[str, Any]
Rule = tuple[str, str, str]  # (apiGroup, resource, verb)


def run(argv: list[str | Path], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing text output."""
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, timeout=300, **kwargs)


def helm_template(*args: str, namespace: str = NAMESPACE, release: str = RELEASE) -> str:
    """`helm template` of the chart; fails the test with helm's stderr."""
    result = run(
        [find_binary("helm"), "template", release, CHART, "-n", namespace, "--kube-version", KUBE_VERSION, *args]
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def render(*args: str, **kwargs: str) -> list[Manifest]:
    """The rendered manifests as dicts (empty documents dropped)."""
    return [doc for doc in yaml.safe_load_all(helm_template(*args, **kwargs)) if doc]


def values_args(path: Path) -> list[str]:
    return ["-f", str(path)]


def find(docs: list[Manifest], kind: str, name: str | None = None, namespace: str | None = None) -> list[Manifest]:
    """The manifests of `kind` (optionally with that name and namespace)."""
    return [
        d
        for d in docs
        if d["kind"] == kind
        and (name is None or d["metadata"]["name"] == name)
        and (namespace is None or d["metadata"].get("namespace") == namespace)
    ]


def one(docs: list[Manifest], kind: str, name: str | None = None, namespace: str | None = None) -> Manifest:
    found = find(docs, kind, name, namespace)
    assert len(found) == 1, f"expected one {kind} {name or ''}, got {len(found)}"
    return found[0]


def rule_set(role: Manifest) -> set[Rule]:
    """Flatten a (Cluster)Role's rules to (apiGroup, resource, verb) triples."""
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule.get("apiGroups", [])
        for resource in rule.get("resources", [])
        for verb in rule["verbs"]
    }


def triples(group: str, resources: list[str], verbs: list[str]) -> set[Rule]:
    return {(group, r, v) for r in resources for v in verbs}


NAMESPACED_RULES = (
    triples("datacredit.dev", ["valuationruns"], ["get", "list", "watch", "patch", "update"])
    | triples("datacredit.dev", ["valuationruns/status"], ["get", "patch", "update"])
    | triples("batch", ["jobs"], ["get", "list", "watch", "create", "delete", "patch"])
    | triples("", ["pods"], ["get", "list", "watch"])
    | triples("", ["events"], ["create", "patch"])
    | triples("events.k8s.io", ["events"], ["create", "patch"])
)
DISCOVERY_RULES = triples("apiextensions.k8s.io", ["customresourcedefinitions"], ["get", "list", "watch"]) | triples(
    "", ["namespaces"], ["list", "watch"]
)
PEERING_VERBS = ["get", "list", "watch", "patch"]


@pytest.fixture(scope="module")
def default_docs() -> list[Manifest]:
    return render(*values_args(CHART / "ci" / "default-values.yaml"))


@pytest.fixture(scope="module")
def namespaced_docs() -> list[Manifest]:
    return render(*values_args(CHART / "ci" / "namespaced-values.yaml"))


@pytest.fixture(scope="module")
def monitoring_docs() -> list[Manifest]:
    return render(*values_args(CHART / "ci" / "monitoring-values.yaml"))


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_strict(values: Path) -> None:
    result = run([find_binary("helm"), "lint", "--strict", "--kube-version", KUBE_VERSION, "-f", values, CHART])
    assert result.returncode == 0, result.stdout + result.stderr


def _schema_file(manifest: Manifest) -> str:
    """kubeconform's file name for a manifest's schema: <kind>[-<group prefix>]-<version>.json."""
    group, _, version = manifest["apiVersion"].rpartition("/")
    suffix = f"-{group.split('.')[0]}-{version}" if group else f"-{version}"
    return f"{manifest['kind'].lower()}{suffix}.json"


@pytest.fixture(scope="module")
def kubeconform_schemas(tmp_path_factory: pytest.TempPathFactory) -> Callable[[list[Manifest]], str]:
    """A function that writes standalone schemas for the given manifests and returns the -schema-location."""
    import kubernetes_validate

    source = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema" / f"v{KUBE_VERSION}-local-strict"
    assert source.is_dir(), f"kubernetes-validate has no schemas for {KUBE_VERSION}: {source}"
    root = tmp_path_factory.mktemp("kubeconform")
    target = root / f"v{KUBE_VERSION}-standalone-strict"
    target.mkdir()
    definitions = json.loads((source / "_definitions.json").read_text())["$defs"]
    ref = re.compile(r'"(?:/api/_definitions\.json)?#/\$defs/([^"]+)"')

    def standalone(name: str) -> None:
        text = (source / name).read_text()
        needed: dict[str, Any] = {}
        pending = ref.findall(text)
        while pending:
            key = pending.pop()
            if key not in needed:
                needed[key] = definitions[key]
                pending += ref.findall(json.dumps(definitions[key]))
        schema = json.loads(text.replace('"/api/_definitions.json#', '"#'))
        schema["$defs"] = json.loads(json.dumps(needed).replace('"/api/_definitions.json#', '"#'))
        (target / name).write_text(json.dumps(schema))

    def prepare(docs: list[Manifest]) -> str:
        for doc in docs:
            name = _schema_file(doc)
            if doc["kind"] not in MONITORING_KINDS and not (target / name).exists():
                assert (source / name).is_file(), f"no Kubernetes {KUBE_VERSION} schema for {doc['kind']}"
                standalone(name)
        return (
            f"{root}/{{{{ .NormalizedKubernetesVersion }}}}-standalone{{{{ .StrictSuffix }}}}/"
            "{{ .ResourceKind }}{{ .KindSuffix }}.json"
        )

    return prepare


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_kubeconform(values: Path, kubeconform_schemas: Callable[[list[Manifest]], str], tmp_path: Path) -> None:
    text = helm_template(*values_args(values))
    docs = [d for d in yaml.safe_load_all(text) if d]
    location = kubeconform_schemas(docs)
    manifests = tmp_path / "chart.yaml"
    manifests.write_text(text)
    result = run(
        [
            find_binary("kubeconform"),
            "-strict",
            "-ignore-missing-schemas",
            "-summary",
            "-output",
            "json",
            "-kubernetes-version",
            KUBE_VERSION,
            "-schema-location",
            location,
            manifests,
        ]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    summary = json.loads(result.stdout)["summary"]
    skipped = sum(1 for d in docs if d["kind"] in MONITORING_KINDS)
    assert summary == {"valid": len(docs) - skipped, "invalid": 0, "errors": 0, "skipped": skipped}


def test_operator_deployment(default_docs: list[Manifest]) -> None:
    deployment = one(default_docs, "Deployment", f"{RELEASE}-datacredit", NAMESPACE)
    spec = deployment["spec"]
    assert spec["replicas"] == 1 and spec["strategy"] == {"type": "Recreate"}
    pod = spec["template"]["spec"]
    [container] = pod["containers"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    repository = yaml.safe_load((CHART / "values.yaml").read_text())["image"]["repository"]
    assert container["image"] == f"{repository}:{chart['appVersion']}"
    assert container["args"] == ["operator", "--metrics-port=8080", "--liveness-port=8081"]
    assert {"name": "DATACREDIT_WATCH_NAMESPACES", "value": ""} in container["env"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"metrics": 8080, "health": 8081}
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "health"}
    assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"]
    # Pod Security "restricted", with a writable /tmp under the read-only root filesystem.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True and security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert container["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    assert pod["volumes"][0]["name"] == "tmp" and "emptyDir" in pod["volumes"][0]
    assert pod["serviceAccountName"] == f"{RELEASE}-datacredit"


def test_image_overrides() -> None:
    docs = render("--set", "image.tag=1.2.3", "--set", "operator.extraArgs={--verbose}")
    container = one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"].endswith(":1.2.3") and container["args"][-1] == "--verbose"
    digest = "sha256:" + "a" * 64
    docs = render("--set", f"image.digest={digest}")
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]["image"].endswith("@" + digest)


def test_cluster_wide_rbac_is_least_privilege(default_docs: list[Manifest]) -> None:
    role = one(default_docs, "ClusterRole", f"{RELEASE}-datacredit")
    assert rule_set(role) == NAMESPACED_RULES | DISCOVERY_RULES
    binding = one(default_docs, "ClusterRoleBinding", f"{RELEASE}-datacredit")
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": f"{RELEASE}-datacredit", "namespace": NAMESPACE}]
    assert not find(default_docs, "Role") and not find(default_docs, "RoleBinding")


def test_namespaced_rbac(namespaced_docs: list[Manifest]) -> None:
    cluster_role = one(namespaced_docs, "ClusterRole", f"{RELEASE}-datacredit")
    assert rule_set(cluster_role) == DISCOVERY_RULES | triples("kopf.dev", ["clusterkopfpeerings"], PEERING_VERBS)
    for namespace in ("team-a", "team-b"):
        role = one(namespaced_docs, "Role", namespace=namespace)
        assert rule_set(role) == NAMESPACED_RULES | triples("kopf.dev", ["kopfpeerings"], PEERING_VERBS)
        binding = one(namespaced_docs, "RoleBinding", namespace=namespace)
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "Role",
            "name": role["metadata"]["name"],
        }
        assert binding["subjects"][0]["namespace"] == NAMESPACE
    container = one(namespaced_docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert {"name": "DATACREDIT_WATCH_NAMESPACES", "value": "team-a,team-b"} in container["env"]
    account = one(namespaced_docs, "ServiceAccount")
    assert "eks.amazonaws.com/role-arn" in account["metadata"]["annotations"]


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_no_secrets_or_wildcards(values: Path) -> None:
    for doc in render(*values_args(values)):
        if doc["kind"] in {"ClusterRole", "Role"} and not doc["metadata"]["name"].endswith(("-editor", "-viewer")):
            for group, resource, verb in rule_set(doc):
                assert "*" not in (group, resource, verb) and resource != "secrets", (doc["metadata"], resource)


def test_user_roles_aggregate(default_docs: list[Manifest]) -> None:
    editor = one(default_docs, "ClusterRole", f"{RELEASE}-datacredit-editor")
    viewer = one(default_docs, "ClusterRole", f"{RELEASE}-datacredit-viewer")
    assert editor["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert viewer["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert ("datacredit.dev", "valuationruns", "create") in rule_set(editor)
    assert {v for _, _, v in rule_set(viewer)} == {"get", "list", "watch"}
    assert not find(render("--set", "rbac.userRoles=false"), "ClusterRole", f"{RELEASE}-datacredit-editor")


def test_crd_toggles(default_docs: list[Manifest], namespaced_docs: list[Manifest]) -> None:
    source = yaml.safe_load((CHART / "crds-src" / "valuationruns.yaml").read_text())
    crd = one(default_docs, "CustomResourceDefinition", "valuationruns.datacredit.dev")
    assert crd["spec"] == source["spec"]
    assert crd["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    assert crd["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    unkept = one(namespaced_docs, "CustomResourceDefinition")  # ci/namespaced-values.yaml sets crds.keep=false
    assert "helm.sh/resource-policy" not in unkept["metadata"].get("annotations", {})
    assert not find(render("--set", "crds.install=false"), "CustomResourceDefinition")


def test_crd_copy_matches_generated() -> None:
    """The chart's CRD copy (crds-src/) is the committed generated CRD (crds/), byte for byte."""
    generated = REPO / "crds" / "valuationruns.datacredit.dev.yaml"
    copy = CHART / "crds-src" / "valuationruns.yaml"
    if not (generated.is_file() and copy.is_file()):
        pytest.skip("crds/valuationruns.datacredit.dev.yaml or its chart copy does not exist yet")
    assert copy.read_text() == generated.read_text(), f"refresh the copy: cp {generated} {copy}"


def test_values_schema_rejects_typos() -> None:
    for bad in (
        "serviceMonitor.enabled=true",
        "operator.metricsPort=0",
        "metrics.serviceMonitor.interval=30",
        "image.pullPolicy=Sometimes",
        "watchNamespaces={Team_A}",
    ):
        result = run([find_binary("helm"), "template", RELEASE, CHART, "--set", bad])
        assert result.returncode != 0 and "values don't meet the specifications of the schema" in result.stderr, bad


def test_metrics_service_and_monitor(monitoring_docs: list[Manifest]) -> None:
    service = one(monitoring_docs, "Service", f"{RELEASE}-datacredit-metrics")
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    monitor = one(monitoring_docs, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= service["metadata"]["labels"].items()
    pod_labels = one(monitoring_docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == "metrics" and endpoint["path"] == "/metrics" and endpoint["honorLabels"] is True
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}


def test_helm_test_hook_checks_the_operator_metrics(default_docs: list[Manifest]) -> None:
    """`helm test` runs a Pod that reads the metrics Service; its script is run here against a real endpoint
    serving the operator's registry, and against one that serves something else."""
    import subprocess
    import sys

    from prometheus_client import start_http_server

    from datacredit.operator import metrics
    from tests.infra.process import free_port

    pod = one(default_docs, "Pod", f"{RELEASE}-datacredit-test-metrics")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    [container] = pod["spec"]["containers"]
    assert container["securityContext"]["readOnlyRootFilesystem"] and pod["spec"]["securityContext"]["runAsNonRoot"]
    script = container["args"][0]
    url = f"http://{RELEASE}-datacredit-metrics.{NAMESPACE}.svc:8080/metrics"
    assert url in script
    port = free_port()
    server, thread = start_http_server(port, addr="127.0.0.1", registry=metrics.REGISTRY)
    try:
        ok = subprocess.run([sys.executable, "-c", script.replace(url, f"http://127.0.0.1:{port}/metrics")],
                            capture_output=True, text=True, timeout=60)
        assert ok.returncode == 0 and "operator metrics are served" in ok.stdout, ok.stderr
    finally:
        server.shutdown()
        thread.join(5)
    other = free_port()
    server, thread = start_http_server(other, addr="127.0.0.1")  # the default registry: not the operator's
    try:
        bad = subprocess.run([sys.executable, "-c", script.replace(url, f"http://127.0.0.1:{other}/metrics")],
                             capture_output=True, text=True, timeout=60)
        assert bad.returncode != 0 and "without datacredit_build_info" in bad.stderr
    finally:
        server.shutdown()
        thread.join(5)


def test_dashboard_configmaps(monitoring_docs: list[Manifest]) -> None:
    files = sorted((CHART / "dashboards").glob("*.json"))
    maps = find(monitoring_docs, "ConfigMap")
    assert len(maps) == len(files) >= 2
    for config_map, path in zip(sorted(maps, key=lambda m: next(iter(m["data"]))), files, strict=True):
        assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
        assert config_map["metadata"]["annotations"] == {"grafana_folder": "datacredit"}
        assert config_map["data"] == {path.name: path.read_text().rstrip("\n")}
    docs = render(
        "--set",
        "grafana.dashboards.enabled=true",
        "--set",
        "grafana.dashboards.label=dash",
        "--set",
        "grafana.dashboards.labelValue=yes",
        "--set",
        "grafana.dashboards.namespace=monitoring",
    )
    for config_map in find(docs, "ConfigMap"):
        assert config_map["metadata"]["labels"]["dash"] == "yes" and "annotations" not in config_map["metadata"]
        assert config_map["metadata"]["namespace"] == "monitoring"
    assert not find(render(), "ConfigMap")


def prometheus_rule_groups(docs: list[Manifest]) -> dict[str, Any]:
    """The rule file (`groups:`) of the chart's PrometheusRule."""
    return {"groups": one(docs, "PrometheusRule")["spec"]["groups"]}


def test_promtool_check_rules(monitoring_docs: list[Manifest], tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump(prometheus_rule_groups(monitoring_docs)))
    result = run([find_binary("promtool"), "check", "rules", rules])
    assert result.returncode == 0, result.stdout + result.stderr
    alerts = {r["alert"] for r in prometheus_rule_groups(monitoring_docs)["groups"][0]["rules"]}
    assert alerts == {
        "DatacreditOperatorDown",
        "DatacreditReconcileStalled",
        "DatacreditRunStalled",
        "DatacreditCoalitionFailureRatioHigh",
    }


# Unit tests of the alert expressions (promtool test rules): each alert fires on the series built to trigger
# it and stays quiet on the healthy ones. The operator is down from 6m (up == 0) and gone from 16m (absent).
ALERT_TESTS = """
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'up{job="dc-datacredit-metrics", namespace="datacredit"}'
        values: '1x5 0x10 _x20'
      - series: 'datacredit_runs{phase="Evaluating", namespace="ml"}'
        values: '1x40'
      - series: 'datacredit_reconcile_total{result="success"}'
        values: '0+1x10 10x30'
    alert_rule_test:
      - {eval_time: 4m, alertname: DatacreditOperatorDown, exp_alerts: []}
      - eval_time: 12m
        alertname: DatacreditOperatorDown
        exp_alerts:
          - exp_labels: {severity: critical, team: ml-platform, job: dc-datacredit-metrics, namespace: datacredit}
      - eval_time: 30m
        alertname: DatacreditOperatorDown
        exp_alerts:
          - exp_labels: {severity: critical, team: ml-platform, job: dc-datacredit-metrics, namespace: datacredit}
      - {eval_time: 20m, alertname: DatacreditReconcileStalled, exp_alerts: []}
      - eval_time: 32m
        alertname: DatacreditReconcileStalled
        exp_alerts:
          - exp_labels: {severity: warning, team: ml-platform}
  - interval: 1m
    input_series:
      # "stuck" never moves with coalitions running; "moving" progresses; "done" finished.
      - series: 'datacredit_run_progress_ratio{namespace="ml", name="stuck"}'
        values: '0.4x300'
      - series: 'datacredit_coalitions{namespace="ml", name="stuck", phase="Running"}'
        values: '8x300'
      - series: 'datacredit_run_progress_ratio{namespace="ml", name="moving"}'
        values: '0+0.001x300'
      - series: 'datacredit_coalitions{namespace="ml", name="moving", phase="Running"}'
        values: '8x300'
      - series: 'datacredit_run_progress_ratio{namespace="ml", name="done"}'
        values: '1x300'
      - series: 'datacredit_coalitions{namespace="ml", name="done", phase="Queued"}'
        values: '0x300'
    alert_rule_test:
      - {eval_time: 2h, alertname: DatacreditRunStalled, exp_alerts: []}
      - eval_time: 4h
        alertname: DatacreditRunStalled
        exp_alerts:
          - exp_labels: {severity: warning, team: ml-platform, namespace: ml, name: stuck}
  - interval: 1m
    input_series:
      # ml: 1 of 3 completions fail (under the minimum count); prod: 3 of 10 fail; ok: 1 of 10.
      - series: 'datacredit_coalitions_completed_total{namespace="ml", result="failed"}'
        values: '0+0.01x60'
      - series: 'datacredit_coalitions_completed_total{namespace="ml", result="succeeded"}'
        values: '0+0.02x60'
      - series: 'datacredit_coalitions_completed_total{namespace="prod", result="failed"}'
        values: '0+0.05x60'
      - series: 'datacredit_coalitions_completed_total{namespace="prod", result="succeeded"}'
        values: '0+0.12x60'
      - series: 'datacredit_coalitions_completed_total{namespace="ok", result="failed"}'
        values: '0+0.02x60'
      - series: 'datacredit_coalitions_completed_total{namespace="ok", result="succeeded"}'
        values: '0+0.18x60'
    alert_rule_test:
      - eval_time: 60m
        alertname: DatacreditCoalitionFailureRatioHigh
        exp_alerts:
          - exp_labels: {severity: warning, team: ml-platform, namespace: prod}
"""


def test_promtool_alert_unit_tests(monitoring_docs: list[Manifest], tmp_path: Path) -> None:
    groups = prometheus_rule_groups(monitoring_docs)
    for rule in groups["groups"][0]["rules"]:
        rule.pop("annotations")  # their templates are checked by `promtool check rules`; here: expr and labels
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(groups))
    (tmp_path / "tests.yaml").write_text(ALERT_TESTS)
    result = run([find_binary("promtool"), "test", "rules", "tests.yaml"], cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def helm_env(plane: ControlPlane, home: Path) -> dict[str, str]:
    """Environment for helm against the test control plane, with its state under `home`."""
    dirs = {f"HELM_{kind}_HOME": str(home / kind.lower()) for kind in ("CACHE", "CONFIG", "DATA")}
    return {**os.environ, **dirs, "KUBECONFIG": str(plane.kubeconfig)}


def allowed(
    api: client.AuthorizationV1Api,
    user: str,
    verb: str,
    resource: str,
    namespace: str = "",
    group: str = "",
    subresource: str = "",
) -> bool:
    """Ask the API server (SubjectAccessReview) whether `user` may `verb` the resource."""
    attributes = client.V1ResourceAttributes(
        namespace=namespace or None, verb=verb, group=group, resource=resource, subresource=subresource or None
    )
    review = client.V1SubjectAccessReview(
        spec=client.V1SubjectAccessReviewSpec(user=user, resource_attributes=attributes)
    )
    return bool(api.create_subject_access_review(review).status.allowed)


def adopt_crd(extensions: client.ApiextensionsV1Api) -> None:
    """Let the release take over a ValuationRun CRD that other tests created (Helm adopts what carries its
    ownership metadata); deleting it would delete their runs."""
    name = "valuationruns.datacredit.dev"
    if extensions.list_custom_resource_definition(field_selector=f"metadata.name={name}").items:
        owner = {"meta.helm.sh/release-name": RELEASE, "meta.helm.sh/release-namespace": NAMESPACE}
        patch = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "Helm"}, "annotations": owner}}
        extensions.patch_custom_resource_definition(name, patch)


@pytest.mark.controlplane
def test_chart_on_api_server(control_plane: ControlPlane, tmp_path: Path) -> None:
    """helm install into a real API server: restricted pods admitted, RBAC as intended, CRD kept on uninstall."""
    env = helm_env(control_plane, tmp_path)
    helm = find_binary("helm")
    for namespace in ("team-a", "team-b", NAMESPACE, "datacredit-wide"):
        control_plane.ensure_namespace(namespace)
    with control_plane.api_client() as api_client:
        core = client.CoreV1Api(api_client)
        core.patch_namespace(NAMESPACE, {"metadata": {"labels": {"pod-security.kubernetes.io/enforce": "restricted"}}})
        adopt_crd(client.ApiextensionsV1Api(api_client))
        # A namespaced release (its CRD kept on uninstall) and a cluster-wide one that reuses the CRD.
        install = [
            helm,
            "install",
            RELEASE,
            CHART,
            "-n",
            NAMESPACE,
            "-f",
            CHART / "ci" / "namespaced-values.yaml",
            "--set",
            "crds.keep=true",
            "--set",
            "grafana.dashboards.enabled=true",
        ]
        result = run(install, env=env)
        assert result.returncode == 0, result.stderr
        notes = result.stdout.split("NOTES:", 1)[1]
        assert "kubectl -n team-a create secret" in notes and f"{RELEASE}-datacredit-metrics.{NAMESPACE}:8080" in notes
        result = run([helm, "install", "wide", CHART, "-n", "datacredit-wide", "--set", "crds.install=false"], env=env)
        assert result.returncode == 0, result.stderr

        # The ReplicaSet controller creates the operator pod only if Pod Security "restricted" admits it.
        wait_until(
            lambda: bool(core.list_namespaced_pod(NAMESPACE, label_selector="app.kubernetes.io/instance=dc").items),
            "the operator pod to be admitted",
            60,
        )

        auth = client.AuthorizationV1Api(api_client)
        scoped = f"system:serviceaccount:{NAMESPACE}:{RELEASE}-datacredit"
        wide = "system:serviceaccount:datacredit-wide:wide-datacredit"
        grants = [
            (scoped, "create", "jobs", "team-a", "batch", ""),
            (scoped, "list", "pods", "team-b", "", ""),
            (scoped, "watch", "valuationruns", "team-a", "datacredit.dev", ""),
            (scoped, "patch", "valuationruns", "team-b", "datacredit.dev", "status"),
            (scoped, "create", "events", "team-a", "events.k8s.io", ""),
            (scoped, "list", "customresourcedefinitions", "", "apiextensions.k8s.io", ""),
            (scoped, "watch", "namespaces", "", "", ""),
            (wide, "create", "jobs", "default", "batch", ""),
            (wide, "list", "valuationruns", "", "datacredit.dev", ""),
        ]
        denials = [
            (scoped, "create", "jobs", "default", "batch", ""),
            (scoped, "list", "valuationruns", "", "datacredit.dev", ""),
            (scoped, "get", "secrets", "team-a", "", ""),
            (scoped, "delete", "pods", "team-a", "", ""),
            (scoped, "delete", "valuationruns", "team-a", "datacredit.dev", ""),
            (wide, "get", "secrets", "default", "", ""),
            (wide, "create", "configmaps", "default", "", ""),
            (wide, "patch", "clusterkopfpeerings", "", "kopf.dev", ""),
        ]
        for user, verb, resource, namespace, group, sub in grants:
            assert allowed(auth, user, verb, resource, namespace, group, sub), (user, verb, resource, namespace)
        for user, verb, resource, namespace, group, sub in denials:
            assert not allowed(auth, user, verb, resource, namespace, group, sub), (user, verb, resource, namespace)

        # The editor and viewer roles aggregate into the built-in edit and view roles.
        rbac = client.RbacAuthorizationV1Api(api_client)
        for user, role in (("alice", "edit"), ("bob", "view")):
            rbac.create_namespaced_role_binding(
                "team-a",
                {
                    "metadata": {"name": f"{user}-{role}"},
                    "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
                    "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}],
                },
            )
        wait_until(
            lambda: allowed(auth, "alice", "create", "valuationruns", "team-a", "datacredit.dev"),
            "edit to aggregate the ValuationRun editor role",
            60,
        )
        wait_until(
            lambda: allowed(auth, "bob", "list", "valuationruns", "team-a", "datacredit.dev"),
            "view to aggregate the ValuationRun viewer role",
            60,
        )
        assert not allowed(auth, "bob", "create", "valuationruns", "team-a", "datacredit.dev")

        for release, namespace in ((RELEASE, NAMESPACE), ("wide", "datacredit-wide")):
            result = run([helm, "uninstall", release, "-n", namespace], env=env)
            assert result.returncode == 0, result.stderr
        extensions = client.ApiextensionsV1Api(api_client)
        assert extensions.read_custom_resource_definition("valuationruns.datacredit.dev").metadata.name
