"""farcall as an operator runs it: a ``farcall-broker serve`` process and ``farcall-endpoint`` processes.

Only the public command lines and the SDK are used, the way a user would, so
the numbers include everything a real deployment pays.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from bench.context import BIN, RunContext
from bench.procs import processes_mentioning, union
from harness.procs import ManagedProcess, end_processes, free_port, wait_until
from harness.services import AMQP_URL, REDIS_URL

HEARTBEAT_PERIOD = 1.0
STOP_TIMEOUT = 5.0


class Broker:
    """``farcall-broker serve`` on loopback, on the shared Redis and RabbitMQ under the run's prefixes."""

    def __init__(self, ctx: RunContext, name: str) -> None:
        self.ctx = ctx
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = ctx.env(
            FARCALL_REDIS_URL=REDIS_URL,
            FARCALL_AMQP_URL=AMQP_URL,
            FARCALL_REDIS_PREFIX=ctx.redis_prefix,
            FARCALL_QUEUE_PREFIX=ctx.queue_prefix,
        )
        # warning: uvicorn's per-request access log at info would be measured as broker cost
        args = [str(BIN / "farcall-broker"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", "warning"]
        self.proc = ManagedProcess(f"{name} broker", args, self.env, ctx.workdir / f"{name}-broker.log")

    def start(self) -> None:
        self.proc.start()
        wait_until(self._healthy, 30, f"the broker on {self.url}\n{self.proc.output()}")

    def _healthy(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"the broker exited: {self.proc.output()}")
        return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200

    def create_user(self, name: str) -> str:
        done = subprocess.run([str(BIN / "farcall-broker"), "users", "create", name], env=self.env,
                              capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            raise RuntimeError(f"farcall-broker users create failed: {done.stderr or done.stdout}")
        return done.stdout.strip().splitlines()[-1].strip()

    def tree(self) -> list[psutil.Process]:
        return self.proc.tree()

    def stop(self) -> list[int]:
        return self.proc.stop()


class Endpoint:
    """One endpoint: ``configure`` with 2 workers, ``heartbeat_period: 1``, then ``start`` as a process.

    ``engine`` replaces the engine section ``configure`` wrote, when given.
    """

    def __init__(self, ctx: RunContext, broker: Broker, token: str, name: str,
                 engine_type: str, engine: dict[str, Any] | None = None) -> None:
        self.ctx, self.broker, self.name = ctx, broker, name
        self.engine_type, self.engine = engine_type, engine
        self.home = ctx.workdir / f"home-{name}"
        self.env = ctx.env(FARCALL_HOME=str(self.home), FARCALL_TOKEN=token,
                           FARCALL_BROKER_URL=broker.url)
        self.proc: ManagedProcess | None = None

    @property
    def dir(self) -> Path:
        return self.home / "endpoints" / self.name

    @property
    def endpoint_id(self) -> str:
        return str(json.loads((self.dir / "endpoint.json").read_text())["endpoint_id"])

    def configure(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(
            [str(BIN / "farcall-endpoint"), "configure", self.name, "--engine", self.engine_type,
             "--max-workers", "2", "--broker-url", self.broker.url],
            env=self.env, capture_output=True, text=True, timeout=60,
        )
        if done.returncode != 0:
            raise RuntimeError(f"farcall-endpoint configure failed: {done.stderr or done.stdout}")
        path = self.dir / "config.yaml"
        config = yaml.safe_load(path.read_text())
        config.update(heartbeat_period=HEARTBEAT_PERIOD, stop_timeout=STOP_TIMEOUT)
        if self.engine is not None:
            config["engine"] = self.engine
        path.write_text(yaml.safe_dump(config))

    def start(self) -> float:
        """Start ``farcall-endpoint start NAME``; the ``perf_counter`` time just before it was started."""
        self.proc = ManagedProcess(f"endpoint {self.name}",
                                   [str(BIN / "farcall-endpoint"), "start", self.name],
                                   self.env, self.home / f"{self.name}.log", cwd=self.home)
        t0 = time.perf_counter()
        self.proc.start()
        return t0

    def wait_online(self, client: Any, timeout: float = 60) -> str:
        proc = self.proc
        assert proc is not None

        def registered() -> bool:
            if not proc.alive():
                raise RuntimeError(f"the endpoint exited: {proc.output()}")
            return (self.dir / "endpoint.json").exists()

        wait_until(registered, timeout, f"endpoint {self.name} to register\n{proc.output()}")
        eid = self.endpoint_id
        wait_until(lambda: client.get_endpoint_status(eid)["status"] == "online", timeout,
                   f"endpoint {self.name} to be online\n{proc.output()}")
        return eid

    def tree(self) -> list[psutil.Process]:
        """The endpoint, its children, and the Parsl worker pools it started in other sessions."""
        own = self.proc.tree() if self.proc is not None else []
        return union(own, processes_mentioning(f"{self.home}/"))

    def stop(self) -> list[int]:
        """A graceful stop; the pids of leftovers (e.g. worker pools) that had to be ended after it."""
        killed = self.proc.stop(timeout=STOP_TIMEOUT + 20) if self.proc is not None else []
        return killed + end_processes(processes_mentioning(f"{self.home}/"))
