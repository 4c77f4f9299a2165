"""Benchmark: our ``kernel`` estimator side by side with shapiq's and pyDVL's Shapley approximators.

Games with many higher-order interactions, exact values known for every n here:

* ``interactions``, ``harmful``: the product-form games of ``estimators.py`` (every interaction order
  present; exact by Owen's multilinear extension, brute force for n <= 16).
* ``unanimity``: v(S) = sum_T c_T [T ⊆ S] over 2n random coalitions T of sizes 2..8, c_T ~ N(0.5, 1);
  phi_i = sum over T containing i of c_T / |T|.
* ``majority``: weighted voting, v(S) = [w(S) >= half the total weight], integer weights 1..10; exact by
  counting the coalitions of each size and weight that i swings (dynamic programming).

Noise: none, or the ``estimators.py`` model (each evaluation adds N(0, (2% of the utility range)^2)); the
target is always the noise-free value. Every estimator gets the same budget (8n or 32n evaluations). The
game is memoised per run: a repeated coalition returns its first (noisy) value and costs nothing, as a
utility cache would make it; ``evals`` is the number of distinct coalitions an estimator actually
evaluated (pyDVL's samplers stop a little short of the budget; none goes over it).

Error: relative L2, ||phi_hat - phi|| / ||phi||, averaged over seeds. ``ratio`` = ours / the best peer in
the cell; ``coverage`` = share of (contributor, seed) whose 95% interval from ``kernel`` holds the exact
value. Target: ratio <= 0.5 in every cell with coverage >= 0.9.

Peers: shapiq ``KernelSHAP`` (default, and with its pairing trick), ``UnbiasedKernelSHAP``, ``SVARM``,
``PermutationSamplingSV``, ``StratifiedSamplingSV``, ``OwenSamplingSV``; pyDVL ``ShapleyValuation`` with
permutation, antithetic-permutation, uniform (Monte Carlo over the powerset) and Owen samplers,
``TMCShapleyValuation``, ``StratifiedShapleyValuation`` and ``GroupTestingShapleyValuation`` (n <= 16 only:
its cvxpy solve takes ~9 s a run at n = 64, and its error there is above 100%). pyDVL has no
regression (KernelSHAP) estimator.

Needs the ``bench`` extra (``make bench-peers``). Run ``python benchmarks/peers.py`` (~10 min on one
core, 5 seeds; writes results/peers.json) or ``--quick`` (< 60 s, prints only).
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from math import comb
from pathlib import Path
from typing import Any

import numpy as np
import shapiq
from estimators import NOISE, Case, Game, brute_force_shapley, make_case, noisy, rel_l2, utility_range
from joblib import parallel_config
from pydvl.utils.status import Status
from pydvl.valuation import (
    AntitheticPermutationSampler,
    Dataset,
    GridOwenStrategy,
    GroupTestingShapleyValuation,
    NoStopping,
    OwenSampler,
    PermutationSampler,
    ShapleyValuation,
    StoppingCriterion,
    StratifiedShapleyValuation,
    TMCShapleyValuation,
    UniformSampler,
    ValuationResult,
)
from pydvl.valuation.types import Sample
from pydvl.valuation.utility.base import UtilityBase

from datacredit.shapley import estimate

RESULTS = Path(__file__).parent / "results" / "peers.json"
GROUP_TESTING_MAX_N = 16


class Memo:
    """The game behind a cache: counts distinct coalitions, returns a repeated one's first value."""

    def __init__(self, v: Game, n: int):
        self.v, self.n, self.values = v, n, {}

    def __call__(self, Z: np.ndarray) -> np.ndarray:
        Z = np.asarray(Z, dtype=bool).reshape(-1, self.n)
        keys = [z.tobytes() for z in Z]
        new = [k for k in dict.fromkeys(keys) if k not in self.values]
        if new:
            self.values.update(zip(new, self.v(np.array([np.frombuffer(k, dtype=bool) for k in new])), strict=True))
        return np.array([self.values[k] for k in keys])

    @property
    def count(self) -> int:
        return len(self.values)


def unanimity_case(n: int, seed: int) -> Case:
    """Sum of 2n unanimity games over random coalitions of sizes 2..8."""
    rng = np.random.default_rng([seed, n, 7])
    T = np.zeros((2 * n, n), dtype=bool)
    for row in T:
        row[rng.choice(n, rng.integers(2, min(8, n) + 1), replace=False)] = True
    c = rng.normal(0.5, 1.0, len(T))
    size = T.sum(axis=1)

    def v(Z: np.ndarray) -> np.ndarray:
        return ((np.asarray(Z, dtype=int) @ T.T.astype(int)) == size) @ c

    return Case("unanimity", n, v, (c / size) @ T, "formula")


