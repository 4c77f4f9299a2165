"""Console output for long work: a live rich bar in a terminal, one plain line per step anywhere else.

Outside a terminal (a pipe, a file, ``kubectl logs`` of a Job) a live bar prints nothing until it ends and rich
wraps everything at 80 columns. :func:`console` returns a console that, there, neither wraps nor cuts lines, and
:func:`progress_for` a :class:`PlainProgress` that prints a line per finished step with its time and the ETA.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from rich.console import Console, ConsoleDimensions
from rich.progress import Progress, ProgressColumn

#: Width of a console that is not a terminal: wide enough that tables and contributor names are never cut.
PLAIN_WIDTH = 4096


class AdaptiveConsole(Console):
    """A rich console that, when its stream is not a terminal, is :data:`PLAIN_WIDTH` wide and soft-wraps (no
    hard line breaks inserted), so log lines and table cells come out whole. In a terminal it is a plain
    :class:`~rich.console.Console`. The check is made at each print, so a redirected stream is seen as such."""

    @property
    def size(self) -> ConsoleDimensions:
        """The terminal's size, or :data:`PLAIN_WIDTH` columns when this console does not write to a terminal."""
        if self._width is None and not self.is_terminal:
            return ConsoleDimensions(PLAIN_WIDTH, self._height or 25)
        return Console.size.fget(self)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        Console.size.fset(self, new_size)

    def print(self, *objects: Any, **kwargs: Any) -> None:
        """:meth:`rich.console.Console.print`, soft-wrapped when not writing to a terminal."""
        if kwargs.get("soft_wrap") is None and not self.is_terminal:
            kwargs["soft_wrap"] = True
        super().print(*objects, **kwargs)


def console(*, stderr: bool = False) -> AdaptiveConsole:
    """A console on stdout (or stderr) that does not wrap or cut lines when it is redirected."""
    return AdaptiveConsole(stderr=stderr)


def duration(seconds: float) -> str:
    """A compact duration for ETAs: ``45s``, ``3m10s``, ``2h05m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def step_seconds(seconds: float) -> str:
    """How long one step took: ``0.4 s``, ``41 s``, ``3m10s``."""
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{seconds:.0f} s"
    return duration(seconds)


@dataclass
class _Task:
    description: str
    total: float | None
    started: float
    last: float
    completed: float = 0
    timed: int = 0  # steps that took time (quiet steps, such as results reused from storage, do not count)
    fields: dict[str, Any] = field(default_factory=dict)


class PlainProgress:
    """The part of :class:`rich.progress.Progress` the long jobs use, printing one line per finished step::

        coalition 12/48 {clean-0, noise} utility -12.3456 (41 s) eta 3m10s

    The line is the task's description, ``completed/total``, the ``note`` of this update if given, the step's
    seconds (this update's ``seconds``, else the time since the task's previous step) and the ETA: the mean
    time per timed step so far times the steps left. ``quiet=True`` advances without a line and without
    counting towards the ETA (work found done). Markup in descriptions and notes is printed as is.
    """

    def __init__(self, console: Console):
        self.console = console
        self._tasks: list[_Task] = []

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def add_task(self, description: str, total: float | None = 100.0, **fields: Any) -> int:
        """Start a task; returns its id."""
        now = time.monotonic()
        self._tasks.append(_Task(description, total, now, now, fields=dict(fields)))
        return len(self._tasks) - 1

    def advance(self, task_id: int, advance: float = 1) -> None:
        """One (or ``advance``) more steps done: print the line."""
        self.update(task_id, advance=advance)

    def update(self, task_id: int, *, total: float | None = None, completed: float | None = None,
               advance: float | None = None, description: str | None = None, quiet: bool = False,
               **fields: Any) -> None:
        """:meth:`rich.progress.Progress.update`; a step done (``advance`` or a larger ``completed``) prints."""
        task = self._tasks[task_id]
        if total is not None:
            task.total = total
        if description is not None:
            task.description = description
        task.fields.update(fields)
        before = task.completed
        if completed is not None:
            task.completed = completed
        if advance:
            task.completed += advance
        if task.completed <= before:
            return
        now = time.monotonic()
        if quiet:
            task.last = now
            return
        task.timed += 1
        took = fields.get("seconds")
        took = now - task.last if took is None else float(took)
        task.last = now
        self.console.print(self.line(task, took, str(fields.get("note") or "")), markup=False, highlight=False)

    @staticmethod
    def line(task: _Task, took: float, note: str = "") -> str:
        """The line of a finished step of ``task`` that took ``took`` seconds, with ``note`` after the count."""
        done = f"{task.completed:g}/{task.total:g}" if task.total is not None else f"{task.completed:g}"
        text = f"{task.description} {done}{' ' + note if note else ''} ({step_seconds(took)})"
        if task.total is not None and task.timed:
            left = max(0.0, task.total - task.completed)
            text += f" eta {duration((time.monotonic() - task.started) / task.timed * left)}"
        return text


#: What :func:`progress_for` returns.
ProgressBar = Progress | PlainProgress


def progress_for(console: Console, *columns: str | ProgressColumn, transient: bool = False) -> ProgressBar:
    """A live :class:`~rich.progress.Progress` with ``columns`` when ``console`` writes to a terminal, else a
    :class:`PlainProgress` (a line per step) on it."""
    if console.is_terminal:
        return Progress(*columns, console=console, transient=transient)
    return PlainProgress(console)
