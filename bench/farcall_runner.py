"""farcall under test: a broker process, an endpoint process with 2 workers, the SDK's ``Executor``.

"farcall" uses the ProcessPoolEngine, "farcall-parsl" the ParslEngine on a
LocalProvider block of 2 workers. Each has its own broker process, so the
broker's CPU and memory figures belong to that system alone. Beyond the common
measurements: the endpoint's cold start and the broker's memory with many
tasks queued (ProcessPoolEngine), and scaling from 0 to 2 workers (ParslEngine).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from functools import partial
from importlib import metadata
from typing import Any

import psutil

from bench.context import RunContext
from bench.farcall_deploy import Broker, Endpoint
from bench.noop import noop
from bench.procs import rss_mb, union
from bench.stats import median
from bench.system import (
    RunTimes,
    System,
    check_results,
    own_process,
    services_groups,
    wait_futures,
)
from harness.procs import process_tree, wait_until
from harness.services import rabbitmq_queues

PARSL_ENGINE: dict[str, Any] = {
    "type": "ParslEngine", "max_workers_per_node": 2, "strategy_period": 0.2, "max_idletime": 60,
    "provider": {"type": "LocalProvider", "init_blocks": 1, "min_blocks": 0, "max_blocks": 1},
}
WORKERS = 2
SCALE_TASKS = 20


class FarcallSystem(System):
    """farcall end to end; ``engine`` None keeps the ProcessPoolEngine section ``configure`` writes."""

    batch_meaning = "Executor(batch_size=k): at most k tasks per submission"

    def __init__(self, ctx: RunContext, name: str, engine_type: str,
                 engine: dict[str, Any] | None = None) -> None:
        super().__init__(ctx)
        self.name = name
        self.engine_type, self.engine = engine_type, engine
        self.broker = Broker(ctx, name)
        self.client: Any = None
        self.token = ""
        self.endpoint: Endpoint | None = None
        self.endpoint_id = ""
        self.executor: Any = None
        self.first_online_s = 0.0
        self._endpoints: list[tuple[Endpoint, str]] = []

    # ----------------------------------------------------------- lifecycle

    def start(self) -> None:
        from farcall import Client, Executor

        self.broker.start()
        self.token = self.broker.create_user(f"bench-{self.name}-{self.ctx.run_id}")
        self.client = Client(broker_url=self.broker.url, token=self.token)
        self.endpoint = Endpoint(self.ctx, self.broker, self.token, f"{self.name}-ep", self.engine_type,
                                 self.engine)
        self.endpoint_id, self.first_online_s = self._start_endpoint(self.endpoint)
        wait_until(lambda: self.client.get_endpoint_status(self.endpoint_id)["workers"] >= WORKERS, 60,
                   f"{WORKERS} workers on {self.endpoint.name}")
        self.executor = Executor(endpoint_id=self.endpoint_id, client=self.client, batch_size=1)

    def _start_endpoint(self, endpoint: Endpoint) -> tuple[str, float]:
        """Configure, start and wait for ``endpoint``; its id and seconds from start to online."""
        endpoint.prepare()
        t0 = endpoint.spawn()
        self._endpoints.append((endpoint, ""))
        eid = endpoint.wait_online(self.client)
        self._endpoints[-1] = (endpoint, eid)
        return eid, time.perf_counter() - t0

    def stop(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        for endpoint, eid in self._endpoints:
            self.leftovers += endpoint.stop()
            if eid and self.client is not None and self.broker.proc.alive():
                try:
                    self.client.delete_endpoint(eid)  # removes its RabbitMQ queue
                except Exception:  # noqa: BLE001 - already deleted, or the broker is gone: cleanup follows
                    pass
        self._endpoints = []
        self.leftovers += self.broker.stop()
        if self.client is not None:
            self.client.close()

    # ----------------------------------------------------------- measurements

    def call(self, x: int) -> Any:
        return self.executor.submit(noop, x).result(timeout=30)

    def run(self, n: int, batch: int, timeout: float) -> RunTimes:
        from farcall import Executor

        ex = Executor(endpoint_id=self.endpoint_id, client=self.client, batch_size=batch)
        finished = False
        try:
            t0 = time.perf_counter()
            futures = [ex.submit(noop, i) for i in range(n)]
            times = wait_futures(futures, t0, time.perf_counter() - t0, timeout)
            finished = True
            check_results([f.result() for f in futures], range(n))
            return times
        finally:
            ex.shutdown(wait=finished, cancel_futures=True)

    def versions(self) -> dict[str, str]:
        return {"farcall": metadata.version("farcall"), "engine": self.engine_type,
                **({"parsl": metadata.version("parsl")} if self.engine else {})}

    def cpu_groups(self) -> dict[str, Callable[[], list[psutil.Process]]]:
        endpoint = self.endpoint
        assert endpoint is not None
        return {"broker": self.broker.tree, "endpoint+children": endpoint.tree, "client": own_process,
                **services_groups()}

    def processes(self) -> list[psutil.Process]:
        assert self.endpoint is not None
        return union(self.broker.tree(), self.endpoint.tree(), process_tree(os.getpid()))

    def extras(self, say: Callable[[str], None], found: dict[str, Any]) -> None:
        found["first_start_to_online_s"] = self.first_online_s
        if self.engine_type == "ParslEngine":
            found.update(self.scale_from_zero(say))
        else:
            found.update(self.cold_start(say))
            found.update(self.queued_memory(say))

    def cold_start(self, say: Callable[[str], None]) -> dict[str, Any]:
        """From ``farcall-endpoint start`` (already registered) to the result of a task queued meanwhile."""
        from farcall import Executor

        endpoint = self.endpoint
        assert endpoint is not None
        samples = []
        for _ in range(self.ctx.sizes.cold_start_repeats):
            self.leftovers += endpoint.stop()
            ex = Executor(endpoint_id=self.endpoint_id, client=self.client, batch_size=1)
            try:
                future = ex.submit(noop, 7)
                wait_until(partial(_has_task_id, future), 30, "the task to be queued")
                t0 = endpoint.spawn()
                assert future.result(timeout=60) == 7
                samples.append(time.perf_counter() - t0)
            finally:
                ex.shutdown(wait=True)
        endpoint.wait_online(self.client)
        say(f"cold start  {median(samples):.2f} s from `farcall-endpoint start` to the first result "
            f"(median of {len(samples)}: {', '.join(f'{s:.2f}' for s in samples)})")
        return {"cold_start_s": median(samples), "cold_start_samples_s": samples}

    def queued_memory(self, say: Callable[[str], None]) -> dict[str, Any]:
        """Broker RSS before and after queuing many tasks for a stopped endpoint; then delete it."""
        n = self.ctx.sizes.queued_tasks
        endpoint = self.endpoint
        assert endpoint is not None
        self.leftovers += endpoint.stop()
        time.sleep(1.0)
        before = rss_mb(self.broker.tree())
        fid = self.client.register_function(noop)
        batch = self.client.create_batch()
        for i in range(n):
            batch.add(fid, (i,))
        t = time.perf_counter()
        self.client.batch_run(self.endpoint_id, batch)
        submit_s = time.perf_counter() - t
        time.sleep(1.0)
        after = rss_mb(self.broker.tree())
        queue = f"{self.ctx.queue_prefix}ep.{self.endpoint_id}"
        depth = rabbitmq_queues(queue).get(queue, 0)
        self.client.delete_endpoint(self.endpoint_id)
        self._endpoints = [(e, i) for e, i in self._endpoints if i != self.endpoint_id]
        gone = wait_until(lambda: queue not in rabbitmq_queues(queue), 30, f"queue {queue} to be deleted")
        label = f"{n // 1000}k" + (" (--quick: 20k instead of 100k)" if n != 100_000 else "")
        say(f"memory      broker RSS {before:.0f} MB -> {after:.0f} MB with {label} tasks queued "
            f"({depth:,} RabbitMQ messages; submitted at {n / submit_s:,.0f} tasks/s; "
            f"endpoint deleted, queue removed: {bool(gone)})")
        key = "broker_rss_mb_100k_queued" if n == 100_000 else f"broker_rss_mb_{n // 1000}k_queued"
        return {
            key: after,
            "broker_rss_mb_queued": after,
            "broker_rss_mb_before_queueing": before,
            "queued_tasks": n,
            "queued_in_rabbitmq": depth,
            "queued_submit_tps": n / submit_s,
        }

    def scale_from_zero(self, say: Callable[[str], None]) -> dict[str, Any]:
        """A ParslEngine endpoint with no blocks: from submitting work to 2 workers in its heartbeat."""
        from farcall import Executor

        spec = {**PARSL_ENGINE, "provider": {**PARSL_ENGINE["provider"], "init_blocks": 0}}
        endpoint = Endpoint(self.ctx, self.broker, self.token, f"{self.name}-scale", "ParslEngine", spec)
        eid, online_s = self._start_endpoint(endpoint)
        wait_until(lambda: self.client.get_endpoint_status(eid)["details"].get("blocks_running") == 0
                   and self.client.get_endpoint_status(eid)["workers"] == 0, 30, "an endpoint with 0 workers")
        ex = Executor(endpoint_id=eid, client=self.client, batch_size=SCALE_TASKS)
        first: list[float] = []
        try:
            t0 = time.perf_counter()
            futures = [ex.submit(noop, i) for i in range(SCALE_TASKS)]
            futures[0].add_done_callback(lambda _: first.append(time.perf_counter() - t0))
            wait_until(lambda: self.client.get_endpoint_status(eid)["workers"] >= WORKERS, 60,
                       f"{WORKERS} workers reported", interval=0.05)
            scale_s = time.perf_counter() - t0
            check_results([f.result(timeout=60) for f in futures], range(SCALE_TASKS))
        finally:
            ex.shutdown(wait=True)
        self.leftovers += endpoint.stop()
        self.client.delete_endpoint(eid)
        self._endpoints = [(e, i) for e, i in self._endpoints if i != eid]
        say(f"scale 0->{WORKERS}  {scale_s:.2f} s from submitting {SCALE_TASKS} tasks to {WORKERS} workers "
            f"reported (heartbeat every 1 s); first result after {first[0]:.2f} s")
        return {"scale_0_to_n_s": scale_s, "scale_first_result_s": first[0], "scale_n_workers": WORKERS,
                "scale_endpoint_start_to_online_s": online_s}


def _has_task_id(future: Any) -> bool:
    return future.task_id is not None


class FarcallProcessSystem(FarcallSystem):
    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx, "farcall", "ProcessPoolEngine")


class FarcallParslSystem(FarcallSystem):
    def __init__(self, ctx: RunContext) -> None:
        super().__init__(ctx, "farcall-parsl", "ParslEngine", PARSL_ENGINE)

