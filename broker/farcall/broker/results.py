"""Where results are published: stored task results reach their task group's result streams
(``client_stream``) on every replica, through pub/sub.

Two kinds of result come here: those an endpoint sent (``store_results``: recorded first,
the first one per task winning, their blobs renewed) and those the broker decided itself
(``publish_results``: a task failed, cancelled, or lost with its endpoint, already final in
the store).
"""

from __future__ import annotations

import logging

from farcall.broker.services import Services
from farcall.broker.store.base import PubSub
from farcall.errors import DeserializationError
from farcall.protocol.channel import ResultMessage
from farcall.protocol.common import now
from farcall.protocol.stream import ResultStreamFrame, TaskResult
from farcall.serialize import is_ref, parse_ref

log = logging.getLogger(__name__)


async def publish_results(svc: Services, done: list[tuple[str, TaskResult]]) -> None:
    """Push results already final in the store, ``(task group id, result)``, to their streams:
    one frame per group."""
    await publish_final(svc.store.pubsub, done)


async def publish_final(pubsub: PubSub, done: list[tuple[str, TaskResult]]) -> None:
    """``publish_results`` for callers that hold only the store (``farcall-broker users``)."""
    by_group: dict[str, list[TaskResult]] = {}
    for group, result in done:
        by_group.setdefault(group, []).append(result)
    for group, results in by_group.items():
        await pubsub.publish_results(group, ResultStreamFrame(results=results))


async def store_results(svc: Services, endpoint_id: str, results: list[ResultMessage]) -> None:
    """Record results ``endpoint_id`` sent (a task completes once: a repeated result is
    dropped) and publish the new ones, their blobs renewed to live as long as the records."""
    await _renew_blobs(svc, endpoint_id, results)
    await publish_results(svc, await svc.store.tasks.complete(endpoint_id, results, now()))


async def _renew_blobs(svc: Services, endpoint_id: str, results: list[ResultMessage]) -> None:
    """Make the blobs of results that are blob references live as long as the results."""
    blob_ids = []
    for r in results:
        if is_ref(r.data):
            try:
                blob_ids.append(parse_ref(r.data)[0])
            except DeserializationError:
                log.warning("endpoint %s: task %s has a malformed blob reference",
                            endpoint_id, r.task_id)
    if not blob_ids:
        return
    try:
        await svc.blobs.touch(blob_ids, svc.settings.result_ttl)
    except Exception as e:  # noqa: BLE001 - they live result_ttl from upload anyway
        log.warning("endpoint %s: could not renew %d result blobs: %r",
                    endpoint_id, len(blob_ids), e)
