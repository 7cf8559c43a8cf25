"""What every benchmarked system offers the measurements: start, one call, a timed run of many, stop.

Each system implements ``run`` with its own native batch or async API; the
measurements in ``bench.measure`` are the same code for all of them.
"""

from __future__ import annotations

import abc
import concurrent.futures
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import psutil

from bench.context import BATCH_SIZES, RunContext
from bench.services import rabbitmq_process, redis_process
from harness.procs import process_tree


@dataclass
class RunTimes:
    """A timed run of ``tasks`` tasks: seconds from the first submit until the last submit call
    returned, and until the last result was in (or the deadline, with ``done`` results)."""

    tasks: int
    submitted_s: float
    completed_s: float
    done: int


class RunTimedOut(Exception):
    """A run missed its deadline; ``times`` holds what it got done."""

    def __init__(self, times: RunTimes) -> None:
        super().__init__(f"{times.done} of {times.tasks} results after {times.completed_s:.1f} s")
        self.times = times


class WrongResults(Exception):
    """A system answered something other than the no-op's argument."""


def check_results(results: Sequence[Any], expected: Sequence[Any]) -> None:
    if list(results) != list(expected):
        wrong = next(i for i, (a, b) in enumerate(zip(results, expected, strict=False)) if a != b)
        raise WrongResults(f"result {wrong} is {results[wrong]!r}, expected {expected[wrong]!r}")


def wait_futures(futures: Sequence[concurrent.futures.Future[Any]], t0: float, submitted: float,
                 timeout: float) -> RunTimes:
    """Wait for ``concurrent.futures`` futures; the run's times, or ``RunTimedOut``."""
    done, _ = concurrent.futures.wait(futures, timeout=max(timeout - (time.perf_counter() - t0), 0.1))
    times = RunTimes(len(futures), submitted, time.perf_counter() - t0, len(done))
    if times.done < times.tasks:
        raise RunTimedOut(times)
    return times


def own_process() -> list[psutil.Process]:
    return [psutil.Process(os.getpid())]


def own_children() -> list[psutil.Process]:
    return process_tree(os.getpid())[1:]


def services_groups() -> dict[str, Callable[[], list[psutil.Process]]]:
    """Redis and RabbitMQ as CPU groups (shared: a concurrent test run's load counts here too)."""
    redis, rabbit = redis_process(), rabbitmq_process()
    groups: dict[str, Callable[[], list[psutil.Process]]] = {}
    if redis is not None:
        groups["redis-server"] = lambda: [redis]
    if rabbit is not None:
        groups["rabbitmq beam.smp"] = lambda: [rabbit]
    return groups


class System(abc.ABC):
    """One system under test, started on loopback with 2 workers."""

    name: str = ""
    batch_sizes: tuple[int, ...] = BATCH_SIZES
    batch_meaning: str = ""
    """What "batch size" means for this system, shown in the report."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx
        self.leftovers: list[int] = []
        """Pids still running after a graceful stop, which had to be ended: leaks worth reporting."""

    @abc.abstractmethod
    def start(self) -> None:
        """Start everything and return once a task can run (workers up)."""

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop everything started; safe to call after a failed or partial start."""

    @abc.abstractmethod
    def call(self, x: int) -> Any:
        """One round trip of ``noop(x)``: submit and wait for its result."""

    @abc.abstractmethod
    def run(self, n: int, batch: int, timeout: float) -> RunTimes:
        """Submit ``noop(i)`` for i in range(n) with the native API at ``batch``; wait for every result."""

    def versions(self) -> dict[str, str]:
        return {}

    def cpu_groups(self) -> dict[str, Callable[[], list[psutil.Process]]]:
        """Processes whose CPU time is reported per 1,000 tasks during the throughput runs."""
        return {"client": own_process, "children": own_children}

    def processes(self) -> list[psutil.Process]:
        """Every process of this system, for the loopback-only check."""
        return process_tree(os.getpid())

    def extras(self, say: Callable[[str], None], found: dict[str, Any]) -> None:
        """System-specific measurements after the common ones (cold start, scaling, memory), into
        ``found`` one by one."""
        return None
