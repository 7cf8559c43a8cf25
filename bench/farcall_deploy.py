"""farcall as an operator runs it, for the benchmark: :mod:`harness.deploy` under the run's settings.

Only the public command lines and the SDK are used, the way a user would, so
the numbers include everything a real deployment pays.
"""

from __future__ import annotations

from typing import Any

import psutil

from bench.context import RunContext
from bench.procs import processes_mentioning, union
from harness.deploy import BrokerProcess, EndpointProcess
from harness.procs import end_processes
from harness.services import AMQP_URL, REDIS_URL

HEARTBEAT_PERIOD = 1.0
STOP_TIMEOUT = 5.0


class Broker(BrokerProcess):
    """``farcall-broker serve`` on the shared Redis and RabbitMQ under the run's prefixes."""

    def __init__(self, ctx: RunContext, name: str) -> None:
        env = ctx.env(
            FARCALL_REDIS_URL=REDIS_URL,
            FARCALL_AMQP_URL=AMQP_URL,
            FARCALL_REDIS_PREFIX=ctx.redis_prefix,
            FARCALL_QUEUE_PREFIX=ctx.queue_prefix,
        )
        # warning: uvicorn's per-request access log at info would be measured as broker cost
        super().__init__(env, ctx.workdir / f"{name}-broker.log", f"{name} broker", log_level="warning")

    def tree(self) -> list[psutil.Process]:
        return self.proc.tree()


class Endpoint(EndpointProcess):
    """One endpoint: ``configure`` with 2 workers, ``heartbeat_period: 1``, then ``start`` as a process.

    ``engine`` replaces the engine section ``configure`` wrote, when given.
    """

    def __init__(self, ctx: RunContext, broker: Broker, token: str, name: str,
                 engine_type: str, engine: dict[str, Any] | None = None) -> None:
        home = ctx.workdir / f"home-{name}"
        super().__init__(name, ctx.env(FARCALL_HOME=str(home), FARCALL_TOKEN=token,
                                       FARCALL_BROKER_URL=broker.url))
        self.broker = broker
        self.engine_type, self.engine = engine_type, engine

    def prepare(self) -> None:
        """``configure`` with the benchmark's settings."""
        overrides: dict[str, Any] = {"heartbeat_period": HEARTBEAT_PERIOD, "stop_timeout": STOP_TIMEOUT}
        if self.engine is not None:
            overrides["engine"] = self.engine
        super().configure(self.engine_type, 2, self.broker.url, **overrides)

    def tree(self) -> list[psutil.Process]:
        """The endpoint, its children, and the Parsl worker pools it started in other sessions."""
        own = self.proc.tree() if self.proc is not None else []
        return union(own, processes_mentioning(f"{self.home}/"))

    def stop(self, timeout: float = STOP_TIMEOUT + 20) -> list[int]:
        """A graceful stop; the pids of leftovers (e.g. worker pools) that had to be ended after it."""
        return super().stop(timeout) + end_processes(processes_mentioning(f"{self.home}/"))
