"""Unit tier: common random numbers, replicated coalitions and the between-seed part of the intervals."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from datacredit.planner import Planner
from datacredit.seeds import coalition_seeds, derived_seed
from datacredit.shapley.design import make_plan
from datacredit.shapley.engine import table_values
from datacredit.shapley.exact import exact_shapley
from datacredit.shapley.kernel import kernel_fit
from datacredit.shapley.result import Z95
from datacredit.shapley.seednoise import SeedNoise, replicate_positions, seed_variance, sensitivity
from datacredit.shapley.table import Observations, Table


def test_common_random_numbers_share_noise_not_data():
    a, b = coalition_seeds(7, "c-a"), coalition_seeds(7, "c-b")
    assert a.noise == b.noise and a.data != b.data
    off_a, off_b = coalition_seeds(7, "c-a", common=False), coalition_seeds(7, "c-b", common=False)
    assert off_a.noise != off_b.noise
    # a replicate re-draws everything, like a run with another seed; another run seed does too
    assert coalition_seeds(7, "c-a", 1).noise != a.noise and coalition_seeds(7, "c-a", 1).data != a.data
    assert coalition_seeds(8, "c-a").noise != a.noise
    assert derived_seed(7, "x") == derived_seed(7, "x") < 2**31


def test_seed_noise_recovers_the_two_way_components():
    rng = np.random.default_rng(0)
    m, k = 400, 6
    within, common, null = 4.0, 9.0, 1.0
    mu = rng.normal(0, 10, m)
    c = rng.normal(0, np.sqrt(common), (200, k))  # many independent "experiments" of the seed shift
    fits = []
    for e in range(200):
        u = mu[:, None] + c[e][None, :] + rng.normal(0, np.sqrt(within), (m, k))
        groups = [(False, list(row)) for row in u] + [(True, list(rng.normal(3, 1, k)))]
        fits.append(SeedNoise.fit(groups))
    assert np.mean([f.within for f in fits]) == pytest.approx(within, rel=0.02)
    assert np.mean([f.common for f in fits]) == pytest.approx(common, rel=0.15)
    assert np.mean([f.null for f in fits]) == pytest.approx(null, rel=0.15)
    assert SeedNoise.fit([(True, [1.0, 2.0])]) is None  # no trained coalition replicated: nothing to say


def test_replicate_positions_take_empty_and_spread_sizes():
    plan = make_plan(10, 48, "kernel", 0)
    pos = replicate_positions(plan.sequence, 4, 42)
    assert pos == replicate_positions(plan.sequence, 4, 42)  # deterministic
    rows = plan.sequence[pos]
    assert not rows[0].any() and len(pos) == 5 and max(pos) < 42
    assert len(set(rows[1:].sum(axis=1).tolist())) >= 2  # more than one coalition size
    assert replicate_positions(plan.sequence, 0) == []


def _exact_obs(values: dict[tuple[int, ...], float], n: int) -> Observations:
    table = Table(np.array([[i in s for i in range(n)] for s in values], dtype=bool))
    for j, v in enumerate(values.values()):
        table.add(j, v)
    return Observations.of(table)


def test_sensitivity_closed_forms_match_finite_differences():
    n = 4
    rng = np.random.default_rng(1)
    coalitions = [s for k in range(n + 1) for s in itertools.combinations(range(n), k)]
    obs = _exact_obs({s: float(rng.normal()) for s in coalitions}, n)
    J = sensitivity(obs, "exact", lambda y: exact_shapley(obs._replace(values=y))[0])
    h = 1e-6
    for j in range(len(obs.values)):
        y = obs.values.copy()
        y[j] += h
        np.testing.assert_allclose((exact_shapley(obs._replace(values=y))[0] - exact_shapley(obs)[0]) / h,
                                   J[:, j], atol=1e-6)
    # kernel: on a noisy additive game the blend is capped at 1, so the fit is linear around it
    plan = make_plan(8, 40, "kernel", 0)
    table = Table(plan.sequence)
    w = rng.normal(size=8)
    for j, z in enumerate(plan.sequence):
        table.add(j, float(z @ w) + 0.3 * rng.normal())
    obs = Observations.of(table)
    fit = kernel_fit(obs)
    assert fit.blend == 1.0
    for j in (0, 1, 5, 17):
        y = obs.values.copy()
        y[j] += 1e-5
        np.testing.assert_allclose((kernel_fit(obs._replace(values=y)).values - fit.values) / 1e-5,
                                   fit.sensitivity[:, j], atol=1e-5)


def _noisy_runs(method: str, n: int, budget: int, reps: int, crn: bool, seeds: int = 3, runs: int = 60):
    """Values and stderrs of ``runs`` repeated valuations of a game whose utility noise has a seed-shared part
    (like common random numbers) and an idiosyncratic part."""
    rng = np.random.default_rng(3)
    w = np.linspace(-2, 3, n)

    def game(z: np.ndarray) -> float:
        return float(z @ w + 0.5 * z[0] * z[1])

    out = []
    for _ in range(runs):
        planner = Planner(n, budget, method, seed=0, replicate_coalitions=reps)
        shift = {r: rng.normal(0, 2.0) if crn else 0.0 for r in range(seeds + 1)}
        replicated = {tuple(np.flatnonzero(c)) for c in planner.replicated}
        while len(batch := planner.ask(64)):
            for z in batch:
                u = [game(z) + (shift[r] if z.any() else 0.0) + rng.normal(0, 0.5) for r in range(seeds + 1)]
                extra = u[1:] if tuple(np.flatnonzero(z)) in replicated else ()
                planner.tell(z, u[0], extra)
        est = planner.estimate()
        out.append((est.values, est.stderr, est.seed_stderr))
    return out


@pytest.mark.parametrize(("method", "n", "budget"), [("exact", 4, 16), ("kernel", 8, 60)])
def test_replicates_make_intervals_cover_the_seed_to_seed_spread(method, n, budget):
    runs = _noisy_runs(method, n, budget, reps=4, crn=True)
    values = np.array([v for v, _, _ in runs])
    stderr = np.array([s for _, s, _ in runs])
    assert all(s is not None for _, _, s in runs)
    mean = values.mean(axis=0)
    coverage = float((np.abs(values - mean) <= Z95 * stderr).mean())
    assert coverage >= 0.9
    # the intervals are not absurdly wide either: median half-width under 4x the real spread
    assert np.median(Z95 * stderr) < 4 * Z95 * values.std(axis=0).mean()
    if method == "exact":  # without replicates exact enumeration reports no uncertainty at all
        plain = _noisy_runs(method, n, budget, reps=0, crn=True, runs=3)
        assert all(np.all(s == 0) for _, s, _ in plain) and all(b is None for _, _, b in plain)


def test_seed_variance_is_zero_without_noise_and_grows_with_it():
    plan = make_plan(6, 30, "kernel", 0)
    table = Table(plan.sequence)
    for j, z in enumerate(plan.sequence):
        table.add(j, float(z.sum()))
    obs = Observations.of(table)
    J = sensitivity(obs, "kernel", lambda y: table_values(table, "kernel")[0])
    quiet = SeedNoise(0.0, 0.0, 0.0, 4, 3)
    loud = SeedNoise(1.0, 0.0, 1.0, 4, 3)
    assert np.allclose(seed_variance(quiet, obs, J), 0.0)
    assert np.all(seed_variance(loud, obs, J) > 0)
    shifted = SeedNoise(1.0, 5.0, 1.0, 4, 3)  # a shift shared by every trained coalition reaches phi through ∅
    assert np.all(seed_variance(shifted, obs, J) > seed_variance(loud, obs, J))
