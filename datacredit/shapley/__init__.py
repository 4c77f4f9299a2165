"""Shapley (and Banzhaf, leave-one-out) values of data contributors from noisy utility evaluations.

``estimate(utility, n_players, budget, method="kernel", seed=0)`` runs a deterministic plan of
coalitions against a batched utility; ``estimate_from_table(rows, n_players, method)`` re-estimates
from stored rows. Methods: ``exact`` (all 2^n coalitions), ``kernel`` (paired, size-stratified,
regression-adjusted KernelSHAP; the default), ``permutation`` (antithetic), ``banzhaf`` (MSR design)
and ``loo``. The asynchronous ask/tell interface over the same plans is
:class:`datacredit.planner.Planner`.
"""

from datacredit.shapley.design import METHODS, Plan, make_plan
from datacredit.shapley.engine import estimate, estimate_from_table
from datacredit.shapley.result import Estimate, StopReason
from datacredit.shapley.table import Row, read_jsonl, write_jsonl

__all__ = [
    "METHODS",
    "Estimate",
    "Plan",
    "Row",
    "StopReason",
    "estimate",
    "estimate_from_table",
    "make_plan",
    "read_jsonl",
    "write_jsonl",
]
