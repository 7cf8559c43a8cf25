"""The floor: ``concurrent.futures.ProcessPoolExecutor(2)`` on this machine, with no network at all.

Every system's overhead per task is its per-task wall time minus this one's.
Batch size 1 is ``submit`` per task; larger sizes are ``map(chunksize=...)``,
which sends that many calls to a worker in one message. Workers come from a
forkserver, so they never inherit the threads of peers that ran before.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import sys
import time
from typing import Any

from bench.noop import noop
from bench.system import RunTimedOut, RunTimes, System, check_results, wait_futures


class ProcessPoolSystem(System):
    name = "processpool"
    batch_meaning = "1: submit() per task; k: map(chunksize=k)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.pool: concurrent.futures.ProcessPoolExecutor | None = None

    def start(self) -> None:
        self.pool = concurrent.futures.ProcessPoolExecutor(
            2, mp_context=multiprocessing.get_context("forkserver")
        )
        self.call(0)

    def stop(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.pool = None

    def call(self, x: int) -> Any:
        assert self.pool is not None
        return self.pool.submit(noop, x).result(timeout=30)

    def run(self, n: int, batch: int, timeout: float) -> RunTimes:
        assert self.pool is not None
        t0 = time.perf_counter()
        if batch == 1:
            futures = [self.pool.submit(noop, i) for i in range(n)]
            times = wait_futures(futures, t0, time.perf_counter() - t0, timeout)
            check_results([f.result() for f in futures], range(n))
            return times
        results = self.pool.map(noop, range(n), chunksize=batch, timeout=timeout)
        submitted = time.perf_counter() - t0
        try:
            values = list(results)
        except TimeoutError:
            raise RunTimedOut(RunTimes(n, submitted, time.perf_counter() - t0, 0)) from None
        times = RunTimes(n, submitted, time.perf_counter() - t0, n)
        check_results(values, range(n))
        return times

    def versions(self) -> dict[str, str]:
        return {"python": sys.version.split()[0]}
