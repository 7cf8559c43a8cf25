"""In-process ``EndpointStore``: endpoints, their credentials, sessions and queued counts."""

from __future__ import annotations

import builtins
import copy
import time
from typing import Any

from farcall.broker.records import EndpointRecord
from farcall.broker.store.base import EndpointStore, Principal
from farcall.broker.store.memory.state import State, shared_with
from farcall.protocol.channel import Heartbeat


class MemoryEndpoints(EndpointStore):
    def __init__(self, state: State) -> None:
        self._s = state

    async def put(self, endpoint: EndpointRecord, credential_hash: str) -> None:
        eid = endpoint.endpoint_id
        self._s.endpoints[eid] = endpoint.model_copy(
            deep=True, update={"shared_with": sorted(set(endpoint.shared_with))})
        self._s.credentials[eid] = credential_hash
        self._s.tokens[credential_hash] = Principal("endpoint", eid, credential_hash)

    async def get(self, endpoint_id: str) -> EndpointRecord | None:
        ep = self._s.endpoints.get(endpoint_id)
        if ep is None:
            return None
        return ep.model_copy(deep=True, update={
            "connected": bool(self._s.sessions.get(endpoint_id)),
            "queued_tasks": max(0, self._s.queued.get(endpoint_id, 0)),
            "inflight_tasks": len(self._s.inflight.get(endpoint_id, {})),
        })

    async def list(self, user_id: str) -> list[EndpointRecord]:
        ids = sorted(e for e, rec in self._s.endpoints.items() if rec.usable_by(user_id))
        return [r for e in ids if (r := await self.get(e)) is not None]

    async def credential_hash(self, endpoint_id: str) -> str | None:
        return self._s.credentials.get(endpoint_id)

    async def delete(self, endpoint_id: str) -> None:
        s = self._s
        ep = s.endpoints.pop(endpoint_id, None)
        if ep is not None and ep.parent_id:
            s.children.get(ep.parent_id, set()).discard(endpoint_id)
        s.children.pop(endpoint_id, None)
        s.starting.pop(endpoint_id, None)
        s.tokens.pop(s.credentials.pop(endpoint_id, ""), None)
        s.sessions.pop(endpoint_id, None)
        s.live.pop(endpoint_id, None)
        s.inflight.pop(endpoint_id, None)
        s.queued.pop(endpoint_id, None)

    async def share(self, endpoint_id: str, user_id: str, shared: bool) -> None:
        ep = self._s.endpoints.get(endpoint_id)
        if ep is not None:
            ep.shared_with = shared_with(ep.shared_with, user_id, shared)

    async def rotate_credential(self, endpoint_id: str, credential_hash: str) -> str | None:
        s = self._s
        if endpoint_id not in s.endpoints:
            return None
        old = s.credentials.get(endpoint_id, "")
        s.tokens.pop(old, None)
        s.credentials[endpoint_id] = credential_hash
        s.tokens[credential_hash] = Principal("endpoint", endpoint_id, credential_hash)
        return old

    async def connect_session(
        self, endpoint_id: str, session_id: str, heartbeat_period: float | None, at: float
    ) -> str | None:
        self._s.sessions.setdefault(endpoint_id, set()).add(session_id)
        self._s.starting.pop(endpoint_id, None)
        previous = self._s.live.get(endpoint_id)
        self._s.live[endpoint_id] = session_id
        ep = self._s.endpoints.get(endpoint_id)
        if ep is not None and heartbeat_period is not None:
            ep.heartbeat_period = heartbeat_period
        await self.touch(endpoint_id, at)
        return previous

    async def disconnect_session(self, endpoint_id: str, session_id: str, at: float) -> None:
        self._s.sessions.get(endpoint_id, set()).discard(session_id)
        if self._s.live.get(endpoint_id) == session_id:
            del self._s.live[endpoint_id]
        await self.touch(endpoint_id, at)

    async def live_session(self, endpoint_id: str) -> str | None:
        return self._s.live.get(endpoint_id)

    async def set_heartbeat(self, endpoint_id: str, heartbeat: Heartbeat, at: float) -> None:
        ep = self._s.endpoints.get(endpoint_id)
        if ep is not None:
            ep.heartbeat = heartbeat.model_copy(deep=True)
            ep.last_heartbeat = ep.last_seen = at

    async def touch(self, endpoint_id: str, at: float) -> None:
        ep = self._s.endpoints.get(endpoint_id)
        if ep is not None:
            ep.last_seen = at

    async def count_queued(self, endpoint_id: str, delta: int) -> None:
        self._s.queued[endpoint_id] = self._s.queued.get(endpoint_id, 0) + delta

    async def set_multi_user(
        self, endpoint_id: str, multi_user: bool, schema: dict[str, Any] | None
    ) -> bool:
        ep = self._s.endpoints.get(endpoint_id)
        if ep is None:
            return False
        changed = ep.multi_user != multi_user
        ep.multi_user = multi_user
        ep.user_config_schema = copy.deepcopy(schema)
        return changed

    async def ensure_user_endpoint(self, child: EndpointRecord, credential_hash: str) -> bool:
        s, eid = self._s, child.endpoint_id
        if eid in s.endpoints:
            return True
        if child.parent_id not in s.endpoints:
            return False
        shared = [child.for_user] if child.for_user and child.for_user != child.user_id else []
        await self.put(child.model_copy(update={"shared_with": shared}), credential_hash)
        s.children.setdefault(child.parent_id, set()).add(eid)
        return True

    async def children(self, endpoint_id: str) -> builtins.list[EndpointRecord]:
        ids = sorted(self._s.children.get(endpoint_id, ()))
        return [r for e in ids if (r := await self.get(e)) is not None]

    async def claim_start(self, endpoint_id: str, seconds: float) -> bool:
        s, at = self._s, time.monotonic()
        if s.live.get(endpoint_id) or s.starting.get(endpoint_id, 0.0) > at:
            return False
        s.starting[endpoint_id] = at + seconds
        return True

    async def release_start(self, endpoint_id: str) -> None:
        self._s.starting.pop(endpoint_id, None)
