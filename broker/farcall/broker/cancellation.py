"""Cancelling tasks: the one way the broker does it, for ``POST /v1/tasks/cancel`` and for an
action's cancel (``action_runner``).

A cancelled task is final at once in the store; its result stream hears of it, and each
endpoint holding some of them is told to drop or stop them (on whichever replica holds its
session).
"""

from __future__ import annotations

from farcall.broker.endpoint_channel import send_control
from farcall.broker.services import Services
from farcall.broker.store.base import Cancelled
from farcall.broker.submission import publish_results
from farcall.protocol.common import now
from farcall.protocol.control import CancelTasks


async def cancel_tasks(svc: Services, user: str, task_ids: list[str],
                       only_queued: bool = False) -> Cancelled:
    """Cancel ``user``'s tasks among ``task_ids`` that are not final (with ``only_queued``: not
    running either); what was cancelled and why the others were not."""
    done = await svc.store.tasks.cancel(user, task_ids, only_queued, now())
    await publish_results(svc, [(group, result) for group, _, result in done.results])
    by_endpoint: dict[str, list[str]] = {}
    for _, endpoint_id, result in done.results:
        by_endpoint.setdefault(endpoint_id, []).append(result.task_id)
    for endpoint_id, ids in by_endpoint.items():
        await send_control(svc, endpoint_id, CancelTasks(task_ids=ids))
    return done
