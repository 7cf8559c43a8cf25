"""Celery as its users run it: a prefork worker of 2 processes on RabbitMQ, results in Redis.

The worker is a separate ``celery -A bench.celery_app worker`` process on a
queue private to this run; result keys carry the run's Redis prefix, so the
run's cleanup removes them. Batch size k means a ``group`` of k signatures sent
with one ``apply_async`` (Celery still publishes one message per task; the
group shares a producer and a result set); 1 means ``apply_async`` per task.
Results are collected with ``ResultSet.join_native``, Celery's bulk path.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import psutil

from bench.context import BIN, REPO, RunContext
from bench.procs import union
from bench.system import RunTimedOut, RunTimes, System, check_results, own_process, services_groups
from harness.procs import ManagedProcess, process_tree

READY_TIMEOUT = 60.0


class CelerySystem(System):
    name = "celery"
    batch_meaning = "1: apply_async per task; k: group of k signatures, one apply_async (k messages)"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.queue = f"{ctx.queue_prefix}celery"
        self.keyprefix = f"{ctx.redis_prefix}celery:"
        env = ctx.env(FCBENCH_CELERY_QUEUE=self.queue, FCBENCH_CELERY_KEYPREFIX=self.keyprefix)
        args = [str(BIN / "celery"), "-A", "bench.celery_app", "worker", "--pool", "prefork",
                "--concurrency", "2", "--loglevel", "WARNING", "--without-gossip", "--without-mingle",
                "--without-heartbeat", "-n", f"fcbench-{ctx.run_id}@localhost", "-Q", self.queue]
        self.proc = ManagedProcess("celery worker", args, env, ctx.workdir / "celery-worker.log", cwd=REPO)
        self.app: Any = None
        self.task: Any = None

    def start(self) -> None:
        from bench.celery_app import make_app, task

        self.proc.start()
        self.app = make_app(self.queue, self.keyprefix)
        self.task = task(self.app)
        try:  # the first answer means the worker is up (remote control, and so ping, is off)
            self.task.apply_async((0,)).get(timeout=READY_TIMEOUT)
        except Exception as e:
            raise RuntimeError(f"the Celery worker did not answer ({e!r}): {self.proc.output()}") from e

    def stop(self) -> None:
        self.leftovers += self.proc.stop()
        if self.app is not None:
            self.app.close()

    def call(self, x: int) -> Any:
        return self.task.apply_async((x,)).get(timeout=30)

    def run(self, n: int, batch: int, timeout: float) -> RunTimes:
        from celery import group
        from celery.exceptions import TimeoutError as CeleryTimeout
        from celery.result import ResultSet

        t0 = time.perf_counter()
        if batch == 1:
            results = [self.task.apply_async((i,)) for i in range(n)]
        else:
            results = []
            for first in range(0, n, batch):
                sent = group(self.task.s(i) for i in range(first, min(n, first + batch))).apply_async()
                results.extend(sent.results)
        submitted = time.perf_counter() - t0
        collected = ResultSet(results, app=self.app)
        try:
            values = collected.join_native(timeout=max(timeout - submitted, 0.1))
        except CeleryTimeout:
            raise RunTimedOut(RunTimes(n, submitted, time.perf_counter() - t0,
                                       collected.completed_count())) from None
        times = RunTimes(n, submitted, time.perf_counter() - t0, n)
        check_results(values, range(n))
        return times

    def versions(self) -> dict[str, str]:
        return {name: metadata.version(name) for name in ("celery", "kombu", "redis")}

    def cpu_groups(self) -> dict[str, Callable[[], list[psutil.Process]]]:
        return {"worker+children": self.proc.tree, "client": own_process, **services_groups()}

    def processes(self) -> list[psutil.Process]:
        return union(self.proc.tree(), process_tree(os.getpid()))
