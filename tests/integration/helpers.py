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
    unique = f"{tag}-{uuid.uuid4().hex[:6]}"
    env = dict(service_env,
               FARCALL_REDIS_PREFIX=f"{service_env['FARCALL_REDIS_PREFIX']}{unique}:",
               FARCALL_QUEUE_PREFIX=f"{service_env['FARCALL_QUEUE_PREFIX']}{unique}.",
               **(settings or {}))
    broker = Broker(env, log_dir / f"{unique}.log", name=f"{tag} broker", **tls)
    try:
        yield broker.start()
    finally:
        broker.stop()
        drop_service_data(env["FARCALL_REDIS_PREFIX"], env["FARCALL_QUEUE_PREFIX"])
