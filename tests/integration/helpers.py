"""The broker and endpoint processes the integration tests drive (their fixtures are in conftest)."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from harness.deploy import BrokerProcess, EndpointProcess
from harness.services import drop_service_data

Broker = BrokerProcess


class Endpoint(EndpointProcess):
    def start(self, client: object, timeout: float = 30) -> str:
        """Start the endpoint; its id once ``client`` sees it online."""
        self.spawn()
        return self.wait_online(client, timeout)


@contextmanager
def own_broker(service_env: dict[str, str], log_dir: Path, tag: str, *,
               settings: dict[str, str] | None = None, **tls: Any) -> Iterator[Broker]:
    """A broker process of its own, with Redis and queue prefixes of its own (removed after):
    for tests whose settings (``FARCALL_*`` in ``settings``; ``tls``: certfile, keyfile, ca_file)
    or whose traffic (bad tokens, bursts) must not touch the session's broker."""
    with own_replicas(service_env, log_dir, tag, 1, settings=settings, **tls) as (broker,):
        yield broker


@contextmanager
def own_replicas(service_env: dict[str, str], log_dir: Path, tag: str, n: int, *,
                 settings: dict[str, str] | None = None, **tls: Any) -> Iterator[list[Broker]]:
    """``n`` broker processes sharing Redis and queue prefixes of their own (removed after):
    replicas of one broker, as behind a load balancer (``own_broker`` for the rest)."""
    unique = f"{tag}-{uuid.uuid4().hex[:6]}"
    env = dict(service_env,
               FARCALL_REDIS_PREFIX=f"{service_env['FARCALL_REDIS_PREFIX']}{unique}:",
               FARCALL_QUEUE_PREFIX=f"{service_env['FARCALL_QUEUE_PREFIX']}{unique}.",
               **(settings or {}))
    brokers = [Broker(env, log_dir / f"{unique}-{i}.log" if n > 1 else log_dir / f"{unique}.log",
                      name=f"{tag} broker" + (f" {i}" if n > 1 else ""), **tls) for i in range(n)]
    try:
        yield [broker.start() for broker in brokers]
    finally:
        for broker in brokers:
            broker.stop()
        drop_service_data(env["FARCALL_REDIS_PREFIX"], env["FARCALL_QUEUE_PREFIX"])
