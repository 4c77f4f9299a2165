"""Stop when the question is settled: coalitions needed to identify the top and bottom 20% of contributors with
`estimator.stop: topK` (k = 20% of n), against running the whole budget, side by side on the same games.

Games: additive values plus random pairwise synergies, evaluated with Gaussian noise; the exact Shapley values
are known in closed form, so "correct" means the estimated top-k and bottom-k sets equal the true ones.

    python benchmarks/stopping.py                      # n = 10 and 20, 20 games each, budget 32n
    python benchmarks/stopping.py --out benchmarks/results/stopping.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import numpy as np

from datacredit.shapley import estimate


def game(n: int, noise: float, seed: int, synergy: float = 0.5) -> tuple[np.ndarray, Any]:
    """Exact Shapley values and a noisy utility of an additive-plus-pairwise game (pair synergies of sd
    `synergy`; 0: additive)."""
    rng = np.random.default_rng(seed)
    weights = rng.normal(0, 3.0, n)
    pairs = np.triu(rng.normal(0, 1.0, (n, n)), 1) * synergy
    phi = weights + 0.5 * (pairs.sum(0) + pairs.sum(1))
    noise_rng = np.random.default_rng(seed + 10_000)

    def utility(coalitions: np.ndarray) -> list[float]:
        z = coalitions.astype(float)
        return [float(row @ weights + row @ pairs @ row + noise_rng.normal(0, noise)) for row in z]

    return phi, utility


def ends_right(values: np.ndarray, phi: np.ndarray, k: int) -> bool:
    """Whether the k best and k worst by `values` are the true k best and k worst."""
    est, truth = np.argsort(-values), np.argsort(-phi)
    return set(est[:k]) == set(truth[:k]) and set(est[-k:]) == set(truth[-k:])


def cell(n: int, games: int, noise: float, budget_per_player: int, synergy: float) -> dict[str, Any]:
    """Coalitions used and correctness, stopping on topK against the whole budget, over `games` games."""
    k, budget = max(1, n // 5), budget_per_player * n
    rows = []
    for g in range(games):
        phi, _ = game(n, noise, g, synergy)
        whole = estimate(game(n, noise, g, synergy)[1], n, budget, "kernel", seed=g)
        stop = estimate(game(n, noise, g, synergy)[1], n, budget, "kernel", seed=g, question="topK", k=k)
        rows.append({"game": g, "wholeCoalitions": whole.n_evaluations, "stopCoalitions": stop.n_evaluations,
                     "wholeRight": ends_right(whole.values, phi, k), "stopRight": ends_right(stop.values, phi, k),
                     "stopped": bool(stop.converged)})
    used_whole = statistics.median(r["wholeCoalitions"] for r in rows)
    used_stop = statistics.median(r["stopCoalitions"] for r in rows)
    return {
        "n": n, "k": k, "budget": budget, "noise": noise, "synergy": synergy, "games": games,
        "medianCoalitionsWhole": used_whole, "medianCoalitionsStop": used_stop,
        "ratio": round(used_whole / used_stop, 2),
        "correctWhole": sum(r["wholeRight"] for r in rows) / games,
        "correctStop": sum(r["stopRight"] for r in rows) / games,
        "stoppedEarly": sum(r["stopped"] for r in rows) / games,
        "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[10, 20])
    ap.add_argument("--games", type=int, default=20)
    ap.add_argument("--noise", type=float, default=0.5, help="sd of the evaluation noise")
    ap.add_argument("--budget-per-player", type=int, default=32)
    ap.add_argument("--synergies", type=float, nargs="+", default=[0.0, 0.5],
                    help="sd of the pairwise synergies (0: additive game)")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    cells = []
    for synergy in args.synergies:
        for n in args.sizes:
            c = cell(n, args.games, args.noise, args.budget_per_player, synergy)
            cells.append(c)
            print(f"synergy {synergy:g} n={n:>3} k={c['k']} budget {c['budget']}: whole budget "
                  f"{c['medianCoalitionsWhole']:.0f} coalitions "
                  f"({c['correctWhole']:.0%} right), stop at topK {c['medianCoalitionsStop']:.0f} "
                  f"({c['correctStop']:.0%} right, {c['stoppedEarly']:.0%} stopped early): {c['ratio']:.2f}x fewer",
                  flush=True)
    ok = all(c["ratio"] >= 3 and c["correctStop"] >= c["correctWhole"] - 0.05 - 1e-9 for c in cells)  # 5 points: ok
    print("target (>= 3x fewer coalitions, correctness within 5 points of the whole budget):",
          "met" if ok else "NOT met")
    if args.out:
        args.out.write_text(json.dumps({"benchmark": "stopping", "cells": cells, "targetMet": ok}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
