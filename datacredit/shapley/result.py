"""Result type shared by :func:`datacredit.shapley.estimate` and the planner."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from datacredit.shapley.seednoise import SeedNoise

#: z-value of a two-sided 95% interval; ``values ± Z95 * stderr`` is the reported interval.
Z95 = 1.959963984540054


class StopReason(StrEnum):
    """Why an estimate is final (or that it is not)."""

    CONVERGED = "converged"  # interval criterion met at a checkpoint before the plan ran out
    BUDGET = "budget"  # the planned sequence, sized to the budget, is fully evaluated
    ALL_COALITIONS = "all_coalitions"  # every one of the 2^n coalitions was evaluated
    DESIGN_COMPLETE = "design_complete"  # the method's design finished below the budget (loo)
    RUNNING = "running"  # interim estimate: the plan is not finished


@dataclass(frozen=True)
class Estimate:
    """Per-contributor values with uncertainty.

    ``stderr`` is scaled so that ``values ± 1.96 * stderr`` is the method's 95% interval (a Student-t
    interval on few design units is wider than the normal one; the scaling folds that in); it is inf
    while the design has fewer units than parameters. Utility noise is part of the standard errors
    of the sampling methods; ``kernel`` also adds the noise of v(∅) and v(N), which every value
    shares. ``exact`` and ``loo`` see noise only through coalitions evaluated more than once or replicated
    under other seeds. When coalitions were replicated, ``stderr`` also holds the between-seed part
    (``seed_stderr``, see :mod:`datacredit.shapley.seednoise`). ``n_coalitions`` counts the distinct
    coalitions used.
    """

    values: np.ndarray
    stderr: np.ndarray
    n_evaluations: int
    converged: bool
    stop_reason: StopReason
    method: str
    n_coalitions: int
    seed_stderr: np.ndarray | None = None  # the between-seed part of ``stderr`` (None: not measured)
    noise: SeedNoise | None = None  # the variance components it came from
    names: tuple[str, ...] | None = None  # contributor names, when the caller gave them

    @property
    def halfwidth(self) -> np.ndarray:
        """Half-width of the 95% interval of each value."""
        return Z95 * self.stderr

    @property
    def labels(self) -> tuple[str, ...]:
        """The contributor names, or ``player 0``, ``player 1``, ... without them."""
        return self.names or tuple(f"player {i}" for i in range(len(self.values)))

    def to_frame(self) -> Any:
        """A pandas DataFrame indexed by contributor: ``value``, ``stderr`` and the 95% interval ``low``/``high``,
        best first (needs pandas)."""
        try:
            import pandas as pd
        except ImportError:
            raise ImportError("Estimate.to_frame() needs pandas: pip install pandas") from None
        frame = pd.DataFrame({"value": self.values, "stderr": self.stderr, "low": self.values - self.halfwidth,
                              "high": self.values + self.halfwidth}, index=pd.Index(self.labels, name="contributor"))
        return frame.sort_values("value", ascending=False, kind="stable")

    def plot(self, ax: Any = None, title: str = "") -> Any:
        """A horizontal bar chart of the values, best on top, with 95% intervals; returns the matplotlib Axes
        (a new figure unless ``ax`` is given; needs matplotlib)."""
        try:
            import matplotlib.pyplot as plt
        except ImportError:
            raise ImportError("Estimate.plot() needs matplotlib: pip install matplotlib") from None
        order = np.argsort(self.values, kind="stable")  # barh draws the first at the bottom
        if ax is None:
            _, ax = plt.subplots(figsize=(6, 0.6 + 0.35 * len(order)), layout="constrained")
        values = self.values[order]
        ax.barh([self.labels[i] for i in order], values, xerr=np.where(np.isfinite(self.halfwidth[order]),
                self.halfwidth[order], 0.0), color=np.where(values >= 0, "tab:blue", "tab:red"), capsize=3)
        ax.axvline(0, color="black", linewidth=0.8)
        ax.set_xlabel(f"{self.method} value (95% interval)")
        if title:
            ax.set_title(title)
        return ax

    def to_dict(self) -> dict[str, object]:
        """JSON-serialisable form."""
        return {
            "method": self.method,
            "values": _finite_or_none(self.values),
            "stderr": _finite_or_none(self.stderr),
            "n_evaluations": self.n_evaluations,
            "n_coalitions": self.n_coalitions,
            "converged": self.converged,
            "stop_reason": str(self.stop_reason),
            "seed_stderr": None if self.seed_stderr is None else _finite_or_none(self.seed_stderr),
            "noise": None if self.noise is None else self.noise.to_dict(),
        }


def _finite_or_none(array: np.ndarray) -> list[float | None]:
    """List form with NaN/inf as None, so the result is valid JSON."""
    return [float(x) if np.isfinite(x) else None for x in array]
