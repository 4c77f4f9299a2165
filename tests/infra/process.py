"""Child-process plumbing shared by the fixtures: free ports, supervised processes, bounded waits."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

_PR_SET_PDEATHSIG = 1
_LIVE: set[ManagedProcess] = set()


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _die_with_parent() -> None:
    """In the forked child: ask Linux to SIGKILL us when the spawning thread dies (no orphans)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


class ManagedProcess:
    """A child in its own process group, logging to a file, stopped by `stop()` or at interpreter exit.

    The child also gets PR_SET_PDEATHSIG, so a SIGKILLed test run does not leave it behind. Linux ties that
    signal to the *thread* that started the child: start long-lived processes from a thread that outlives them.
    """

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = [str(a) for a in argv]
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(log_path, "ab") as log:
            self.popen = subprocess.Popen(
                self.argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )
        _LIVE.add(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def poll(self) -> int | None:
        """The exit code, or None while running."""
        return self.popen.poll()

    def log_tail(self, max_bytes: int = 4000) -> str:
        """The last `max_bytes` of the process log, for error messages."""
        try:
            with open(self.log_path, "rb") as log:
                log.seek(max(0, log.seek(0, os.SEEK_END) - max_bytes))
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def stop(self, grace: float = 10.0) -> int | None:
        """SIGTERM the whole process group, SIGKILL it after `grace` seconds; return the exit code."""
        _LIVE.discard(self)
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait(timeout=10)
        # Reap stragglers the main process left in its group.
        self._signal_group(signal.SIGKILL)
        return self.popen.returncode

    def _signal_group(self, sig: signal.Signals) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, sig)

    def __repr__(self) -> str:
        return f"ManagedProcess({self.name!r}, pid={self.popen.pid}, log={str(self.log_path)!r})"


@atexit.register
def _stop_all() -> None:
    for proc in list(_LIVE):
        proc.stop(grace=3.0)


def wait_until(
    check: Callable[[], bool],
    what: str,
    timeout: float,
    interval: float = 0.2,
    process: ManagedProcess | None = None,
) -> None:
    """Poll `check` until it returns True; raise TimeoutError (or the process's death) with context.

    Exceptions raised by `check` count as "not yet"; the last one is reported on timeout.
    """
    deadline = time.monotonic() + timeout
    last_error: BaseException | None = None
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(
                f"{process.name} exited with code {process.poll()} while waiting for {what}; "
                f"log {process.log_path}:\n{process.log_tail()}"
            )
        try:
            if check():
                return
        except Exception as error:  # any failure means "not ready yet"
            last_error = error
        time.sleep(interval)
    detail = f" (last error: {last_error!r})" if last_error else ""
    tail = f"; log {process.log_path}:\n{process.log_tail()}" if process else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}{tail}")
