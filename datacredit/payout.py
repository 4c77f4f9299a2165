"""Paying contributors from a finished run: rules, exact rounding, minimum payouts and carry-over.

Everything here is exact: amounts are integers in the currency's minor unit (cents), weights are
:class:`fractions.Fraction` (a float from shapley.json becomes the decimal it prints as, ``Fraction(repr(x))``),
and the pool is split by largest remainder (Hamilton), so the amounts always add up to the pool exactly.

Rules (``v⁺ = max(v, 0)``; negative values are clipped to zero and reported, never charged):

- ``shapley``: share of ``v⁺``.
- ``pro-rata``: share of the image count (what payers do today).
- ``blend``: ``α · image share + (1 − α) · value share``. Unless given, ``α = clip(median(h) / median(|v|), 0, 1)``
  with ``h`` the half-width of each 95% interval, rounded to 4 decimals: the typical interval's width relative to
  the typical value. Exact values (± 0) give ``α = 0`` (pure Shapley); intervals as wide as the values give
  ``α = 1`` (pure pro-rata).
- ``lower-bound``: pay ``max(ci95_low, 0)`` over ``Σ v⁺``; what the point values would have paid on top of that
  (``v⁺ − max(ci95_low, 0)`` per contributor) is held in escrow until the intervals narrow.

Floor: a recipient whose amount (its share plus what was carried in) is below the floor gets nothing this period;
its amount is carried over to the next one. Recipients are dropped one at a time, smallest amount first, and the
pool is re-apportioned over everyone left (recipients and escrow) in proportion to their weights, so the dropped
share is redistributed. Amounts carried in are paid first out of the next period's pool.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Hashable, Mapping, Sequence
from fractions import Fraction
from typing import Any, TypeVar

RULES = ("shapley", "blend", "lower-bound", "pro-rata")
PERIOD_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"  # a payout's name: one storage key segment, payouts/<period>.*
#: ISO 4217 minor-unit exponents that differ from 2 (the default).
EXPONENTS = {"JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "PYG": 0, "UGX": 0, "XAF": 0, "XOF": 0,
             "BHD": 3, "IQD": 3, "JOD": 3, "KWD": 3, "LYD": 3, "OMR": 3, "TND": 3}
PAY, ESCROW = 0, 1  # the two parts of a contributor's weight
ROUNDING = ("largest remainder (Hamilton): each key gets the floor of its exact quota of the pool in minor units, "
            "the units left go to the largest remainders, ties to the name that sorts first")

K = TypeVar("K", bound=Hashable)


class PayoutError(ValueError):
    """A payout cannot be computed as asked; the message says why."""


def currency_exponent(code: str) -> int:
    """Decimals of the currency's minor unit: 2 unless listed in :data:`EXPONENTS` (JPY 0, KWD 3, ...)."""
    if not code.isalpha() or len(code) != 3:
        raise PayoutError(f"currency {code!r}: expected a 3-letter ISO 4217 code such as USD, EUR or JPY")
    return EXPONENTS.get(code.upper(), 2)


def parse_amount(text: str, exponent: int, what: str = "amount") -> int:
    """A decimal amount such as ``10000.01`` as integer minor units; refuses more decimals than the currency has."""
    try:
        amount = Fraction(text.strip())
    except (ValueError, ZeroDivisionError):
        raise PayoutError(f"{what} {text!r} is not a decimal number") from None
    minor = amount * 10**exponent
    if minor.denominator != 1:
        raise PayoutError(f"{what} {text!r} has more than {exponent} decimal(s), the currency's minor unit")
    return int(minor)


def format_minor(units: int, exponent: int) -> str:
    """Minor units as a decimal string: ``format_minor(1000001, 2) == "10000.01"``."""
    sign, units = ("-" if units < 0 else ""), abs(units)
    if exponent == 0:
        return f"{sign}{units}"
    return f"{sign}{units // 10**exponent}.{units % 10**exponent:0{exponent}d}"


def exact(x: float, what: str) -> Fraction:
    """A finite float as the decimal it prints as; :class:`PayoutError` naming ``what`` otherwise."""
    if not math.isfinite(x):
        raise PayoutError(f"{what} is {x}: cannot pay on it")
    return Fraction(repr(float(x)))


def decimal_text(x: Fraction) -> str:
    """A fraction as an exact decimal string when it has one (``3/8`` -> ``0.375``), else ``p/q``."""
    rest, twos, fives = x.denominator, 0, 0
    while rest % 2 == 0:
        rest, twos = rest // 2, twos + 1
    while rest % 5 == 0:
        rest, fives = rest // 5, fives + 1
    if rest != 1:
        return str(x)
    places = max(twos, fives)
    return format_minor(int(x * 10**places), places)


