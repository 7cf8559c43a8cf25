"""The data plane's routes (docs/protocol.md): limits, blob upload, blob download.

Big arguments and results travel as binary blobs on the broker's one port, streamed through
in ``BLOB_CHUNK`` pieces between the client and the ``BlobStore``, never whole in memory. The
body limit middleware leaves ``/v1/blobs`` alone: an upload is held to ``max_task_bytes`` here,
by its ``Content-Length``. Callers are users (bearer token) or an endpoint's workers
(``farcall.broker.grants``); a blob id is unguessable, so knowing it is what allows reading it.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.responses import StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials
from starlette.requests import ClientDisconnect

from farcall import serialize
from farcall.broker import grants
from farcall.broker.deps import OBJECT_ERRORS, USER_ERRORS, Svc, User, bearer, services_of
from farcall.broker.errors import (
    BACKEND_ERRORS,
    InvalidRequest,
    LengthRequired,
    ObjectNotFound,
    PayloadTooLarge,
    Unavailable,
    clip,
)
from farcall.broker.store.base import BLOB_CHUNK, BLOB_ID, Principal
from farcall.protocol.rest import BlobCreated, ErrorBody, Limits

PATH = "/v1/blobs"

router = APIRouter(prefix="/v1")

_grant = APIKeyHeader(name=grants.HEADER, auto_error=False, description=(
    "an endpoint's upload grant, '<endpoint id>:<grant>' (for its workers)"))

BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **USER_ERRORS,
    411: {"model": ErrorBody, "description": "the upload has no Content-Length; send one"},
    413: {"model": ErrorBody, "description": (
        "the blob is bigger than the broker's limit per task (FARCALL_MAX_TASK_BYTES)")},
}
_ERROR_JSON = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}
DOWNLOAD_ANSWERS: dict[int | str, dict[str, Any]] = {
    200: {"content": BINARY, "description": "the blob's bytes"},
    # Spelled out: with "model", FastAPI would give errors the route's octet-stream type.
    **{code: {k: v for k, v in answer.items() if k != "model"} | {"content": _ERROR_JSON}
       for code, answer in OBJECT_ERRORS.items()},
    404: {"description": "no such blob, or it expired", "content": _ERROR_JSON},
}


async def _caller(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    grant: Annotated[str | None, Security(_grant)],
) -> str:
    """Who sends the request: a user's id, or ``endpoint:<id>`` for a grant (401/403/429
    otherwise). Either way the request counts against a rate limit."""
    svc = services_of(request)
    address = request.client.host if request.client else ""
    if grant is not None and creds is None:
        endpoint_id = await grants.check(svc, grant, address)
        svc.charge(Principal("endpoint", endpoint_id, token_hash=f"grant:{endpoint_id}"))
        return f"endpoint:{endpoint_id}"
    principal = await svc.authenticate(creds.credentials if creds else None, address)
    svc.charge(principal)
    return principal.id


Caller = Annotated[str, Depends(_caller)]


class OctetStream(StreamingResponse):
    media_type = "application/octet-stream"


@router.get("/limits", responses=USER_ERRORS)
async def limits(user: User, svc: Svc) -> Limits:
    """What the broker takes: the SDK checks each task against ``max_task_bytes`` before
    sending it, and sends arguments over ``inline_bytes`` as a blob."""
    return Limits(max_task_bytes=svc.settings.max_task_bytes,
                  max_payload_bytes=svc.settings.max_payload_bytes,
                  inline_bytes=serialize.INLINE_BYTES)


@router.post("/blobs", status_code=201, responses=UPLOAD_ERRORS,
             openapi_extra={"requestBody": {"required": True, "content": BINARY}})
async def upload_blob(request: Request, caller: Caller, svc: Svc) -> BlobCreated:
    """Store the raw body (``Content-Length`` required, at most ``FARCALL_MAX_TASK_BYTES``) as
    a blob that lives as long as a task's result; a body cut short stores nothing."""
    size = _declared_size(request, svc.settings.max_task_bytes)
    blob_id = secrets.token_urlsafe(24)
    try:
        stored = await svc.blobs.write(blob_id, _body(request, size), svc.settings.result_ttl)
    except ClientDisconnect:
        raise InvalidRequest(_SHORT) from None
    except BACKEND_ERRORS:
        raise
    except OSError as e:  # the blob directory: full, unmounted, not writable
        raise Unavailable(f"the broker could not store the blob ({e.strerror or e}); retry "
                          "later, or tell the broker's operator (FARCALL_BLOB_DIR)") from e
    return BlobCreated(blob_id=blob_id, size=stored)


@router.get("/blobs/{blob_id}", response_class=OctetStream, responses=DOWNLOAD_ANSWERS)
async def download_blob(blob_id: str, caller: Caller, svc: Svc) -> Response:
    """The blob's bytes, streamed, with ``Content-Length``."""
    blob = await svc.blobs.open(blob_id) if BLOB_ID.fullmatch(blob_id) else None
    if blob is None:
        raise ObjectNotFound(
            f"blob {clip(blob_id)} not found: unknown, or expired (a blob lives as long as its "
            "task's result, FARCALL_RESULT_TTL); run the task again")
    return OctetStream(blob.chunks, headers={"Content-Length": str(blob.size)})


_SHORT = ("the body ended before Content-Length bytes arrived; nothing was stored; send the "
          "blob again")


def _declared_size(request: Request, limit: int) -> int:
    raw = request.headers.get("content-length")
    if raw is None:
        raise LengthRequired("a blob upload needs a Content-Length header (its size in bytes); "
                             "send the body with its length, not chunked")
    try:
        size = int(raw)
    except ValueError:
        raise InvalidRequest("Content-Length is not a number") from None
    if size < 0:
        raise InvalidRequest("Content-Length is negative")
    if size > limit:
        raise PayloadTooLarge(
            f"the blob is {size} bytes, over this broker's limit of {limit} bytes per task; send "
            "less data per task, or ask the broker's operator to raise FARCALL_MAX_TASK_BYTES")
    return size


async def _body(request: Request, size: int) -> AsyncIterator[bytes]:
    """The request body in pieces of about ``BLOB_CHUNK`` bytes, as it arrives; raises if it
    is not exactly ``size`` bytes."""
    pieces: list[bytes] = []
    held = received = 0
    async for piece in request.stream():
        received += len(piece)
        if received > size:
            raise InvalidRequest("the body is longer than its Content-Length; nothing was stored")
        pieces.append(piece)
        held += len(piece)
        if held >= BLOB_CHUNK:
            yield b"".join(pieces)
            pieces.clear()
            held = 0
    if received < size:
        raise InvalidRequest(_SHORT)
    if pieces:
        yield b"".join(pieces)
