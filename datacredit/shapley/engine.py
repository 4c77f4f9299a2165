"""Run a plan against a utility, and estimate any method from a table of evaluated coalitions."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import replace

import numpy as np

from datacredit.shapley.design import Plan, make_plan
from datacredit.shapley.registry import get_method
from datacredit.shapley.result import Estimate, StopReason
from datacredit.shapley.seednoise import SeedNoise, seed_variance, sensitivity
from datacredit.shapley.stopping import StoppingRule
from datacredit.shapley.table import Observations, RowLike, Table, as_row, infer_n_players

Utility = Callable[[np.ndarray], Iterable[float]]


def table_values(
    table: Table, method: str, plan: Plan | None = None, upto: int | None = None
) -> tuple[np.ndarray, np.ndarray, int]:
    """Values, standard errors and number of coalitions used, from the first ``upto`` table rows.

    Shapley methods use the exact formula once all 2^n coalitions are present. ``permutation``
    needs its plan's chains; without them, or before the first antithetic pair is complete, it
    falls back to the kernel regression over the observed rows (same target, any design).
    ``exact`` does the same while incomplete.
    """
    obs = Observations.of(table, upto)
    values, stderr = get_method(method).fit(obs, table, plan, upto)
    return values, stderr, len(obs.values)


def seed_stderr(table: Table, method: str, noise: SeedNoise, plan: Plan | None = None,
                upto: int | None = None) -> np.ndarray:
    """Between-seed standard error of each value estimated from the first ``upto`` rows (see
    :mod:`datacredit.shapley.seednoise`)."""
    obs = Observations.of(table, upto)
    keep = table.observed.copy()
    if upto is not None:
        keep[upto:] = False
    rows = np.flatnonzero(keep)

    def values_of(means: np.ndarray) -> np.ndarray:
        moved = copy.copy(table)
        moved.total = table.total.copy()
        moved.total[rows] = means * table.count[rows]
        return table_values(moved, method, plan, upto)[0]

    return np.sqrt(seed_variance(noise, obs, sensitivity(obs, method, values_of)))


def plan_estimate(
    plan: Plan, table: Table, rule: StoppingRule, upto: int, n_evaluations: int, stop_reason: StopReason,
    noise: SeedNoise | None = None,
) -> Estimate:
    """Estimate from the first ``upto`` rows of a plan's table; ``converged`` is the rule's verdict. With
    ``noise`` (from replicated coalitions) the standard errors include the between-seed part."""
    values, stderr, used = table_values(table, plan.method, plan, upto)
    between = None
    if noise is not None:
        between = seed_stderr(table, plan.method, noise, plan, upto)
        stderr = np.sqrt(stderr**2 + between**2)
    converged = rule.met(plan.method, values, stderr, _covariance(plan, table, rule, upto))
    return Estimate(values, stderr, n_evaluations, converged, stop_reason, plan.method, used, between, noise)


def _covariance(plan: Plan, table: Table, rule: StoppingRule, upto: int) -> np.ndarray | None:
    """The values' covariance when the rule compares differences (topK) and the method gives one. Only its
    off-diagonal is read, so the between-seed parts of the variances count as independent."""
    method = get_method(plan.method)
    if rule.question != "topK" or method.covariance is None:
        return None
    return method.covariance(Observations.of(table, upto), table, plan, upto)


def estimate(
    utility: Utility,
    n_players: int,
    budget: int,
    method: str = "kernel",
    seed: int = 0,
    *,
    tolerance: float | None = None,
    atol: float | None = None,
    min_evaluations: int | None = None,
    check_every: int | None = None,
    batch_size: int | None = None,
    question: str = "interval",
    k: int | None = None,
    names: Sequence[str] | None = None,
) -> Estimate:
    """Estimate contributor values by calling ``utility`` on batches of coalitions.

    ``utility`` maps a (k, n) boolean array to k floats and may be noisy. At most ``budget`` rows
    are evaluated, in the order of :func:`~datacredit.shapley.design.make_plan` (∅ and the full set
    first). With ``tolerance`` or ``atol`` the run stops early once the largest 95% half-width is
    below ``tolerance * (max - min value)`` or ``atol``, checked after at least ``min_evaluations``
    (default 4n + 2) and then every ``check_every`` (default n) evaluations. ``question="topK"`` with ``k``
    stops instead once the k highest and k lowest values are separated from the rest at 95%, ``"sign"`` once
    every value's interval excludes zero (:class:`~datacredit.shapley.stopping.StoppingRule`). Batches never cross a
    checkpoint; ``batch_size`` (default: up to the next checkpoint) caps them further. The
    :class:`~datacredit.planner.Planner` walks the same plan and returns the same estimate. ``names`` (one per
    player) label the result: :meth:`~datacredit.shapley.result.Estimate.to_frame` and ``plot`` show them.
    """
    labels = _names(names, n_players)
    plan = make_plan(n_players, budget, method, seed)
    rule = StoppingRule(tolerance, atol, min_evaluations, check_every, question, k)
    table = Table(plan.sequence)
    end = len(plan.sequence)
    done = 0
    for stop in [*rule.checkpoints(plan), end]:
        step = batch_size or stop - done
        for start in range(done, stop, step):
            batch = plan.sequence[start : min(start + step, stop)]
            utilities = np.asarray(list(utility(batch.copy())), dtype=float)
            if utilities.shape != (len(batch),):
                raise ValueError(f"utility returned {utilities.shape[0]} values for {len(batch)} coalitions")
            for position, value in enumerate(utilities, start):
                table.add(position, value)
        done = stop
        if stop < end:
            result = plan_estimate(plan, table, rule, stop, stop, StopReason.CONVERGED)
            if result.converged:
                return replace(result, names=labels)
    return replace(plan_estimate(plan, table, rule, end, end, plan.end_reason), names=labels)


def _names(names: Sequence[str] | None, n_players: int) -> tuple[str, ...] | None:
    if names is None:
        return None
    if len(names) != n_players:
        raise ValueError(f"names: {len(names)} names for {n_players} players")
    return tuple(str(x) for x in names)


def estimate_from_table(
    rows: Iterable[RowLike],
    n_players: int | None = None,
    method: str = "kernel",
    *,
    tolerance: float | None = None,
    atol: float | None = None,
    names: Sequence[str] | None = None,
) -> Estimate:
    """Re-estimate any method from stored rows (e.g. a JSONL table), averaging repeated coalitions.

    No plan is needed: ``kernel``, ``banzhaf`` and ``permutation`` run the size-stratified
    regression over whatever rows exist (``permutation`` loses its chain structure and becomes the
    kernel regression), ``exact`` needs all 2^n rows (otherwise it also regresses), ``loo`` needs the
    n leave-one-out rows. Rows with ``"replicates"`` (utilities under replicate seeds, as
    results/utilities.jsonl stores them) add the between-seed part to the standard errors.
    ``converged`` reports whether the interval criterion holds.
    """
    get_method(method)  # unknown: ValueError naming the choices
    raw = list(rows)
    rows = [as_row(r) for r in raw]
    n = infer_n_players(rows) if n_players is None else n_players
    table = Table.from_rows(rows, n)
    values, stderr, used = table_values(table, method)
    replicated = [(not r.members, [r.utility, *d["replicates"]]) for r, d in zip(rows, raw, strict=True)
                  if isinstance(d, Mapping) and d.get("replicates")]
    noise = SeedNoise.fit(replicated)
    between = seed_stderr(table, method, noise) if noise is not None else None
    if between is not None:
        stderr = np.sqrt(stderr**2 + between**2)
    complete = used == 2**n
    reason = StopReason.ALL_COALITIONS if complete else StopReason.BUDGET
    met = StoppingRule(tolerance, atol).met(method, values, stderr)
    return Estimate(values, stderr, len(rows), met, reason, method, used, between, noise, _names(names, n))
