"""Tests of the Shapley estimation engine (datacredit.shapley)."""

from __future__ import annotations

import json
from itertools import islice
from math import factorial
from typing import Any

import numpy as np
import pytest

from datacredit.shapley import (
    Estimate,
    StopReason,
    estimate,
    estimate_from_table,
    make_plan,
    method_names,
    read_jsonl,
    write_jsonl,
)
from datacredit.shapley.hadamard import hadamard_for, orthogonal_coalitions
from datacredit.shapley.kernel import kernel_fit
from datacredit.shapley.table import Observations, Table


def saturating_game(n: int, seed: int = 0):
    """Coverage-style game with diminishing returns, a harmful player and a pairwise synergy."""
    rng = np.random.default_rng(seed)
    a = rng.gamma(0.8, 1.0, size=(5, n)) * (rng.random((5, n)) < 0.5)
    w = rng.uniform(0.5, 2.0, size=5)
    harm = np.zeros(n)
    harm[0] = 0.4

    def v(Z: np.ndarray) -> np.ndarray:
        Zf = np.asarray(Z, dtype=float)
        cover = (1 - np.exp(-Zf @ a.T)) @ w
        return cover - Zf @ harm + 0.3 * Zf[:, 1] * Zf[:, 2]

    return v


def brute_force(v, n: int, banzhaf: bool = False) -> np.ndarray:
    """Reference semivalues by looping over all coalitions."""
    idx = np.arange(2**n)
    masks = (idx[:, None] >> np.arange(n) & 1).astype(bool)
    values = v(masks)
    out = np.zeros(n)
    for i in range(n):
        for S in idx[~masks[:, i]]:
            s = int(masks[S].sum())
            weight = 2.0 ** -(n - 1) if banzhaf else factorial(s) * factorial(n - s - 1) / factorial(n)
            out[i] += weight * (values[S | (1 << i)] - values[S])
    return out


def noisy(v, sd: float, seed: int):
    rng = np.random.default_rng(seed)
    return lambda Z: v(Z) + sd * rng.standard_normal(len(Z))


class Recorder:
    """Utility wrapper that counts and stores every evaluated row."""

    def __init__(self, v):
        self.v, self.rows = v, []

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        out = self.v(Z)
        self.rows.extend(zip((np.flatnonzero(z).tolist() for z in Z), out.tolist(), strict=True))
        return out


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.mark.parametrize("n", [3, 5, 7])
def test_exact_matches_brute_force(n: int) -> None:
    v = saturating_game(n)
    res = estimate(v, n, 2**n, "exact")
    assert np.allclose(res.values, brute_force(v, n), atol=1e-12)
    assert res.n_evaluations == 2**n and res.stop_reason == StopReason.ALL_COALITIONS
    assert np.all(res.stderr == 0)


def test_banzhaf_exact_when_all_coalitions_and_close_when_sampled() -> None:
    n = 6
    v = saturating_game(n)
    truth = brute_force(v, n, banzhaf=True)
    assert np.allclose(estimate(v, n, 2**n, "banzhaf").values, truth, atol=1e-12)
    assert rel_l2(estimate(v, n, 40, "banzhaf", seed=1).values, truth) < 0.1


@pytest.mark.parametrize("method", ["kernel", "permutation"])
def test_full_budget_gives_exact_shapley(method: str) -> None:
    n = 6
    v = saturating_game(n)
    res = estimate(v, n, 2**n, method)
    assert res.stop_reason == StopReason.ALL_COALITIONS
    assert np.allclose(res.values, brute_force(v, n), atol=1e-10)


def test_loo_values() -> None:
    n = 5
    v = saturating_game(n)
    res = estimate(v, n, n + 2, "loo")
    full = v(np.ones((1, n), dtype=bool))[0]
    expected = [full - v((np.arange(n) != i)[None])[0] for i in range(n)]
    assert np.allclose(res.values, expected) and res.stop_reason == StopReason.DESIGN_COMPLETE