def majority_case(n: int, seed: int) -> Case:
    """Weighted voting game with quota half the total weight; exact by dynamic programming."""
    w = np.random.default_rng([seed, n, 8]).integers(1, 11, n)
    quota = (w.sum() + 1) // 2

    def v(Z: np.ndarray) -> np.ndarray:
        return (np.asarray(Z, dtype=int) @ w >= quota).astype(float)

    phi = np.zeros(n)
    for i in range(n):
        count = np.zeros((n, w.sum() + 1))  # coalitions of N \ {i} by size and weight
        count[0, 0] = 1.0
        for j in np.delete(np.arange(n), i):
            count[1:, w[j] :] += count[:-1, : count.shape[1] - w[j]].copy()
        swings = count[:, quota - w[i] : quota].sum(axis=1)
        phi[i] = sum(swings[s] / (n * comb(n - 1, s)) for s in range(n))
    return Case("majority", n, v, phi, "formula")


def case_for(name: str, n: int) -> Case:
    case = {"unanimity": unanimity_case, "majority": majority_case}.get(name, make_case)
    out = case(n, 0) if name in ("unanimity", "majority") else case(name, n, 0)
    if n <= 16 and out.truth_source == "formula":
        assert np.allclose(brute_force_shapley(out.utility, n), out.truth, atol=1e-9), f"{name}: formula is wrong"
    return out


class GameUtility(UtilityBase):
    """A pyDVL utility over players 0..n-1 that evaluates a batched game on one coalition."""

    def __init__(self, game: Memo):
        self.game = game

    def __call__(self, sample: Sample | None) -> float:
        z = np.zeros(self.game.n, dtype=bool)
        if sample is not None:
            z[np.asarray(sample.subset, dtype=int)] = True
        return float(self.game(z[None])[0])


class Budget(StoppingCriterion):
    """Stops pyDVL before the next batch could take the game past ``budget`` distinct evaluations (the
    largest batch seen so far is the step allowed for)."""

    def __init__(self, game: Memo, budget: int):
        super().__init__()
        self.game, self.budget, self.last, self.step = game, budget, 0, 0

    def _check(self, result: ValuationResult) -> Status:
        self.step, self.last = max(self.step, self.game.count - self.last), self.game.count
        if self.game.count + self.step > self.budget:
            self._converged = np.full_like(result.indices, True, dtype=bool)
            return Status.Converged
        return Status.Pending

    def completion(self) -> float:
        return min(1.0, self.game.count / self.budget)


