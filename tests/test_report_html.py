"""results/report.html: one self-contained page, written by every finished run and opened in a real browser."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from datacredit import calibration as cal
from datacredit import layout
from datacredit.finish import finish_run
from datacredit.report_html import REPORT, convergence
from datacredit.runstate import member_indices, open_run, planner_for, utility_row
from datacredit.spec import ValuationRun, parse_manifest
from datacredit.storage import Storage, write_json

NAMES = ["alice", "bob", "carol", "dave", "erin", "frank", "<script>alert(1)</script>", "noise"]
WEIGHTS = np.array([3.0, 2.5, 2.0, 1.5, 1.0, 0.5, 0.25, -4.0])
ARTIFACTS = Path(os.environ.get("DATACREDIT_TEST_ARTIFACTS", Path(__file__).resolve().parents[1] / "test-artifacts"))


def _finished_run(tmp_path: Path, pearson: float | None = None) -> tuple[ValuationRun, Storage]:
    """A kernel run over a noisy game with interactions, finished through the same code as both executors."""
    run = parse_manifest({
        "apiVersion": "datacredit.dev/v1alpha1", "kind": "ValuationRun", "metadata": {"name": "report"},
        "spec": {"dataset": {"images": str(tmp_path / "images")},
                 "estimator": {"name": "kernel", "budget": 64, "seed": 3, "replicates": {"seeds": 0}},
                 "storage": {"uri": str(tmp_path / "runs")}}})
    store = open_run(run).store
    contributors = [{"name": n, "id": f"id-{i}", "images": 10 + i} for i, n in enumerate(NAMES)]
    write_json(store, layout.MANIFEST, {"contributors": contributors, "configHash": run.config_hash()})
    if pearson is not None:
        cell = {"ratio": run.spec.method.prune.ratio, "steps": run.spec.method.finetune.steps, "coalitions": 8,
                "pearson": {"value": pearson, "ci95": [pearson - 0.3, min(pearson + 0.1, 0.99)], "n": 8}}
        write_json(store, cal.REPORT, {"configHash": run.config_hash(), "cells": [cell], "threshold": 0.8,
                                       "recommendation": {"ratio": None, "steps": None, "met": False}})
    rng = np.random.default_rng(0)
    planner = planner_for(run, len(NAMES))
    rows = []
    while not planner.done and len(ask := planner.ask(1)):
        members = member_indices(ask[0])
        utility = float(WEIGHTS[members].sum() + 0.8 * (0 in members and 1 in members) + rng.normal(0, 0.2))
        planner.tell(ask[0], utility)
        rows.append(utility_row(members, utility, []))
    finish_run(store, run, planner, contributors, rows, 7.0)
    return run, store


def test_every_finished_run_writes_a_self_contained_escaped_report(tmp_path: Path) -> None:
    run, store = _finished_run(tmp_path, pearson=0.55)
    page = store.read_bytes(REPORT).decode()
    # self-contained: no script, stylesheet or image is fetched from anywhere
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", page)
    assert "<script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # names are escaped
    rows = re.findall(r"<tr class='(pos|neg|)'><td>(\d+)</td><td class=name>([^<]*)</td>", page)
    assert [int(r[1]) for r in rows] == list(range(1, len(NAMES) + 1))
    assert rows[0][2] == "alice" and rows[-1] == ("neg", "8", "noise")  # best first; the harmful one marked
    charts = re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    assert len(charts) == 2  # intervals and convergence
    # the fidelity below the threshold is stated and warned about; the settings name the run's config
    assert "Pearson 0.55" in page and "is below the threshold 0.8" in page and "class=warn" in page
    assert run.config_hash() in page and "budget: 64" in page


def test_convergence_refits_growing_prefixes_and_ends_at_the_final_values(tmp_path: Path) -> None:
    _, store = _finished_run(tmp_path)
    import json

    rows = [json.loads(line) for line in store.read_bytes(layout.UTILITIES).decode().splitlines()]
    track = convergence(rows, len(NAMES), "kernel")
    sizes = [p["coalitions"] for p in track]
    assert sizes == sorted(set(sizes)) and sizes[-1] == len(rows) and len(sizes) >= 5
    final = json.loads(store.read_bytes(f"{layout.RESULTS}/shapley.json"))
    by_index = {r["index"]: r["value"] for r in final["contributors"]}
    np.testing.assert_allclose(track[-1]["values"], [by_index[i] for i in range(len(NAMES))], atol=1e-9)
    assert track[-1]["halfwidth"][0] < track[1]["halfwidth"][0]  # more coalitions, narrower intervals


def _chromium() -> str:
    found = os.environ.get("DATACREDIT_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("no Chromium to open the report in: `bash hack/install-chromium.sh` installs Debian's "
                    "(.ci/run does), or set DATACREDIT_CHROMIUM to a Chrome/Chromium binary")
    return found


def _open(browser: str, page: Path, out: Path, *args: str) -> subprocess.CompletedProcess[str]:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--hide-scrollbars", f"--user-data-dir={out / 'profile'}", "--window-size=1200,2800"]
    return subprocess.run([browser, *flags, *args, page.as_uri()], capture_output=True, text=True, timeout=120,
                          check=True)


@pytest.mark.browser
def test_report_renders_in_headless_chromium(tmp_path: Path) -> None:
    _, store = _finished_run(tmp_path)
    page = store.root / REPORT
    browser = _chromium()
    dom = _open(browser, page, tmp_path, "--dump-dom").stdout
    assert "<title>report: Shapley values of quality</title>" in dom
    assert len(re.findall(r"<tr class=\"(?:pos|neg|)\">", dom)) == len(NAMES)  # the browser parsed every row

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    shot.unlink(missing_ok=True)
    _open(browser, page, tmp_path, f"--screenshot={shot}")
    pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB")).reshape(-1, 3).astype(int)

    def share(rgb: tuple[int, int, int]) -> float:
        return float(np.mean(np.abs(pixels - rgb).sum(axis=1) < 30))

    # the inline charts were decoded and drawn: the blue bars of helpful and the red of harmful contributors
    assert share((0x2E, 0x86, 0xC1)) > 0.002 and share((0xC0, 0x39, 0x2B)) > 0.0005
