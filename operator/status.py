"""The bounded ValuationRun status (counts, estimate summary, top 10, conditions), as pure functions."""

from __future__ import annotations

import datetime as dt
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from datacredit.ids import display_name
from datacredit.run_status import PAYOUT_TOP_N, TOP_N, RunStatus
from datacredit.vocabulary import TERMINAL_PHASES, Phase, RunFailure

from .reconcile import Decision
from .waiting import Waiting


def now_iso() -> str:
    """The current UTC time as Kubernetes writes it."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass(frozen=True)
class StatusEstimate:
    """The planner's current estimate, by contributor."""

    names: list[str]
    values: list[float]
    stderr: list[float]
    evaluations: int
    converged: bool
    stop_reason: str

    @property
    def max_stderr(self) -> float:
        finite = [s for s in self.stderr if math.isfinite(s)]
        return max(finite) if finite else float("nan")

    def top(self, k: int = TOP_N) -> list[dict[str, Any]]:
        """The k highest values, best first (ties keep contributor order)."""
        order = np.argsort(-np.asarray(self.values), kind="stable")[:k]
        return [{"contributor": display_name(self.names[i]), "value": _num(self.values[i]),
                 "stderr": _num(self.stderr[i])} for i in order]


def _num(x: float) -> float:
    """JSON-safe float (NaN and infinities are not valid in a Kubernetes object)."""
    return round(float(x), 8) if math.isfinite(x) else 0.0


def estimate_of(compute: Callable[[], Any], names: list[str]) -> StatusEstimate | None:
    """The estimate ``compute()`` returns (a planner's), or None while it has too few evaluations."""
    try:
        est = compute()
    except (ValueError, np.linalg.LinAlgError):  # too few evaluations for this estimator yet
        return None
    return StatusEstimate(names, [float(v) for v in est.values], [float(s) for s in est.stderr],
                    int(est.n_evaluations), bool(est.converged), str(est.stop_reason))


def set_condition(conditions: list[dict[str, Any]], type_: str, status: bool, reason: str, message: str,
                  generation: int, now: str) -> list[dict[str, Any]]:
    """Conditions with `type_` set; lastTransitionTime only moves when the status flips."""
    value = "True" if status else "False"
    old = next((c for c in conditions if c.get("type") == type_), None)
    since = old["lastTransitionTime"] if old and old.get("status") == value and old.get("lastTransitionTime") else now
    new = {"type": type_, "status": value, "reason": reason, "message": message[:4000],
           "lastTransitionTime": since, "observedGeneration": generation}
    return [c for c in conditions if c.get("type") != type_] + [new]


def status_fidelity(results: dict[str, Any] | None) -> dict[str, Any] | None:
    """The bounded fidelity summary of a results document (shapley.json's ``fidelity``, from
    ``datacredit calibrate``): Pearson and Spearman with retrained utilities, calibration coalitions and whether
    Pearson reaches the threshold; None when the results carry none. Undefined correlations are left out."""
    fid = (results or {}).get("fidelity")
    if not isinstance(fid, dict):
        return None
    out: dict[str, Any] = {}
    for key in ("pearson", "spearman"):
        value = (fid.get(key) or {}).get("value")
        if value is not None and math.isfinite(float(value)):
            out[key] = round(float(value), 4)
    out["coalitions"] = max(int(fid.get("coalitions") or 0), 0)
    out["ok"] = bool(fid.get("ok"))
    return out


PAYOUT_FIELDS = ("period", "rule", "currency", "total", "paid", "escrow", "top", "error")


def payout_patch(payout: dict[str, Any]) -> dict[str, Any]:
    """``status.payout`` for a merge patch: the summary, with every field it lacks set to None (deleted), so
    nothing of an earlier payout (say, its ``top`` after a failure) is left beside it."""
    return {**{k: None for k in PAYOUT_FIELDS if k not in payout}, **payout}


def status_payout(outcome: dict[str, Any] | None) -> dict[str, Any] | None:
    """The bounded payout summary of what finishing the run paid (the results document's ``payout``, from
    ``spec.payout``): period, rule, currency, total (the pool), paid and escrow as exact decimal strings and the
    3 largest amounts; ``{"period", "error"}`` when no payout was made; None when none was asked for."""
    if not isinstance(outcome, dict):
        return None
    doc = outcome.get("document")
    if not isinstance(doc, dict):
        error = str(outcome.get("error") or "no payout document")
        return {**({"period": str(outcome["period"])} if outcome.get("period") else {}), "error": error[:4000]}
    paid = [e for e in doc.get("contributors", []) if e.get("amountMinor", 0) > 0]
    return {"period": str(doc["period"]), "rule": str(doc["rule"]), "currency": str(doc["currency"]),
            "total": str(doc["pool"]), "paid": str(doc["paid"]), "escrow": str(doc["escrow"]),
            "top": [{"contributor": display_name(str(e["name"])), "amount": str(e["amount"])}
                    for e in paid[:PAYOUT_TOP_N]]}