@pytest.mark.parametrize("method", ["kernel", "permutation", "exact"])
def test_efficiency_holds_on_noisy_utility(method: str) -> None:
    n = 8
    rec = Recorder(noisy(saturating_game(n), 0.05, seed=3))
    budget = 2**n if method == "exact" else 6 * n
    res = estimate(rec, n, budget, method, seed=2)
    observed = dict((tuple(m), u) for m, u in rec.rows)
    assert np.isclose(res.values.sum(), observed[tuple(range(n))] - observed[()], atol=1e-10)


@pytest.mark.parametrize("method", method_names())
def test_budget_never_exceeded_and_counted(method: str) -> None:
    n = 7
    for budget in [2**n, 2**n + 5] if method == "exact" else [n + 2, 2 * n + 3, 5 * n, 300]:
        rec = Recorder(saturating_game(n))
        try:
            res = estimate(rec, n, budget, method, seed=1)
        except ValueError:
            assert method == "permutation" and budget < 2 * n
            continue
        assert len(rec.rows) == res.n_evaluations <= budget
        assert len({tuple(m) for m, _ in rec.rows}) == len(rec.rows)  # no coalition evaluated twice
        assert rec.rows[0][0] == [] and rec.rows[1][0] == list(range(n))


@pytest.mark.parametrize("method", ["kernel", "permutation", "banzhaf"])
def test_same_seed_same_result(method: str) -> None:
    n = 10
    v = saturating_game(n)
    a, b = (estimate(noisy(v, 0.02, seed=9), n, 8 * n, method, seed=4) for _ in range(2))
    assert np.array_equal(a.values, b.values) and np.array_equal(a.stderr, b.stderr)
    assert not np.array_equal(a.values, estimate(noisy(v, 0.02, seed=9), n, 8 * n, method, seed=5).values)


def test_error_shrinks_with_budget() -> None:
    n = 12
    v = saturating_game(n, seed=1)
    truth = brute_force(v, n)
    errors = {
        k: np.median([rel_l2(estimate(v, n, k * n, seed=s).values, truth) for s in range(6)]) for k in (4, 16, 64)
    }
    assert errors[64] < errors[16] < errors[4]


def test_stop_reasons_and_tolerance() -> None:
    n = 10
    v = saturating_game(n)
    full = estimate(v, n, 20 * n)
    assert full.stop_reason == StopReason.BUDGET and not full.converged and full.n_evaluations == 20 * n
    early = estimate(v, n, 20 * n, tolerance=0.5)
    assert early.converged and early.stop_reason == StopReason.CONVERGED
    assert 4 * n + 2 <= early.n_evaluations < 20 * n
    assert np.all(early.halfwidth < 0.5 * np.ptp(early.values))
    later = estimate(v, n, 20 * n, tolerance=0.5, min_evaluations=10 * n)
    assert later.n_evaluations >= 10 * n
    absolute = estimate(v, n, 20 * n, atol=1e-9)  # unreachable: runs to the budget
    assert absolute.stop_reason == StopReason.BUDGET and absolute.n_evaluations == 20 * n


def test_stopping_is_not_fooled_by_tiny_designs() -> None:
    n = 10
    res = estimate(saturating_game(n), n, 2 * n, tolerance=1.0, min_evaluations=4)
    assert not res.converged  # fewer pairs than parameters: infinite intervals, never converged


def test_resume_from_jsonl_table(tmp_path) -> None:
    n = 9
    rec = Recorder(noisy(saturating_game(n), 0.03, seed=1))
    for method in ("kernel", "banzhaf"):
        rec.rows.clear()
        res = estimate(rec, n, 7 * n, method, seed=3)
        path = tmp_path / f"{method}.jsonl"
        write_jsonl(path, rec.rows)
        again = estimate_from_table(read_jsonl(path), n, method)
        assert np.allclose(again.values, res.values, atol=1e-10)
        assert np.allclose(again.stderr, res.stderr, atol=1e-10)
        assert again.n_evaluations == res.n_evaluations
        assert estimate_from_table(read_jsonl(path), method=method).values.shape == (n,)  # n inferred


