"""Generic ASGI pieces the broker's app and server use, knowing nothing of farcall's routes."""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import hashlib
import logging
import time
from collections.abc import Callable
from typing import Any

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from farcall.broker.errors import (
    ApiError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    TooManyRequests,
)
from farcall.broker.limits import Slots

log = logging.getLogger(__name__)

LARGE_BODY = 64 * 1024
"""A JSON body over this many bytes counts against its sender's concurrent bodies in
``BodyLimit``; smaller ones pass uncounted (they cannot add up to much)."""
BUSY_RETRY = 1.0
"""Seconds a sender over its concurrent bodies or uploads is told to wait (``Retry-After``)."""
TRIM_EVERY = 1.0
"""Seconds between two returns of freed memory to the system (``MemoryTrim``)."""


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


class Dropped(Exception):  # noqa: N818 - a condition, raised on purpose
    """Raised by an app to end a request whose answer may have started (a download whose token
    was revoked): ``BodyTimeout`` ends it quietly, the connection closed without the rest."""


class BodyTimeout:
    """Drop a request whose body sends nothing for ``seconds`` (uvicorn has no such timeout).

    Each ``receive`` of a body still incomplete gets the deadline; once the body is whole,
    ``receive`` passes untimed (a streaming answer waits on it for the client's disconnect).
    The app (a route reading the body, ``BodyLimit`` buffering it) sees ``RequestTimeout``,
    so what it held is released as the exception unwinds; the answer is 408 with
    ``Connection: close`` if none was started (``render`` writes it), else the connection
    is just closed.
    """

    def __init__(self, app: ASGIApp, seconds: float,
                 render: Callable[[ApiError], Response] | None = None) -> None:
        self.app, self.seconds = app, seconds
        self.render: Callable[[ApiError], Response] = render or (lambda error: error.response())

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        whole = False
        started = False

        async def timed() -> Message:
            nonlocal whole
            if whole:
                return await receive()
            try:
                async with asyncio.timeout(self.seconds):
                    message = await receive()
            except TimeoutError:
                raise RequestTimeout(
                    f"the request body sent nothing for {self.seconds:g} seconds "
                    "(FARCALL_BODY_TIMEOUT); the request was dropped: send it again, without "
                    "pauses") from None
            if message["type"] != "http.request" or not message.get("more_body", False):
                whole = True
            return message

        async def watched(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, timed, watched)
        except Dropped as e:
            log.info("ended a request to %s: %s", _path(scope), e)
        except RequestTimeout as e:
            log.info("dropped a request to %s from %s: its body stalled",
                     _path(scope), (scope.get("client") or ("?",))[0])
            if not started:
                await self.render(e)(scope, receive, send)


class MemoryTrim:
    """Give memory freed by large request bodies back to the system (glibc's ``malloc_trim``),
    at most once per ``TRIM_EVERY`` seconds, after a request whose body was over
    ``LARGE_BODY`` ends. Without it glibc keeps freed heap pages, so a burst of big or stalled
    bodies would leave the broker's memory at its peak (measured in the data plane's memory
    test). Does nothing where the C library has no ``malloc_trim``."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._trim = _malloc_trim()
        self._last = 0.0
        self._pending: asyncio.Task[None] | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self._trim is None:
            await self.app(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            length = dict(scope["headers"]).get(b"content-length", b"0")
            if (not length.isdigit() or int(length) > LARGE_BODY) and self._pending is None:
                self._pending = asyncio.get_running_loop().create_task(self._later())

    async def _later(self) -> None:
        """Trim once the burst's other requests had a moment to end too, off the event loop."""
        try:
            await asyncio.sleep(max(0.0, self._last + TRIM_EVERY - time.monotonic()))
            self._last = time.monotonic()
            assert self._trim is not None
            await asyncio.to_thread(self._trim, 0)
        finally:
            self._pending = None


def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError, TypeError):
        return None
    return trim


class BodyLimit:
    """Refuse bodies over the limit (413), by Content-Length and by bytes actually received.

    ``render`` turns the refusal into the answer (by default the error's own JSON); paths
    under a prefix in ``skip`` pass untouched, for a mounted app that limits its bodies itself
    with answers of its own form (the Action Provider API's ``{"code", "description"}``).
    """

    def __init__(self, app: ASGIApp, limit: int, render: Callable[[ApiError], Response] | None = None,
                 skip: tuple[str, ...] = (), concurrent: int = 0) -> None:
        self.app, self.limit = app, limit
        self.render: Callable[[ApiError], Response] = render or (lambda error: error.response())
        self.skip = tuple(prefix.rstrip("/") + "/" for prefix in skip)
        self.bodies = Slots(concurrent)
        """Bodies over ``LARGE_BODY`` being buffered, per sender (its bearer token's hash, or
        its address without one): checked before buffering, since the route authenticates only
        once the body is whole."""

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
        sender = ""
        if length is None or declared > LARGE_BODY:
            sender = _sender(scope, headers)
            if not self.bodies.take(sender):
                await self.render(TooManyRequests(
                    f"this token (or address) is already sending {self.bodies.limit} large "
                    "request bodies at once (FARCALL_MAX_UPLOADS_PER_USER); wait for them to be "
                    "answered, or send fewer at a time", BUSY_RETRY))(scope, receive, send)
                return
        try:
            body = await self._read(receive)
        finally:
            if sender:
                self.bodies.give(sender)
        if body is None:
            return
        if isinstance(body, ApiError):
            await self.render(body)(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | ApiError | None:
        """The whole body; the error to answer if it is too large; None if the client left."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return self._too_large_error()
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> Response:
        return self.render(self._too_large_error())

    def _too_large_error(self) -> ApiError:
        return PayloadTooLarge(
            f"request body is over the limit of {self.limit} bytes (FARCALL_MAX_PAYLOAD_BYTES); "
            "send fewer tasks per batch or smaller arguments")


def _sender(scope: Scope, headers: dict[bytes, bytes]) -> str:
    """Who sends a request, for counting without a store lookup: a hash of its
    ``Authorization`` header (never the token itself), else its address."""
    authorization = headers.get(b"authorization")
    if authorization:
        return "token:" + hashlib.sha256(authorization).hexdigest()
    client = scope.get("client")
    return "address:" + (client[0] if client else "")


def _path(scope: Scope) -> str:
    """The request's path for a log line, with a blob id (a read capability) left out."""
    return redact(str(scope.get("path", "?")))[:80]


BLOB_PATH = "/v1/blobs/"


def redact(path: str) -> str:
    """``path`` with what follows ``/v1/blobs/`` (a blob id: whoever knows it may ask for the
    blob) replaced by ``...``; other paths unchanged."""
    at = path.find(BLOB_PATH)
    if at < 0:
        return path
    return path[:at + len(BLOB_PATH)] + "..."


class RedactBlobIds(logging.Filter):
    """Leaves blob ids out of uvicorn's access log lines (its third argument is the path):
    a blob id is what allows reading the blob. Install with :func:`redact_access_log`."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, tuple) and len(args) >= 3 and isinstance(args[2], str) \
                and BLOB_PATH in args[2]:
            record.args = (*args[:2], redact(args[2]), *args[3:])
        return True


def redact_access_log() -> None:
    """Put ``RedactBlobIds`` on uvicorn's access logger (after uvicorn configured its logging:
    ``uvicorn.Config`` does), once."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, RedactBlobIds) for f in access.filters):
        access.addFilter(RedactBlobIds())
