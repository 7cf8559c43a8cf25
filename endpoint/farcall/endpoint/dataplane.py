"""A worker's side of the data plane: big arguments fetched, big results uploaded.

The agent gives every task a :class:`~farcall.protocol.channel.DataAccess` (the broker's URL,
the endpoint's upload grant, the per-task limit); a worker uses it here, through one
keep-alive :class:`~farcall.transport.Transport` per broker URL and process (TLS as
the agent has it: ``FARCALL_CA_BUNDLE``). Without a ``DataAccess`` (a broker without
a data plane) results travel inline, as before.

A transfer that does not get through (the broker restarting, its store away: refused, reset,
cut off, 5xx, 429) is made again with the SDK's retry policy (:mod:`farcall.retry`) for up to
``DataAccess.retry_seconds`` after its first failure (the endpoint's ``data_retry_seconds``),
so a broker restart costs the task a wait, not a failure; a 4xx that cannot change (expired,
too large, refused) fails the task at once.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any

from farcall import blobs
from farcall.endpoint.errors import ResultTooLarge
from farcall.errors import TaskTooLarge
from farcall.protocol.channel import DataAccess, TaskMessage
from farcall.quietlog import QuietLog
from farcall.retry import Retry, exchange, server_error
from farcall.serialize import INLINE_BYTES, Frames, pack, serialize
from farcall.transport import Response, Transport
from farcall.version import __version__

log = logging.getLogger(__name__)

RETRY_LOG_EVERY = 30.0
"""A worker says its transfers are being retried at most this often (the lines in between are
counted), however many tasks retry at once."""

_transports: dict[str, Transport] = {}
_lock = threading.Lock()
_retrying = QuietLog(log, RETRY_LOG_EVERY, logging.WARNING)
_rate_limited = QuietLog(log, RETRY_LOG_EVERY, logging.WARNING)


def transport(url: str) -> Transport:
    """This process's transport to the broker at ``url`` (made once, shared by threads)."""
    with _lock:
        found = _transports.get(url)
        if found is None:
            found = _transports[url] = Transport(
                url.rstrip("/") + "/v1", {"User-Agent": f"farcall-worker/{__version__}"})
        return found


def _headers(data: DataAccess) -> dict[str, str]:
    return {blobs.GRANT_HEADER: data.grant}


def _exchange(data: DataAccess) -> blobs.Exchange:
    """One transfer's attempts, retried within ``data.retry_seconds`` (see the module's docstring)."""

    def run(send: Callable[[], Response]) -> Response:
        retry = Retry(data.retry_seconds, _rate_limited, _retrying)
        return exchange(send, retry, data.url, blobs.unreachable, server_error)

    return run


def fetch_arguments(task: TaskMessage) -> memoryview:
    """The blob of a task whose ``args`` is a reference payload (``serialize.unpack_blob`` it)."""
    data = task.data
    if data is None:
        raise RuntimeError(
            f"task {task.task_id} has its arguments on the broker's data plane, but this endpoint "
            "was given no way to fetch them (the broker sent no upload grant); upgrade the "
            "endpoint and the broker to the same farcall version")
    return blobs.download(transport(data.url), task.args, _headers(data), _exchange(data))


def result_payload(task: TaskMessage, value: Any) -> str:
    """``value`` as the task's result: inline up to ``INLINE_BYTES``, else uploaded as a blob
    and referenced; ``ResultTooLarge`` over the broker's ``max_task_bytes``."""
    data = task.data
    if data is None:
        return serialize(value)
    frames = pack(value)
    if frames.nbytes <= INLINE_BYTES:
        return frames.payload()
    if data.max_task_bytes and frames.nbytes > data.max_task_bytes:
        raise too_large(task.task_id, frames.nbytes, data.max_task_bytes)
    return _upload(task.task_id, data, frames)


def _upload(task_id: str, data: DataAccess, frames: Frames) -> str:
    try:
        return blobs.upload(transport(data.url), frames, _headers(data), _exchange(data))
    except TaskTooLarge as e:  # the broker's limit changed since the endpoint connected
        raise too_large(task_id, frames.nbytes, e.limit or data.max_task_bytes) from e


def too_large(task_id: str, size: int, limit: int) -> ResultTooLarge:
    """The error of a task whose result is over the broker's per-task limit."""
    return ResultTooLarge(
        f"the result of task {task_id} is {size:,} bytes ({size / 2**20:.1f} MiB) serialized, "
        f"over the broker's limit of {limit:,} bytes ({limit / 2**20:.1f} MiB) per task; return "
        "less data (or write it to shared storage and return its path), or raise "
        "FARCALL_MAX_TASK_BYTES on the broker")
