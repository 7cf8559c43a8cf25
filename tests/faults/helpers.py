"""One farcall deployment for fault tests: a broker process, its user, endpoints configured alike."""

from __future__ import annotations

import os
import signal
import uuid
from pathlib import Path
from typing import Any

from harness import BIN
from harness.deploy import BrokerProcess, EndpointProcess
from harness.services import AMQP_URL, REDIS_URL, drop_rabbitmq_prefix, drop_redis_prefix

HEARTBEAT_PERIOD = 1.0
STOP_TIMEOUT = 5.0
WORKERS = 2


class Deployment:
    """A broker on the given Redis and RabbitMQ under its own key and queue prefix, and its endpoints.

    ``stop`` ends every process and removes what the run left in the machine's
    Redis and RabbitMQ (a private service is thrown away whole by its owner).
    """

    def __init__(self, workdir: Path, redis_url: str = REDIS_URL, amqp_url: str = AMQP_URL,
                 name: str = "faults", settings: dict[str, str] | None = None) -> None:
        """``settings``: more broker environment (``FARCALL_*``)."""
        self.workdir = workdir
        self.redis_url = redis_url
        self.tag = f"fcfault-{uuid.uuid4().hex[:8]}"
        self.redis_prefix, self.queue_prefix = f"{self.tag}:", f"{self.tag}."
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARCALL_")}
        env.update(
            FARCALL_REDIS_URL=redis_url,
            FARCALL_AMQP_URL=amqp_url,
            FARCALL_REDIS_PREFIX=self.redis_prefix,
            FARCALL_QUEUE_PREFIX=self.queue_prefix,
            PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
            PYTHONUNBUFFERED="1",
        )
        env.update(settings or {})
        self.env = env
        self.shared_redis, self.shared_rabbit = redis_url == REDIS_URL, amqp_url == AMQP_URL
        self.broker = BrokerProcess(env, workdir / f"{name}-broker.log", f"{name} broker")
        self.token = ""
        self.endpoints: list[EndpointProcess] = []

    def start(self) -> Deployment:
        self.broker.start()
        self.token = self.broker.create_user(f"faults-{uuid.uuid4().hex[:6]}")
        return self

    def client(self, **kwargs: Any) -> Any:
        from farcall import Client

        return Client(broker_url=self.broker.url, token=self.token, **kwargs)

    def endpoint(self, name: str, broker_url: str | None = None, engine: str = "ProcessPoolEngine",
                 workers: int = WORKERS, **config: Any) -> EndpointProcess:
        """A configured endpoint (not started): ``engine`` with ``workers``, heartbeats every second,
        and any other top-level ``config`` keys of its config.yaml."""
        env = dict(self.env, FARCALL_HOME=str(self.workdir / f"home-{name}-{uuid.uuid4().hex[:6]}"),
                   FARCALL_BROKER_URL=self.broker.url, FARCALL_TOKEN=self.token)
        ep = EndpointProcess(name, env)
        ep.configure(engine, workers, broker_url or self.broker.url,
                     heartbeat_period=HEARTBEAT_PERIOD, stop_timeout=STOP_TIMEOUT, **config)
        self.endpoints.append(ep)
        return ep

    def start_endpoint(self, ep: EndpointProcess, timeout: float = 60) -> str:
        """Start ``ep``; its id once the broker shows it online."""
        ep.spawn()
        with self.client() as c:
            return ep.wait_online(c, timeout)

    def stop_endpoints(self) -> None:
        """Stop every endpoint started so far; print the log tail of one that ended badly."""
        while self.endpoints:
            ep = self.endpoints.pop()
            ep.stop()
            proc = ep.proc
            if proc and proc.popen and proc.popen.returncode not in (0, -signal.SIGTERM, -signal.SIGKILL):
                print(f"--- endpoint {ep.name} exited {proc.popen.returncode}; its log ends ---\n"
                      f"{proc.output(4000)}")

    def stop(self) -> None:
        try:
            self.stop_endpoints()
        finally:
            self.broker.stop()
        if self.shared_redis:
            drop_redis_prefix(self.redis_prefix)
        if self.shared_rabbit:
            drop_rabbitmq_prefix(self.queue_prefix)


def kill_agent(ep: EndpointProcess) -> None:
    """``kill -9`` the agent; its workers go with it, as systemd ends a unit's cgroup."""
    assert ep.proc is not None, "start the endpoint first"
    ep.proc.stop(timeout=10, sig=signal.SIGKILL)


def agent_sessions(ep: EndpointProcess) -> int:
    """Sessions the endpoint's agents opened so far, from its log (every restart appends to it)."""
    return 0 if ep.proc is None else ep.proc.output().count("connected to ")
