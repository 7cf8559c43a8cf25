"""The embedded stack the SDK tests share (importable by the test modules)."""

from __future__ import annotations

from dataclasses import dataclass

from farcall import Client
from farcall.broker.embedded import EmbeddedBroker


@dataclass
class Stack:
    broker: EmbeddedBroker
    token: str
    endpoint_id: str

    def client(self, **kwargs: object) -> Client:
        return Client(broker_url=self.broker.url, token=self.token, **kwargs)  # type: ignore[arg-type]
