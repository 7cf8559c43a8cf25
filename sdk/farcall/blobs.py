"""Moving data-plane blobs over HTTP: big arguments and results, outside the task records.

A blob is what ``Frames.blob_parts`` makes (pickle protocol 5 with its buffers out of
band). It is uploaded with ``POST /v1/blobs`` as those parts one after the other (no
join, no base64) and downloaded with ``GET /v1/blobs/{id}`` into one preallocated
buffer (``Transport.read_into``), from which ``serialize.unpack_blob`` rebuilds the object without copying its
arrays. The SDK uses it with a user's token, a worker with its endpoint's grant
(``X-Farcall-Grant``); both go through :class:`~farcall.transport.Transport`, and both retry
a transfer that did not get through (refused, reset, cut off, 5xx, 429) with
:func:`farcall.retry.exchange`; only a 4xx that cannot change fails at once.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
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
"""How a worker authenticates to the data plane: ``<endpoint id>:<task id>:<mac>``
(``DataAccess.grant``, made by :func:`task_grant`)."""


def task_grant(endpoint_id: str, key: bytes, task_id: str) -> str:
    """The grant of one task's worker: HMAC-SHA256 of the task id under the endpoint's grant
    key (``Welcome.upload_grant``, decoded), which only the agent holds. The broker honours it
    while the task is in flight on the endpoint, for that task's own blobs."""
    mac = hmac.new(key, task_id.encode(), hashlib.sha256).digest()
    return f"{endpoint_id}:{task_id}:{base64.urlsafe_b64encode(mac).decode('ascii')}"

Exchange = Callable[[Callable[[], Response]], Response]
"""Runs one attempt-making callable and returns the answer: ``once`` makes a single attempt; the
SDK's ``Client`` and a worker (``farcall.endpoint.dataplane``) retry through
:func:`farcall.retry.exchange` with :func:`unreachable` and ``retry.server_error``."""


class CutShort(TransportError):
    """A download ended with fewer (or more) bytes than its reference says: sent again like a
    dropped connection."""


def unreachable(e: TransportError) -> FarcallError:
    """The error of a transfer that did not get through (after its last attempt)."""
    if isinstance(e, CutShort):
        return DeserializationError(f"{e}: it was cut short or replaced on the way; run the task "
                                    "again")
    return BrokerError(0, f"cannot reach the broker's data plane ({e}); check that the broker "
                          "is running and reachable from here")


def once(send: Callable[[], Response]) -> Response:
    """A single attempt; an unreachable broker is a :class:`BrokerError` (status 0)."""
    try:
        return send()
    except TransportError as e:
        raise unreachable(e) from None


def upload(http: Transport, frames: Frames, headers: dict[str, str] | None = None,
           exchange: Exchange = once) -> str:
    """Store ``frames`` as a blob; the reference payload (strategy ``30``) that stands for it.
    Every attempt sends the whole blob again (an upload cut short stores nothing)."""
    parts = frames.blob_parts()
    all_headers = {"Content-Type": "application/octet-stream", **(headers or {})}
    answer = exchange(lambda: http.send_parts("POST", "/blobs", parts, all_headers))
    if answer.status != 201:
        raise error_of(answer, f"uploading {frames.nbytes} bytes", frames.nbytes)
    created = BlobCreated.model_validate(answer.json())
    return ref_payload(created.blob_id, created.size)


def download(http: Transport, ref: str, headers: dict[str, str] | None = None,
             exchange: Exchange = once) -> memoryview:
    """The blob a reference payload names, in one writable buffer of its size. A download cut
    off is an attempt that failed (:class:`CutShort`): the next one reads the blob from its
    start (the broker's ``GET`` serves whole blobs, no ranges)."""
    blob_id, size = parse_ref(ref)
    path = f"/blobs/{quote(blob_id, safe='')}"

    def attempt() -> Response:
        answer = http.read_into("GET", path, headers, size)
        if answer.status == 200 and len(answer.body) != size:
            raise CutShort(f"blob {blob_id} came as {len(answer.body)} bytes, but its reference "
                           f"says {size}")
        return answer

    answer = exchange(attempt)
    if answer.status != 200:
        raise error_of(answer, f"blob {blob_id}")
    body = answer.body
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
