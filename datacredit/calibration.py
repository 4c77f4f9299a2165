"""Calibrating sparsified fine-tuning against retraining (pure: no torch; the GPU side is
``datacredit.jobs.calibrate``).

``datacredit calibrate`` retrains a few coalitions from scratch and evaluates the same coalitions with
sparsified fine-tuning over a grid of prune ratios and fine-tuning steps k. Each grid cell's *fidelity* is the
Pearson r and Spearman ρ between its utilities and the retrained ones, with 95% Fisher-z intervals. What is
stored in the run:

* ``calibration/sweep.jsonl``: one sparsified-FT utility per line, keyed by (ratio, k, members, seed, config);
* ``calibration/report.json``: the grid, every cell's fidelity and cost, the recommendation and the fidelity of
  the manifest's own (ratio, k), which :func:`fidelity_of` hands to the results.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from .spec import ValuationRun, ValuationRunSpec
from .storage import Storage, read_json

REPORT = "calibration/report.json"
SWEEP = "calibration/sweep.jsonl"
THRESHOLD = 0.8  # Pearson r with retrained utilities below which values are flagged
DEFAULT_STEPS = "0.25x,0.5x,1x,2x"
INTERVAL = ("Fisher z: tanh(atanh r ± 1.96·se), se = 1/√(n−3) for Pearson, √(1.06/(n−3)) for Spearman "
            "(n = calibration coalitions)")
RULE = (f"the cheapest setting (counted work per coalition, then measured seconds) whose Pearson r with the "
        f"retrained utilities is ≥ {THRESHOLD}; when none reaches it, the setting with the highest r")


class CalibrationError(ValueError):
    """A calibration option or stored calibration table is invalid; the message names it."""


# ---------------------------------------------------------------- the grid


def parse_steps(text: str, base: int) -> tuple[int, ...]:
    """``--steps``: comma-separated fine-tuning step counts; ``0.5x`` is a multiple of ``base``
    (``spec.method.finetune.steps``), a plain integer is a step count. Sorted, distinct, each ≥ 1."""
    out: set[int] = set()
    for item in (t.strip().lower() for t in text.split(",")):
        if not item:
            continue
        try:
            k = max(1, round(float(item[:-1]) * base)) if item.endswith("x") else int(item)
        except ValueError:
            raise CalibrationError(f"--steps {text!r}: {item!r} is neither a multiple such as 0.5x nor a step "
                                   f"count such as 40") from None
        if k < 1:
            raise CalibrationError(f"--steps {text!r}: {item!r} gives {k} steps; each setting needs ≥ 1 step")
        out.add(k)
    if not out:
        raise CalibrationError(f"--steps {text!r}: no settings; give e.g. {DEFAULT_STEPS}")
    return tuple(sorted(out))


def default_ratios(base: float) -> tuple[float, ...]:
    """The manifest's prune ratio with one lower and one higher (0.3 → 0.2, 0.3, 0.5)."""
    lower = round(max(base / 2, base - 0.1), 3)
    higher = round(min(base + 0.2, (1 + base) / 2), 3)
    return tuple(sorted({lower, round(base, 6), higher}))


def parse_ratios(text: str, base: float) -> tuple[float, ...]:
    """``--ratios``: comma-separated prune ratios in (0, 1); empty: :func:`default_ratios` of ``base``."""
    if not text.strip():
        return default_ratios(base)
    out: set[float] = set()
    for item in (t.strip() for t in text.split(",")):
        if not item:
            continue
        try:
            r = float(item)
        except ValueError:
            raise CalibrationError(f"--ratios {text!r}: {item!r} is not a number") from None
        if not 0 < r < 1:
            raise CalibrationError(f"--ratios {text!r}: {item} must be in (0, 1) (the fraction of channels removed)")
        out.add(round(r, 6))
    return tuple(sorted(out))


def grid(ratios: Sequence[float], steps: Sequence[int], own: tuple[float, int]) -> list[tuple[float, int]]:
    """Every (ratio, k) of the sweep, sorted, with the manifest's own setting ``own`` always in it."""
    cells = {(round(r, 6), int(k)) for r in ratios for k in steps}
    cells.add((round(own[0], 6), int(own[1])))
    return sorted(cells)


