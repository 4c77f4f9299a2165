"""Pure evaluation logic: test coalitions, LDS with intervals, counterfactuals, similarity, ground-truth table."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from datacredit import evaluation as ev


def test_datamodel_subsets_fixed_size_distinct_and_deterministic() -> None:
    subs = ev.datamodel_subsets(8, 0.5, 20, seed=3)
    assert all(len(s) == 4 and list(s) == sorted(set(s)) and max(s) < 8 for s in subs)
    assert len(set(subs)) == 20
    assert subs == ev.datamodel_subsets(8, 0.5, 20, seed=3) != ev.datamodel_subsets(8, 0.5, 20, seed=4)
    assert {len(s) for s in ev.datamodel_subsets(8, 0.25, 5)} == {2}
    # more requests than distinct coalitions: all distinct ones appear, then repeats
    small = ev.datamodel_subsets(4, 0.25, 6)
    assert set(small) == {(0,), (1,), (2,), (3,)}
    with pytest.raises(ValueError, match="alpha"):
        ev.datamodel_subsets(8, 1.0, 3)


def test_lds_matches_scipy_and_orders_good_and_bad_values() -> None:
    rng = np.random.default_rng(0)
    truth = rng.normal(size=10)
    subs = ev.datamodel_subsets(10, 0.5, 30, seed=0)
    observed = {s: [truth[list(m)].sum() + rng.normal(scale=0.3) for m in subs] for s in (42, 43, 44)}
    good = ev.lds(truth, subs, observed)
    bad = ev.lds(-truth, subs, observed)
    assert good.mean > 80 and bad.mean < -80
    pred = [truth[list(m)].sum() for m in subs]
    per_seed = [100 * stats.spearmanr(pred, observed[s]).statistic for s in (42, 43, 44)]
    np.testing.assert_allclose(good.per_seed, per_seed)
    half = 1.96 * np.std(per_seed, ddof=1) / math.sqrt(3)
    assert good.low == pytest.approx(np.mean(per_seed) - half) and good.high == pytest.approx(np.mean(per_seed) + half)


def test_interval_methods_and_constant_predictions() -> None:
    x = [10.0, 20.0, 30.0, 40.0]
    normal, t, boot = ev.interval(x), ev.interval(x, "t"), ev.interval(x, "bootstrap")
    assert normal.mean == t.mean == boot.mean == 25.0
    assert (t.high - t.low) > (normal.high - normal.low)  # t has fatter tails at 4 seeds
    assert 10.0 <= boot.low < 25.0 < boot.high <= 40.0
    assert math.isnan(ev.spearman100([1, 1, 1], [1, 2, 3]))
    nan_seed = ev.interval([float("nan"), 5.0, 7.0])
    assert nan_seed.mean == 6.0 and math.isnan(nan_seed.per_seed[0])
    with pytest.raises(ValueError, match="interval method"):
        ev.interval(x, "wild")


def test_counterfactual_members_and_relative_change() -> None:
    scores = [0.5, -1.0, 2.0, 0.1, -0.2]
    assert ev.ranking(scores).tolist() == [2, 0, 3, 4, 1]
    assert ev.counterfactual_members(scores, 0.4, "top") == (1, 3, 4)
    assert ev.counterfactual_members(scores, 0.4, "bottom") == (0, 2, 3)
    assert ev.counterfactual_members(scores, 0.01, "top") == (0, 1, 3, 4)  # at least one removed
    assert ev.relative_change(-12.0, -10.0) == pytest.approx(-20.0)
    assert ev.relative_change(3.0, 2.0) == pytest.approx(50.0)
    with pytest.raises(ValueError, match="which"):
        ev.counterfactual_members(scores, 0.4, "middle")


def test_similarity_scores_credit_the_contributor_nearest_the_queries() -> None:
    rng = np.random.default_rng(1)
    proto = rng.normal(size=(2, 16))
    train = np.concatenate([proto[0] + 0.1 * rng.normal(size=(5, 16)), proto[1] + 0.1 * rng.normal(size=(5, 16))])
    owner = np.repeat([0, 1], 5)
    queries = proto[0] + 0.1 * rng.normal(size=(7, 16))
    for agg in ("max", "mean"):
        s = ev.similarity_scores(queries, train, owner, 3, agg)
        assert s[0] > s[1] and math.isnan(s[2])  # player 2 has no images
    assert ev.similarity_scores(queries, train, owner, 2, "max")[0] >= ev.similarity_scores(
        queries, train, owner, 2, "mean")[0]


def test_truth_table_roundtrip_and_errors() -> None:
    rows = [ev.TruthRow("retrain", (0, 2), 42, "abc", -3.5, 1.2), ev.TruthRow("retrain", (1,), 43, "abc", -4.0)]
    parsed = ev.parse_truth(ev.format_truth(rows))
    assert list(parsed.values()) == rows
    assert ev.truth_key("retrain", [2, 0], 42, "abc") in parsed
    assert ev.config_digest({"a": 1, "b": 2}) == ev.config_digest({"b": 2, "a": 1}) != ev.config_digest({"a": 2})
    with pytest.raises(ValueError, match="line 2"):
        ev.parse_truth(rows[0].to_json() + "\n{\"kind\": \"retrain\"}\n", "t.jsonl")
    with pytest.raises(ValueError, match="ground-truth kind"):
        ev.truth_file("guess")


def _work(**kw: int) -> ev.WorkModel:
    base = {"params_full": 100, "params_pruned": 25, "samples": 16, "sampler_steps": 5, "finetune_steps": 10,
            "finetune_batch": 8, "prune_finetune_steps": 0, "prune_batch": 8, "train_steps": 40, "train_batch": 8}
    return ev.WorkModel(**{**base, **kw})


def test_counted_work_per_ranker_from_the_settings() -> None:
    w = _work(prune_finetune_steps=20)
    sample = 5 * 16  # DDIM steps x samples, forward passes
    # sparsified: 10 steps x 8 images x 3 passes on the pruned model (a quarter of the full one)
    assert w.coalition("sparsified", 3) == pytest.approx((3 * 10 * 8 + sample) * 0.25)
    assert w.coalition("ft-full", 3) == pytest.approx(3 * 10 * 8 + sample)
    assert w.coalition("retrain", 3) == pytest.approx(3 * 40 * 8 + sample)
    assert w.coalition("proxy", 3) == pytest.approx(sample)  # the caption proxy trains nothing
    for kind in ev.RANKER_KINDS:  # ∅ only samples, on a full-size model
        assert w.coalition(kind, 0) == pytest.approx(sample)
    assert w.coalition("sparsified", 3, steps=20, params=50) == pytest.approx((3 * 20 * 8 + sample) * 0.5)
    assert w.one_off("sparsified") == pytest.approx(3 * 20 * 8 * 0.25) and w.one_off("ft-full") == 0.0
    # every evaluation counts, replicate seeds included
    assert ev.sparsified_run_work(w, [(0, 1), (2, 3)]) == pytest.approx(
        w.one_off("sparsified") + sample + 3 * w.coalition("sparsified", 2))
    with pytest.raises(ValueError, match="ranker kind"):
        w.coalition("guess", 1)
    with pytest.raises(ValueError, match="paramsFull"):
        ev.WorkModel.from_run(None, {"paramsPruned": 3})


def test_equal_budget_never_gives_a_ranker_more_than_its_share() -> None:
    w = _work()
    sizes = [0, 4, 1, 3, 2, 2, 1, 3, 2, 2]  # a plan: ∅ and the full set first, then the rest
    budget = ev.sparsified_run_work(w, [(s, 1) for s in sizes])  # sparsified-FT evaluated the whole plan
    # FT-Shapley costs 4x per non-empty coalition (unpruned model): (240 + 80) vs 80
    ft = ev.equal_budget_plan(w, "ft-full", sizes, budget)
    ft_costs = [w.coalition("ft-full", s) for s in sizes]
    assert sum(ft_costs[:ft]) <= budget < sum(ft_costs[:ft + 1])
    assert ft == 3  # 80 + 320 + 320 = 720 ≤ 800 < 1040
    assert ev.equal_budget_plan(w, "sparsified", sizes, budget) == len(sizes)  # its own plan fits exactly
    assert ev.equal_budget_plan(w, "retrain", sizes, budget) == 1  # ∅ (80), then a retrain (1040) is too much
    assert ev.coalitions_within_budget([1.0, 1.0, 1.0], 2.5) == 2
    assert ev.coalitions_within_budget([], 1.0) == 0


def test_pro_rata_ranker_is_the_image_count_in_player_order() -> None:
    contributors = [{"name": "a", "images": 30}, {"name": "b", "images": 10}, {"name": "c"}]
    scores = ev.pro_rata_scores(contributors)
    assert scores.tolist() == [30.0, 10.0, 0.0] and scores.dtype == float
    subs = [(0,), (1,), (2,)]
    assert ev.lds(scores, subs, {0: [3.0, 2.0, 1.0]}).mean == pytest.approx(100.0)  # more images, more utility
    equal = ev.pro_rata_scores([{"images": 5}] * 4)
    assert math.isnan(ev.lds(equal, ev.datamodel_subsets(4, 0.5, 4), {0: [1.0, 2.0, 3.0, 4.0]}).mean)



def test_lds_by_ranker_shows_pro_rata_next_to_shapley() -> None:
    rng = np.random.default_rng(1)
    images = np.asarray([40.0, 10.0, 25.0, 5.0, 30.0, 15.0])
    tests = {0.5: ev.datamodel_subsets(6, 0.5, 12, seed=0)}
    observed = {0.5: {s: [images[list(m)].sum() + rng.normal() for m in tests[0.5]] for s in (0, 1)}}
    rankers = {"sparsified-FT Shapley": -images, ev.PRO_RATA: ev.pro_rata_scores([{"images": k} for k in images]),
               "broken": np.asarray([np.nan] * 6)}
    out = ev.lds_by_ranker(rankers, tests, observed)
    assert list(out) == ["sparsified-FT Shapley", ev.PRO_RATA]  # the pro-rata row, in the rankers' order
    assert out[ev.PRO_RATA]["0.5"]["mean"] > 80 > -80 > out["sparsified-FT Shapley"]["0.5"]["mean"]
    assert len(out[ev.PRO_RATA]["0.5"]["perSeed"]) == 2
    equal = {**rankers, ev.PRO_RATA: ev.pro_rata_scores([{"images": 7}] * 6)}
    assert ev.PRO_RATA not in ev.lds_by_ranker(equal, tests, observed)  # equal counts rank no subset


def test_trak_scores_sum_kernel_influence_over_each_contributors_images() -> None:
    # training features e1, e1, e2 (contributors 0, 0, 1; contributor 2 has none); generated e1 and e1 + e2
    train = np.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    generated = np.asarray([[1.0, 0.0], [1.0, 1.0]])
    scores = ev.trak_scores(train, generated, np.asarray([0, 0, 1]), 3, ridge=0.5)
    # K = diag(1/2.5, 1/1.5); mean generated (1, 0.5): image scores 0.4, 0.4, 1/3
    assert scores == pytest.approx([0.8, 1 / 3, 0.0])
    rng = np.random.default_rng(0)
    phi, gen, owner = rng.normal(size=(12, 4)), rng.normal(size=(5, 4)), rng.integers(0, 3, 12)
    explicit = gen @ np.linalg.inv(phi.T @ phi + 0.5 * np.eye(4)) @ phi.T  # (generated, train) scores
    expected = [explicit[:, owner == c].sum(axis=1).mean() for c in range(3)]
    assert ev.trak_scores(phi, gen, owner, 3) == pytest.approx(expected)


def test_datamodel_recovers_an_additive_game_and_is_the_least_squares_fit_otherwise() -> None:
    n = 5
    members = [tuple(i for i in range(n) if mask >> i & 1) for mask in range(2**n)]
    weights = np.array([2.0, -1.0, 0.5, 0.0, 3.0])
    additive = [1.5 + weights[list(m)].sum() for m in members]
    assert np.allclose(ev.datamodel_scores(members, additive, n, ridge=0.0), weights)
    assert np.allclose(ev.datamodel_scores(members, additive, n), weights, rtol=0.01)  # the ridge shrinks a little
    with_pair = [u + 4.0 * (0 in m and 1 in m) for u, m in zip(additive, members, strict=True)]
    fit = ev.datamodel_scores(members, with_pair, n, ridge=0.0)
    assert np.allclose(fit[2:], weights[2:]) and np.allclose(fit[:2], weights[:2] + 2.0)  # the pair split evenly
