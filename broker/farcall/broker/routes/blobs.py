"""The data plane's routes (docs/protocol.md): limits, blob upload, blob download.

Big arguments and results travel as binary blobs on the broker's one port, streamed through
in ``BLOB_CHUNK`` pieces between the client and the ``BlobStore``, never whole in memory. The
body limit middleware leaves ``/v1/blobs`` alone: an upload is held to ``max_task_bytes`` here,
by its ``Content-Length``. Callers are users (bearer token) or an endpoint's workers
(``farcall.broker.grants``, one task's grant).

Who may do what: a blob belongs to the user its bytes count against (the uploading user; for a
worker's upload, the task's submitter), up to ``FARCALL_MAX_BLOB_BYTES_PER_USER`` bytes each
(403 ``quota_exceeded``), with at most ``FARCALL_MAX_UPLOADS_PER_USER`` uploads in progress per
user and replica (429). A user downloads only their own blobs (their uploads and their tasks'
results); a grant downloads only its task's argument blob. Revoking a token ends the transfers
it started (an upload at once, a download at its next chunk).
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, Security
from fastapi.responses import StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials
from starlette.requests import ClientDisconnect

from farcall import serialize
from farcall.broker import grants
from farcall.broker.asgi import Dropped
from farcall.broker.deps import OBJECT_ERRORS, USER_ERRORS, Svc, User, bearer, services_of
from farcall.broker.errors import (
    BACKEND_ERRORS,
    InvalidRequest,
    LengthRequired,
    ObjectNotFound,
    PayloadTooLarge,
    QuotaExceeded,
    TooManyRequests,
    Unauthorized,
    Unavailable,
    clip,
)
from farcall.broker.services import Services
from farcall.broker.store.base import BLOB_CHUNK, BLOB_ID, OverBlobQuota, Principal
from farcall.protocol.rest import BlobCreated, ErrorBody, Limits

PATH = "/v1/blobs"

router = APIRouter(prefix="/v1")

_grant = APIKeyHeader(name=grants.HEADER, auto_error=False, description=(
    "a task's grant, '<endpoint id>:<task id>:<grant>' (for the worker running it)"))

UPLOAD_RETRY = 1.0
"""Seconds a user at their limit of uploads in progress is told to wait (``Retry-After``)."""

BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
UPLOAD_ERRORS: dict[int | str, dict[str, Any]] = {
    **USER_ERRORS,
    403: {"model": ErrorBody, "description": (
        "an endpoint credential, a grant whose task ended, or the owner's blob bytes quota "
        "reached (quota_exceeded, FARCALL_MAX_BLOB_BYTES_PER_USER)")},
    408: {"model": ErrorBody, "description": (
        "the body sent nothing for FARCALL_BODY_TIMEOUT seconds; send the blob again")},
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


@dataclass(frozen=True)
class _Caller:
    """Who sends a data-plane request: a user (by token), or the worker of a task (by grant)."""

    owner: str
    """The user the request acts for: the token's user, or the grant's task's submitter."""
    token_id: str = ""
    grant: grants.Grant | None = None


async def _caller(
    request: Request,
    creds: Annotated[HTTPAuthorizationCredentials | None, Security(bearer)],
    grant: Annotated[str | None, Security(_grant)],
) -> _Caller:
    """Who sends the request (401/403/429 otherwise); either way the request counts against a
    rate limit (a grant's against its endpoint's)."""
    svc = services_of(request)
    address = request.client.host if request.client else ""
    if grant is not None and creds is None:
        found = await grants.check(svc, grant, address)
        svc.charge(Principal("endpoint", found.endpoint_id,
                             token_hash=f"grant:{found.endpoint_id}"))
        return _Caller(found.user_id, grant=found)
    principal = await svc.authenticate(creds.credentials if creds else None, address)
    svc.charge(principal)
    return _Caller(principal.id, token_id=principal.token_id)


Caller = Annotated[_Caller, Depends(_caller)]


class _Revoked(Dropped):
    """The token of a download was revoked while it ran."""


