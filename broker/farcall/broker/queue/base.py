"""The task queue interface: one durable queue per endpoint, so tasks wait while it is offline.

Bodies are opaque bytes (``TaskMessage`` JSON) to the queue. A consumer hands
out deliveries in batches; the endpoint channel acks each batch as soon as it
has recorded it, so no delivery stays unacked while its task runs.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Delivery:
    """One queued body; ``handle`` belongs to the queue implementation."""

    body: bytes
    handle: Any = None


class Consumer(abc.ABC):
    """Deliveries from one endpoint's queue, at most ``prefetch`` unacked at a time."""

    @abc.abstractmethod
    async def get_batch(self, max_n: int, timeout: float | None = None) -> list[Delivery]:
        """Wait for at least one delivery (or ``timeout``, then ``[]``); return up to ``max_n``.

        Deliveries come oldest first and are taken without waiting for more once one is there.
        """

    @abc.abstractmethod
    async def ack(self, deliveries: list[Delivery]) -> None:
        """Acknowledge deliveries; they must be every delivery taken so far and not yet acked."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Stop consuming; every unacked delivery goes back to the queue."""


class TaskQueue(abc.ABC):
    def __init__(self, prefix: str = "farcall.") -> None:
        self.prefix = prefix

    def queue_name(self, endpoint_id: str) -> str:
        return f"{self.prefix}ep.{endpoint_id}"

    async def start(self) -> None:
        """Connect (and fail fast if the backing service does not answer)."""
        return None

    async def close(self) -> None:
        return None

    @abc.abstractmethod
    async def declare(self, endpoint_id: str) -> None:
        """Create the endpoint's queue if it does not exist (idempotent)."""

    @abc.abstractmethod
    async def publish(self, endpoint_id: str, bodies: list[bytes]) -> None:
        """Queue bodies durably; returns once the queue confirmed all of them."""

    @abc.abstractmethod
    async def consume(self, endpoint_id: str, prefetch: int) -> Consumer: ...

    @abc.abstractmethod
    async def depth(self, endpoint_id: str) -> int:
        """Messages waiting in the queue (not counting unacked deliveries)."""

    @abc.abstractmethod
    async def delete(self, endpoint_id: str) -> None: ...
