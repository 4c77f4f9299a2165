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
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path}: no type"
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


def test_names_columns_and_status() -> None:
    crd = build_crd()
    names = crd["spec"]["names"]
    assert "vrun" in names["shortNames"] and names["categories"]
    version = crd["spec"]["versions"][0]
    assert version["subresources"] == {"status": {}}
    cols = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert cols["Phase"] == ".status.phase" and cols["Progress"] == ".status.progress"
    assert cols["Top"] == ".status.topContributor" and cols["Age"] == ".metadata.creationTimestamp"
    status = version["schema"]["openAPIV3Schema"]["properties"]["status"]["properties"]
    assert status["top"]["maxItems"] == 10
    assert {"phase", "conditions", "coalitions", "estimate", "results", "observedGeneration", "startTime",
            "completionTime", "progress"} <= set(status)


def test_yaml_round_trips() -> None:
    assert yaml.safe_load(crd_yaml()) == build_crd()