class _Watch:
    """Ends a transfer when its token is revoked (``Services.watch_token``): cancels the
    upload's task, or flags the download, whose next chunk then ends it."""

    def __init__(self, svc: Services, token_id: str) -> None:
        self.revoked = False
        self._task: asyncio.Task[int] | None = None
        self._unwatch = svc.watch_token(token_id, self._close) if token_id else None

    async def _close(self) -> None:
        self.revoked = True
        if self._task is not None:
            self._task.cancel()

    async def run(self, task: asyncio.Task[int]) -> int:
        self._task = task
        try:
            return await task
        except asyncio.CancelledError:
            if self.revoked and not _cancelling():
                raise Unauthorized("the token was revoked during the upload; nothing was "
                                   "stored") from None
            raise
        finally:
            if not task.done():
                task.cancel()

    def stop(self) -> None:
        if self._unwatch is not None:
            self._unwatch()
            self._unwatch = None


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


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
    a blob that lives as long as a task's result, counted against its owner's quota; a body
    cut short stores nothing."""
    s = svc.settings
    size = _declared_size(request, s.max_task_bytes)
    if not svc.uploads.take(caller.owner):
        raise TooManyRequests(
            f"{s.max_uploads_per_user} uploads of this user are already in progress on this "
            "broker (FARCALL_MAX_UPLOADS_PER_USER); wait for one to finish, or upload fewer "
            "blobs at once", UPLOAD_RETRY)
    blob_id = secrets.token_urlsafe(24)
    watch = _Watch(svc, caller.token_id)
    try:
        stored = await watch.run(asyncio.ensure_future(svc.blobs.write(
            blob_id, _body(request, size), s.result_ttl, owner=caller.owner, size=size,
            quota=s.max_blob_bytes_per_user)))
    except OverBlobQuota as e:
        raise QuotaExceeded(
            f"this blob of {e.size:,} bytes would take its owner's stored blobs to "
            f"{e.used + e.size:,} bytes, over the broker's limit of {e.quota:,} bytes per user "
            "(FARCALL_MAX_BLOB_BYTES_PER_USER); wait for earlier tasks' blobs to be freed "
            "(an argument blob when its task ends, a result's after FARCALL_RESULT_TTL), send "
            "less data, or ask the broker's operator to raise the limit") from None
    except ClientDisconnect:
        raise InvalidRequest(_SHORT) from None
    except BACKEND_ERRORS:
        raise
    except OSError as e:  # the blob directory: full, unmounted, not writable
        raise Unavailable(f"the broker could not store the blob ({e.strerror or e}); retry "
                          "later, or tell the broker's operator (FARCALL_BLOB_DIR)") from e
    finally:
        watch.stop()
        svc.uploads.give(caller.owner)
    return BlobCreated(blob_id=blob_id, size=stored)


@router.get("/blobs/{blob_id}", response_class=OctetStream, responses=DOWNLOAD_ANSWERS)
async def download_blob(blob_id: str, caller: Caller, svc: Svc) -> Response:
    """The blob's bytes, streamed, with ``Content-Length``: a user's own blob, or a grant's
    task's argument blob (404 for any other, as for one that does not exist)."""
    grant = caller.grant
    allowed = BLOB_ID.fullmatch(blob_id) and (grant is None or blob_id == grant.args_blob)
    blob = await svc.blobs.open(blob_id) if allowed else None
    if blob is not None and blob.owner and blob.owner != caller.owner:
        await blob.chunks.aclose()  # type: ignore[attr-defined]
        blob = None
    if blob is None:
        raise ObjectNotFound(
            f"blob {clip(blob_id)} not found: unknown, not yours, or expired (a blob lives as "
            "long as its task's result, FARCALL_RESULT_TTL, an argument blob until its task "
            "ends); run the task again")
    watch = _Watch(svc, caller.token_id)
    return OctetStream(_watched(blob.chunks, watch), headers={"Content-Length": str(blob.size)})


async def _watched(chunks: AsyncIterator[bytes], watch: _Watch) -> AsyncIterator[bytes]:
    try:
        async for chunk in chunks:
            if watch.revoked:
                raise _Revoked("the token was revoked during the download")
            yield chunk
    finally:
        watch.stop()
        await chunks.aclose()  # type: ignore[attr-defined]


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
