"""A report of the machine a task runs on, for ``get_worker_hardware_details``.

It runs as an ordinary task on a worker (pickled by reference to this module, which every
worker has), so it reports what the endpoint's tasks actually get: the host, the CPUs this
process may use, memory, and the accelerators the usual tools see. Only the standard library
and ``/proc`` are read; a tool that is missing is left out, never an error.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess

TOOLS = (("nvidia-smi", "-L"), ("rocm-smi", "--showproductname"), ("lscpu",))
"""Commands whose output the report adds when they are installed."""


def hardware_report(title: str = "farcall worker") -> str:
    """The report, as lines of text."""
    lines = [f"== {title} ==",
             f"host: {platform.node()}",
             f"platform: {platform.platform()}",
             f"python: {platform.python_version()} ({platform.python_implementation()})",
             f"cpus: {os.cpu_count()} on the machine, {_usable_cpus()} usable by this task",
             f"cpu model: {cpu_model()}",
             f"memory: {_mem_total() or 'unknown'}",
             f"working directory: {os.getcwd()}"]
    for tool in TOOLS:
        if shutil.which(tool[0]) is None:
            continue
        try:
            done = subprocess.run(tool, capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.SubprocessError):
            continue
        if done.returncode == 0 and done.stdout.strip():
            lines += [f"-- {' '.join(tool)} --", done.stdout.rstrip()]
    return "\n".join(lines)


def _usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 0


def cpu_model() -> str:
    """The CPU's model name (Linux's ``/proc/cpuinfo``, else what ``platform`` says)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _mem_total() -> str:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    kib = int(line.split()[1])
                    return f"{kib / 2**20:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return ""
