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
import logging
import re

from fastapi import WebSocket
from pydantic import ValidationError
from starlette.websockets import WebSocketDisconnect

from farcall.broker import auth
from farcall.broker.asgi import over_limit
from farcall.broker.errors import (
    BACKEND_ERRORS,
    ApiError,
    ObjectNotFound,
    TooManyRequests,
    clip,
    deny_websocket,
    error_summary,
)
from farcall.broker.services import Services
from farcall.broker.store.base import Principal, Subscription
from farcall.broker.submission import submit_batch
from farcall.protocol.stream import RequestFailedFrame, SubmitFrame, SubmittedFrame

log = logging.getLogger(__name__)

TOKEN_REVOKED = 4001
"""Close code of a stream whose token was revoked while it was open."""


async def serve(ws: WebSocket, svc: Services, task_group_id: str) -> None:
    address = ws.client.host if ws.client else ""
    try:
        principal = await svc.authenticate(auth.bearer(ws.headers.get("authorization")), address)
        svc.charge(principal)
        if await svc.store.tasks.group_owner(task_group_id) != principal.id:
            raise ObjectNotFound(f"task group {clip(task_group_id)} not found")
    except ApiError as refused:
        await deny_websocket(ws, refused)
        return
    subscription = await svc.store.pubsub.subscribe_results(task_group_id)
    lock = asyncio.Lock()

    async def revoked() -> None:
        with contextlib.suppress(Exception):
            await ws.close(code=TOKEN_REVOKED, reason="the token was revoked")
        await subscription.close()

    unwatch = svc.watch_token(principal.token_id, revoked)
    try:
        await ws.accept()
        forward = asyncio.create_task(_forward(ws, subscription, lock))
        watch = asyncio.create_task(_requests(ws, svc, principal, lock))
        done, pending = await asyncio.wait({forward, watch}, return_when=asyncio.FIRST_COMPLETED)
        for t in pending:
            t.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for t in done:
            if (e := t.exception()) is not None and not isinstance(e, WebSocketDisconnect):
                log.warning("result stream of %s ended: %r", task_group_id, e)
    finally:
        unwatch()
        await subscription.close()
        with contextlib.suppress(Exception):
            await ws.close()


async def _forward(ws: WebSocket, subscription: Subscription, lock: asyncio.Lock) -> None:
    async for frame in subscription:
        async with lock:
            await ws.send_text(frame)


async def _requests(
    ws: WebSocket, svc: Services, principal: Principal, lock: asyncio.Lock
) -> None:
    """Answer the client's submissions until it disconnects; each counts against the token's
    rate limit, as a REST request does."""
    limit = svc.settings.max_payload_bytes
    while True:
        message = await ws.receive()
        if message["type"] == "websocket.disconnect":
            return
        raw = message.get("text") or message.get("bytes") or ""
        answer = await _answer(svc, principal, raw, limit)
        async with lock:
            await ws.send_text(answer.model_dump_json())


async def _answer(
    svc: Services, principal: Principal, raw: str | bytes, limit: int
) -> SubmittedFrame | RequestFailedFrame:
    """The answer to one message; its size, then the token's rate limit, are checked before
    it is read."""
    request_id = _request_id(raw)
    if over_limit(raw, limit):
        return RequestFailedFrame(
            request_id=request_id, status=413, error="payload_too_large",
            message=f"the submission is over the limit of {limit} bytes "
            "(FARCALL_MAX_PAYLOAD_BYTES); send fewer tasks per batch or smaller arguments",
        )
    try:
        svc.charge(principal)
    except ApiError as e:
        return _failed(request_id, e)
    try:
        frame = SubmitFrame.model_validate_json(raw)
    except ValidationError as e:
        return RequestFailedFrame(
            request_id=request_id, status=422, error="invalid_request",
            message=f"not a submit frame: {error_summary(e.errors(), 3)}",
        )
    request_id = frame.request_id
    try:
        done = await submit_batch(svc, principal.id, frame.batch)
    except ApiError as e:
        return _failed(request_id, e)
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


def _failed(request_id: int, e: ApiError) -> RequestFailedFrame:
    return RequestFailedFrame(
        request_id=request_id, status=e.status, error=e.code, message=e.message,
        retry_after=e.retry_after if isinstance(e, TooManyRequests) else None)


REQUEST_ID_WITHIN = 200
"""Until a message is read, its ``request_id`` is looked for only in its first this many bytes
(clients send it second, after ``type``): a message that cannot be used is never parsed whole."""
_REQUEST_ID = re.compile(rb'"request_id"\s*:\s*(-?\d{1,18})\b')


def _request_id(raw: str | bytes) -> int:
    """The ``request_id`` near the start of a message not read yet (0 if not found there)."""
    head = raw[:REQUEST_ID_WITHIN]
    found = _REQUEST_ID.search(head.encode() if isinstance(head, str) else head)
    return int(found.group(1)) if found else 0
