"""The whole method end to end on one machine: tiny model, 4 contributors, exact Shapley."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from datacredit import layout
from datacredit.local import execute
from datacredit.runstate import open_run
from datacredit.spec import parse_manifest
from datacredit.storage import read_json
from tests.tiny import CONTRIBUTORS, TinyData, tiny_manifest

pytestmark = pytest.mark.workload


def _values(doc: dict) -> dict[str, float]:
    return {r["name"]: r["value"] for r in doc["contributors"]}


def test_local_run_exact_resume_and_determinism(tiny_data: TinyData, tmp_path: Path) -> None:
    manifest = tiny_manifest("tiny", str(tiny_data.images), str(tiny_data.reference), {"uri": str(tmp_path / "a")})
    run = parse_manifest(manifest)
    first = execute(run).results

    assert sorted(_values(first)) == sorted(CONTRIBUTORS)
    assert first["evaluations"] == 16
    total = sum(_values(first).values())
    assert total == pytest.approx(first["vFull"] - first["vEmpty"], abs=1e-6)

    store = open_run(run).store
    skipped = read_json(store, layout.MANIFEST)["skipped"]
    assert [s["path"] for s in skipped] == [tiny_data.corrupt]
    assert {"shapley.json", "shapley.csv", "values.png"} <= {k.split("/")[-1] for k in store.list("results")}

    # a rerun evaluates nothing again and gives the same values
    stamps = {k: (store.root / k).stat().st_mtime_ns for k in store.list("coalitions") if k.endswith("result.json")}
    assert len(stamps) == 16
    again = execute(run).results
    assert _values(again) == _values(first)
    assert {k: (store.root / k).stat().st_mtime_ns for k in stamps} == stamps

    # the same seed in a fresh storage gives the same values
    fresh = parse_manifest({**manifest, "spec": {**manifest["spec"], "storage": {"uri": str(tmp_path / "b")}}})
    third = execute(fresh).results
    np.testing.assert_allclose(list(_values(third).values()), list(_values(first).values()), atol=1e-9)
