"""When to stop evaluating: interval width relative to the spread of the values, or absolute."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datacredit.shapley.design import Plan
from datacredit.shapley.result import Z95

#: Methods whose plan has no stopping checkpoints (their design is all-or-nothing).
FIXED_DESIGN_METHODS = ("exact", "loo")


@dataclass(frozen=True)
class StoppingRule:
    """Converged when the largest 95% half-width is below ``tolerance * (max - min of values)`` or
    below ``atol``, checked at plan unit boundaries at least ``min_evaluations`` (default 4n + 2)
    into the sequence and at least ``check_every`` (default n) evaluations apart.
    """

    tolerance: float | None = None
    atol: float | None = None
    min_evaluations: int | None = None
    check_every: int | None = None

    def __post_init__(self) -> None:
        for name in ("tolerance", "atol"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.check_every is not None and self.check_every < 1:
            raise ValueError("check_every must be >= 1")

    def applies(self, method: str) -> bool:
        """Whether a tolerance is set and ``method`` can stop early."""
        return (self.tolerance is not None or self.atol is not None) and method not in FIXED_DESIGN_METHODS

    def checkpoints(self, plan: Plan) -> list[int]:
        """Sequence positions at which the rule is evaluated (none if it does not apply)."""
        if not self.applies(plan.method):
            return []
        n = plan.n_players
        first = self.min_evaluations if self.min_evaluations is not None else 4 * n + 2
        return plan.checkpoints(first, self.check_every or n)

    def met(self, method: str, values: np.ndarray, stderr: np.ndarray) -> bool:
        """Whether the interval criterion holds for these values of ``method``."""
        if not self.applies(method) or not (np.all(np.isfinite(stderr)) and np.all(np.isfinite(values))):
            return False
        half = Z95 * float(stderr.max())
        spread = float(values.max() - values.min())
        return (self.tolerance is not None and half < self.tolerance * spread) or (
            self.atol is not None and half < self.atol
        )
