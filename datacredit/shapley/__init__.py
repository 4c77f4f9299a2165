"""Shapley (and Banzhaf, leave-one-out) values of data contributors from noisy utility evaluations.

``estimate(utility, n_players, budget, method="kernel", seed=0)`` runs a deterministic plan of
coalitions against a batched utility; ``estimate_from_table(rows, n_players, method)`` re-estimates
from stored rows. Methods: ``exact`` (all 2^n coalitions), ``kernel`` (paired, size-stratified,
regression-adjusted KernelSHAP; the default), ``permutation`` (antithetic), ``banzhaf`` (MSR design)
and ``loo``; :func:`register_method` adds more (:mod:`datacredit.shapley.registry`). The asynchronous ask/tell
interface over the same plans is :class:`datacredit.planner.Planner`.
"""

from datacredit.shapley import builtin  # noqa: F401 - registers the built-in methods
from datacredit.shapley.design import Plan, make_plan
from datacredit.shapley.engine import estimate, estimate_from_table
from datacredit.shapley.registry import Method, get_method, method_names, register_method
from datacredit.shapley.result import Estimate, StopReason
from datacredit.shapley.table import Row, read_jsonl, write_jsonl

__all__ = [
    "Estimate",
    "Method",
    "Plan",
    "Row",
    "StopReason",
    "estimate",
    "estimate_from_table",
    "get_method",
    "make_plan",
    "method_names",
    "read_jsonl",
    "register_method",
    "write_jsonl",
]
