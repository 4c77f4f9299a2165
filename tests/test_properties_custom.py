"""A user's `module:function` property: import errors name the field, the context reaches the function,
fitted state reloads in workers, and a whole run scores coalitions with it."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from datacredit.jobs.properties.registry import property_for  # noqa: E402
from datacredit.local import execute  # noqa: E402
from datacredit.spec import PropertySpec, SpecError, parse_manifest  # noqa: E402
from tests.tiny import CONTRIBUTORS, TinyData, tiny_manifest  # noqa: E402

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "properties"
TARGET = "contrast:relative_contrast"


@pytest.fixture(autouse=True)
def _importable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", str(EXAMPLES))  # spawned worker processes import it too


def _no_fetch(uri: str, field: str) -> Path:
    raise AssertionError(f"nothing to fetch, got {field}={uri}")


def _images(n: int, scale: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(n, 1, 8, 8, generator=g) * 2 - 1) * scale


def test_context_options_and_reload_from_cache(tmp_path: Path) -> None:
    prop = property_for(PropertySpec(name=TARGET, options={"cap": "1.5"}), _no_fetch)
    reference = _images(20, 0.5)
    info = prop.fit(reference, np.arange(20) % 2, tmp_path, seed=3)
    assert info == {"function": TARGET, "reference": 20}
    assert prop.score(reference) == pytest.approx(1.0, abs=0.01)  # the reference is as contrasted as itself
    assert prop.score(_images(20, 0.1, seed=1)) < 0.5  # washed out
    assert prop.score(_images(20, 1.0, seed=2)) == pytest.approx(1.5)  # capped by options.cap

    worker = property_for(PropertySpec(name=TARGET, options={"cap": "1.5"}), _no_fetch)
    worker.fit(None, None, tmp_path)  # what a coalition worker does: the context comes from the cache
    assert worker.context is not None and worker.context.seed == 0 and worker.context.labels is not None
    assert worker.score(_images(20, 0.3, seed=4)) == prop.score(_images(20, 0.3, seed=4))


@pytest.mark.parametrize(
    ("name", "field", "says"),
    [("no_such_module_xyz:f", "spec.property.name", "cannot import"),
     ("contrast:missing", "spec.property.name", "no function"),
     ("contrast:", "spec.property.name", "module:function")],
)
def test_bad_targets_name_the_field(name: str, field: str, says: str) -> None:
    with pytest.raises(SpecError) as e:
        property_for(PropertySpec(name=name), _no_fetch)
    assert e.value.problems[0][0] == field and says in e.value.problems[0][1]


def test_fields_a_function_does_not_take_are_refused() -> None:
    with pytest.raises(SpecError) as e:
        property_for(PropertySpec(name=TARGET, weights="/models/inception.pth"), lambda uri, field: Path(uri))
    assert [p for p, _ in e.value.problems] == ["spec.property.weights"]


def test_non_finite_results_are_errors(tmp_path: Path) -> None:
    module = tmp_path / "badprop.py"
    module.write_text("def nan(images, context):\n    return float('nan')\n\n"
                      "def text(images, context):\n    return 'high'\n")
    import sys

    sys.path.insert(0, str(tmp_path))
    try:
        for fn, error in (("nan", ValueError), ("text", TypeError)):
            prop = property_for(PropertySpec(name=f"badprop:{fn}"), _no_fetch)
            prop.fit(_images(4, 1.0), None, tmp_path / fn)
            with pytest.raises(error, match=f"badprop:{fn}"):
                prop.score(_images(4, 1.0))
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.workload
def test_a_run_scores_coalitions_with_the_function(tiny_data: TinyData, tmp_path: Path) -> None:
    doc = tiny_manifest("custom", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path)},
                        estimator="loo", budget=6)
    doc["spec"]["property"].update({"name": TARGET, "options": {"cap": "3"}})
    results = execute(parse_manifest(doc)).results
    values = {r["name"]: r["value"] for r in results["contributors"]}
    assert sorted(values) == sorted(CONTRIBUTORS) and all(math.isfinite(v) for v in values.values())
    assert 0 < results["vFull"] <= 3 and results["vFull"] != results["vEmpty"]
