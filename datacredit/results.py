"""Shapley results: shapley.json / shapley.csv / values.png in the run, and the terminal table."""

from __future__ import annotations

import csv
import io
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from . import layout
from .calibration import fidelity_caption, fidelity_warning
from .storage import Storage, read_json, write_json


def build_results(
    contributors: list[dict[str, Any]],
    values: np.ndarray,
    stderr: np.ndarray,
    *,
    run_name: str,
    property_name: str,
    method: str,
    v_empty: float,
    v_full: float,
    evaluations: int,
    converged: bool,
    stop_reason: str,
    wall_seconds: float,
    fidelity: dict[str, Any] | None = None,
    estimator: dict[str, Any] | None = None,
    config_hash: str | None = None,
) -> dict[str, Any]:
    """The shapley.json document: contributors sorted by value, best first, each with its ``index`` (the
    player index of manifest.json and utilities.jsonl). ``fidelity`` (from
    :func:`datacredit.calibration.fidelity_of`) is kept as ``fidelity``; below its threshold it adds a
    ``warnings`` entry. ``version`` is the datacredit that wrote it; ``estimator`` (budget, seed, tolerance, ...)
    and ``configHash`` say what run settings made it, when given."""
    from . import package_version

    order = np.argsort(-values, kind="stable")
    rows = []
    for rank, i in enumerate(order, start=1):
        v, s = float(values[i]), float(stderr[i])
        c = contributors[i]
        rows.append(
            {
                "name": c["name"],
                "id": c["id"],
                "index": int(i),
                "images": c.get("images", 0),
                "value": v,
                "stderr": s,
                "ci95": [v - 1.96 * s, v + 1.96 * s],
                "rank": rank,
            }
        )
    doc: dict[str, Any] = {
        "version": package_version(),
        "run": run_name,
        "property": property_name,
        "method": method,
        "vEmpty": v_empty,
        "vFull": v_full,
        "evaluations": evaluations,
        "converged": converged,
        "stopReason": stop_reason,
        "wallClockSeconds": round(wall_seconds, 1),
        "contributors": rows,
    }
    if estimator is not None:
        doc["estimator"] = dict(estimator)
    if config_hash is not None:
        doc["configHash"] = config_hash
    if fidelity is not None:
        doc["fidelity"] = fidelity
        warning = fidelity_warning(fidelity)
        if warning:
            doc["warnings"] = [*doc.get("warnings", []), warning]
    return doc


