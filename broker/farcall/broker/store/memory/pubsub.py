"""In-process ``PubSub``: frames handed to this process's subscribers (one replica only)."""

from __future__ import annotations

from farcall.broker.store.base import LocalSubscription, PubSub, Subscription, deliver_locally
from farcall.broker.store.memory.state import State


class MemoryPubSub(PubSub):
    def __init__(self, state: State) -> None:
        self._s = state

    async def publish(self, channel: str, frame: str) -> None:
        deliver_locally(self._s.subscribers, channel, frame)

    async def subscribe(self, channel: str) -> Subscription:
        return LocalSubscription(self._s.subscribers, channel)
