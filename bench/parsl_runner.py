"""Parsl as its users run it: a DataFlowKernel with HighThroughputExecutor on a LocalProvider block.

2 workers, interchange on 127.0.0.1, ``initialize_logging=False`` (HTEX's
default DEBUG logging costs about 45% of throughput here), a short strategy
period. Parsl submits app calls one at a time and has no batching, so there
is one throughput figure, reported as batch size 1.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from importlib import metadata
from typing import Any

import psutil

from bench.context import RunContext
from bench.noop import noop
from bench.procs import processes_mentioning, union
from bench.system import RunTimes, System, check_results, own_children, own_process, wait_futures
from harness.procs import end_processes


class ParslSystem(System):
    name = "parsl"
    batch_sizes = (1,)
    batch_meaning = "no batching: one app call per task (only the one figure)"

    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx)
        self.run_dir = ctx.workdir / "parsl-runinfo"
        self.dfk: Any = None
        self.app: Any = None

    def start(self) -> None:
        import parsl
        from parsl.config import Config
        from parsl.executors import HighThroughputExecutor
        from parsl.providers import LocalProvider

        htex = HighThroughputExecutor(
            label="htex", address="127.0.0.1", max_workers_per_node=2,
            provider=LocalProvider(init_blocks=1, min_blocks=0, max_blocks=1),
        )
        config = Config(executors=[htex], run_dir=str(self.run_dir), strategy_period=0.2,
                        initialize_logging=False, usage_tracking=0)
        self.dfk = parsl.load(config)
        self.app = parsl.python_app(noop, executors=["htex"])
        self.call(0)

    def stop(self) -> None:
        import parsl

        if self.dfk is not None:
            self.dfk.cleanup()
            parsl.clear()
            self.dfk = None
        self.leftovers += end_processes(processes_mentioning(f"{self.run_dir}/"))

    def call(self, x: int) -> Any:
        return self.app(x).result(timeout=30)

    def run(self, n: int, batch: int, timeout: float) -> RunTimes:
        t0 = time.perf_counter()
        futures = [self.app(i) for i in range(n)]
        times = wait_futures(futures, t0, time.perf_counter() - t0, timeout)
        check_results([f.result() for f in futures], range(n))
        return times

    def versions(self) -> dict[str, str]:
        return {"parsl": metadata.version("parsl")}

    def _workers(self) -> list[psutil.Process]:
        """Interchange (a child) and the worker pool (left by LocalProvider in its own session)."""
        return union(own_children(), processes_mentioning(f"{self.run_dir}/"))

    def cpu_groups(self) -> dict[str, Callable[[], list[psutil.Process]]]:
        return {"client+DFK": own_process, "interchange+workers": self._workers}

    def processes(self) -> list[psutil.Process]:
        return union(own_process(), self._workers())