def to_csv(doc: dict[str, Any]) -> str:
    """One row per contributor."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["rank", "contributor", "value", "stderr", "ci95_low", "ci95_high", "images"])
    for r in doc["contributors"]:
        w.writerow([r["rank"], r["name"], f"{r['value']:.6g}", f"{r['stderr']:.6g}",
                    f"{r['ci95'][0]:.6g}", f"{r['ci95'][1]:.6g}", r["images"]])
    return buf.getvalue()


#: Above this many contributors, values.png shows the best and worst :data:`PLOT_EACH_END` and a histogram.
PLOT_ALL_UP_TO = 40
PLOT_EACH_END = 20


def plot_png(doc: dict[str, Any]) -> bytes | None:
    """A horizontal bar chart of the values with 95% error bars; None when matplotlib is not installed.

    Up to :data:`PLOT_ALL_UP_TO` contributors every one gets a bar; above, the top and bottom
    :data:`PLOT_EACH_END` do (the rest are counted on the chart) and a histogram of all values is added, so the
    image stays readable and its size bounded whatever the number of contributors.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    everyone = doc["contributors"]
    many = len(everyone) > PLOT_ALL_UP_TO
    shown = [*everyone[:PLOT_EACH_END], *everyone[-PLOT_EACH_END:]] if many else list(everyone)
    rows = shown[::-1]
    labels = [f"{r['rank']}. {r['name']}" if many else r["name"] for r in rows]
    bars_height = (0.3 if many else 0.45) * len(rows) + 1.6
    width = min(14.0, 7 + 0.065 * max(0, max(map(len, labels), default=0) - 24))  # room for long names
    if many:
        fig, (ax, hist) = plt.subplots(2, 1, figsize=(width, bars_height + 2.6),
                                       gridspec_kw={"height_ratios": [bars_height, 2.6]})
    else:
        fig, ax = plt.subplots(figsize=(width, bars_height))
    vals = [r["value"] for r in rows]
    colors = ["#c0392b" if v < 0 else "#2e86c1" for v in vals]
    ax.barh(range(len(rows)), vals, xerr=[1.96 * r["stderr"] for r in rows], color=colors, capsize=3)
    ax.set_yticks(range(len(rows)), labels, fontsize=8 if many else None)
    ax.set_ylim(-0.6, len(rows) - 0.4)
    ax.axvline(0, color="black", linewidth=0.8)
    ax.set_xlabel(f"Shapley value of {doc['property']} (95% interval)")
    title = f"{doc['run']}: {doc['evaluations']} coalitions, v(full)={doc['vFull']:.3g}, v(∅)={doc['vEmpty']:.3g}"
    if many:
        hidden = len(everyone) - len(shown)
        ax.axhline(PLOT_EACH_END - 0.5, color="grey", linestyle=":", linewidth=1)
        ax.text(0.99, PLOT_EACH_END - 0.5, f"{hidden} more between", transform=ax.get_yaxis_transform(),
                ha="right", va="center", fontsize=8, color="grey", backgroundcolor="white")
        title += f"\ntop and bottom {PLOT_EACH_END} of {len(everyone)} contributors"
        hist.hist([r["value"] for r in everyone], bins=min(50, max(10, len(everyone) // 5)), color="#7f8c8d")
        hist.axvline(0, color="black", linewidth=0.8)
        hist.set_xlabel(f"Shapley value, all {len(everyone)} contributors")
        hist.set_ylabel("contributors")
    ax.set_title(title)
    fig.tight_layout()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "values.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path.read_bytes()


def save_results(store: Storage, doc: dict[str, Any]) -> None:
    """Write shapley.json, shapley.csv and values.png under results/."""
    write_json(store, f"{layout.RESULTS}/shapley.json", doc)
    store.write_bytes(f"{layout.RESULTS}/shapley.csv", to_csv(doc).encode())
    png = plot_png(doc)
    if png:
        store.write_bytes(f"{layout.RESULTS}/values.png", png)


def load_results(store: Storage) -> dict[str, Any]:
    """Read results/shapley.json of a finished run."""
    return read_json(store, f"{layout.RESULTS}/shapley.json")


def results_table(doc: dict[str, Any]) -> Any:
    """A rich table of the values, best first; harmful contributors in red."""
    from rich.markup import escape
    from rich.table import Table

    t = Table(title=f"Shapley values of {doc['property']} — {doc['run']}", title_justify="left")
    for col, just in (("#", "right"), ("contributor", "left"), ("value", "right"), ("± 95%", "right"),
                      ("images", "right")):
        t.add_column(col, justify=just)
    for r in doc["contributors"]:
        style = "red" if r["ci95"][1] < 0 else ("green" if r["ci95"][0] > 0 else "")
        t.add_row(str(r["rank"]), r["name"], f"{r['value']:+.4f}", f"{1.96 * r['stderr']:.4f}", str(r["images"]),
                  style=style)
    t.caption = (f"v(full)={doc['vFull']:.4f}  v(∅)={doc['vEmpty']:.4f}  coalitions={doc['evaluations']}  "
                 f"{doc['stopReason']}  {doc['wallClockSeconds']:.0f}s")
    if "sumOfValues" in doc:
        t.caption += (f"\nvalues sum to v(full) − v(∅) = {doc['sumOfValues']:+.4f}: what the data added over an "
                      "untrained model")
    fid = doc.get("fidelity")
    if fid:
        line = escape(fidelity_caption(fid))
        t.caption += "\n" + (line if fid.get("ok") else f"[yellow]{line}, below {fid.get('threshold', 0.8):g}[/]")
    return t
