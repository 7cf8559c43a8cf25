"""Generic ASGI pieces the broker's app wraps itself in, knowing nothing of farcall's routes."""

from __future__ import annotations

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from farcall.broker.errors import InvalidRequest, PayloadTooLarge


class BodyLimit:
    """Refuse bodies over the limit (413), by Content-Length and by bytes actually received."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None:
            try:
                declared = int(length)
            except ValueError:
                await InvalidRequest("Content-Length is not a number").response()(
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
        return PayloadTooLarge(
            f"request body is over the limit of {self.limit} bytes (FARCALL_MAX_PAYLOAD_BYTES); "
            "send fewer tasks per batch or smaller arguments"
        ).response()
