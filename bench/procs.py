"""Child processes the benchmark starts, their CPU time, and the sockets they listen on.

Every child runs in its own session (process group), so Ctrl-C on the
terminal reaches only the benchmark, which then stops each child in order.
Each child's descendants are remembered by pid before it is stopped, and any
that outlive it (Parsl's LocalProvider starts worker pools in new sessions)
are ended by pid, so nothing the benchmark started keeps running.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
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
    """Poll ``condition`` until it returns something truthy; ``TimeoutError`` naming ``what``."""
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


class ManagedProcess:
    """A child process with its output in a log file, stopped with its whole tree."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_path: Path,
                 cwd: Path | None = None) -> None:
        self.name, self.args, self.env, self.log_path = name, args, env, log_path
        self.cwd = cwd or log_path.parent
        self.popen: subprocess.Popen[bytes] | None = None
        self.started_at = 0.0

    def start(self) -> ManagedProcess:
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

    def output(self, tail: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def stop(self, timeout: float = 20.0) -> list[int]:
        """SIGTERM (a graceful stop), then kill whatever of its tree outlived it; the pids killed."""
        if self.popen is None:
            return []
        descendants = [p for p in self.tree() if p.pid != self.pid]
        killed = []
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("%s (pid %d) ignored SIGTERM for %.0f s; killing it",
                            self.name, self.pid, timeout)
                killed.append(self.pid)
        survivors = [p for p in descendants if _running(p)]
        _kill_group(self.pid)
        if self.popen.poll() is None:
            self.popen.wait(10)
        killed += end_processes(survivors)
        if self in _LIVE:
            _LIVE.remove(self)
        if killed:
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
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Processes whose command line contains ``text`` (a run's scratch path), with their descendants.

    This finds what a child started in a new session and then left, such as
    Parsl's worker pools, which LocalProvider starts in the background of a shell that exits.
    """
    found: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if text in " ".join(p.info["cmdline"] or []) and p.pid != os.getpid():
                for q in [p, *p.children(recursive=True)]:
                    found[q.pid] = q
        except psutil.Error:
            continue
    return list(found.values())


def union(*groups: list[psutil.Process]) -> list[psutil.Process]:
    """The processes of all groups, each once."""
    return list({p.pid: p for group in groups for p in group}.values())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def find_service(name: str, marker: str) -> psutil.Process | None:
    """A running process called ``name`` whose command line contains ``marker`` (Redis, RabbitMQ)."""
    for p in psutil.process_iter(["name", "cmdline"]):
        try:
            if p.info["name"] == name and marker in " ".join(p.info["cmdline"] or []):
                return p
        except psutil.Error:
            continue
    return None


def cpu_seconds(p: psutil.Process) -> float:
    try:
        t = p.cpu_times()
        return float(t.user + t.system)
    except psutil.Error:
        return 0.0


class CpuMeter:
    """CPU seconds each named group of processes used between ``start`` and ``stop``.

    A group is a function returning its processes at that moment, so a group
    counts descendants that appeared meanwhile. Processes that exited in between
    are not counted (none of the measured ones do during a throughput run).
    ``details`` splits the last interval by group and process kind, to show where time went.
    """

    def __init__(self, groups: dict[str, Callable[[], list[psutil.Process]]]) -> None:
        self.groups = groups
        self._before: dict[str, dict[int, float]] = {}
        self.details: dict[str, float] = {}

    def start(self) -> None:
        self._before = {name: {p.pid: cpu_seconds(p) for p in procs()} for name, procs in self.groups.items()}

    def stop(self) -> dict[str, float]:
        used: dict[str, float] = {}
        self.details = {}
        for name, procs in self.groups.items():
            before = self._before.get(name, {})
            total = 0.0
            for p in procs():
                delta = max(cpu_seconds(p) - before.get(p.pid, 0.0), 0.0)
                total += delta
                key = f"{name}: {kind(p)}"
                self.details[key] = self.details.get(key, 0.0) + delta
            used[name] = total
        return used


def kind(p: psutil.Process) -> str:
    """A short name for what a process is, the same for every process of that kind (pids and
    numbers left out): the script or module a Python process runs, or its process title."""
    try:
        args = [a for a in p.cmdline() if a] or [p.name()]
    except psutil.Error:
        return "?"
    text = " ".join(args)
    if "celeryd" in text:  # Celery sets process titles
        return "celery pool worker" if "PoolWorker" in text else "celery main"
    if not os.path.exists(args[0]) and not shutil.which(args[0]):  # a title (Parsl, Dask)
        return re.sub(r"\d+", "N", text)[:40]
    if not os.path.basename(args[0]).startswith("python") or len(args) < 2:
        return os.path.basename(args[0])
    rest = args[1:]
    for i, arg in enumerate(rest):  # the interpreter's own options end at -m, -c or the script
        following = rest[i + 1] if i + 1 < len(rest) else ""
        if arg == "-m":
            return f"python -m {following}"
        if arg == "-c":
            found = re.search(r"from ([\w.]+) import", following)
            return f"python -c {found.group(1)}" if found else "python -c"
        if not arg.startswith("-"):
            return os.path.basename(arg)
    return "python"


def rss_mb(processes: Iterable[psutil.Process]) -> float:
    total = 0
    for p in processes:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _loopback(ip: str) -> bool:
    """127.0.0.0/8 and ::1, also when written as an IPv4-mapped IPv6 address (::ffff:127.0.0.1)."""
    address = ipaddress.ip_address(ip.split("%")[0])
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def non_loopback_listeners(processes: Iterable[psutil.Process]) -> list[str]:
    """Listening TCP and bound UDP sockets of ``processes`` that are not on a loopback address."""
    found = []
    for p in processes:
        try:
            conns = p.net_connections(kind="inet")
        except psutil.Error:
            continue
        for c in conns:
            listening = c.status == psutil.CONN_LISTEN or (c.status == psutil.CONN_NONE and not c.raddr)
            if listening and c.laddr and not _loopback(c.laddr.ip):
                found.append(f"{p.name()}[{p.pid}] {c.laddr.ip}:{c.laddr.port}")
    return sorted(set(found))
