"""Output outside a terminal: plain progress lines, no wrapping at 80 columns, whole contributor names."""

from __future__ import annotations

import io
import re

import numpy as np
from rich.table import Table

from datacredit.local import coalition_label
from datacredit.progress import PLAIN_WIDTH, AdaptiveConsole, PlainProgress, duration, progress_for


def test_a_redirected_console_neither_wraps_nor_cuts() -> None:
    buf = io.StringIO()
    con = AdaptiveConsole(file=buf)
    assert not con.is_terminal and con.width == PLAIN_WIDTH
    name = "a-contributor-with-a-name-far-longer-than-any-terminal-would-fit-" * 2
    t = Table()
    t.add_column("contributor")
    t.add_column("value")
    t.add_row(name, "+1.0")
    con.print(t)
    con.print("word " * 60)
    text = buf.getvalue()
    assert any(name in line for line in text.splitlines())  # the whole name on one line
    assert ("word " * 60).strip() in text  # no line break inserted at 80 columns
    assert isinstance(progress_for(con), PlainProgress)


def test_plain_progress_prints_a_line_per_step_with_its_time_and_eta() -> None:
    buf = io.StringIO()
    bar = PlainProgress(AdaptiveConsole(file=buf))
    task = bar.add_task("coalition", total=4)
    bar.update(task, advance=1, quiet=True)  # found done: no line
    bar.update(task, advance=1, note="{clean-0, [red]noise[/]} utility -12.3456", seconds=41)
    bar.advance(task)
    bar.update(task, total=3)  # no step: no line
    lines = buf.getvalue().splitlines()
    assert len(lines) == 2, lines
    assert re.fullmatch(r"coalition 2/4 \{clean-0, \[red\]noise\[/\]\} utility -12\.3456 \(41 s\) eta \d+s", lines[0])
    assert re.fullmatch(r"coalition 3/4 \(\d\.\d s\) eta \d+s", lines[1])  # the note was of the earlier step


def test_durations_and_coalition_labels() -> None:
    assert [duration(s) for s in (4.4, 190, 7500)] == ["4s", "3m10s", "2h05m"]
    names = ["ann", "bob", "cy", "noise"]
    mask = np.array([True, False, False, True])
    assert coalition_label(mask, names) == "{ann, noise}"
    assert coalition_label(np.zeros(4, bool), names) == "{} (∅)"
    assert coalition_label(np.ones(4, bool), names) == "all 4"
    many = [f"c{i}" for i in range(30)]
    assert coalition_label(np.arange(30) != 7, many) == "all but {c7}"
    assert coalition_label(np.arange(30) < 12, many) == "{12 of 30: c0, c1, c2, c3, c4, c5, c6, c7, …}"