# ---------------------------------------------------------------- stored sweep utilities


def sweep_key(ratio: float, steps: int, members: Iterable[int], seed: int, config: str) -> str:
    """The key of one sparsified-FT utility of the sweep."""
    return f"{round(ratio, 6):g}:{steps}:{','.join(str(m) for m in sorted(members))}:{seed}:{config}"


@dataclass(frozen=True)
class SweepRow:
    """One sparsified-FT utility: the model pruned at ``ratio`` fine-tuned ``steps`` on ``members``.
    ``seconds`` is fine-tuning plus sampling, measured in the calibrating process."""

    ratio: float
    steps: int
    members: tuple[int, ...]
    seed: int
    config: str
    utility: float
    seconds: float = 0.0

    @property
    def key(self) -> str:
        return sweep_key(self.ratio, self.steps, self.members, self.seed, self.config)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "members": list(self.members)})


def parse_sweep(text: str, source: str = SWEEP) -> dict[str, SweepRow]:
    """Sweep rows by key (a later duplicate wins); errors name the line."""
    rows: dict[str, SweepRow] = {}
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            row = SweepRow(float(d["ratio"]), int(d["steps"]), tuple(sorted(int(m) for m in d["members"])),
                           int(d["seed"]), str(d["config"]), float(d["utility"]), float(d.get("seconds", 0.0)))
        except (ValueError, KeyError, TypeError) as e:
            raise CalibrationError(f"{source} line {n}: not a sweep row ({e}); delete the line to recompute it") \
                from None
        rows[row.key] = row
    return rows


def format_sweep(rows: Iterable[SweepRow]) -> str:
    """The JSONL text of the sweep table."""
    return "".join(r.to_json() + "\n" for r in rows)


# ---------------------------------------------------------------- recommendation


def manifest_snippet(ratio: float, steps: int) -> str:
    """The manifest lines that select a setting."""
    return f"spec:\n  method:\n    prune: {{ratio: {ratio:g}}}\n    finetune: {{steps: {steps}}}\n"


def _pearson_value(cell: dict[str, Any]) -> float | None:
    v = (cell.get("pearson") or {}).get("value")
    return float(v) if v is not None and math.isfinite(float(v)) else None


def recommend(cells: Sequence[dict[str, Any]], threshold: float = THRESHOLD) -> dict[str, Any]:
    """The recommended cell by :data:`RULE`. ``cells`` carry ``ratio``, ``steps``, ``pearson`` ({value, ...}),
    ``work`` (counted work per coalition) and ``seconds`` (per coalition). ``met`` says whether the
    recommended setting reaches ``threshold``; ``ratio`` / ``steps`` are None when no cell has a Pearson r."""
    scored = [c for c in cells if _pearson_value(c) is not None]
    passing = [c for c in scored if (_pearson_value(c) or 0.0) >= threshold]
    out: dict[str, Any] = {"rule": RULE, "threshold": threshold}
    if passing:
        best = min(passing, key=lambda c: (c["work"], c["seconds"], c["ratio"], c["steps"]))
        met = True
    elif scored:
        best = max(scored, key=lambda c: (_pearson_value(c), -c["work"]))
        met = False
    else:
        return {**out, "met": False, "ratio": None, "steps": None, "pearson": None, "snippet": ""}
    return {**out, "met": met, "ratio": best["ratio"], "steps": best["steps"], "pearson": _pearson_value(best),
            "snippet": manifest_snippet(best["ratio"], best["steps"])}


# ---------------------------------------------------------------- fidelity of a run's own setting


def _config_hash(spec: ValuationRun | ValuationRunSpec) -> str:
    """The config hash of a ValuationRun or of a bare spec (it does not depend on the metadata)."""
    if isinstance(spec, ValuationRun):
        return spec.config_hash()
    return ValuationRun(metadata={"name": "x"}, spec=spec).config_hash()


