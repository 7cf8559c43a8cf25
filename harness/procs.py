"""Child processes that tests and benchmarks start, stopped with their whole tree; waiting on conditions.

Every child runs in its own session (process group), so Ctrl-C on the
terminal reaches only the parent, which then stops each child in order. A
child's descendants are remembered by pid before it is stopped, and any that
outlive it (Parsl's LocalProvider starts worker pools in new sessions) are ended
by pid, so nothing started here keeps running.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

_LIVE: list[ManagedProcess] = []
"""Started and not yet stopped; ``stop_all`` ends them (newest first)."""


def wait_until(condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy and return that; ``TimeoutError`` naming
    ``what`` (and the last error ``condition`` raised) at the deadline."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while time.monotonic() < deadline:
        try:
            value = condition()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - a service that is still starting may raise anything
            last = e
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last!r})")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ManagedProcess:
    """A child process with its output in a log file, stopped with its whole tree."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path,
                 cwd: Path | None = None) -> None:
        self.name, self.args, self.env, self.log_path = name, args, env, log_path
        self.cwd = cwd or log_path.parent
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> ManagedProcess:
        """Start (again, after a stop); output is appended to the log."""
        with open(self.log_path, "ab") as out:
            self.popen = subprocess.Popen(
                self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                start_new_session=True, stdin=subprocess.DEVNULL,
            )
        self.started_at = time.perf_counter()
        _LIVE.append(self)
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def process(self) -> psutil.Process:
        return psutil.Process(self.pid)

    def tree(self) -> list[psutil.Process]:
        """The process and its live descendants (empty once it has exited)."""
        return process_tree(self.pid)

    def output(self, tail: int | None = None) -> str:
        """The log so far (its last ``tail`` characters)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return text if tail is None else text[-tail:]

    def stop(self, timeout: float = 20.0, sig: int = signal.SIGTERM) -> list[int]:
        """Send ``sig`` (SIGTERM: a graceful stop), wait, then kill whatever of its tree outlived it;
        the pids killed."""
        if self.popen is None:
            return []
        descendants = [p for p in self.tree() if p.pid != self.pid]
        killed = []
        if self.popen.poll() is None:
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored signal %d for %.0f s; killing it",
                            self.name, self.pid, sig, timeout)
                killed.append(self.pid)
        survivors = [p for p in descendants if _running(p)]
        _kill_group(self.pid)
        if self.popen.poll() is None:
            self.popen.wait(10)
        killed += end_processes(survivors)
        if self in _LIVE:
            _LIVE.remove(self)
        if killed and sig == signal.SIGTERM:
            log.warning("%s left processes running after its stop; ended pids %s", self.name, killed)
        return killed


def _running(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def end_processes(processes: Iterable[psutil.Process], grace: float = 5.0) -> list[int]:
    """Terminate, then kill, each given process that still runs; the pids that had to be ended."""
    alive = []
    for p in processes:
        if _running(p):
            try:
                p.terminate()
                alive.append(p)
            except psutil.Error:
                pass
    _, still = psutil.wait_procs(alive, timeout=grace)
    for p in still:
        try:
            p.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(still, timeout=grace)
    return [p.pid for p in alive]


def stop_all() -> None:
    """Stop every child still running, newest first (an endpoint before its broker)."""
    for proc in reversed(list(_LIVE)):
        try:
            proc.stop(timeout=10)
        except Exception:  # noqa: BLE001 - keep stopping the others
            log.exception("stopping %s failed", proc.name)


def process_tree(pid: int) -> list[psutil.Process]:
    """The process ``pid`` and its descendants (empty when it is gone)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []
