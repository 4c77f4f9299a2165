"""When to stop evaluating: interval width relative to the spread of the values, or absolute."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from datacredit.shapley.design import Plan
from datacredit.shapley.registry import get_method
from datacredit.shapley.result import Z95

#: What a run can stop on: every value to a tolerance, who the k best and k worst are, or every value's sign.
QUESTIONS = ("interval", "topK", "sign")


@dataclass(frozen=True)
class StoppingRule:
    """When a run may stop, checked at plan unit boundaries at least ``min_evaluations`` (default 4n + 2)
    into the sequence and at least ``check_every`` (default n) evaluations apart. ``question``:

    * ``interval``: the largest 95% half-width is below ``tolerance * (max - min of values)`` or ``atol``;
    * ``topK``: the ``k`` highest and the ``k`` lowest values are known: each of the top k exceeds each other
      contributor by more than the 95% half-width of their difference, and each of the bottom k falls short of
      everyone else the same way (the ranking at both ends, in the spirit of SHAP@k). The difference's standard
      error is √(c_aa + c_bb - 2 c_ab) from the values' covariance where the method gives one (``kernel``: its
      errors are correlated, mostly positively), else √(se_a² + se_b²), treating the two as independent;
    * ``sign``: every value's 95% interval excludes zero.
    """

    tolerance: float | None = None
    atol: float | None = None
    min_evaluations: int | None = None
    check_every: int | None = None
    question: str = "interval"
    k: int | None = None

    def __post_init__(self) -> None:
        for name in ("tolerance", "atol"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be > 0, got {value}")
        if self.check_every is not None and self.check_every < 1:
            raise ValueError("check_every must be >= 1")
        if self.question not in QUESTIONS:
            raise ValueError(f"question must be one of {', '.join(QUESTIONS)}, got {self.question!r}")
        if self.question == "topK" and (self.k is None or self.k < 1):
            raise ValueError(f"question topK needs k >= 1, got {self.k}")

    def describe(self) -> str:
        """The question in words, for results and status."""
        if self.question == "topK":
            return f"top {self.k} and bottom {self.k} known at 95%"
        if self.question == "sign":
            return "every value's sign known at 95%"
        limits = [f"tolerance {self.tolerance:g}" if self.tolerance is not None else "",
                  f"atol {self.atol:g}" if self.atol is not None else ""]
        return "95% intervals within " + " or ".join(x for x in limits if x) if any(limits) else "the whole budget"

    def applies(self, method: str) -> bool:
        """Whether the rule can stop ``method`` early (a question or tolerance, and a design that can stop)."""
        asked = self.question != "interval" or self.tolerance is not None or self.atol is not None
        return asked and get_method(method).stops_early

    def checkpoints(self, plan: Plan) -> list[int]:
        """Sequence positions at which the rule is evaluated (none if it does not apply)."""
        if not self.applies(plan.method):
            return []
        n = plan.n_players
        first = self.min_evaluations if self.min_evaluations is not None else 4 * n + 2
        return plan.checkpoints(first, self.check_every or n)

    def met(self, method: str, values: np.ndarray, stderr: np.ndarray, cov: np.ndarray | None = None) -> bool:
        """Whether the rule's question is settled for these values of ``method``; ``cov`` (n, n), the values'
        covariance if known: ``topK`` reads its off-diagonal (the variances are ``stderr**2``) to compare
        differences; without it the values count as independent."""
        if not self.applies(method) or not (np.all(np.isfinite(stderr)) and np.all(np.isfinite(values))):
            return False
        if cov is not None and not np.all(np.isfinite(cov)):
            return False
        low, high = values - Z95 * stderr, values + Z95 * stderr
        if self.question == "sign":
            return bool(np.all((low > 0) | (high < 0)))
        if self.question == "topK":
            k = int(self.k or 0)
            if 2 * k > len(values):
                raise ValueError(f"topK k={k} needs at least {2 * k} contributors, got {len(values)}")
            order = np.argsort(-values, kind="stable")
            return (_above(values, stderr, cov, order[:k], order[k:])
                    and _above(values, stderr, cov, order[:-k], order[-k:]))
        half = Z95 * float(stderr.max())
        spread = float(values.max() - values.min())
        return (self.tolerance is not None and half < self.tolerance * spread) or (
            self.atol is not None and half < self.atol
        )


def _above(values: np.ndarray, stderr: np.ndarray, cov: np.ndarray | None, upper: np.ndarray, lower: np.ndarray
           ) -> bool:
    """Whether every contributor in `upper` beats every one in `lower` at 95% (one-sided per pair)."""
    diff = values[upper][:, None] - values[lower][None, :]
    var = stderr[upper][:, None] ** 2 + stderr[lower][None, :] ** 2
    if cov is not None:
        var = var - 2 * cov[np.ix_(upper, lower)]
    return bool(np.all(diff > Z95 * np.sqrt(np.maximum(var, 0.0))))