def apportion(total: int, weights: Mapping[K, Fraction]) -> dict[K, int]:
    """Split ``total`` units in proportion to ``weights`` (≥ 0, positive sum) by largest remainder (Hamilton).

    The result sums to ``total`` exactly; ties in the remainder go to the key that sorts first.
    """
    if any(w < 0 for w in weights.values()):
        raise PayoutError("weights must not be negative")
    s = sum(weights.values(), Fraction(0))
    if s <= 0:
        raise PayoutError("nothing to apportion on: every weight is zero")
    quotas = {k: total * w / s for k, w in weights.items()}
    out = {k: q.numerator // q.denominator for k, q in quotas.items()}
    left = total - sum(out.values())
    for k in sorted(quotas, key=lambda k: (-(quotas[k] - out[k]), k))[:left]:
        out[k] += 1
    return out


def auto_alpha(rows: Sequence[Mapping[str, Any]]) -> Fraction:
    """``clip(median half-width of the 95% intervals / median |value|, 0, 1)``, rounded to 4 decimals."""
    half = statistics.median((r["ci95"][1] - r["ci95"][0]) / 2 for r in rows)
    typical = statistics.median(abs(r["value"]) for r in rows)
    ratio = 1.0 if typical == 0 or not math.isfinite(half / typical) else min(max(half / typical, 0.0), 1.0)
    return Fraction(round(ratio * 10_000), 10_000)


def rule_weights(rows: Sequence[Mapping[str, Any]], rule: str, alpha: Fraction | None = None
                 ) -> dict[tuple[str, int], Fraction]:
    """Weights keyed ``(name, PAY)`` and, for ``lower-bound``, ``(name, ESCROW)``; zero weights left out."""
    if rule not in RULES:
        raise PayoutError(f"unknown rule {rule!r}; choose one of {', '.join(RULES)}")
    images = {r["name"]: Fraction(int(r.get("images", 0))) for r in rows}
    pos = {} if rule == "pro-rata" else {
        r["name"]: max(exact(r["value"], f"the value of {r['name']}"), Fraction(0)) for r in rows}
    out: dict[tuple[str, int], Fraction] = {}
    if rule == "pro-rata" or (rule == "blend" and alpha == 1):
        out = {(n, PAY): w for n, w in images.items()}
    elif rule == "shapley" or (rule == "blend" and alpha == 0):
        out = {(n, PAY): w for n, w in pos.items()}
    elif rule == "blend":
        a = auto_alpha(rows) if alpha is None else alpha
        si, sv = sum(images.values()), sum(pos.values())
        if si == 0 or sv == 0:
            missing = "no images" if si == 0 else "no contributor has a positive value"
            raise PayoutError(f"blend needs both images and a positive value: {missing}")
        out = {(n, PAY): a * images[n] / si + (1 - a) * pos[n] / sv for n in pos}
    else:
        for r in rows:
            low = r["ci95"][0]
            lb = Fraction(0) if low == -math.inf else max(exact(low, f"the 95% interval of {r['name']}"), Fraction(0))
            pay = min(lb, pos[r["name"]])
            out[(r["name"], PAY)], out[(r["name"], ESCROW)] = pay, pos[r["name"]] - pay
    out = {k: w for k, w in out.items() if w > 0}
    if not out:
        raise PayoutError("nothing to pay on: " + ("no contributor has images" if rule == "pro-rata" else
                                                   "no contributor has a positive value"))
    return out


def crosses_zero(row: Mapping[str, Any]) -> bool:
    """Whether the 95% interval holds zero (and has width): the sign of the value is not established."""
    low, high = row["ci95"]
    return low <= 0 <= high and high > low


def compute_payout(rows: Sequence[Mapping[str, Any]], *, pool_minor: int, rule: str, exponent: int = 2,
                   alpha: Fraction | None = None, floor_minor: int = 0,
                   carry_in: Mapping[str, int] | None = None) -> dict[str, Any]:
    """Apportion ``pool_minor`` over the results' contributor rows (name, id, images, value, stderr, ci95).

    Returns the totals and one entry per contributor (and per name only carried in) with its amount, escrow,
    carry in and out, flags and a short ``why``. ``Σ amountMinor + escrowMinor == pool_minor`` always.
    """
    carry_in = dict(carry_in or {})
    names = [r["name"] for r in rows]
    if len(set(names)) != len(names):
        raise PayoutError("contributor names are not unique in the results")
    if pool_minor <= 0:
        raise PayoutError("the pool must be positive")
    if floor_minor < 0 or floor_minor > pool_minor:
        raise PayoutError("the floor must be between 0 and the pool")
    if any(int(c) != c or c < 0 for c in carry_in.values()):
        raise PayoutError("carried amounts must be non-negative integers of minor units")
    if rule != "blend":
        alpha = None
    elif alpha is None:
        alpha = auto_alpha(rows)
    if alpha is not None and not 0 <= alpha <= 1:
        raise PayoutError(f"alpha {alpha} is outside [0, 1]")
    weights = rule_weights(rows, rule, alpha)
    active = set(names) | set(carry_in)
    carried_out: dict[str, int] = {}
    while True:
        distributable = pool_minor - sum(carry_in.get(n, 0) for n in active)
        if distributable < 0:
            raise PayoutError(f"the amounts carried in ({format_minor(pool_minor - distributable, exponent)}) "
                              f"exceed the pool ({format_minor(pool_minor, exponent)})")
        live = {k: w for k, w in weights.items() if k[1] == ESCROW or k[0] in active}
        if not live and distributable:
            raise PayoutError("nobody is left to pay this period's pool: lower the floor")
        shares = apportion(distributable, live) if live else {}
        totals = {n: shares.get((n, PAY), 0) + carry_in.get(n, 0) for n in active}
        below = [n for n in active if 0 < totals[n] < floor_minor]
        if not below:
            break
        drop = max(below, key=lambda n: (-totals[n], n))  # the smallest amount; ties: the name that sorts last
        carried_out[drop] = totals[drop]
        active.remove(drop)
    entries = []
    by_name = {r["name"]: r for r in rows}
    for n in [*names, *sorted(set(carry_in) - set(names))]:
        r = by_name.get(n, {"name": n, "id": "", "images": 0, "value": 0.0, "stderr": 0.0, "ci95": [0.0, 0.0]})
        amount, escrow = (totals[n] if n in active else 0), shares.get((n, ESCROW), 0)
        entry = {"name": n, "id": r.get("id", ""), "images": int(r.get("images", 0)), "value": r["value"],
                 "stderr": r.get("stderr", 0.0), "ci95": list(r["ci95"]),
                 "weight": str(weights.get((n, PAY), Fraction(0))), "amountMinor": amount,
                 "amount": format_minor(amount, exponent), "escrowMinor": escrow,
                 "escrow": format_minor(escrow, exponent), "carriedInMinor": carry_in.get(n, 0),
                 "carriedOutMinor": carried_out.get(n, 0), "carriedOut": format_minor(carried_out.get(n, 0), exponent),
                 "clipped": n in by_name and r["value"] < 0, "crossesZero": n in by_name and crosses_zero(r)}
        entry["why"] = why(entry, rule, exponent, in_run=n in by_name, weighted=(n, PAY) in weights)
        entries.append(entry)
    entries.sort(key=lambda e: (-e["amountMinor"], -e["carriedOutMinor"], e["name"]))
    paid, escrow = sum(e["amountMinor"] for e in entries), sum(e["escrowMinor"] for e in entries)
    assert paid + escrow == pool_minor, "apportionment lost a minor unit"
    return {"rule": rule, "alpha": None if alpha is None else decimal_text(alpha), "poolMinor": pool_minor,
            "paidMinor": paid, "escrowMinor": escrow, "floorMinor": floor_minor,
            "carriedInMinor": sum(carry_in.values()), "carriedOverMinor": sum(carried_out.values()),
            "carriedOver": dict(sorted(carried_out.items())), "contributors": entries,
            "clipped": sorted(e["name"] for e in entries if e["clipped"]),
            "crossesZero": sorted(e["name"] for e in entries if e["crossesZero"])}


def why(entry: Mapping[str, Any], rule: str, exponent: int, *, in_run: bool = True, weighted: bool = True) -> str:
    """A short reason for one contributor's amount, e.g. ``"clipped: negative value; not charged"``."""
    if not in_run:
        parts = ["not in this run: only the amount carried in"]
    elif entry["clipped"]:
        parts = ["clipped: negative value; not charged" + ("; image share only" if weighted else "")]
    elif not weighted:
        parts = [{"pro-rata": "no images", "lower-bound": "lower bound ≤ 0: nothing paid yet"}.get(rule, "zero value")]
    else:
        parts = [{"shapley": "share of positive values", "pro-rata": "share of images",
                  "blend": "blend of image and value shares", "lower-bound": "share of positive lower bounds"}[rule]]
    if entry["crossesZero"]:
        parts.append("95% interval crosses zero")
    if entry["escrowMinor"]:
        parts.append(f"{format_minor(entry['escrowMinor'], exponent)} in escrow until the interval narrows")
    if entry["carriedInMinor"]:
        parts.append(f"includes {format_minor(entry['carriedInMinor'], exponent)} carried in")
    if entry["carriedOutMinor"]:
        parts.append(f"below floor: carried over {format_minor(entry['carriedOutMinor'], exponent)}")
    return "; ".join(parts)


def carry_from(doc: Mapping[str, Any], currency: str) -> dict[str, int]:
    """The amounts a previous payout document carried over, checked to be in the same currency."""
    if doc.get("currency", "").upper() != currency.upper():
        raise PayoutError(f"the carry file is in {doc.get('currency')!r}, this payout in {currency!r}")
    carried = doc.get("carriedOver")
    if not isinstance(carried, dict):
        raise PayoutError("the carry file has no carriedOver table (is it a payouts/<period>.json?)")
    if any(not isinstance(v, int) or isinstance(v, bool) or v < 0 for v in carried.values()):
        raise PayoutError("carriedOver must map names to non-negative integer minor units")
    return {str(k): v for k, v in carried.items()}
