"""Broker errors and the handlers that turn every failure into ``{"error", "message"}`` JSON.

Bad input always answers 4xx; a Redis or RabbitMQ outage answers 503 so clients
know to retry; only a bug in the broker itself is a 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request, WebSocket
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

CODES = {
    400: "invalid_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    422: "invalid_request",
    503: "unavailable",
}


class ApiError(Exception):
    """Base class of errors the broker answers with; ``status`` is the HTTP status.

    (The SDK's ``farcall.errors.BrokerError`` is what a client raises on receiving one.)
    """

    status = 500
    code = "internal"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers())

    def headers(self) -> dict[str, str] | None:
        return None


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="farcall"'}


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class ObjectNotFound(ApiError):
    status, code = 404, "not_found"


class InvalidRequest(ApiError):
    status, code = 400, "invalid_request"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class Unavailable(ApiError):
    """Redis or RabbitMQ did not answer; the request may be retried."""

    status, code = 503, "unavailable"


def error_response(
    status: int, code: str, message: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        {"error": code, "message": message, **extra}, status_code=status, headers=headers
    )


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


def install_handlers(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""

    async def api_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        return exc.response()

    async def http_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        code = CODES.get(exc.status_code, "error")
        message = str(exc.detail)
        if isinstance(exc.__cause__, RecursionError):  # FastAPI's body parser hit the stack limit
            message = ("the JSON body is nested too deeply to read; no field of the API nests "
                       "more than a few levels (resource_specification at most 16)")
        return error_response(
            exc.status_code, code, message, dict(exc.headers or {}) or None
        )

    async def validation_error(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        detail = [
            {k: v for k, v in e.items() if k not in ("input", "ctx", "url")} for e in exc.errors()
        ]
        first = detail[0] if detail else {}
        where = ".".join(str(p) for p in first.get("loc", ()))
        problem = first.get("msg", "invalid")
        message = f"invalid request: {where}: {problem}; see 'detail' and fix the body"
        return error_response(422, "invalid_request", message, detail=jsonable_encoder(detail))

    async def backend_down(_: Request, exc: Exception) -> JSONResponse:
        log.warning("backing service unavailable: %r", exc)
        return error_response(
            503, "unavailable", "the broker's store or queue is not answering; retry later"
        )

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error", exc_info=exc)
        return error_response(500, "internal", "the broker failed unexpectedly; see its log")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    for kind in BACKEND_ERRORS:
        app.add_exception_handler(kind, backend_down)
    app.add_exception_handler(Exception, unexpected)


async def deny_websocket(ws: WebSocket, error: ApiError) -> None:
    """Refuse a WebSocket upgrade with the error's HTTP status and JSON body (else close 1008)."""
    try:
        await ws.send_denial_response(error.response())
    except RuntimeError:
        await ws.close(code=1008, reason=error.message[:120])
