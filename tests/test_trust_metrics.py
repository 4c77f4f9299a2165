"""The trust benchmark's measures on synthetic runs whose truth is known (pure numpy, no training)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

_BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "trust.py"
_SPEC = importlib.util.spec_from_file_location("trust", _BENCH)
trust = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(trust)


def _docs(values: np.ndarray, stderr: float, names: list[str]) -> list[dict]:
    rows = [[{"name": n, "value": float(v), "stderr": stderr} for n, v in zip(names, r, strict=True)] for r in values]
    return [{"contributors": r, "wallClockSeconds": 1.0} for r in rows]


@pytest.mark.parametrize("seeds", [3, 5])
def test_a_correct_interval_covers_95_percent_for_any_number_of_seeds(seeds: int) -> None:
    rng = np.random.default_rng(0)
    names = [f"c{i}" for i in range(4000)]
    truth = np.linspace(-1, 1, len(names))
    values = truth + rng.normal(0, 2.0, size=(seeds, len(names)))
    m = trust.metrics(_docs(values, 2.0, names), planted={"c0"})
    assert abs(m["coverage"] - 0.95) < 0.01
    assert m["coverageRaw"] < m["coverage"] - 0.015  # the uncorrected check under-covers a correct interval


def test_too_narrow_intervals_and_planted_order_are_detected() -> None:
    rng = np.random.default_rng(1)
    names = ["bad", "good-0", "good-1"]
    values = np.array([-5.0, 5.0, 6.0]) + rng.normal(0, 1.0, size=(4, 3))
    m = trust.metrics(_docs(values, 0.1, names), planted={"bad"})
    assert m["coverage"] < 0.5
    assert m["plantedLast"] == 1.0
    assert m["gapCleanMinusPlanted"] > 8
