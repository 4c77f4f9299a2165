"""A payout's record in the run: payouts/<period>.json, .csv and .png, and the terminal table."""

from __future__ import annotations

import csv
import io
import json
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .payout import ROUNDING, format_minor
from .storage import Storage

PAYOUTS = "payouts"
RULE_TEXT = {
    "shapley": "share of the positive part of each value",
    "pro-rata": "share of the image count",
    "blend": "alpha x image share + (1 - alpha) x share of positive values; alpha = clip(median half-width of the "
             "95% intervals / median |value|, 0, 1) unless given",
    "lower-bound": "share of max(ci95 low, 0) over the positive values; the rest of what the values would pay is "
                   "held in escrow",
}
FLOOR_TEXT = ("below the floor a recipient gets nothing and its amount is carried over; the smallest is dropped "
              "first and the pool re-apportioned over everyone left, so its share goes to the others")


def payout_document(results: Mapping[str, Any], payout: Mapping[str, Any], *, period: str, currency: str,
                    exponent: int, run_uri: str, config_hash: str | None, alpha_given: bool,
                    carry_source: str | None, checks: Mapping[str, Any]) -> dict[str, Any]:
    """The payouts/<period>.json document: what was paid, on which values, by which rule, and why."""
    money = {name: format_minor(payout[key], exponent) for name, key in (
        ("pool", "poolMinor"), ("paid", "paidMinor"), ("escrow", "escrowMinor"), ("floor", "floorMinor"),
        ("carriedIn", "carriedInMinor"), ("carriedOverTotal", "carriedOverMinor"))}
    return {
        "period": period, "run": results.get("run"), "runUri": run_uri, "configHash": config_hash,
        "property": results.get("property"), "method": results.get("method"), "converged": results.get("converged"),
        "rule": payout["rule"], "ruleMeans": RULE_TEXT[payout["rule"]], "rounding": ROUNDING, "floorMeans": FLOOR_TEXT,
        "parameters": {"alpha": payout["alpha"],
                       "alphaSource": None if payout["alpha"] is None else ("given" if alpha_given else
                                                                            "from the interval widths"),
                       "floor": money["floor"], "carryFrom": carry_source},
        "currency": currency.upper(), "exponent": exponent, **{k: v for k, v in payout.items() if k.endswith("Minor")},
        **money, "carriedOver": payout["carriedOver"], "clipped": payout["clipped"],
        "crossesZero": payout["crossesZero"], "contributors": payout["contributors"], "checks": dict(checks),
        "valuesFrom": "results/shapley.json",
    }


def _cell(text: str) -> str:
    """A CSV text cell that spreadsheets will not run as a formula (a leading = + - @ gets a quote)."""
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def to_csv(doc: Mapping[str, Any]) -> str:
    """One row per contributor, amounts in minor units and as decimals."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["contributor", "id", "images", "value", "stderr", "ci95_low", "ci95_high", "weight", "amount_minor",
                "amount", "escrow_minor", "escrow", "carried_in_minor", "carried_out_minor", "currency", "why"])
    for e in doc["contributors"]:
        w.writerow([_cell(e["name"]), e["id"], e["images"], repr(e["value"]), repr(e["stderr"]), repr(e["ci95"][0]),
                    repr(e["ci95"][1]), e["weight"], e["amountMinor"], e["amount"], e["escrowMinor"], e["escrow"],
                    e["carriedInMinor"], e["carriedOutMinor"], doc["currency"], e["why"]])
    return buf.getvalue()


def plot_png(doc: Mapping[str, Any]) -> bytes | None:
    """Horizontal bars: paid, in escrow and carried over per contributor; None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = doc["contributors"][::-1]
    scale = 10 ** doc["exponent"]
    names = [e["name"].replace("$", r"\$") for e in rows]  # a '$' would start matplotlib's mathtext
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.6))
    left = [0.0] * len(rows)
    for key, color, label in (("amountMinor", "#2e86c1", "paid"), ("escrowMinor", "#aab7b8", "escrow"),
                              ("carriedOutMinor", "#f5b041", "carried over")):
        part = [e[key] / scale for e in rows]
        if key == "amountMinor" or any(part):
            ax.barh(range(len(rows)), part, left=left, color=color, label=label)
            left = [a + b for a, b in zip(left, part, strict=True)]
    ax.set_yticks(range(len(rows)), names)
    ax.set_xlabel(f"{doc['currency']} ({doc['rule']})")
    ax.set_title(f"{doc['run']}: payout {doc['period']}, pool {doc['pool']} {doc['currency']}".replace("$", r"\$"))
    ax.legend(loc="lower right", fontsize="small")
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "payout.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path.read_bytes()


def document_bytes(doc: Mapping[str, Any]) -> bytes:
    """The JSON as stored (indented, stable key order), to compare with an existing record."""
    return json.dumps(doc, indent=2, sort_keys=True).encode()


def save_payout(store: Storage, doc: Mapping[str, Any]) -> list[str]:
    """Write payouts/<period>.json, .csv and .png; return the keys written."""
    base = f"{PAYOUTS}/{doc['period']}"
    store.write_bytes(f"{base}.json", document_bytes(doc))
    store.write_bytes(f"{base}.csv", to_csv(doc).encode())
    keys = [f"{base}.json", f"{base}.csv"]
    png = plot_png(doc)
    if png:
        store.write_bytes(f"{base}.png", png)
        keys.append(f"{base}.png")
    return keys


def payout_table(doc: Mapping[str, Any]) -> Any:
    """A rich table of the amounts, largest first; flagged contributors in yellow, clipped in red."""
    from rich.markup import escape
    from rich.table import Table

    cur = escape(doc["currency"])
    t = Table(title=escape(f"Payout {doc['period']} — {doc['run']}: {doc['pool']} {doc['currency']} by "
                           f"{doc['rule']}"), title_justify="left")
    escrow, carried = doc["escrowMinor"] > 0, doc["carriedOverMinor"] > 0  # columns only when they hold something
    columns = [("contributor", "left"), ("value", "right"), ("± 95%", "right"), ("images", "right"),
               (f"amount {cur}", "right"), *([("escrow", "right")] if escrow else []),
               *([("carried over", "right")] if carried else []), ("why", "left")]
    for col, just in columns:
        t.add_column(col, justify=just, no_wrap=col != "why")
    for e in doc["contributors"]:
        style = "red" if e["clipped"] else ("yellow" if e["crossesZero"] else "")
        cells = [escape(e["name"]), f"{e['value']:+.4f}", f"{(e['ci95'][1] - e['ci95'][0]) / 2:.4f}",
                 str(e["images"]), e["amount"], *([e["escrow"]] if escrow else []),
                 *([e["carriedOut"]] if carried else []), escape(e["why"])]
        t.add_row(*cells, style=style)
    alpha = doc["parameters"]["alpha"]
    caption = f"paid {doc['paid']} + escrow {doc['escrow']} = pool {doc['pool']} {doc['currency']}"
    if alpha is not None:
        caption += f"  alpha={alpha} ({doc['parameters']['alphaSource']})"
    if doc["floorMinor"]:
        caption += f"  floor {doc['floor']}, carried over {doc['carriedOverTotal']}"
    if doc["carriedInMinor"]:
        caption += f"  carried in {doc['carriedIn']}"
    t.caption = escape(caption)
    return t
