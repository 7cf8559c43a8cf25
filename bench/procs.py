"""What the benchmark reads off its processes: CPU time, memory, the sockets they listen on.

Starting and stopping them is :mod:`harness.procs`, shared with the tests.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import shutil
from collections.abc import Callable, Iterable

import psutil

log = logging.getLogger(__name__)

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
