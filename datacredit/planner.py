"""Ask/tell planner over a deterministic plan, for executors that evaluate coalitions asynchronously.

The plan (see :func:`datacredit.shapley.make_plan`) is an ordered sequence of distinct coalitions
fixed by (n_players, budget, method, seed), with ∅ and the full set first. Executors ``ask`` for
the next coalitions in order and ``tell`` results in any order; a stateless executor rebuilds the
planner from its stored results with :meth:`Planner.from_table` and carries on. The stopping rule is
only evaluated at fixed checkpoints of the sequence, on exactly the rows before the checkpoint, so
the final estimate is the same whatever the batch sizes, timing or order of results, and equal to
:func:`datacredit.shapley.estimate` with the same arguments. The price: ``ask`` hands out nothing
past a checkpoint until every coalition before it has been told.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from datacredit.shapley.design import make_plan
from datacredit.shapley.engine import plan_estimate
from datacredit.shapley.result import Estimate, StopReason
from datacredit.shapley.seednoise import SeedNoise, replicate_positions
from datacredit.shapley.stopping import StoppingRule
from datacredit.shapley.table import RowLike, Table, as_mask, as_row

__all__ = ["Estimate", "Planner", "StopReason"]


class Planner:
    """Hand out the coalitions of a plan, collect their utilities, estimate at any time.

    ``tolerance``/``atol``/``min_evaluations``/``check_every``/``question``/``k`` are the stopping rule of
    :func:`datacredit.shapley.estimate` (:class:`~datacredit.shapley.stopping.StoppingRule`); without a
    tolerance, atol or question the whole plan is used.
    ``replicate_coalitions``: how many coalitions besides ∅ (from before the first checkpoint, spread
    over sizes) executors also evaluate under other seeds (:attr:`replicated`); their utilities, told
    with :meth:`tell`, add the between-seed part to the standard errors.
    """

    def __init__(
        self,
        n_players: int,
        budget: int,
        method: str = "kernel",
        seed: int = 0,
        *,
        tolerance: float | None = None,
        atol: float | None = None,
        min_evaluations: int | None = None,
        check_every: int | None = None,
        replicate_coalitions: int = 0,
        question: str = "interval",
        k: int | None = None,
    ):
        self.plan = make_plan(n_players, budget, method, seed)
        self.rule = StoppingRule(tolerance, atol, min_evaluations, check_every, question, k)
        if question == "topK" and k is not None and 2 * k > n_players:
            raise ValueError(f"estimator.topK={k} asks for the {k} best and {k} worst of {n_players} contributors; "
                             f"use at most {n_players // 2}")
        self._table = Table(self.plan.sequence)
        horizon = self.rule.checkpoints(self.plan)[:1] or [4 * n_players + 2]
        self._replicated = replicate_positions(self.plan.sequence, replicate_coalitions, horizon[0])
        self._replicates: dict[int, list[float]] = {}  # position -> utilities under replicate seeds 1, 2, ...
        self._asked = np.zeros(len(self.plan.sequence), dtype=bool)
        self._skipped = np.zeros(len(self.plan.sequence), dtype=bool)
        self._checkpoints = self.rule.checkpoints(self.plan)
        self._stopped: Estimate | None = None  # set once a checkpoint meets the rule

    @classmethod
    def from_table(
        cls, rows: Iterable[RowLike], *, pending: Iterable[Sequence[int] | np.ndarray] = (), **kwargs: Any
    ) -> Planner:
        """Rebuild a planner from stored ``(coalition, utility)`` rows or ``{"members", "utility"}`` dicts.

        ``kwargs`` are the constructor's arguments; ``pending`` lists coalitions handed out whose
        results are not stored yet, so ``ask`` does not hand them out again.
        """
        planner = cls(**kwargs)
        for row in map(as_row, rows):
            planner.tell(list(row.members), row.utility)
        for coalition in pending:
            planner._asked[planner._position(coalition)] = True
        return planner

    def fork(self) -> Planner:
        """An independent copy that shares the (immutable) plan: what it is told, asked or skipped stays in it.

        Cheap next to a rebuild with :meth:`from_table`, which re-tells every row and re-evaluates every
        checkpoint; the operator keeps one planner per run and walks a fork of it in each reconcile pass.
        """
        twin = copy.copy(self)
        twin._table = self._table.copy()
        twin._replicates = {k: list(v) for k, v in self._replicates.items()}
        twin._asked, twin._skipped = self._asked.copy(), self._skipped.copy()
        twin._checkpoints = list(self._checkpoints)
        return twin

    @property
    def n_players(self) -> int:
        return self.plan.n_players

    @property
    def method(self) -> str:
        return self.plan.method

    @property
    def sequence(self) -> np.ndarray:
        """The whole planned sequence, (m, n) bool, m <= budget."""
        return self.plan.sequence

    @property
    def n_told(self) -> int:
        """Number of utilities told, repeats included."""
        return int(self._table.count.sum())

    @property
    def replicated(self) -> np.ndarray:
        """The coalitions to evaluate under replicate seeds too, (k, n) bool."""
        return self.plan.sequence[self._replicated]

    def noise(self, upto: int | None = None) -> SeedNoise | None:
        """Between-seed variance components from the replicates told (of plan rows before ``upto``)."""
        groups = []
        for position, extra in self._replicates.items():
            if (upto is None or position < upto) and self._table.count[position] and extra:
                groups.append((not self.plan.sequence[position].any(), [self._table.mean[position], *extra]))
        return SeedNoise.fit(groups)

    @property
    def skipped(self) -> np.ndarray:
        """Coalitions given up on with :meth:`skip` and not told since, in plan order, (k, n) bool."""
        return self.plan.sequence[self._skipped & ~self._table.observed]

    @property
    def pending(self) -> np.ndarray:
        """Coalitions asked for but neither told nor skipped yet, (k, n) bool."""
        return self.plan.sequence[self._asked & ~self._resolved]

    @property
    def done(self) -> bool:
        """Converged, or the sequence is exhausted and every asked coalition was told (or skipped)."""
        self._resolve()
        return self._stopped is not None or bool(self._resolved.all())

    @property
    def _resolved(self) -> np.ndarray:
        return self._table.observed | self._skipped

    def ask(self, k: int = 1) -> np.ndarray:
        """Up to ``k`` next coalitions not yet asked, (j, n) bool with 0 <= j <= k.

        Empty when the planner is done, or when the next coalition lies past a checkpoint whose
        earlier coalitions are not all told (or skipped) yet: tell those, then ask again.
        """
        self._resolve()
        if self._stopped is not None:
            return np.zeros((0, self.n_players), dtype=bool)
        limit = self._checkpoints[0] if self._checkpoints else len(self.plan.sequence)
        free = np.flatnonzero(~self._asked[:limit])[: max(k, 0)]
        self._asked[free] = True
        return self.plan.sequence[free]

    def tell(self, coalition: Sequence[int] | np.ndarray, utility: float, replicates: Sequence[float] = ()) -> None:
        """Record the utility of a planned coalition (bool mask or member indices), and its utilities under
        replicate seeds if it was evaluated under them.

        Repeated results for one coalition are averaged. Raises ``KeyError`` for a coalition that is
        not in the plan. A repeat arriving after its checkpoint was evaluated does not reopen it.
        """
        position = self._position(coalition)
        self._table.add(position, utility)
        self._asked[position] = True
        if len(replicates):
            self._replicates[position] = [float(u) for u in replicates]

    def skip(self, coalition: Sequence[int] | np.ndarray) -> None:
        """Give up on a planned coalition (its evaluation failed for good).

        Checkpoints and :attr:`done` stop waiting for it and estimates go on without it; a result
        told for it later still counts. Skips are not part of the deterministic plan: executors that
        skip different coalitions can stop at different checkpoints.
        """
        position = self._position(coalition)
        self._skipped[position] = True
        self._asked[position] = True

    def tell_many(self, coalitions: np.ndarray | Iterable[Sequence[int]], utilities: Iterable[float]) -> None:
        """:meth:`tell` for a batch."""
        for coalition, utility in zip(list(coalitions), list(utilities), strict=True):
            self.tell(coalition, utility)

    def estimate(self) -> Estimate:
        """The current estimate; final (with its stop reason) once :attr:`done`.

        Needs the utilities of ∅ and the full set (``ValueError`` otherwise). Interim estimates use
        every coalition told so far; a converged planner reports the estimate at its checkpoint.
        """
        self._resolve()
        if self._stopped is not None:
            return self._stopped
        reason = self.plan.end_reason if self._resolved.all() else StopReason.RUNNING
        return plan_estimate(self.plan, self._table, self.rule, len(self.plan.sequence), self.n_told, reason,
                             self.noise())

    def _position(self, coalition: Sequence[int] | np.ndarray) -> int:
        return self._table.position(as_mask(coalition, self.n_players))

    def _resolve(self) -> None:
        """Evaluate the stopping rule at every checkpoint whose prefix is fully told, in order."""
        while self._stopped is None and self._checkpoints:
            checkpoint = self._checkpoints[0]
            if not self._resolved[:checkpoint].all():
                return
            result = plan_estimate(self.plan, self._table, self.rule, checkpoint, checkpoint, StopReason.CONVERGED,
                                   self.noise(checkpoint))
            if result.converged:
                self._stopped = result
            else:
                self._checkpoints.pop(0)
