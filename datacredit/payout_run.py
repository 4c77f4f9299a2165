"""Making a payout of a finished run: the one path `datacredit payout`, `spec.payout` and the operator share.

:func:`make_payout` reads results/shapley.json, apportions the pool (:mod:`datacredit.payout`), runs the
robustness checks (:mod:`datacredit.payout_checks`), builds the document and writes ``payouts/<period>.json``,
``.csv`` and ``.png`` (:mod:`datacredit.payout_report`). :func:`pay_after_finish` does it for a run whose
manifest has ``spec.payout``, right after its results are written, for both executors.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import layout
from .payout import PERIOD_PATTERN, RULES, PayoutError, carry_from, compute_payout, currency_exponent, parse_amount
from .payout_checks import contributor_names, duplicate_check, split_report
from .payout_report import PAYOUTS, document_bytes, payout_document, save_payout
from .results import load_results
from .storage import Storage, StorageError, read_json, write_json

if TYPE_CHECKING:
    from .spec import PayoutSpec, ValuationRun

log = logging.getLogger("datacredit.payout")

#: Where the period of a ``spec.payout`` without one is kept: the UTC date the run first finished, so a rerun
#: (or an operator pass repeated after a failed status update) pays the same period again, not a new one.
#: A period cannot start with '_', so no payout can have this name.
SPEC_PERIOD = f"{PAYOUTS}/_spec-period.json"
#: ``spec.payout`` runs in the executor's process (for the operator: a pod of 512 MiB at most), so its
#: near-duplicate check reads prepare/dataset.npz only when the decoded images are at most this big.
SPEC_CHECK_BYTES = 64 << 20


@dataclass(frozen=True)
class PayoutParams:
    """What to pay: the options of `datacredit payout`, or a ``spec.payout`` section."""

    pool: str
    currency: str = "USD"
    rule: str = "shapley"
    alpha: float | None = None
    floor: str = "0"
    period: str | None = None
    carry: str | None = None  # the previous payout: a JSON file, or a period in the run's payouts/
    overwrite: bool = False
    prefix: str = "--"  # how messages name a setting: "--pool" (the CLI) or "spec.payout.pool"
    max_dataset_bytes: int | None = None  # near-duplicate check: skip larger datasets (see duplicate_check)


@dataclass(frozen=True)
class Checked:
    """Validated parameters in minor units."""

    period: str
    exponent: int
    pool_minor: int
    floor_minor: int
    alpha: Fraction | None


@dataclass(frozen=True)
class PayoutRecord:
    """A payout made: the payouts/<period>.json document and the keys written."""

    doc: dict[str, Any]
    written: list[str] = field(default_factory=list)


class PayoutExists(PayoutError):
    """payouts/<period>.json is already there with other amounts or settings."""

    def __init__(self, key: str, uri: str):
        self.key = key
        super().__init__(f"{key} already exists in {uri} with other amounts or settings")


def today_utc() -> str:
    """Today's UTC date as YYYY-MM-DD: the default period."""
    return dt.datetime.now(dt.UTC).strftime("%Y-%m-%d")


def check_params(params: PayoutParams) -> Checked:
    """The parameters checked and in minor units; :class:`PayoutError` naming the setting otherwise."""
    p = params.prefix
    period = params.period or today_utc()
    if not re.match(PERIOD_PATTERN, period):
        raise PayoutError(f"{p}period {period!r}: use letters, digits, '.', '_' or '-' (at most 64), e.g. 2025-06")
    if params.rule not in RULES:
        raise PayoutError(f"unknown {p}rule {params.rule!r}; choose one of {', '.join(RULES)}")
    if params.alpha is not None and (params.rule != "blend" or not 0 <= params.alpha <= 1):
        raise PayoutError(f"{p}alpha {params.alpha} is outside [0, 1]" if params.rule == "blend" else
                          f"{p}alpha only applies to {p}rule blend")
    try:
        exponent = currency_exponent(params.currency)
    except PayoutError as e:
        raise PayoutError(f"{p}currency: {e}") from None
    pool_minor = parse_amount(params.pool, exponent, f"{p}pool")
    floor_minor = parse_amount(params.floor, exponent, f"{p}floor")
    if pool_minor <= 0:
        raise PayoutError(f"{p}pool {params.pool!r} must be positive")
    if not 0 <= floor_minor <= pool_minor:
        raise PayoutError(f"{p}floor {params.floor!r} must be between 0 and the pool")
    alpha = None if params.alpha is None else Fraction(repr(float(params.alpha)))
    return Checked(period, exponent, pool_minor, floor_minor, alpha)


def _carry(store: Storage, params: PayoutParams, period: str) -> tuple[dict[str, int], str | None]:
    """What the previous payout carried over, and where it was read from."""
    carry, p = params.carry, params.prefix
    if not carry:
        return {}, None
    carry_key = f"{PAYOUTS}/{carry}.json"
    if carry == period:
        raise PayoutError(f"{p}carry {carry!r} is the period being written")
    try:
        if Path(carry).is_file():
            doc, source = json.loads(Path(carry).read_text()), str(Path(carry))
        elif re.match(PERIOD_PATTERN, carry) and store.exists(carry_key):
            doc, source = read_json(store, carry_key), carry_key
        else:
            raise PayoutError(f"no such file, and no {carry_key} in {store.uri}")
        return carry_from(doc, params.currency), source
    except (PayoutError, ValueError, AttributeError) as e:
        raise PayoutError(f"{p}carry {carry!r}: {e}") from None


