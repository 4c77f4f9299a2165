"""results/report.html: one self-contained page per finished run.

The page holds the values table, the intervals chart (results/values.png), how the values converged as
coalitions were added, the fidelity of sparsified fine-tuning to retraining (when the run was calibrated) and
the run's settings. Charts are inline PNGs and the styles are inline, so the file opens offline, from a
bucket or as a mail attachment. Without matplotlib the page keeps its tables and says the charts are missing.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import yaml

from . import layout
from .calibration import fidelity_caption, fidelity_warning
from .shapley import estimate_from_table
from .storage import Storage

REPORT = f"{layout.RESULTS}/report.html"
#: Prefix fits on the convergence chart, evenly spaced over the evaluated coalitions.
CONVERGENCE_POINTS = 12
#: Above this many contributors the convergence chart follows the best and worst :data:`TRACK_EACH_END`.
TRACK_ALL_UP_TO = 10
TRACK_EACH_END = 5

STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:#1c2833;margin:0;background:#f4f6f7}
main{max-width:1100px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 8px}
.sub{color:#5d6d7e;margin:0 0 16px}
.cards{display:flex;flex-wrap:wrap;gap:10px}
.card{background:#fff;border:1px solid #d5dbdb;border-radius:6px;padding:8px 12px;min-width:120px}
.card b{display:block;font-size:18px}.card span{color:#5d6d7e;font-size:12px}
.warn{background:#fef5e7;border:1px solid #f0b27a;border-radius:6px;padding:8px 12px;margin:12px 0}
section{background:#fff;border:1px solid #d5dbdb;border-radius:6px;padding:12px 16px;margin-top:12px}
img{max-width:100%;height:auto}
table{border-collapse:collapse;width:100%}
th,td{padding:4px 8px;border-bottom:1px solid #eaeded;text-align:right}
th{background:#eaf2f8;position:sticky;top:0}
td.name,th.name{text-align:left;word-break:break-all}
tr.pos td.verdict{color:#1e8449}tr.neg td.verdict{color:#c0392b}
pre{background:#f8f9f9;border:1px solid #eaeded;padding:10px;overflow:auto;font-size:12px}
"""


def convergence(rows: Sequence[Mapping[str, Any]], n_players: int, method: str,
                points: int = CONVERGENCE_POINTS) -> list[dict[str, Any]]:
    """Refit ``method`` on growing prefixes of the run's coalitions (plan order): per prefix, the number of
    coalitions, each player's value and 95% half-width (player-index order). Prefixes too small to fit are left
    out."""
    total = len(rows)
    sizes = sorted({int(m) for m in np.linspace(min(total, n_players + 2), total, num=points)} | {total})
    out = []
    for m in sizes:
        try:
            est = estimate_from_table(rows[:m], n_players, method)
        except (ValueError, np.linalg.LinAlgError):
            continue
        values, half = np.asarray(est.values), 1.96 * np.asarray(est.stderr)
        if np.all(np.isfinite(values)):
            out.append({"coalitions": m, "values": values.tolist(), "halfwidth": half.tolist()})
    return out


def _png(fig: Any) -> bytes:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def convergence_png(doc: Mapping[str, Any], track: list[dict[str, Any]]) -> bytes | None:
    """Values with their 95% bands against coalitions evaluated, and the widest interval; None without
    matplotlib or with fewer than two prefix fits."""
    if len(track) < 2:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    ranked = doc["contributors"]
    follow = ranked if len(ranked) <= TRACK_ALL_UP_TO else [*ranked[:TRACK_EACH_END], *ranked[-TRACK_EACH_END:]]
    x = [p["coalitions"] for p in track]
    fig, (ax, wide) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    for row in follow:
        i = row["index"]
        v = np.array([p["values"][i] for p in track])
        h = np.array([p["halfwidth"][i] for p in track])
        (line,) = ax.plot(x, v, marker=".", label=row["name"][:28])
        ax.fill_between(x, v - h, v + h, color=line.get_color(), alpha=0.12)
    ends = [(row["value"] - 1.96 * row["stderr"], row["value"] + 1.96 * row["stderr"]) for row in follow]
    lo, hi = min(e[0] for e in ends), max(e[1] for e in ends)
    if np.isfinite(lo) and np.isfinite(hi) and hi > lo:  # the final intervals set the scale; early ones are clipped
        ax.set_ylim(lo - 0.25 * (hi - lo), hi + 0.25 * (hi - lo))
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_xlabel("coalitions evaluated")
    ax.set_ylabel(f"Shapley value of {doc['property']}")
    shown = "" if len(follow) == len(ranked) else f" (best and worst {TRACK_EACH_END} of {len(ranked)})"
    ax.set_title(f"values as coalitions were added{shown}", fontsize=10)
    ax.legend(fontsize=7, loc="best")
    widest = [(p["coalitions"], max(p["halfwidth"])) for p in track if np.all(np.isfinite(p["halfwidth"]))]
    wide.plot([w[0] for w in widest], [w[1] for w in widest], marker=".", color="#7f8c8d")
    wide.set_xlabel("coalitions evaluated")
    wide.set_ylabel("widest 95% half-width")
    wide.set_ylim(bottom=0)
    wide.set_title("interval width", fontsize=10)
    fig.tight_layout()
    return _png(fig)


def _img(png: bytes | None, alt: str) -> str:
    if png is None:
        return f"<p class=sub>{html.escape(alt)}: not drawn (matplotlib is not installed, or too few points).</p>"
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _card(value: str, label: str) -> str:
    return f"<div class=card><b>{html.escape(value)}</b><span>{html.escape(label)}</span></div>"


