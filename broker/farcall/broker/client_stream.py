"""A client's stream on its task group (``WS /v1/task_groups/{id}/results``): results out, batches in.

Out: each batch of stored results of the group, as one frame. Frames come from
the store's pub/sub, so a result stored by any broker replica reaches a client
connected to any other. Nothing is replayed: the client asks
``POST /v1/tasks/status`` for what it missed.

In: batches the client submits on the same socket (``SubmitFrame``), which
spares it an HTTP request per batch; each gets a ``SubmittedFrame`` or a
``RequestFailedFrame`` answer, in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

from fastapi import WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from farcall.broker import auth
from farcall.broker.errors import (
    BACKEND_ERRORS,
    ApiError,
    Forbidden,
    ObjectNotFound,
    Unauthorized,
    deny_websocket,
)
from farcall.broker.services import Services
from farcall.broker.store.base import Subscription
from farcall.broker.submission import submit_batch
from farcall.messages import RequestFailedFrame, SubmitFrame, SubmittedFrame

log = logging.getLogger(__name__)


async def serve(ws: WebSocket, svc: Services, task_group_id: str) -> None:
    principal = await auth.authenticate(svc.store.users, auth.bearer(ws.headers.get("authorization")))
    if principal is None:
        await deny_websocket(
            ws, Unauthorized("no valid user token: send 'Authorization: Bearer <token>'")
        )
        return
    if principal.kind != "user":
        await deny_websocket(ws, Forbidden("an endpoint credential cannot read result streams"))
        return
    if await svc.store.tasks.group_owner(task_group_id) != principal.id:
        await deny_websocket(ws, ObjectNotFound(f"task group {task_group_id} not found"))
        return
    subscription = await svc.store.pubsub.subscribe(task_group_id)
    lock = asyncio.Lock()
    try:
        await ws.accept()
        forward = asyncio.create_task(_forward(ws, subscription, lock))
        watch = asyncio.create_task(_requests(ws, svc, principal.id, lock))
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


async def _forward(ws: WebSocket, subscription: Subscription, lock: asyncio.Lock) -> None:
    async for frame in subscription:
        async with lock:
            await ws.send_text(frame)


async def _requests(ws: WebSocket, svc: Services, user: str, lock: asyncio.Lock) -> None:
    """Answer the client's submissions until it disconnects."""
    limit = svc.settings.max_payload_bytes
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text") or message.get("bytes") or ""
        answer = await _answer(svc, user, raw, limit)
        async with lock:
            await ws.send_text(answer.model_dump_json())


async def _answer(
    svc: Services, user: str, raw: str | bytes, limit: int
) -> SubmittedFrame | RequestFailedFrame:
    request_id = _request_id(raw)
    if len(raw) > limit:
        return RequestFailedFrame(
            request_id=request_id, status=413, error="payload_too_large",
            message=f"the submission is over the limit of {limit} bytes; send fewer tasks per batch",
        )
    try:
        frame = SubmitFrame.model_validate_json(raw)
    except ValidationError as e:
        return RequestFailedFrame(
            request_id=request_id, status=422, error="invalid_request",
            message=f"not a submit frame: {e.errors(include_url=False)[:3]}",
        )
    try:
        done = await submit_batch(svc, user, frame.batch)
    except ApiError as e:
        return RequestFailedFrame(request_id=request_id, status=e.status, error=e.code,
                                  message=e.message)
    except BACKEND_ERRORS as e:
        log.warning("backing service unavailable: %r", e)
        return RequestFailedFrame(request_id=request_id, status=503, error="unavailable",
                                  message="the broker's store or queue is not answering; retry later")
    except Exception:
        log.exception("submission on a result stream failed")
        return RequestFailedFrame(request_id=request_id, status=500, error="internal",
                                  message="the broker failed unexpectedly; see its log")
    return SubmittedFrame(request_id=request_id, task_group_id=done.task_group_id,
                          task_ids=done.task_ids)


def _request_id(raw: str | bytes) -> int:
    try:
        return int(json.loads(raw).get("request_id", 0))
    except (ValueError, TypeError, AttributeError):
        return 0
