"""Benchmark: our ``kernel`` estimator vs the paper's KernelSHAP on synthetic games with known values.

Games (players = data contributors):

* ``additive``: v(S) = sum of weights. Exact values are the weights.
* ``saturating``: quality-weighted coverage of styles, sum_k w_k (1 - exp(-sum_{i in S} a_ik)).
* ``harmful``: the same times prod_{i in S} (1 - r_i), where 15% of contributors carry r_i > 0.
* ``interactions``: saturating plus sparse pairwise synergies and redundancies b_ij.
* ``diversity``: entropy of the pooled class histogram of the contributors in S (like the paper's
  cluster-occupancy entropy).

Exact values: brute force over all 2^n coalitions for n <= 16. For n > 16 the first four are exact
by formula: each is a sum of product-form terms prod_{i in S} g_i, whose Shapley value is the
1-D integral int_0^1 (g_i - 1) prod_{j != i} (1 - p + p g_j) dp (Owen's multilinear extension),
computed by 64-point Gauss-Legendre quadrature, plus b_ij / 2 per pair member; for n <= 16 the
formula is asserted to agree with brute force. ``diversity`` has no closed form: for n > 16 its reference
values come from 20,000 antithetic permutation pairs; their Monte Carlo error (reported as
``reference_mc_relerr``, about 2-3%) adds negligibly to the estimators' errors (>= 10%).

Noise: each evaluation adds N(0, (2% of the utility range)^2) (``--noise``); the target stays the noise-free value.

Baseline (the paper's KernelSHAP): sizes from the Shapley kernel, coalitions uniform within a size, with
replacement, no pairing, closed-form constrained regression with a pseudo-inverse (Covert & Lee
eq. 7), ∅ and the full set as exact constraints. Both spend the same budget (anchors included).

Targets: the geometric mean of the ratio over all cells, the worst cell, and each game's geometric mean
("no game worse than 0.8" read per game and per cell; both are printed). On a noisy additive game the only
error is the evaluation noise. The ``floor`` column there is the best design for a linear game (complement
pairs of rows of a Hadamard matrix, exactly orthogonal, with the paper's solver) over the paper's error:
what an estimator could reach if it ignored non-additive games, on which that design is biased. Noise-free
additive games are solved exactly by both and left out of the ratios.
``--noise 0.1`` reruns the grid at 10% noise (results/estimators_noise10.json), closer to FID-like utilities.

Run ``python benchmarks/estimators.py`` (a few minutes on 2 cores) or ``--quick`` (CI, < 60 s).
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from math import factorial
from pathlib import Path

import numpy as np

from datacredit.shapley import estimate
from datacredit.shapley.hadamard import orthogonal_coalitions

Game = Callable[[np.ndarray], np.ndarray]
RESULTS = Path(__file__).parent / "results" / "estimators.json"
BRUTE_FORCE_MAX_N = 16
NOISE = 0.02


@dataclass
class Case:
    """A game instance with its reference values."""

    name: str
    n: int
    utility: Game
    truth: np.ndarray
    truth_source: str
    truth_mc_relerr: float = 0.0


def brute_force_shapley(v: Game, n: int) -> np.ndarray:
    """Exact Shapley values by enumerating all 2^n coalitions (independent of the library code)."""
    idx = np.arange(2**n)
    masks = (idx[:, None] >> np.arange(n) & 1).astype(bool)
    values = np.concatenate([v(masks[i : i + 8192]) for i in range(0, 2**n, 8192)])
    sizes = masks.sum(axis=1)
    weight = np.array([factorial(s) * factorial(n - s - 1) / factorial(n) for s in range(n)])
    phi = np.zeros(n)
    for i in range(n):
        without = idx[~masks[:, i]]
        phi[i] = weight[sizes[without]] @ (values[without | (1 << i)] - values[without])
    return phi


def product_terms(G: np.ndarray, coef: np.ndarray) -> tuple[Game, np.ndarray]:
    """Game v(S) = sum_t coef_t prod_{i in S} G[t, i] (G > 0) and its exact Shapley values."""
    log_g = np.log(G)

    def v(Z: np.ndarray) -> np.ndarray:
        return np.exp(np.asarray(Z, dtype=float) @ log_g.T) @ coef

    x, w = np.polynomial.legendre.leggauss(64)
    p, w = (x + 1) / 2, w / 2
    phi = np.zeros(G.shape[1])
    for t in range(G.shape[0]):
        log_f = np.log(1 - p[:, None] + p[:, None] * G[t][None, :])
        others = np.exp(log_f.sum(axis=1, keepdims=True) - log_f)
        phi += coef[t] * (G[t] - 1) * (w @ others)
    return v, phi


def coverage_terms(n: int, rng: np.random.Generator, harmful: float) -> tuple[np.ndarray, np.ndarray]:
    """Product-form terms of sum_k w_k (1 - exp(-sum a_ik)) * prod (1 - r_i)."""
    styles = 12
    a = rng.gamma(0.6, 1.0, size=(styles, n)) * (rng.random((styles, n)) < 0.35)
    w = rng.gamma(2.0, 1.0, size=styles)
    keep = np.ones(n)
    n_bad = int(round(harmful * n))
    keep[rng.choice(n, n_bad, replace=False)] = 1 - rng.uniform(0.1, 0.3, n_bad)
    G = np.vstack([keep, keep * np.exp(-a)])
    return G, np.concatenate([[w.sum()], -w])


def make_case(name: str, n: int, seed: int) -> Case:
    rng = np.random.default_rng([seed, n, len(name)])
    if name == "additive":
        weights = rng.gamma(1.0, 1.0, size=n) - 0.1
        return Case(name, n, lambda Z: np.asarray(Z, dtype=float) @ weights, weights, "formula")
    if name == "diversity":
        hist = rng.gamma(0.3, 1.0, size=(n, 20)) * rng.integers(20, 200, size=(n, 1))

        def entropy(Z: np.ndarray) -> np.ndarray:
            pooled = np.asarray(Z, dtype=float) @ hist
            q = pooled / np.maximum(pooled.sum(axis=1, keepdims=True), 1e-300)
            return -(q * np.log(np.where(q > 0, q, 1.0))).sum(axis=1)

        if n <= BRUTE_FORCE_MAX_N:
            return Case(name, n, entropy, brute_force_shapley(entropy, n), "brute force")
        truth, relerr = permutation_reference(entropy, n, pairs=20_000, seed=seed)
        return Case(name, n, entropy, truth, "Monte Carlo (20k antithetic pairs)", relerr)
    G, coef = coverage_terms(n, rng, harmful=0.15 if name == "harmful" else 0.0)
    base, phi = product_terms(G, coef)
    b = np.zeros((n, n))
    if name == "interactions":
        b = np.triu(rng.normal(0, 0.15 * coef[0] / n, size=(n, n)) * (rng.random((n, n)) < 3 / n), 1)
        phi = phi + (b.sum(axis=1) + b.sum(axis=0)) / 2

    def v(Z: np.ndarray) -> np.ndarray:
        Zf = np.asarray(Z, dtype=float)
        return base(Z) + np.einsum("ki,ij,kj->k", Zf, b, Zf)

    if n > BRUTE_FORCE_MAX_N:
        return Case(name, n, v, phi, "formula")
    truth = brute_force_shapley(v, n)
    assert np.allclose(truth, phi, rtol=1e-9, atol=1e-12), "formula disagrees with brute force"
    return Case(name, n, v, truth, "brute force (= formula)")


def permutation_reference(v: Game, n: int, pairs: int, seed: int) -> tuple[np.ndarray, float]:
    """Antithetic-permutation Monte Carlo values and their relative standard error."""
    rng = np.random.default_rng([seed, n, 99])
    sums, sq = np.zeros(n), np.zeros(n)
    lower = np.tri(n + 1, n, -1, dtype=bool)
    for _ in range(pairs // 100):
        units = np.zeros((100, n))
        for u in range(100):
            perm = rng.permutation(n)
            for order in (perm, perm[::-1]):
                chain = v(lower[:, np.argsort(order)])
                units[u, order] += np.diff(chain) / 2
        sums += units.sum(axis=0)
        sq += (units**2).sum(axis=0)
    mean = sums / pairs
    se = np.sqrt((sq / pairs - mean**2) / (pairs - 1))
    return mean, float(np.linalg.norm(se) / np.linalg.norm(mean))


def noisy(v: Game, sd: float, rng: np.random.Generator) -> Game:
    return lambda Z: v(Z) + sd * rng.standard_normal(len(Z))


def utility_range(v: Game, n: int) -> float:
    """max - min of v over ∅, the full set and 2,048 coalitions of uniformly random sizes."""
    rng = np.random.default_rng(0)
    sizes = rng.integers(0, n + 1, size=2048)
    Z = rng.random((2048, n)).argsort(axis=1) < sizes[:, None]
    vals = v(np.vstack([Z, np.zeros(n, dtype=bool), np.ones(n, dtype=bool)]))
    return float(vals.max() - vals.min())


def paper_kernelshap(v: Game, n: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """The paper's estimator: unpaired Shapley-kernel sampling with replacement, Covert-Lee closed form."""
    m = budget - 2
    sizes = np.arange(1, n)
    p = 1.0 / (sizes * (n - sizes))
    drawn = rng.choice(sizes, size=m, p=p / p.sum())
    return constrained_regression(v, n, rng.random((m, n)).argsort(axis=1) < drawn[:, None])


