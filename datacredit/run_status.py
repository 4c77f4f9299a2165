"""The ValuationRun status as a typed model: the operator builds it, and the CRD's status schema is generated
from it as the spec's is from :class:`~datacredit.spec.ValuationRunSpec`.

The status is bounded (per-coalition detail lives in storage), so every list has a maximum length.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from .vocabulary import Phase

TOP_N = 10
PAYOUT_TOP_N = 3

Count = Annotated[int, Field(ge=0, json_schema_extra={"format": "int64"})]
Int64 = Annotated[int, Field(json_schema_extra={"format": "int64"})]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="forbid")


class Condition(_Status):
    """One condition (Kubernetes' metav1.Condition shape)."""

    type: Annotated[str, Field(description="Prepared, Converged, Ready, Failed, Waiting or PaidOut.")]
    status: Literal["True", "False", "Unknown"]
    reason: str | None = None
    message: str | None = None
    last_transition_time: Timestamp | None = None
    observed_generation: Int64 | None = None


class Coalitions(_Status):
    """Coalition counts (coalitions, not Jobs)."""

    planned: Count | None = None
    succeeded: Count | None = None
    running: Count | None = None
    queued: Count | None = None
    failed: Count | None = None
    failed_attempts: Count | None = None


class EstimateSummary(_Status):
    """The planner's current estimate, in brief."""

    evaluations: Count | None = None
    max_stderr: float | None = None
    converged: bool | None = None
    stop_reason: str | None = None


class TopEntry(_Status):
    contributor: str
    value: float
    stderr: float | None = None


class Fidelity(_Status):
    """How well the run's sparsified-FT utilities track retrained ones, from `datacredit calibrate`
    (results/shapley.json has the intervals)."""

    pearson: float | None = None
    spearman: float | None = None
    coalitions: Annotated[Count | None, Field(description="Calibration coalitions retrained.")] = None
    ok: Annotated[bool | None, Field(description="Pearson reaches the threshold (0.8).")] = None


class PayoutEntry(_Status):
    contributor: str
    amount: str


class PayoutSummary(_Status):
    """The payout spec.payout asked for (payouts/<period>.json has every contributor), or why it could not be
    made (the values are kept)."""

    period: str | None = None
    rule: str | None = None
    currency: str | None = None
    total: Annotated[str | None, Field(description="The pool, exact, in currency units.")] = None
    paid: str | None = None
    escrow: Annotated[str | None, Field(description="Held until the intervals narrow (lower-bound).")] = None
    top: Annotated[list[PayoutEntry] | None, Field(max_length=PAYOUT_TOP_N,
                                                   description=f"The {PAYOUT_TOP_N} largest amounts.")] = None
    error: Annotated[str | None, Field(max_length=4000, description="Why no payout was made.")] = None


class RunStatus(_Status):
    """Written by the operator only. Per-coalition detail lives in storage, not here."""

    phase: Phase | None = None
    observed_generation: Int64 | None = None
    start_time: Timestamp | None = None
    completion_time: Timestamp | None = None
    contributors: Annotated[Count | None, Field(description="Contributors found by the prepare step.")] = None
    progress: Annotated[str | None, Field(description="succeeded/planned coalitions, e.g. 12/64.")] = None
    coalitions: Coalitions | None = None
    estimate: EstimateSummary | None = None
    top: Annotated[list[TopEntry] | None, Field(
        max_length=TOP_N, description=f"The {TOP_N} contributors with the highest values (all of them: results).")
    ] = None
    top_contributor: str | None = None
    fidelity: Fidelity | None = None
    payout: PayoutSummary | None = None
    results: Annotated[str | None, Field(description="URI of results/ (shapley.json, shapley.csv).")] = None
    conditions: list[Condition] | None = None

    def to_status(self) -> dict:
        """The status document as the API server stores it (camelCase, unset fields left out)."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")
