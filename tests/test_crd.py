"""The committed CRD equals what the spec model generates, and the schema is structural and complete."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from datacredit.crd import build_crd, crd_yaml, spec_schema
from datacredit.spec import ValuationRunSpec

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = [ROOT / "crds" / "valuationruns.datacredit.dev.yaml", ROOT / "charts" / "datacredit" / "crds-src" /
             "valuationruns.yaml"]
REGENERATE = "run `make crds` (datacredit crd > crds/...yaml, copied into the chart)"


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_crd_is_up_to_date(path: Path) -> None:
    assert path.is_file(), f"{path} missing: {REGENERATE}"
    assert path.read_text() == crd_yaml(), f"{path} is stale: {REGENERATE}"


def _walk(node: Any, path: str = "") -> list[tuple[str, dict[str, Any]]]:
    out = []
    if isinstance(node, dict):
        out.append((path, node))
        for k, v in node.get("properties", {}).items():
            out += _walk(v, f"{path}.{k}")
        if isinstance(node.get("items"), dict):
            out += _walk(node["items"], f"{path}[]")
        if isinstance(node.get("additionalProperties"), dict):
            out += _walk(node["additionalProperties"], f"{path}{{}}")
    return out


def test_schema_is_structural() -> None:
    schema = build_crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    for path, node in _walk(schema):
        assert not {"$ref", "anyOf", "oneOf", "allOf", "const", "title", "$defs"} & set(node), path
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields") or node.get(
            "x-kubernetes-int-or-string"), f"{path}: no type"
        assert not ("type" in node and node.get("x-kubernetes-int-or-string")), f"{path}: int-or-string has no type"
        assert node.get("additionalProperties") is not False, path
        assert not isinstance(node.get("exclusiveMinimum"), int | float) or isinstance(
            node["exclusiveMinimum"], bool), path
        if isinstance(node.get("default"), dict):
            assert None not in node["default"].values(), f"{path}: null in a default"


def _model_fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}.{field.alias or name}"
        out.append(key)
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += _model_fields(ann, key)
    return out


def test_every_spec_field_is_in_the_crd() -> None:
    nodes = dict(_walk(spec_schema()))
    missing = [f for f in _model_fields(ValuationRunSpec) if f not in nodes]
    assert not missing


def test_schema_details() -> None:
    nodes = dict(_walk(spec_schema()))
    assert nodes[".method.prune.ratio"]["exclusiveMinimum"] is True
    assert nodes[".method.prune.ratio"]["minimum"] == 0
    assert nodes[".method.prune.ratio"]["exclusiveMaximum"] is True
    assert nodes[".model.checkpoint"]["nullable"] is True and "default" not in nodes[".model.checkpoint"]
    assert nodes[".estimator.name"]["enum"] == ["kernel", "exact", "permutation", "banzhaf", "loo"]
    assert nodes[".estimator.budget"]["default"] == 64
    assert nodes[".dataset.channels"]["enum"] == [1, 3]
    assert nodes[".execution.nodeSelector"]["additionalProperties"] == {"type": "string"}
    assert nodes[".execution.tolerations[]"]["x-kubernetes-preserve-unknown-fields"] is True
    assert nodes[".execution.resources.memory"]["pattern"]
    assert nodes[".storage"]["required"] == ["uri"] and "default" not in nodes[".storage.uri"]
    rules = {r["rule"] for _, n in nodes.items() for r in n.get("x-kubernetes-validations", [])}
    assert any("'manifest'" in r for r in rules) and any("'exact'" in r for r in rules)
    assert any("oldSelf.dataset" in r for r in rules)


def test_payout_section_in_the_crd() -> None:
    """Amounts are integers or decimal strings (a YAML float is not exact money); alpha only with blend."""
    import re

    nodes = dict(_walk(spec_schema()))
    payout = nodes[".payout"]
    assert payout["nullable"] is True and payout["required"] == ["pool"] and "default" not in payout
    assert payout["description"] and all(n["description"] for k, n in nodes.items() if k.startswith(".payout."))
    for key in (".payout.pool", ".payout.floor"):
        assert nodes[key]["x-kubernetes-int-or-string"] is True and "type" not in nodes[key]
    pool, floor = re.compile(nodes[".payout.pool"]["pattern"]), re.compile(nodes[".payout.floor"]["pattern"])
    assert all(pool.match(v) for v in ("1", "10000", "10000.50", "0.01", "007"))
    assert not any(pool.match(v) for v in ("0", "0.00", "-5", "1e3", "10,5", "", "1.", ".5"))
    assert floor.match("0") and floor.match("2.50") and not floor.match("-1")
    assert nodes[".payout.pool"]["minimum"] == 1 and nodes[".payout.floor"]["minimum"] == 0
    assert nodes[".payout.floor"]["default"] == "0" and nodes[".payout.rule"]["default"] == "shapley"
    assert nodes[".payout.rule"]["enum"] == ["shapley", "blend", "lower-bound", "pro-rata"]
    assert nodes[".payout.alpha"]["maximum"] == 1 and nodes[".payout.period"]["pattern"]
    assert [r["fieldPath"] for r in payout["x-kubernetes-validations"]] == [".alpha"]
    immutable = {r["rule"] for r in nodes[""]["x-kubernetes-validations"]}
    assert not any("payout" in r for r in immutable)  # a payout may change after the run: it re-runs nothing


def test_names_columns_and_status() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert "vrun" in names["shortNames"] and names["categories"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert cols["Phase"] == ".status.phase" and cols["Progress"] == ".status.progress"
    assert cols["Ready"] == '.status.conditions[?(@.type=="Ready")].status'
    assert cols["Top"] == ".status.topContributor" and cols["Age"] == ".metadata.creationTimestamp"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["top"]["maxItems"] == 10
    assert {"phase", "conditions", "coalitions", "estimate", "results", "observedGeneration", "startTime",
            "completionTime", "progress", "payout"} <= set(status)
    assert status["payout"]["properties"]["top"]["maxItems"] == 3


def test_yaml_round_trips() -> None:
    text = crd_yaml()
    assert yaml.safe_load(text) == build_crd()
    assert "&id" not in text and "*id" not in text  # no YAML anchors: every schema is written out
