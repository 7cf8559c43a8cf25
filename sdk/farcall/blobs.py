"""Moving data-plane blobs over HTTP: big arguments and results, outside the task records.

A blob is what ``Frames.blob_parts`` makes (pickle protocol 5 with its buffers out of
band). It is uploaded with ``POST /v1/blobs`` as those parts one after the other (no
join, no base64) and downloaded with ``GET /v1/blobs/{id}`` into one preallocated
buffer (``Transport.read_into``), from which ``serialize.unpack_blob`` rebuilds the object without copying its
arrays. The SDK uses it with a user's token, a worker with its endpoint's grant
(``X-Farcall-Grant``); both go through :class:`~farcall.transport.Transport`.
"""

from __future__ import annotations

from collections.abc import Callable
from urllib.parse import quote

from farcall.errors import (
    BrokerError,
    DataExpired,
    DeserializationError,
    FarcallError,
    TaskTooLarge,
    broker_error,
)
from farcall.protocol.rest import BlobCreated
from farcall.serialize import Frames, parse_ref, ref_payload
from farcall.transport import Response, Transport, TransportError

GRANT_HEADER = "X-Farcall-Grant"
"""How a worker authenticates to the data plane: ``<endpoint_id>:<grant>`` (``DataAccess.grant``)."""

Exchange = Callable[[Callable[[], Response]], Response]
"""Runs one attempt-making callable and returns the answer: ``Client.exchange`` retries while the
broker is unreachable or busy; ``once`` makes a single attempt."""


def once(send: Callable[[], Response]) -> Response:
    """A single attempt; an unreachable broker is a :class:`BrokerError` (status 0)."""
    try:
        return send()
    except TransportError as e:
        raise BrokerError(0, f"cannot reach the broker's data plane ({e}); check that the broker "
                             "is running and reachable from here") from None


def upload(http: Transport, frames: Frames, headers: dict[str, str] | None = None,
           exchange: Exchange = once) -> str:
    """Store ``frames`` as a blob; the reference payload (strategy ``30``) that stands for it."""
    parts = frames.blob_parts()
    all_headers = {"Content-Type": "application/octet-stream", **(headers or {})}
    answer = exchange(lambda: http.send_parts("POST", "/blobs", parts, all_headers))
    if answer.status != 201:
        raise error_of(answer, f"uploading {frames.nbytes} bytes", frames.nbytes)
    created = BlobCreated.model_validate(answer.json())
    return ref_payload(created.blob_id, created.size)


def download(http: Transport, ref: str, headers: dict[str, str] | None = None,
             exchange: Exchange = once) -> memoryview:
    """The blob a reference payload names, in one writable buffer of its size."""
    blob_id, size = parse_ref(ref)
    path = f"/blobs/{quote(blob_id, safe='')}"
    answer = exchange(lambda: http.read_into("GET", path, headers, size))
    if answer.status != 200:
        raise error_of(answer, f"blob {blob_id}")
    body = answer.body
    if len(body) != size:
        raise DeserializationError(
            f"blob {blob_id} came as {len(body)} bytes, but its reference says {size}: it was cut "
            "short or replaced on the way; run the task again")
    return body if isinstance(body, memoryview) else memoryview(bytearray(body))


def error_of(answer: Response, what: str, size: int = 0) -> FarcallError:
    """The error for a data-plane answer that is not a success, with the broker's message."""
    try:
        body = answer.json()
    except ValueError:
        body = None
    said = body if isinstance(body, dict) else {}
    message = str(said.get("message") or answer.text[:500] or answer.reason)
    if answer.status == 404:
        return DataExpired(404, (
            f"{what} is not on the broker: a task's big arguments and result live as long as its "
            "result (FARCALL_RESULT_TTL on the broker) and this one expired; run the task again "
            f"({message})"), str(said.get("error", "")), body)
    if answer.status == 413:
        limit = said.get("limit")
        return TaskTooLarge(f"{what}: the broker refused it: {message}", size,
                            limit if isinstance(limit, int) else 0)
    return broker_error(answer.status, f"{what}: {message}", str(said.get("error", "")), body)
