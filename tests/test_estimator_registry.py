"""A new estimator touches one file: registered here, it plans, fits, runs in the planner and the spec accepts it."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from datacredit.planner import Planner
from datacredit.shapley import Method, estimate, get_method, method_names, register_method
from datacredit.shapley.design import Plan, exact_plan
from datacredit.shapley.registry import unregister_method
from datacredit.shapley.table import Observations, Table
from datacredit.spec import SpecError, parse_manifest
from tests.tiny import tiny_manifest


def _marginal_means(obs: Observations, table: Table, plan: Plan | None, upto: int | None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Mean utility with i minus mean utility without i (the Banzhaf value on the full enumeration)."""
    inside = obs.members.T.astype(float)
    with_i = inside @ obs.values / inside.sum(axis=1)
    without = (1 - inside) @ obs.values / (1 - inside).sum(axis=1)
    return with_i - without, np.zeros(obs.members.shape[1])


@pytest.fixture()
def toy() -> Iterator[Method]:
    yield register_method(Method("toy-marginal", "mean with i minus mean without i", exact_plan, _marginal_means,
                                 stops_early=False))
    unregister_method("toy-marginal")  # the CRD and other tests see the built-ins only
    assert "toy-marginal" not in method_names()


def test_a_registered_estimator_plans_fits_and_runs_in_the_planner(toy: Method) -> None:
    assert "toy-marginal" in method_names() and get_method("toy-marginal") is toy
    weights = np.array([1.0, 2.0, -0.5])
    values = estimate(lambda Z: Z.astype(float) @ weights, 3, 8, method="toy-marginal").values
    assert np.allclose(values, weights)  # additive game: the marginal difference is each weight
    banzhaf = estimate(lambda Z: Z.astype(float) @ weights + 3.0 * Z[:, 0] * Z[:, 1], 3, 8, method="banzhaf")
    toy_i = estimate(lambda Z: Z.astype(float) @ weights + 3.0 * Z[:, 0] * Z[:, 1], 3, 8, method="toy-marginal")
    assert np.allclose(toy_i.values, banzhaf.values)  # and the Banzhaf value on an interaction

    planner = Planner(3, 8, "toy-marginal", seed=1)
    for z in planner.ask(8):
        planner.tell(z, float(z.astype(float) @ weights))
    assert planner.done and planner.method == "toy-marginal" and np.allclose(planner.estimate().values, weights)


def test_the_spec_takes_registered_estimators_and_names_the_choices_otherwise(toy: Method) -> None:
    doc = tiny_manifest("toy-estimator", "/data/images", "/data/reference", {"uri": "/tmp/runs"})
    doc["spec"]["estimator"] = {"name": "toy-marginal", "budget": 16}
    assert parse_manifest(doc).spec.estimator.name == "toy-marginal"
    doc["spec"]["estimator"]["name"] = "nope"
    with pytest.raises(SpecError, match=r"spec.estimator.name.*unknown estimator 'nope'; choose one of kernel, exact"):
        parse_manifest(doc)
    with pytest.raises(ValueError, match="registered already"):
        register_method(toy)
