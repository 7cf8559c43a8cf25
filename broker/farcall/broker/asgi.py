"""Generic ASGI pieces the broker's app and server use, knowing nothing of farcall's routes."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from farcall.broker.errors import ApiError, InvalidRequest, PayloadTooLarge


def over_limit(data: str | bytes, limit: int) -> bool:
    """Whether a WebSocket message is over ``limit`` bytes (as UTF-8), found before parsing it
    and without copying a text message unless its size in bytes is in doubt."""
    if isinstance(data, bytes) or data.isascii():  # isascii() is O(1) on CPython's str
        return len(data) > limit
    if len(data) > limit:
        return True
    return len(data) * 4 > limit and len(data.encode("utf-8", "surrogatepass")) > limit


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's default WebSocket protocol, except that a connection refused with an HTTP
    answer (ASGI's denial response, how the broker says 401/403/404/429) counts as handled.

    uvicorn's own class logs "ASGI callable returned without completing handshake" at ERROR
    for each such refusal (open upstream as uvicorn PR #3138), so anyone could fill the log.
    Pass it as uvicorn's ``ws`` (``--ws farcall.broker.asgi:WebSocketProtocol``).
    """

    async def send(self, message: Any) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body"):
            self.handshake_complete = True


class BodyLimit:
    """Refuse bodies over the limit (413), by Content-Length and by bytes actually received.

    ``render`` turns the refusal into the answer (by default the error's own JSON); paths
    under a prefix in ``skip`` pass untouched, for a mounted app that limits its bodies itself
    with answers of its own form (the Action Provider API's ``{"code", "description"}``).
    """

    def __init__(self, app: ASGIApp, limit: int, render: Callable[[ApiError], Response] | None = None,
                 skip: tuple[str, ...] = ()) -> None:
        self.app, self.limit = app, limit
        self.render: Callable[[ApiError], Response] = render or (lambda error: error.response())
        self.skip = tuple(prefix.rstrip("/") + "/" for prefix in skip)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or (self.skip and (scope["path"] + "/").startswith(self.skip)):
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await self.render(InvalidRequest("Content-Length is not a number"))(
                    scope, receive, send
                )
                return
            if declared > self.limit:
                await self._too_large()(scope, receive, send)
                return
            if declared == 0:
                await self.app(scope, receive, send)
                return
        elif b"transfer-encoding" not in headers:
            await self.app(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _too_large(self) -> Response:
        return self.render(PayloadTooLarge(
            f"request body is over the limit of {self.limit} bytes (FARCALL_MAX_PAYLOAD_BYTES); "
            "send fewer tasks per batch or smaller arguments"
        ))