def _table(doc: Mapping[str, Any]) -> str:
    head = ("<tr><th>#</th><th class=name>contributor</th><th>value</th><th>± 95%</th><th>between seeds</th>"
            "<th>images</th><th>verdict</th></tr>")
    body = []
    for r in doc["contributors"]:
        lo, hi = r["ci95"]
        kind, verdict = ("pos", "helps") if lo > 0 else ("neg", "harms") if hi < 0 else ("", "unsure")
        seed = f"{1.96 * r['seedStderr']:.4g}" if "seedStderr" in r else "–"
        body.append(f"<tr class='{kind}'><td>{r['rank']}</td><td class=name>{html.escape(str(r['name']))}</td>"
                    f"<td>{r['value']:+.4f}</td><td>{1.96 * r['stderr']:.4f}</td><td>{seed}</td>"
                    f"<td>{r.get('images', 0)}</td><td class=verdict>{verdict}</td></tr>")
    return f"<table id=values><thead>{head}</thead><tbody>{''.join(body)}</tbody></table>"


def _fidelity(doc: Mapping[str, Any]) -> str:
    fid = doc.get("fidelity")
    if not fid:
        return ("<p>No calibration report for these settings: how closely sparsified fine-tuning tracks "
                "retraining was not measured. <code>datacredit calibrate</code> on the manifest measures it.</p>")
    verdict = "meets" if fid.get("ok") else "is below"
    return (f"<p>{html.escape(fidelity_caption(fid))}</p><p>The Pearson correlation {verdict} the threshold "
            f"{float(fid.get('threshold', 0.8)):g} (from <code>{html.escape(str(fid.get('report', '')))}</code>).</p>")


def render_report(doc: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], manifest: Mapping[str, Any],
                  values_png: bytes | None) -> str:
    """The page for a results document (shapley.json), its coalition rows (utilities.jsonl, plan order), the
    manifest that made it and the intervals chart."""
    n = len(doc["contributors"])
    track = convergence(rows, n, str(doc["method"]))
    est = doc.get("estimator") or {}
    budget = est.get("budget")
    warnings = [*doc.get("warnings", [])]
    if (w := fidelity_warning(doc.get("fidelity"))) and w not in warnings:
        warnings.append(w)
    cards = [
        _card(f"{doc['evaluations']}" + (f" / {budget}" if budget else ""), "coalitions / budget"),
        _card(str(doc["stopReason"]), "stopped on" + (" (converged)" if doc.get("converged") else "")),
        _card(f"{doc['vFull']:.4g}", "v(full)"),
        _card(f"{doc['vEmpty']:.4g}", "v(∅)"),
        _card(f"{doc.get('sumOfValues', doc['vFull'] - doc['vEmpty']):+.4g}", "values sum (v(full) − v(∅))"),
        _card(f"{doc['wallClockSeconds']:.0f} s", "wall clock"),
    ]
    settings = {
        "datacredit": doc.get("version"), "method": doc["method"], "stop rule": doc.get("stopRule"),
        "estimator": est, "common random numbers": doc.get("commonRandomNumbers"),
        "config hash": doc.get("configHash"),
    }
    esc = html.escape
    parts = [
        "<!doctype html><html lang=en><head><meta charset=utf-8>",
        f"<meta name=generator content='datacredit {esc(str(doc.get('version', '')))}'>",
        "<meta name=viewport content='width=device-width,initial-scale=1'>",
        f"<title>{esc(str(doc['run']))}: Shapley values of {esc(str(doc['property']))}</title>",
        f"<style>{STYLE}</style></head><body><main>",
        f"<h1>{esc(str(doc['run']))}: Shapley values of {esc(str(doc['property']))}</h1>",
        f"<p class=sub>{n} contributors · method {esc(str(doc['method']))} · {esc(str(doc.get('sumMeans', '')))}</p>",
        f"<div class=cards>{''.join(cards)}</div>",
        *(f"<div class=warn>{esc(w)}</div>" for w in warnings),
        f"<section id=intervals><h2>Values and 95% intervals</h2>{_img(values_png, 'values chart')}</section>",
        f"<section id=table><h2>All contributors</h2>{_table(doc)}</section>",
        "<section id=convergence><h2>Convergence</h2>"
        f"{_img(convergence_png(doc, track), 'convergence chart')}"
        "<p class=sub>Each point refits the estimator on the first coalitions of the plan; flat lines and "
        "narrowing bands mean more coalitions would change little."
        + (" An exact run enumerates coalitions in a fixed order, so its early points fit an unbalanced sample; "
           "only the last one is exact." if doc["method"] == "exact" else "") + "</p></section>",
        f"<section id=fidelity><h2>Fidelity to retraining</h2>{_fidelity(doc)}</section>",
        f"<section id=settings><h2>Settings</h2><pre>{esc(yaml.safe_dump(settings, sort_keys=False))}</pre>",
        f"<details><summary>manifest</summary><pre>{esc(yaml.safe_dump(dict(manifest), sort_keys=False))}</pre>"
        "</details></section>",
        "</main></body></html>",
    ]
    return "\n".join(parts)


def save_report(store: Storage, doc: Mapping[str, Any], rows: Sequence[Mapping[str, Any]],
                manifest: Mapping[str, Any]) -> None:
    """Write results/report.html, reusing results/values.png when it was drawn."""
    chart = f"{layout.RESULTS}/values.png"
    png = store.read_bytes(chart) if store.exists(chart) else None
    store.write_bytes(REPORT, render_report(doc, rows, manifest, png).encode())
