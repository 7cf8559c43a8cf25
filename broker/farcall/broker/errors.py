"""Broker errors and the handlers that turn every failure into ``{"error", "message"}`` JSON.

Bad input always answers 4xx; a Redis or RabbitMQ outage answers 503 so clients
know to retry; only a bug in the broker itself is a 500. An answer quotes at most a
short prefix of what the client sent (:func:`clip`), so a huge bad request gets a
small answer.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from fastapi import FastAPI, Request, WebSocket
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from farcall.broker import limits
from farcall.quietlog import QuietLog

log = logging.getLogger(__name__)

CLIP = 80
"""Most characters of client input (a key, an id, a value) an error answer quotes."""
CLIP_PROBLEM = 200
"""Most characters of one validation problem's text (pydantic's or a validator's sentence)."""
MAX_MESSAGE = 500
"""Most characters of an error message: ours are sentences, this only bounds a stray quote."""
MAX_DETAILS = 10
"""Most validation errors listed in a 422 answer's ``detail``."""
BODY_UNREADABLE = "There was an error parsing the body"
"""FastAPI's own detail for a body it could not decode."""
BODY_HINT = ("the body could not be read as JSON; send one JSON object as the route's schema in "
             "/openapi.json describes, with Content-Type: application/json")
"""What ``/v1`` tells a client whose body is not JSON."""
REFUSAL_LOG_EVERY = 10.0
"""Refused connections are logged at most once per this many seconds (with a count)."""

CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    409: "conflict",
    411: "length_required",
    413: "payload_too_large",
    422: "invalid_request",
    429: "rate_limited",
    503: "unavailable",
}


def clip(text: object, limit: int = CLIP) -> str:
    """``text`` (or its ``str``) cut to ``limit`` characters, ending in an ellipsis when cut:
    how an error answer or log line quotes what a client sent."""
    s = text if isinstance(text, str) else str(text)
    return s if len(s) <= limit else s[: max(0, limit - 1)] + "\N{HORIZONTAL ELLIPSIS}"


def error_details(
    errors: Sequence[Mapping[str, Any]], limit: int = MAX_DETAILS
) -> list[dict[str, Any]]:
    """pydantic or FastAPI validation errors as ``{"type", "loc", "msg"}``: the first ``limit``,
    every string clipped, never the ``input`` or ``ctx`` (which hold what the client sent)."""
    details = []
    for e in errors[:limit]:
        loc = [p if isinstance(p, int) else clip(p) for p in e.get("loc", ())]
        if len(loc) > MAX_DETAILS:  # a deeply nested body: where it starts says enough
            loc = [*loc[: MAX_DETAILS - 1], "\N{HORIZONTAL ELLIPSIS}"]
        details.append({"type": clip(e.get("type", "invalid")), "loc": loc,
                        "msg": clip(e.get("msg", "invalid"), CLIP_PROBLEM)})
    return details


def error_summary(errors: Sequence[Mapping[str, Any]], limit: int = 1) -> str:
    """``where: what`` for the first ``limit`` validation errors, clipped, for a one-line message."""
    parts = [
        f"{clip('.'.join(str(p) for p in d['loc']))}: {d['msg']}"
        for d in error_details(errors, limit)
    ]
    if not parts:
        return "invalid"
    more = len(errors) - len(parts)
    return "; ".join(parts) + (f" (and {more} more)" if more > 0 else "")


class ApiError(Exception):
    """Base class of errors the broker answers with; ``status`` is the HTTP status.

    (The SDK's ``farcall.errors.BrokerError`` is what a client raises on receiving one.)
    """

    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        message = clip(message, MAX_MESSAGE)
        super().__init__(message)
        self.message = message

    def response(self, respond: Respond | None = None) -> Response:
        """This error as an answer, written by ``respond`` (farcall's ``ErrorBody`` by default)."""
        return (respond or error_response)(self.status, self.code, self.message, self.headers(),
                                           **self.extra())

    def headers(self) -> dict[str, str] | None:
        return None

    def extra(self) -> dict[str, Any]:
        """Fields of the answer's body besides the code and the message."""
        return {}


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="farcall"'}


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class ObjectNotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    """The object is not in a state that allows this (an action still running, asked to be
    released)."""

    status, code = 409, "conflict"


class QuotaExceeded(ApiError):
    """The user owns as many endpoints or functions as the broker allows."""

    status, code = 403, "quota_exceeded"


class TooManyRequests(ApiError):
    """Over a rate limit (``rate_limited``) or the open-task quota (``quota_exceeded``): the
    answer says when to try again, in the ``Retry-After`` header and as ``retry_after``."""

    status, code = 429, "rate_limited"

    def __init__(self, message: str, retry_after: float, code: str | None = None) -> None:
        super().__init__(message)
        self.retry_after = limits.retry_seconds(retry_after)
        """Seconds to wait before sending the request again (whole milliseconds, rounded up)."""
        if code is not None:
            self.code = code

    def extra(self) -> dict[str, Any]:
        return {"retry_after": self.retry_after}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": limits.retry_after(self.retry_after)}


class InvalidRequest(ApiError):
    status, code = 400, "invalid_request"