def test_estimate_from_table_other_methods() -> None:
    n = 8
    rec = Recorder(saturating_game(n))
    estimate(rec, n, 10 * n, "kernel", seed=0)  # border rows give leave-one-out for free
    loo = estimate_from_table(rec.rows, n, "loo")
    assert np.allclose(loo.values, estimate(saturating_game(n), n, n + 2, "loo").values)
    perm = estimate_from_table(rec.rows, n, "permutation")  # no chains: kernel regression
    assert np.allclose(perm.values, estimate_from_table(rec.rows, n, "kernel").values)
    with pytest.raises(ValueError, match="unknown method"):
        estimate_from_table(rec.rows, n, "shapley")
    with pytest.raises(ValueError, match="∅"):
        estimate_from_table(rec.rows[2:], n, "kernel")


def test_repeated_rows_are_averaged_and_give_noise_variance() -> None:
    n = 4
    v = saturating_game(n)
    idx = np.arange(2**n)
    masks = (idx[:, None] >> np.arange(n) & 1).astype(bool)
    rows = [(m, u + d) for m, u in zip(masks, v(masks), strict=True) for d in (-0.1, 0.1)]
    res = estimate_from_table(rows, n, "exact")
    assert np.allclose(res.values, brute_force(v, n))
    assert np.all(res.stderr > 0) and res.n_evaluations == 2 * 2**n


def test_coverage_on_small_noisy_game() -> None:
    n = 10
    v = saturating_game(n, seed=2)
    truth = brute_force(v, n)
    sd = 0.02 * np.ptp(v((np.arange(2**n)[:, None] >> np.arange(n) & 1).astype(bool)))
    covered = []
    for seed in range(30):
        for k in (8, 16):
            res = estimate(noisy(v, sd, seed=100 + seed), n, k * n, seed=seed)
            covered.extend(np.abs(res.values - truth) <= res.halfwidth)
    assert np.mean(covered) >= 0.9


def test_plan_shape_and_errors() -> None:
    plan = make_plan(12, 100, "kernel", seed=0)
    assert len(plan.sequence) <= 100 and not plan.sequence[0].any() and plan.sequence[1].all()
    sizes = plan.sequence[2:].sum(axis=1)
    assert np.all(sizes[0::2] + sizes[1::2] == 12)  # complement pairs
    perm = make_plan(6, 40, "permutation", seed=0)
    first, reverse = perm.sequence[perm.chains[0]], perm.sequence[perm.chains[1]]
    assert np.array_equal(first, ~reverse[::-1])  # antithetic: prefixes of the reverse are complements
    with pytest.raises(ValueError, match="2\\^"):
        make_plan(8, 100, "exact")
    with pytest.raises(ValueError, match="unknown method"):
        make_plan(8, 100, "tmc")
    with pytest.raises(ValueError, match="loo needs"):
        make_plan(8, 5, "loo")


def test_estimate_result_serialises() -> None:
    res = estimate(saturating_game(5), 5, 12, seed=0)
    data = json.loads(json.dumps(res.to_dict()))
    assert isinstance(res, Estimate) and data["stop_reason"] == str(res.stop_reason)
    assert len(data["values"]) == 5


@pytest.mark.parametrize("n", [2, 5, 8, 12, 31, 40])
def test_hadamard_matrices_and_orthogonal_blocks(n: int) -> None:
    H = hadamard_for(n)
    m = len(H)
    assert m > n and np.array_equal(H @ H.T, m * np.eye(m))
    assert (H[0] == 1).all() and (H[:, 0] == 1).all()
    rows = np.array(list(islice(orthogonal_coalitions(n, np.random.default_rng(1)), 4 * m)))
    assert rows.any(axis=1).all() and not rows.all(axis=1).any()  # never ∅ or the full set
    if n == 8:  # seed 1's first block has no trivial row: its m - 1 rows are one whole block
        signs = 2 * rows[: m - 1].astype(int) - 1
        assert np.array_equal(signs.T @ signs, m * np.eye(n, dtype=int) - 1)  # orthogonal players


