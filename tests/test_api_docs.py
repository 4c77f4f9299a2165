"""docs/api.md's examples run as written, and print what the page says they print."""

from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import numpy as np
import pytest

PAGE = Path(__file__).resolve().parent.parent / "docs" / "api.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", PAGE.read_text(), re.S)


def _run(code: str, where: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[dict, str]:
    monkeypatch.chdir(where)
    scope: dict = {"__name__": "__docs__"}
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(PAGE), "exec"), scope)  # noqa: S102 - the page's own example
    return scope, out.getvalue()


def test_the_worked_example_prints_the_table_on_the_page_and_writes_the_plot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scope, printed = _run(_blocks("python")[0], tmp_path, monkeypatch)
    shown = re.search(r"\nprints\n\n```\n(.*?)```", PAGE.read_text(), re.S).group(1)  # the page's output
    assert [line.rstrip() for line in printed.splitlines()] == [line.rstrip() for line in shown.splitlines()]
    result = scope["result"]
    frame = result.to_frame()
    assert list(frame.index) == ["alice", "bob", "carol", "mallory"] and frame.loc["mallory", "value"] < 0
    u = scope["utility"]
    total = u(np.ones((1, 4), dtype=bool))[0] - u(np.zeros((1, 4), dtype=bool))[0]
    assert np.isclose(result.values.sum(), total)  # efficiency: the values add up to what the data added
    png = tmp_path / "values.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000


def test_the_stopping_example_settles_the_top_two_early(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    scope, printed = _run(_blocks("python")[1], tmp_path, monkeypatch)
    quick = scope["quick"]
    assert quick.converged and quick.n_evaluations < 400
    assert printed.split()[0] == "converged" and printed.strip().endswith("['p11', 'p10']")