def fidelity_of(store: Storage, spec: ValuationRun | ValuationRunSpec) -> dict[str, Any] | None:
    """The fidelity of the setting a run uses, from ``calibration/report.json`` in its storage: ``pearson``,
    ``spearman`` (each ``{value, ci95, n}``), ``coalitions``, ``ratio``, ``steps``, ``threshold``, ``ok`` and the
    ``recommended`` setting. ``spec`` is the ValuationRun (or its spec). None when the run has no calibration
    report, or its report was made for other settings (another config hash) or lacks the run's (ratio, k)."""
    if not store.exists(REPORT):
        return None
    try:
        report = read_json(store, REPORT)
    except (OSError, ValueError):
        return None
    s = spec.spec if isinstance(spec, ValuationRun) else spec
    if report.get("configHash") and report["configHash"] != _config_hash(spec):
        return None
    ratio, steps = float(s.method.prune.ratio), int(s.method.finetune.steps)
    cell = next((c for c in report.get("cells", []) if int(c.get("steps", -1)) == steps
                 and math.isclose(float(c.get("ratio", -1)), ratio, abs_tol=1e-9)), None)
    if cell is None:
        return None
    pearson = _pearson_value(cell)
    rec = report.get("recommendation") or {}
    return {
        "ratio": ratio,
        "steps": steps,
        "pearson": cell["pearson"],
        "spearman": cell.get("spearman"),
        "coalitions": int(cell.get("coalitions", cell["pearson"].get("n", 0))),
        "interval": report.get("interval", INTERVAL),
        "threshold": float(report.get("threshold", THRESHOLD)),
        "ok": pearson is not None and pearson >= float(report.get("threshold", THRESHOLD)),
        "recommended": {"ratio": rec.get("ratio"), "steps": rec.get("steps"), "met": bool(rec.get("met"))},
        "report": REPORT,
    }


def _fmt(corr: dict[str, Any] | None) -> str:
    """``0.67 [0.12, 0.91]`` from ``{value, ci95}``."""
    if not corr or corr.get("value") is None:
        return "n/a"
    lo, hi = (corr.get("ci95") or [None, None])[:2]
    band = f" [{lo:.2f}, {hi:.2f}]" if lo is not None and hi is not None else ""
    return f"{corr['value']:.2f}{band}"


def fidelity_caption(fid: dict[str, Any]) -> str:
    """One line for the results table: ``fidelity vs retraining: Pearson 0.91 [...] Spearman 0.88 [...] (n=8)``."""
    return (f"fidelity vs retraining: Pearson {_fmt(fid.get('pearson'))}  Spearman {_fmt(fid.get('spearman'))}  "
            f"(n={fid.get('coalitions', 0)}, ratio {fid.get('ratio', 0):g}, k={fid.get('steps', 0)})")


def fidelity_warning(fid: dict[str, Any] | None) -> str | None:
    """The warning a run gives when its sparsified-FT utilities track retraining below the threshold (or the
    correlation could not be measured); None when there is no calibration or the fidelity is good enough."""
    if not fid or fid.get("ok"):
        return None
    threshold = float(fid.get("threshold", THRESHOLD))
    what = (f"sparsified-FT utilities track retrained ones at Pearson {_fmt(fid.get('pearson'))} over "
            f"{fid.get('coalitions', 0)} calibration coalitions, below {threshold:g}"
            if _pearson_value(fid) is not None else
            "the fidelity of sparsified-FT utilities to retrained ones could not be measured (constant utilities?)")
    rec = fid.get("recommended") or {}
    if rec.get("ratio") is not None and rec.get("met") and (rec["ratio"], rec["steps"]) != (fid.get("ratio"),
                                                                                              fid.get("steps")):
        advice = (f"datacredit calibrate recommends method.prune.ratio: {rec['ratio']:g}, "
                  f"method.finetune.steps: {rec['steps']}")
    else:
        advice = "raise method.finetune.steps or lower method.prune.ratio (`datacredit calibrate` sweeps both)"
    return f"{what}: the values may not reflect retraining; {advice}"