def test_kernel_plan_mixes_border_orthogonal_and_quota_pairs() -> None:
    n = 16
    plan = make_plan(n, 12 * n, "kernel", seed=0)
    first = plan.sequence[2 : 2 + 2 * n : 2]
    assert np.array_equal(np.sort(first.sum(axis=1)), np.ones(n))  # every singleton first
    sizes = np.minimum(plan.sequence[2:].sum(axis=1), n - plan.sequence[2:].sum(axis=1))[::2]
    middle = np.mean(sizes[n:] >= n // 2 - 2)  # Hadamard rows sit near n/2; the quota spreads out
    assert 0.5 <= middle < 0.95 and (sizes[n:] < n // 2 - 2).sum() >= 10


def _fit(v, n: int, budget: int, seed: int):
    plan = make_plan(n, budget, "kernel", seed)
    table = Table(plan.sequence)
    for position, utility in enumerate(v(plan.sequence.copy())):
        table.add(position, utility)
    return kernel_fit(Observations.of(table))


def test_blend_trusts_the_low_noise_fit_only_where_the_game_allows() -> None:
    n = 12
    w = np.random.default_rng(0).gamma(1.0, 1.0, n)
    additive = [_fit(noisy(lambda Z: np.asarray(Z, float) @ w, 0.05 * w.sum(), s), n, 8 * n, s) for s in range(10)]
    assert np.median([f.blend for f in additive]) > 0.8
    err = {k: np.median([rel_l2(getattr(f, k), w) for f in additive]) for k in ("values", "kernel_values")}
    assert err["values"] < err["kernel_values"]  # noise dominates: the equal-weight fit helps
    v = saturating_game(n, seed=1)
    truth = brute_force(v, n)
    small, large = _fit(v, n, 8 * n, 0), _fit(v, n, 2**n - 2, 0)  # noise-free: only the bias is left
    assert large.blend < 0.25 and large.blend < small.blend
    assert rel_l2(large.values, truth) < rel_l2(small.values, truth) / 3


def _noisy_game(n: int, noise: float, seed: int = 0) -> tuple[np.ndarray, Any]:
    """An additive game with pairwise interactions and evaluation noise; its exact Shapley values."""
    rng = np.random.default_rng(seed)
    weights = np.linspace(-3.0, 6.0, n)
    pairs = rng.normal(0, 0.3, (n, n))
    pairs = np.triu(pairs, 1)
    phi = weights + 0.5 * (pairs.sum(0) + pairs.sum(1))  # each pair's synergy is split evenly
    noise_rng = np.random.default_rng(seed + 1)

    def utility(coalitions: np.ndarray) -> list[float]:
        z = coalitions.astype(float)
        return [float(row @ weights + row @ pairs @ row + noise_rng.normal(0, noise)) for row in z]

    return phi, utility


@pytest.mark.parametrize("question", ["topK", "sign"])
def test_questions_stop_as_soon_as_they_are_settled_and_get_them_right(question: str) -> None:
    from datacredit.shapley.stopping import StoppingRule

    n, k = 12, 3
    phi, utility = _noisy_game(n, noise=0.3)
    full = estimate(utility, n, 40 * n, "kernel", seed=1)
    asked = estimate(_noisy_game(n, noise=0.3)[1], n, 40 * n, "kernel", seed=1, question=question, k=k)
    assert asked.converged and asked.n_evaluations < full.n_evaluations / 2, (asked.n_evaluations,
                                                                             full.n_evaluations)
    order, truth = np.argsort(-asked.values), np.argsort(-phi)
    if question == "topK":
        assert set(order[:k]) == set(truth[:k]) and set(order[-k:]) == set(truth[-k:])
    else:
        assert np.array_equal(np.sign(asked.values), np.sign(phi))
    again = estimate(_noisy_game(n, noise=0.3)[1], n, 40 * n, "kernel", seed=1, question=question, k=k)
    assert again.n_evaluations == asked.n_evaluations  # deterministic for a seed
    assert StoppingRule(question=question, k=k).describe().endswith("known at 95%")


def test_question_rules_on_hand_made_intervals() -> None:
    from datacredit.shapley.stopping import StoppingRule

    top = StoppingRule(question="topK", k=1)
    values = np.array([10.0, 5.0, 4.0, 0.0])
    assert top.met("kernel", values, np.full(4, 1.0))  # 10 − 5 and 4 − 0 exceed 1.96·√2
    assert not top.met("kernel", values, np.array([1.0, 3.0, 1.0, 1.0]))  # 10 - 5 < 1.96·√(1 + 9)
    assert not top.met("kernel", values, np.array([1.0, 1.0, 1.5, 1.5]))  # the bottom is not settled
    assert not top.met("exact", values, np.full(4, 0.1))  # a fixed design never stops early
    sign = StoppingRule(question="sign")
    assert sign.met("kernel", np.array([3.0, -3.0]), np.ones(2))
    assert not sign.met("kernel", np.array([3.0, -1.0]), np.ones(2))
    correlated = np.array([[9.0, 8.5, 0.0, 0.0], [8.5, 9.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    close = np.array([10.0, 7.0, 3.0, -1.0])  # 10 − 7 < 1.96·√18 apart, but their difference has variance 1
    assert not top.met("kernel", close, np.sqrt(np.diag(correlated)))
    assert top.met("kernel", close, np.sqrt(np.diag(correlated)), correlated)
    assert not top.met("kernel", close, np.sqrt(np.diag(correlated)), np.full_like(correlated, np.inf))
    with pytest.raises(ValueError, match="k >= 1"):
        StoppingRule(question="topK")
    from datacredit.planner import Planner

    with pytest.raises(ValueError, match="at most 2"):
        Planner(5, 40, question="topK", k=3)


def _kernel_table(utility: Any, n: int, budget: int, seed: int) -> Observations:
    plan = make_plan(n, budget, "kernel", seed)
    table = Table(plan.sequence)
    for position, value in enumerate(utility(plan.sequence.copy())):
        table.add(position, value)
    return Observations.of(table)


def test_kernel_covariance_gives_the_stderr_and_the_spread_of_differences() -> None:
    from datacredit.shapley.kernel import kernel_covariance

    n = 10
    phi, _ = _noisy_game(n, noise=0.5)
    obs = _kernel_table(_noisy_game(n, noise=0.5)[1], n, 12 * n, 0)
    cov = kernel_covariance(obs)
    np.testing.assert_allclose(np.sqrt(np.diag(cov)), kernel_fit(obs).stderr, rtol=1e-10)
    np.testing.assert_allclose(cov, cov.T, atol=1e-12)
    assert np.linalg.eigvalsh(cov).min() > -1e-12
    covered, width_ratio = [], []
    for seed in range(60):
        phi, utility = _noisy_game(n, noise=0.5, seed=seed)
        obs = _kernel_table(utility, n, 12 * n, seed)
        fit, cov = kernel_fit(obs), kernel_covariance(obs)
        a, b = np.triu_indices(n, 1)
        sd = np.sqrt(cov[a, a] + cov[b, b] - 2 * cov[a, b])
        covered.extend(np.abs((fit.values[a] - fit.values[b]) - (phi[a] - phi[b])) <= 1.96 * sd)
        width_ratio.append(np.median(sd / np.hypot(fit.stderr[a], fit.stderr[b])))
    assert 0.9 <= np.mean(covered) <= 0.995, np.mean(covered)
    assert np.median(width_ratio) < 0.95  # positively correlated errors: differences are surer than √(a² + b²)


def test_pairwise_synergies_do_not_widen_the_intervals() -> None:
    """Paired KernelSHAP is exact on a game with pairwise synergies, so only the noise should count; the
    noise of v(∅) and v(N) is estimated from paired residual differences, which the synergies cancel out of."""

    def game(synergy: float, seed: int) -> Any:
        rng = np.random.default_rng(seed)
        weights, pairs = rng.normal(0, 3.0, 16), np.triu(rng.normal(0, synergy, (16, 16)), 1)
        noise = np.random.default_rng(seed + 1)
        return lambda Z: np.einsum("ki,ij,kj->k", Z.astype(float), pairs, Z.astype(float)) + Z @ weights + (
            noise.normal(0, 0.5, len(Z)))

    ratio = [kernel_fit(_kernel_table(game(1.0, s), 16, 24 * 16, s)).stderr.mean()
             / kernel_fit(_kernel_table(game(0.0, s), 16, 24 * 16, s)).stderr.mean() for s in range(5)]
    assert np.median(ratio) < 1.1, ratio