def pydvl_values(kind: str, game: Memo, budget: int, seed: int) -> np.ndarray:
    n = game.n
    u, stop = GameUtility(game), Budget(game, budget)
    samplers = {"permutation": PermutationSampler, "antithetic": AntitheticPermutationSampler,
                "uniform": UniformSampler}
    if kind in samplers:
        valuation = ShapleyValuation(u, samplers[kind](seed=seed), stop)
    elif kind == "tmc":
        valuation = TMCShapleyValuation(u, is_done=stop, seed=seed)
    elif kind == "stratified":
        valuation = StratifiedShapleyValuation(u, stop, seed=seed)
    elif kind == "owen":  # 2 evaluations per (player, grid point): the grid is sized to the budget
        sampler = OwenSampler(GridOwenStrategy(max(1, budget // (2 * n))), n_samples_inner=1, seed=seed)
        valuation = ShapleyValuation(u, sampler, NoStopping())
    else:
        valuation = GroupTestingShapleyValuation(u, n_samples=budget - 2, epsilon=0.1, progress=False, seed=seed)
    with parallel_config(backend="threading", n_jobs=1):  # in-process: no flag process to spawn
        valuation.fit(Dataset(np.arange(n, dtype=float)[:, None], np.zeros(n)))
    return np.asarray(valuation.result.values, dtype=float)


def shapiq_values(cls: str, game: Memo, budget: int, seed: int, **kwargs: Any) -> np.ndarray:
    iv = getattr(shapiq, cls)(game.n, random_state=seed, **kwargs).approximate(budget, game)
    return np.array([iv[(i,)] for i in range(game.n)])


def peers(n: int) -> dict[str, Callable[[Memo, int, int], np.ndarray]]:
    """Name -> run(game, budget, seed) for every peer that runs at this n."""
    out: dict[str, Callable[[Memo, int, int], np.ndarray]] = {}
    for label, cls, kwargs in [
        ("shapiq.KernelSHAP", "KernelSHAP", {}),
        ("shapiq.KernelSHAP(paired)", "KernelSHAP", {"pairing_trick": True}),
        ("shapiq.UnbiasedKernelSHAP", "UnbiasedKernelSHAP", {}),
        ("shapiq.SVARM", "SVARM", {}),
        ("shapiq.PermutationSamplingSV", "PermutationSamplingSV", {}),
        ("shapiq.StratifiedSamplingSV", "StratifiedSamplingSV", {}),
        ("shapiq.OwenSamplingSV", "OwenSamplingSV", {}),
    ]:
        out[label] = lambda g, b, s, cls=cls, kw=kwargs: shapiq_values(cls, g, b, s, **kw)
    kinds = ["permutation", "antithetic", "tmc", "uniform", "stratified", "owen"]
    for kind in kinds + (["group_testing"] if n <= GROUP_TESTING_MAX_N else []):
        out[f"pydvl.{kind}"] = lambda g, b, s, kind=kind: pydvl_values(kind, g, b, s)
    return out


def run_cell(case: Case, noise: float, multiple: int, seeds: int) -> dict[str, object]:
    n, budget = case.n, multiple * case.n
    sd = noise * utility_range(case.utility, n)
    runs = peers(n)
    errors: dict[str, list[float]] = {"ours": [], **{p: [] for p in runs}}
    evals: dict[str, list[int]] = {p: [] for p in errors}
    covered = []
    for seed in range(seeds):
        for k, name in enumerate(errors):
            game = Memo(noisy(case.utility, sd, np.random.default_rng([seed, n, multiple, int(noise * 1000), k])), n)
            if name == "ours":
                res = estimate(game, n, budget, "kernel", seed=seed)
                phi = res.values
                covered.append(np.abs(phi - case.truth) <= res.halfwidth + 1e-9 * np.abs(case.truth).max())
            else:
                phi = runs[name](game, budget, seed)
            assert game.count <= budget, f"{name} spent {game.count} > {budget}"
            errors[name].append(rel_l2(phi, case.truth))
            evals[name].append(game.count)
    mean = {p: float(np.mean(e)) for p, e in errors.items()}
    best = min(runs, key=lambda p: mean[p])
    return {
        "game": case.name,
        "n": n,
        "noise": noise,
        "budget": budget,
        "budget_per_n": multiple,
        "seeds": seeds,
        "ours": mean["ours"],
        "peers": {p: mean[p] for p in runs},
        "evals": {p: float(np.mean(e)) for p, e in evals.items()},
        "best_peer": best,
        "best_peer_rel_l2": mean[best],
        "ratio": mean["ours"] / mean[best],
        "coverage": float(np.mean(covered)),
        "truth": case.truth_source,
    }


def summarize(cells: list[dict[str, Any]]) -> dict[str, object]:
    ratios = np.array([c["ratio"] for c in cells])
    worst = cells[int(np.argmax(ratios))]
    wins: dict[str, int] = {}
    for c in cells:
        wins[c["best_peer"]] = wins.get(c["best_peer"], 0) + 1
    return {
        "cells": len(cells),
        "cells_meeting_target": int(sum(c["ratio"] <= 0.5 and c["coverage"] >= 0.9 for c in cells)),
        "cells_ratio_le_0.5": int((ratios <= 0.5).sum()),
        "cells_ours_better_than_best_peer": int((ratios < 1).sum()),
        "geomean_ratio": float(np.exp(np.log(ratios).mean())),
        "worst_ratio": float(ratios.max()),
        "worst_cell": f"{worst['game']}/n={worst['n']}/noise={worst['noise']}/{worst['budget_per_n']}n",
        "coverage_mean": float(np.mean([c["coverage"] for c in cells])),
        "coverage_min_cell": float(min(c["coverage"] for c in cells)),
        "best_peer_counts": wins,
        "versions": {"shapiq": version("shapiq"), "pyDVL": version("pyDVL"), "numpy": version("numpy")},
    }


def print_table(cells: list[dict[str, Any]], summary: dict[str, object]) -> None:
    head = (
        f"{'game':<13}{'n':>4}{'noise':>7}{'B/n':>5}{'ours':>9}{'best peer':>30}{'its relL2':>11}"
        f"{'ratio':>8}{'cover':>8}"
    )
    print(head)
    print("-" * len(head))
    for c in cells:
        print(
            f"{c['game']:<13}{c['n']:>4}{c['noise']:>7.2f}{c['budget_per_n']:>5}{c['ours']:>9.4f}"
            f"{c['best_peer']:>30}{c['best_peer_rel_l2']:>11.4f}{c['ratio']:>8.3f}{c['coverage']:>8.3f}"
        )
    print("-" * len(head))
    for key, value in summary.items():
        print(f"{key}: {value:.3f}" if isinstance(value, float) else f"{key}: {value}")
    print("relL2 = ||phi_hat - phi|| / ||phi|| (mean over seeds); ratio = ours / best peer; cover = 95% coverage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small grid (< 60 s), prints only")
    parser.add_argument("--seeds", type=int, help="seeds per cell (default 5, quick 1)")
    parser.add_argument("--out", type=Path, help=f"results JSON (default {RESULTS.name} for the full run)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")  # pyDVL's deprecation and convergence chatter
    games = ["interactions", "harmful", "unanimity", "majority"]
    sizes, seeds = ([10, 16], 1) if args.quick else ([10, 16, 32, 64], 5)
    seeds = args.seeds or seeds
    start = time.time()
    cells = []
    for name in games:
        for n in sizes:
            case = case_for(name, n)
            for noise in (0.0, NOISE):
                cells.extend(run_cell(case, noise, k, seeds) for k in (8, 32))
                print(f"{name} n={n} noise={noise}: {time.time() - start:.0f} s", flush=True)
    summary = summarize(cells)
    summary["seconds"] = round(time.time() - start, 1)
    print_table(cells, summary)
    out = args.out or (None if args.quick else RESULTS)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"summary": summary, "cells": cells}, indent=1) + "\n")


if __name__ == "__main__":
    main()
