"""Dask distributed as its users run it: a LocalCluster of 2 worker processes, 1 thread each.

Scheduler in this process (as LocalCluster does), workers behind nannies, all
on 127.0.0.1, dashboard off. Batch size 1 is ``client.submit`` per task; k is
``client.map(..., batch_size=k)``, which sends the graph to the scheduler k tasks
per message.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import psutil

from bench.noop import noop
from bench.system import (
    RunTimedOut,
    RunTimes,
    System,
    check_results,
    own_children,
    own_process,
)


class DaskSystem(System):
    name = "dask"
    batch_meaning = "1: client.submit per task; k: client.map(batch_size=k)"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cluster: Any = None
        self.client: Any = None

    def start(self) -> None:
        from distributed import Client, LocalCluster

        logging.getLogger("distributed").setLevel(logging.ERROR)  # its INFO lines would bury the report
        self.cluster = LocalCluster(
            n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
            dashboard_address=None, worker_dashboard_address=None, silence_logs=logging.ERROR,
        )
        self.client = Client(self.cluster)
        self.call(0)

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
            self.cluster = None

    def call(self, x: int) -> Any:
        return self.client.submit(noop, x, pure=False).result(timeout=30)

    def run(self, n: int, batch: int, timeout: float) -> RunTimes:
        from distributed import wait

        t0 = time.perf_counter()
        if batch == 1:
            futures = [self.client.submit(noop, i, pure=False) for i in range(n)]
        else:
            futures = self.client.map(noop, range(n), pure=False, batch_size=batch)
        submitted = time.perf_counter() - t0
        try:
            wait(futures, timeout=max(timeout - submitted, 0.1))
        except TimeoutError:
            done = sum(f.done() for f in futures)
            raise RunTimedOut(RunTimes(n, submitted, time.perf_counter() - t0, done)) from None
        times = RunTimes(n, submitted, time.perf_counter() - t0, n)
        check_results(self.client.gather(futures), range(n))
        del futures
        return times

    def versions(self) -> dict[str, str]:
        return {name: metadata.version(name) for name in ("dask", "distributed")}

    def cpu_groups(self) -> dict[str, Callable[[], list[psutil.Process]]]:
        return {"client+scheduler": own_process, "nannies+workers": own_children}