def build_status(plan: Decision, estimate: StatusEstimate | None, old: dict[str, Any], *, generation: int,
                 results_uri: str, contributors: int, now: str | None = None,
                 fidelity: dict[str, Any] | None = None, payout: dict[str, Any] | None = None,
                 waiting: Waiting | None = None) -> dict[str, Any]:
    """The whole status (a :class:`~datacredit.run_status.RunStatus` document) from a Decision, the estimate and
    the previous status (for transition times).
    ``waiting``: why Jobs are stuck (:func:`~.waiting.waiting_of`), shown as the `Waiting` condition.
    ``fidelity`` is :func:`status_fidelity` of the results document, once the run has one; ``payout`` is
    :func:`status_payout` of it when spec.payout asked for one (with the PaidOut condition)."""
    now = now or now_iso()
    c = plan.counts
    status: dict[str, Any] = {
        "phase": plan.phase,
        "observedGeneration": generation,
        "startTime": old.get("startTime") or now,
        "contributors": contributors,
        "progress": f"{c.succeeded}/{c.planned}",
        "coalitions": {"planned": c.planned, "succeeded": c.succeeded, "running": c.running, "queued": c.queued,
                       "failed": c.failed, "failedAttempts": c.failed_attempts},
        "results": results_uri,
    }
    if plan.phase in TERMINAL_PHASES:
        status["completionTime"] = old.get("completionTime") or now
    if estimate is not None:
        status["estimate"] = {"evaluations": estimate.evaluations, "maxStderr": _num(estimate.max_stderr),
                              "converged": estimate.converged, "stopReason": estimate.stop_reason}
        status["top"] = estimate.top()
        status["topContributor"] = status["top"][0]["contributor"] if status["top"] else ""
    if fidelity is not None:
        status["fidelity"] = fidelity
    if payout is not None:
        status["payout"] = payout

    conds = list(old.get("conditions") or [])
    if waiting is not None:
        conds = set_condition(conds, "Waiting", True, waiting.reason, waiting.message, generation, now)
    elif any(c.get("type") == "Waiting" for c in conds):
        conds = set_condition(conds, "Waiting", False, "NotWaiting", "no Job is stuck", generation, now)
    prepared = contributors > 0
    if prepared:
        conds = set_condition(conds, "Prepared", True, "PrepareSucceeded",
                              f"{contributors} contributors; sparsified model ready", generation, now)
    elif plan.reason == RunFailure.PREPARE_FAILED:
        conds = set_condition(conds, "Prepared", False, "PrepareFailed", plan.message, generation, now)
    else:
        conds = set_condition(conds, "Prepared", False, plan.phase, "the prepare Job has not finished",
                              generation, now)
    if estimate is not None:
        conds = set_condition(conds, "Converged", estimate.converged, "Converged" if estimate.converged else
                              "NotConverged", f"{estimate.stop_reason} (max stderr {estimate.max_stderr:.4g}, "
                              f"{estimate.evaluations} evaluations)", generation, now)
    if plan.phase == Phase.FAILED:
        conds = set_condition(conds, "Failed", True, plan.reason, plan.message, generation, now)
        conds = set_condition(conds, "Ready", False, plan.reason, plan.message, generation, now)
    else:
        conds = set_condition(conds, "Failed", False, "NoFailure", failed_note(plan), generation, now)
        if plan.phase == Phase.SUCCEEDED:
            conds = set_condition(conds, "Ready", True, "Succeeded",
                                  f"Shapley values of {contributors} contributors in {results_uri}", generation,
                                  now)
        else:
            conds = set_condition(conds, "Ready", False, plan.phase, f"{status['progress']} coalitions evaluated",
                                  generation, now)
    if payout is not None:
        if "error" in payout:
            conds = set_condition(conds, "PaidOut", False, "PayoutFailed", payout["error"], generation, now)
        else:
            conds = set_condition(conds, "PaidOut", True, "PayoutWritten", f"{payout['total']} "
                                  f"{payout['currency']} by {payout['rule']} in payouts/{payout['period']}.json",
                                  generation, now)
    status["conditions"] = conds
    return RunStatus.model_validate(status).to_status()  # typed: a field the CRD does not know fails here, in tests


def failed_note(plan: Decision) -> str:
    """Which coalitions failed for good (they are left out of the estimate)."""
    if not plan.failed_for_good:
        return ""
    return (f"{len(plan.failed_for_good)} coalition(s) failed for good (tolerated): "
            + "; ".join(plan.failure_messages.get(k, k) for k in plan.failed_for_good[:3]))
