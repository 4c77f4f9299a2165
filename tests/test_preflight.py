"""Preflight checks of a manifest against this machine and the property registry, before any training."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from datacredit.preflight import preflight
from datacredit.spec import parse_manifest


def _run(tmp_path: Path, **prop: Any) -> Any:
    (tmp_path / "images").mkdir(exist_ok=True)
    return parse_manifest({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "p"},
        "spec": {"dataset": {"images": str(tmp_path / "images")}, "property": prop,
                 "storage": {"uri": str(tmp_path / "runs")}},
    })


def test_a_good_manifest_has_no_problems(tmp_path: Path) -> None:
    assert preflight(_run(tmp_path, name="quality")) == []


def test_missing_local_paths_are_named_and_s3_uris_left_to_the_worker(tmp_path: Path) -> None:
    run = _run(tmp_path, name="fid", reference=str(tmp_path / "no-ref"), weights="s3://bucket/inception.pth")
    assert preflight(run) == [("spec.property.reference", f"{tmp_path / 'no-ref'} does not exist")]
    relative = _run(tmp_path, name="quality", reference="ref")
    assert [f for f, _ in preflight(relative, base=tmp_path)] == ["spec.property.reference"]
    (tmp_path / "ref").mkdir()
    assert preflight(relative, base=tmp_path) == []


def test_unknown_properties_and_fields_the_property_ignores_are_named(tmp_path: Path) -> None:
    problems = preflight(_run(tmp_path, name="nosuchprop"))
    assert [f for f, _ in problems] == ["spec.property.name"] and "known:" in problems[0][1]
    problems = preflight(_run(tmp_path, name="fid", clusters=4))
    assert problems == [("spec.property.clusters", "property 'fid' does not use it")]
