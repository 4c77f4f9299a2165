"""Finishing a run, the same for both executors: the final estimate, results/, results/utilities.jsonl and the
payout spec.payout asks for."""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from . import layout
from .calibration import fidelity_of
from .payout_run import pay_after_finish
from .planner import Planner
from .report_html import save_report
from .results import build_results, save_results
from .spec import ValuationRun
from .storage import Storage

#: What the values add up to, said in every result (the paper's null game).
SUM_MEANS = ("the values sum to v(full) - v(∅): what the contributors' data added to the property over the "
             "model trained on no data (its untrained initialisation; sd-lora: the base model without the LoRA)")


def finish_run(store: Storage, run: ValuationRun, planner: Planner, contributors: list[dict[str, Any]],
               rows: list[dict[str, Any]], wall_seconds: float) -> dict[str, Any]:
    """Write results/shapley.json, .csv, values.png, utilities.jsonl and report.html from the planner's final
    estimate, then the payout of ``spec.payout`` (payouts/<period>.*), if any.

    ``rows`` are the evaluated coalitions in plan order, ``{"members", "utility"[, "replicates"]}``. Returns the
    results document; with spec.payout it also holds ``payout``, :func:`~datacredit.payout_run.pay_after_finish`'s
    outcome (not saved in shapley.json). A payout that cannot be made is reported there, never raised.
    """
    n = len(contributors)
    anchors = {len(r["members"]): float(r["utility"]) for r in rows if len(r["members"]) in (0, n)}
    est = planner.estimate()
    doc = build_results(
        contributors,
        np.asarray(est.values),
        np.asarray(est.stderr),
        run_name=run.metadata.name,
        property_name=run.spec.property.name,
        method=run.spec.estimator.name,
        v_empty=anchors.get(0, float("nan")),
        v_full=anchors.get(n, float("nan")),
        evaluations=int(est.n_evaluations),
        converged=bool(est.converged),
        stop_reason=str(est.stop_reason),
        wall_seconds=wall_seconds,
        fidelity=fidelity_of(store, run),
        estimator={"budget": run.spec.estimator.budget, "seed": run.spec.estimator.seed,
                   "tolerance": run.spec.estimator.tolerance},
        config_hash=run.config_hash(),
    )
    doc["sumOfValues"] = float(np.sum(est.values))
    doc["sumMeans"] = SUM_MEANS
    doc["commonRandomNumbers"] = run.spec.method.common_random_numbers
    doc["stopRule"] = planner.rule.describe()  # the question a converged run settled
    doc["seedNoise"] = est.noise.to_dict() if est.noise is not None else None
    if est.seed_stderr is not None:
        by_name = {c["name"]: float(s) for c, s in zip(contributors, est.seed_stderr, strict=True)}
        for row in doc["contributors"]:
            row["seedStderr"] = by_name[row["name"]]
    save_results(store, doc)
    store.write_bytes(layout.UTILITIES, "".join(json.dumps(r) + "\n" for r in rows).encode())
    save_report(store, doc, rows, run.to_manifest())
    payout = pay_after_finish(store, run)
    if payout is not None:
        doc["payout"] = payout
    return doc