class Unprocessable(ApiError):
    """A well-formed request whose values the broker cannot take (as pydantic's own 422): the
    message says which and why; ``detail`` lists the problems as ``{"type", "loc", "msg"}``."""

    status, code = 422, "invalid_request"

    def __init__(self, message: str, detail: list[dict[str, Any]] | None = None) -> None:
        super().__init__(message)
        self.detail = detail

    def extra(self) -> dict[str, Any]:
        return {} if self.detail is None else {"detail": self.detail}


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class LengthRequired(ApiError):
    """A blob upload without ``Content-Length``: its size must be known before it is stored."""

    status, code = 411, "length_required"


class Unavailable(ApiError):
    """Redis or RabbitMQ did not answer; the request may be retried."""

    status, code = 503, "unavailable"


class RequestTimeout(ApiError):
    """The request's body sent nothing for ``FARCALL_BODY_TIMEOUT`` seconds; the connection is
    closed after the answer (the rest of the body is not read)."""

    status, code = 408, "request_timeout"

    def headers(self) -> dict[str, str]:
        return {"Connection": "close"}


class StoreFull(ApiError):
    """Redis refused a write because it is at ``maxmemory`` (with ``noeviction``)."""

    status, code = 503, "store_full"


STORE_FULL = StoreFull(
    "the broker's store is full (Redis is at its maxmemory) and cannot take more data now; "
    "retry later, or free space: delete results you no longer need. Operators: raise Redis' "
    "maxmemory, or lower FARCALL_MAX_BLOB_BYTES_PER_USER or FARCALL_RESULT_TTL")


class Respond(Protocol):
    """Writes an error answer: a broker application's own form of them."""

    def __call__(self, status: int, code: str, message: str,
                 headers: dict[str, str] | None = None, **extra: Any) -> Response: ...


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    """An error as ``/v1`` answers it: ``ErrorBody``."""
    return JSONResponse(
        {"error": code, "message": message, **extra}, status_code=status, headers=headers
    )


def _store_full_errors() -> tuple[type[Exception], ...]:
    """Exception types meaning "the store is out of memory" (Redis' ``OOM`` answer)."""
    try:
        import redis.exceptions
    except ImportError:  # pragma: no cover - redis is part of the broker extra
        return ()
    return (redis.exceptions.OutOfMemoryError,)


STORE_FULL_ERRORS = _store_full_errors()


def _backend_errors() -> tuple[type[Exception], ...]:
    """Exception types meaning "a backing service is down", from the clients that are installed."""
    kinds: list[type[Exception]] = [ConnectionError, TimeoutError]
    try:
        import redis.exceptions

        kinds += [redis.exceptions.ConnectionError, redis.exceptions.TimeoutError]
    except ImportError:  # pragma: no cover - redis is part of the broker extra
        pass
    try:
        import aiormq.exceptions

        kinds += [aiormq.exceptions.AMQPConnectionError, aiormq.exceptions.ChannelInvalidStateError]
    except ImportError:  # pragma: no cover
        pass
    return tuple(kinds)


BACKEND_ERRORS = _backend_errors()


def install_handlers(app: FastAPI, respond: Respond = error_response,
                     body_hint: str = BODY_HINT) -> None:
    """Register the JSON error handlers on ``app``, answering in the form ``respond`` writes;
    ``body_hint`` is what a client whose body is not JSON is told to send."""

    async def api_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, ApiError)
        return exc.response(respond)

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = CODES.get(exc.status_code, "error")
        message = clip(exc.detail, MAX_MESSAGE)
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's body parser hit the stack limit
            message = ("the JSON body is nested too deeply to read; no field of the API nests "
                       "more than a few levels (resource_specification at most 16)")
        elif exc.status_code == 400 and exc.detail == BODY_UNREADABLE:
            message = body_hint
        return respond(exc.status_code, code, message, dict(exc.headers or {}) or None)

    async def validation_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = exc.errors()
        message = f"invalid request: {error_summary(errors)}; see 'detail' and fix the request"
        return respond(422, "invalid_request", message,
                       detail=jsonable_encoder(error_details(errors)))

    async def backend_down(_: Request, exc: Exception) -> Response:
        log.warning("backing service unavailable: %r", exc)
        return respond(503, "unavailable", "the broker's store or queue is not answering; retry later")

    async def store_full(_: Request, exc: Exception) -> Response:
        full("the store is full: %r", exc)
        return STORE_FULL.response(respond)

    async def unexpected(_: Request, exc: Exception) -> Response:
        log.exception("unexpected error", exc_info=exc)
        return respond(500, "internal", "the broker failed unexpectedly; see its log")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    for kind in BACKEND_ERRORS:
        app.add_exception_handler(kind, backend_down)
    for kind in STORE_FULL_ERRORS:
        app.add_exception_handler(kind, store_full)
    app.add_exception_handler(Exception, unexpected)


full = QuietLog(log, every=REFUSAL_LOG_EVERY, level=logging.WARNING)
"""Logs the store refusing writes for lack of memory, at most once per ``REFUSAL_LOG_EVERY``."""

refusals = QuietLog(log, every=REFUSAL_LOG_EVERY)
"""Logs refused WebSocket connections: anyone can cause them, so they must not fill the log."""


async def deny_websocket(ws: WebSocket, error: ApiError) -> None:
    """Refuse a WebSocket upgrade with the error's HTTP status and JSON body (else close 1008),
    logged at INFO at most once per ``REFUSAL_LOG_EVERY`` seconds."""
    refusals("refused a WebSocket to %s from %s: %d %s", clip(ws.url.path),
             ws.client.host if ws.client else "?", error.status, error.code)
    try:
        await ws.send_denial_response(error.response())
    except RuntimeError:
        await ws.close(code=1008, reason=error.message[:120])