def payout_checks(store: Storage, rows: list[dict[str, Any]], max_dataset_bytes: int | None = None
                  ) -> dict[str, Any]:
    """The robustness checks of a payout: near duplicates between contributors and, for exact runs, splitting."""
    names = [r["name"] for r in rows]
    checks = {"duplicates": duplicate_check(store, names, max_bytes=max_dataset_bytes)}
    if store.exists(layout.UTILITIES) and store.exists(layout.MANIFEST):
        order = contributor_names(store, names)[0]
        images = {r["name"]: int(r.get("images", 0)) for r in rows}
        utilities = [json.loads(line) for line in store.read_bytes(layout.UTILITIES).decode().splitlines() if line]
        checks["split"] = split_report(utilities, order, [images.get(n, 0) for n in order])
    else:
        checks["split"] = {"status": "skipped", "note": "needs results/utilities.jsonl and manifest.json"}
    return checks


def build_payout(store: Storage, params: PayoutParams) -> dict[str, Any]:
    """The payouts/<period>.json document of a finished run in ``store``, written nowhere yet.

    Raises :class:`PayoutError` for what the parameters or the results do not allow (no results, nothing
    to pay on, a bad carry file) and :class:`~datacredit.storage.StorageError` when the run cannot be read.
    """
    checked = check_params(params)
    try:
        results = load_results(store)
    except FileNotFoundError:
        raise PayoutError(f"no results/shapley.json in {store.uri}: is the run finished? (`datacredit run` "
                          "resumes it)") from None
    carry_in, carry_source = _carry(store, params, checked.period)
    rows = results.get("contributors", [])
    result = compute_payout(rows, pool_minor=checked.pool_minor, rule=params.rule, exponent=checked.exponent,
                            floor_minor=checked.floor_minor, alpha=checked.alpha, carry_in=carry_in)
    config_hash = next((read_json(store, key).get("configHash") for key in (layout.RUN, layout.MANIFEST)
                        if store.exists(key)), None)
    return payout_document(results, result, period=checked.period, currency=params.currency,
                           exponent=checked.exponent, run_uri=store.uri, config_hash=config_hash,
                           alpha_given=params.alpha is not None, carry_source=carry_source,
                           checks=payout_checks(store, rows, params.max_dataset_bytes))


def make_payout(store: Storage, params: PayoutParams) -> PayoutRecord:
    """Build the payout of a finished run and write payouts/<period>.json, .csv and .png into it.

    The same payout again rewrites the same record; a different one for an existing period raises
    :class:`PayoutExists` unless ``params.overwrite``.
    """
    doc = build_payout(store, params)
    key = f"{PAYOUTS}/{doc['period']}.json"
    if not params.overwrite and store.exists(key) and store.read_bytes(key) != document_bytes(doc):
        raise PayoutExists(key, store.uri)
    return PayoutRecord(doc, save_payout(store, doc))


def params_from_spec(spec: PayoutSpec, period: str) -> PayoutParams:
    """The parameters of a ``spec.payout`` section (already validated by the spec model)."""
    return PayoutParams(pool=spec.pool, currency=spec.currency, rule=spec.rule, alpha=spec.alpha,
                        floor=spec.floor, period=period, prefix="spec.payout.",
                        max_dataset_bytes=SPEC_CHECK_BYTES)


def spec_period(store: Storage, today: str | None = None) -> str:
    """The period of a ``spec.payout`` that names none: the UTC date the run first finished, kept in
    :data:`SPEC_PERIOD` (the first writer wins)."""
    if not store.exists(SPEC_PERIOD):
        write_json(store, SPEC_PERIOD, {"period": today or today_utc(),
                                        "means": "the period of spec.payout when it names none: the UTC date "
                                                 "the run first finished"}, if_absent=True)
    return str(read_json(store, SPEC_PERIOD)["period"])


def pay_after_finish(store: Storage, run: ValuationRun, today: str | None = None) -> dict[str, Any] | None:
    """The payout ``run.spec.payout`` asks for, made right after the results were written; None without one.

    Returns ``{"document": doc, "written": keys}``, or ``{"error": message, "period": period}`` when it cannot
    be made: a payout problem never fails the run, its values stay. Storage errors are raised (an outage: the
    caller retries, and the same payout is written again).
    """
    spec = run.spec.payout
    if spec is None:
        return None
    period = spec.period
    try:
        period = period or spec_period(store, today)
        record = make_payout(store, params_from_spec(spec, period))
    except StorageError:
        raise
    except PayoutExists as e:
        message = f"{e}: set spec.payout.period to a new period to pay again"
        return {"error": message, "period": period}
    except Exception as e:  # noqa: BLE001 - a payout bug or refusal must not fail a finished valuation
        if not isinstance(e, PayoutError):
            log.exception("payout of %s failed", store.uri)
        return {"error": str(e) if isinstance(e, PayoutError) else f"{type(e).__name__}: {e}", "period": period}
    return {"document": record.doc, "written": record.written}
