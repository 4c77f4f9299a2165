"""A new property touches one file: registered here, `datacredit validate` accepts its name and the fields its
factory takes, refuses the others, and the worker builds it with them and scores samples."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from datacredit.jobs.properties import Property, available_properties, register_property  # noqa: E402
from datacredit.jobs.properties.registry import property_for, unregister_property  # noqa: E402
from datacredit.preflight import preflight  # noqa: E402
from datacredit.spec import parse_manifest  # noqa: E402
from tests.tiny import tiny_manifest  # noqa: E402


class Brightness:
    """Toy property: the mean pixel value of the brightest `quantile` of the samples (a field it takes)."""

    name = "toy-brightness"

    def __init__(self, quantile: float = 0.5) -> None:
        self.quantile = quantile

    def fit(self, reference_images: torch.Tensor | None, labels: np.ndarray | None, cache_dir: Path,
            seed: int = 0) -> dict[str, Any]:
        return {}

    def score(self, samples: torch.Tensor) -> float:
        means = samples.flatten(1).mean(dim=1)
        return float(torch.quantile(means, self.quantile))


@pytest.fixture()
def toy() -> Iterator[str]:
    register_property("toy-brightness", Brightness)
    yield "toy-brightness"
    unregister_property("toy-brightness")  # other tests see the built-ins only
    assert "toy-brightness" not in available_properties()


def _manifest(prop: dict[str, Any]) -> dict[str, Any]:
    doc = tiny_manifest("toy-property", "/data/images", "/data/reference", {"uri": "/tmp/runs"})
    doc["spec"]["property"] = {**doc["spec"]["property"], **prop}
    return doc


def test_validate_accepts_a_registered_property_and_its_fields(toy: str) -> None:
    run = parse_manifest(_manifest({"name": toy, "quantile": 0.9}))
    assert preflight(run, paths=False) == []
    refused = parse_manifest(_manifest({"name": toy, "clusters": 8}))
    assert preflight(refused, paths=False) == [("spec.property.clusters", f"property {toy!r} does not use it")]


def test_the_worker_builds_it_with_the_manifest_fields_and_scores(toy: str, tmp_path: Path) -> None:
    spec = parse_manifest(_manifest({"name": toy, "quantile": 1.0})).spec.property
    prop = property_for(spec, fetch=lambda uri, field: pytest.fail(f"nothing to fetch, got {field}"))
    assert isinstance(prop, Property) and prop.quantile == 1.0
    assert prop.fit(None, None, tmp_path) == {}
    samples = torch.stack([torch.full((1, 4, 4), v) for v in (-1.0, 0.0, 0.5)])
    assert prop.score(samples) == pytest.approx(0.5)  # quantile 1: the brightest sample


def test_an_unknown_property_is_refused_naming_the_choices() -> None:
    problems = preflight(parse_manifest(_manifest({"name": "toy-nope"})), paths=False)
    assert [f for f, _ in problems] == ["spec.property.name"] and "quality" in problems[0][1]
