"""The embedded stack the SDK tests share (importable by the test modules)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from farcall import Client
from farcall.broker.embedded import EmbeddedBroker


@dataclass
class Stack:
    broker: EmbeddedBroker
    token: str
    endpoint_id: str

    def client(self, **kwargs: object) -> Client:
        return Client(broker_url=self.broker.url, token=self.token, **kwargs)  # type: ignore[arg-type]


def wait_batch(client: Client, task_ids: list[str], timeout: float = 30) -> dict[str, dict[str, Any]]:
    """``get_batch_result`` once no task of ``task_ids`` is pending (fails at the deadline)."""
    from harness.procs import wait_until

    def finished() -> dict[str, dict[str, Any]] | None:
        results = client.get_batch_result(task_ids)
        return None if any(r["pending"] for r in results.values()) else results

    return wait_until(finished, timeout, f"{len(task_ids)} results")
