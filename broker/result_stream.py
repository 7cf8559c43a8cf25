"""``WS /v1/task_groups/{id}/results``: push each batch of stored results of a group to the client.

Frames come from the store's pub/sub, so a result stored by any broker replica
reaches a client connected to any other. Nothing is replayed: the client asks
``POST /v1/tasks/status`` for what it missed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from fastapi import WebSocket
from starlette.websockets import WebSocketDisconnect

from farcall.broker import auth
from farcall.broker.errors import Forbidden, NotFound, Unauthorized, deny_websocket
from farcall.broker.services import Services
from farcall.broker.store.base import Subscription

log = logging.getLogger(__name__)


async def serve(ws: WebSocket, svc: Services, task_group_id: str) -> None:
    principal = await auth.authenticate(svc.store, auth.bearer(ws.headers.get("authorization")))
    if principal is None:
        await deny_websocket(
            ws, Unauthorized("no valid user token: send 'Authorization: Bearer <token>'")
        )
        return
    if principal.kind != "user":
        await deny_websocket(ws, Forbidden("an endpoint credential cannot read result streams"))
        return
    if await svc.store.get_task_group_owner(task_group_id) != principal.id:
        await deny_websocket(ws, NotFound(f"task group {task_group_id} not found"))
        return
    subscription = await svc.store.subscribe_results(task_group_id)
    try:
        await ws.accept()
        forward = asyncio.create_task(_forward(ws, subscription))
        watch = asyncio.create_task(_until_closed(ws))
        done, pending = await asyncio.wait({forward, watch}, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if (e := t.exception()) is not None and not isinstance(e, WebSocketDisconnect):
                log.warning("result stream of %s ended: %r", task_group_id, e)
    finally:
        await subscription.close()
        with contextlib.suppress(Exception):
            await ws.close()


async def _forward(ws: WebSocket, subscription: Subscription) -> None:
    async for frame in subscription:
        await ws.send_text(frame)


async def _until_closed(ws: WebSocket) -> None:
    """Read (and ignore) client frames so a disconnect is noticed at once."""
    while (await ws.receive())["type"] != "websocket.disconnect":
        pass