def orthogonal_oracle(v: Game, n: int, budget: int, rng: np.random.Generator) -> np.ndarray:
    """The best design for an additive game: complement pairs of Hadamard rows (exactly orthogonal
    blocks) with the paper's solver. Unbiased only on additive games, so used only there."""
    rows = orthogonal_coalitions(n, rng)
    Z = np.array([next(rows) for _ in range((budget - 2) // 2)])
    return constrained_regression(v, n, np.vstack([Z, ~Z]))


def constrained_regression(v: Game, n: int, Z: np.ndarray) -> np.ndarray:
    """Covert-Lee closed form: least squares on rows Z with v(∅) and v(full) as the efficiency constraint."""
    m = len(Z)
    v0, v1 = v(np.vstack([np.zeros(n, dtype=bool), np.ones(n, dtype=bool)]))
    Zf = Z.astype(float)
    A_inv = np.linalg.pinv(Zf.T @ Zf / m)
    b = Zf.T @ (v(Z) - v0) / m
    one = np.ones(n)
    return A_inv @ (b - one * (one @ A_inv @ b - (v1 - v0)) / (one @ A_inv @ one))


def rel_l2(estimate_: np.ndarray, truth: np.ndarray) -> float:
    return float(np.linalg.norm(estimate_ - truth) / np.linalg.norm(truth))


def run_cell(case: Case, noise: float, multiple: int, seeds: int) -> dict[str, object]:
    n, budget = case.n, multiple * case.n
    sd = noise * utility_range(case.utility, n)
    ours, paper, covered, floor = [], [], [], []
    for seed in range(seeds):
        rng = np.random.default_rng([seed, n, multiple, int(noise * 1000)])
        res = estimate(noisy(case.utility, sd, rng), n, budget, "kernel", seed=seed)
        assert res.n_evaluations <= budget
        ours.append(rel_l2(res.values, case.truth))
        covered.append(np.abs(res.values - case.truth) <= res.halfwidth + 1e-9 * np.abs(case.truth).max())
        paper.append(rel_l2(paper_kernelshap(noisy(case.utility, sd, rng), n, budget, rng), case.truth))
        if case.name == "additive" and noise:
            floor.append(rel_l2(orthogonal_oracle(noisy(case.utility, sd, rng), n, budget, rng), case.truth))
    ours_med, paper_med = float(np.median(ours)), float(np.median(paper))
    return {
        "game": case.name,
        "n": n,
        "noise": noise,
        "budget": budget,
        "budget_per_n": multiple,
        "seeds": seeds,
        "ours_rel_l2": ours_med,
        "paper_rel_l2": paper_med,
        "ratio": ours_med / paper_med if paper_med > 1e-9 else None,
        "floor_ratio": float(np.median(floor)) / paper_med if floor else None,
        "coverage": float(np.mean(covered)),
        "truth": case.truth_source,
        "truth_mc_relerr": case.truth_mc_relerr,
    }


def summarize(cells: list[dict[str, object]]) -> dict[str, object]:
    """Ratio targets over all games and without ``additive`` (see the module docstring), and coverage."""
    out: dict[str, object] = {}
    for label, keep in (("", lambda c: True), ("_non_additive", lambda c: c["game"] != "additive")):
        rated = [c for c in cells if c["ratio"] is not None and keep(c)]
        ratios = np.array([c["ratio"] for c in rated], dtype=float)
        worst = rated[int(np.argmax(ratios))]
        out[f"geomean_ratio{label}"] = float(np.exp(np.log(ratios).mean()))
        out[f"worst_ratio{label}"] = float(ratios.max())
        out[f"worst_cell{label}"] = f"{worst['game']}/n={worst['n']}/noise={worst['noise']}/{worst['budget_per_n']}n"
    for game in dict.fromkeys(c["game"] for c in cells):
        ratios = [c["ratio"] for c in cells if c["game"] == game and c["ratio"] is not None]
        out[f"geomean_ratio_{game}"] = float(np.exp(np.log(ratios).mean()))
    out["worst_game_geomean"] = max(v for k, v in out.items() if k.startswith("geomean_ratio_") and "non" not in k)
    at_8n = [c for c in cells if c["budget_per_n"] >= 8]
    out["coverage_at_8n_plus"] = float(np.mean([c["coverage"] for c in at_8n]))
    for game in dict.fromkeys(c["game"] for c in cells):
        out[f"coverage_at_8n_plus_{game}"] = float(np.mean([c["coverage"] for c in at_8n if c["game"] == game]))
    out["coverage_min_cell_at_8n_plus"] = float(min(c["coverage"] for c in at_8n))
    out["coverage_at_4n"] = float(np.mean([c["coverage"] for c in cells if c["budget_per_n"] == 4]))
    out["cells_exact_for_both"] = sum(c["ratio"] is None for c in cells)
    floors = [c["floor_ratio"] for c in cells if c["floor_ratio"] is not None]
    out["noisy_additive_floor_ratio_range"] = [round(min(floors), 3), round(max(floors), 3)]
    mc = {f"{c['game']}/n={c['n']}": c["truth_mc_relerr"] for c in cells if c["truth_mc_relerr"]}
    out["reference_mc_relerr"] = {k: round(v, 4) for k, v in mc.items()}
    return out


def print_table(cells: list[dict[str, object]], summary: dict[str, object]) -> None:
    head = (
        f"{'game':<13}{'n':>4}{'noise':>7}{'B/n':>5}{'ours relL2':>12}{'paper relL2':>13}{'ratio':>8}"
        f"{'floor':>7}{'cover':>8}"
    )
    print(head)
    print("-" * len(head))
    for c in cells:
        ratio = "exact" if c["ratio"] is None else f"{c['ratio']:.3f}"
        floor = "" if c["floor_ratio"] is None else f"{c['floor_ratio']:.3f}"
        print(
            f"{c['game']:<13}{c['n']:>4}{c['noise']:>7.2f}{c['budget_per_n']:>5}{c['ours_rel_l2']:>12.4f}"
            f"{c['paper_rel_l2']:>13.4f}{ratio:>8}{floor:>7}{c['coverage']:>8.3f}"
        )
    print("-" * len(head))
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print(
        "ratio = ours / paper (median relL2 over seeds); cover = share of (contributor, seed) whose 95% interval "
        "holds the exact value; 'exact' = both estimators exact (noise-free additive); floor = error of "
        "orthogonal (Hadamard) complement pairs / paper's, on noisy additive games (the best design for a linear game)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid for CI (< 60 s)")
    parser.add_argument("--noise", type=float, default=NOISE, help="evaluation noise, share of the utility range")
    parser.add_argument("--out", type=Path, help="results JSON (default: results/estimators[_noiseN].json)")
    args = parser.parse_args()
    games = ["additive", "saturating", "harmful", "interactions", "diversity"]
    sizes, seeds, multiples = ([8, 16, 32], 4, [4, 8, 32]) if args.quick else ([8, 16, 32, 64], 50, [4, 8, 16, 32])
    start = time.time()
    cells = []
    for name in games:
        for n in sizes:
            case = make_case(name, n, seed=0)
            for noise in (0.0, args.noise):
                cells.extend(run_cell(case, noise, k, seeds) for k in multiples if k * n < 2**n)
    summary = summarize(cells)
    summary["seconds"] = round(time.time() - start, 1)
    print_table(cells, summary)
    out = args.out or RESULTS.with_name(
        "estimators.json" if args.noise == NOISE else f"estimators_noise{round(100 * args.noise)}.json"
    )
    if not args.quick or args.out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"summary": summary, "cells": cells}, indent=1) + "\n")


if __name__ == "__main__":
    main()
