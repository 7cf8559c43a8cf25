"""Taking in a batch of tasks: check it, record it, send it on; shared by REST and the stream.

A batch is recorded in one store round trip and queued whole, as one confirmed
message in the endpoint's queue. Tasks name their function by id; the body
travels to the endpoint once per session (see ``endpoint_channel``).

When the endpoint's channel session is on this replica with credit to spare,
the batch skips the queue: its tasks are recorded in flight with their records
(the same store round trip) and sent to the session at once. That is as safe
as the queue: a task in flight whose result never came is queued again when the
endpoint next says hello (the session's reconcile), and a task record exists
only as long as the store keeps it either way.
"""

from __future__ import annotations

import logging
import uuid

from farcall.broker.errors import NotFound
from farcall.broker.services import Services
from farcall.broker.store.base import Record
from farcall.messages import BatchSubmission, BatchSubmitted, TaskMessage, TaskState, dump_task_batch, now

log = logging.getLogger(__name__)


async def submit_batch(svc: Services, user: str, batch: BatchSubmission) -> BatchSubmitted:
    """Accept ``batch`` for ``user``; raises ``NotFound`` for an id that is not theirs."""
    received = now()
    function_ids = list(dict.fromkeys(t.function_id for t in batch.tasks))
    endpoint_owner, functions, group_owner = await _submit_context(
        svc, batch.endpoint_id, function_ids, batch.task_group_id
    )
    if endpoint_owner != user:
        raise NotFound(f"endpoint {batch.endpoint_id} not found; list yours with GET /v1/endpoints")
    for function_id in function_ids:
        f = functions.get(function_id)
        if f is None or f["user_id"] != user:
            raise NotFound(f"function {function_id} not found; register it first")
    if batch.task_group_id and group_owner != user:
        raise NotFound(
            f"task group {batch.task_group_id} not found; omit task_group_id to get a new one"
        )

    group_id = batch.task_group_id or str(uuid.uuid4())
    new_group = (
        None
        if batch.task_group_id
        else {"task_group_id": group_id, "user_id": user, "created_at": received}
    )
    submitter = batch.submitter.model_dump() if batch.submitter else None
    waiting = now()
    transitions = {TaskState.RECEIVED.value: received, TaskState.WAITING.value: waiting}
    records, messages = [], []
    for spec in batch.tasks:
        task_id = str(uuid.uuid4())
        records.append(
            {
                "task_id": task_id,
                "user_id": user,
                "task_group_id": group_id,
                "endpoint_id": batch.endpoint_id,
                "function_id": spec.function_id,
                "state": TaskState.WAITING.value,
                "transitions": dict(transitions),
                "submitter": submitter,
            }
        )
        messages.append(
            TaskMessage.model_construct(
                task_id=task_id,
                function_id=spec.function_id,
                args=spec.args,
                resource_specification=spec.resource_specification,
                submitter=batch.submitter,
            )
        )
    task_ids = [str(r["task_id"]) for r in records]
    session = svc.sessions.get(batch.endpoint_id)
    direct = None
    if session is not None and session.can_take(len(messages)):
        direct = [(m.task_id, m.function_id, m.model_dump_json()) for m in messages]
    inflight = {task_id: body for task_id, _, body in direct} if direct else None
    await svc.store.create_tasks(records, new_group, inflight=inflight)
    if direct and session is not None:
        # Recorded in flight, the tasks are as safe as dispatched ones: if the session ends
        # before their results, the endpoint's next hello queues them again (reconcile).
        try:
            await session.send_direct(direct, {f: functions[f]["function"] for f in function_ids})
        except Exception as e:  # noqa: BLE001 - reconcile at the next hello queues them again
            log.info("direct send to endpoint %s failed: %r", batch.endpoint_id, e)
        return BatchSubmitted(task_group_id=group_id, task_ids=task_ids)
    try:
        await svc.queue.publish(batch.endpoint_id, [dump_task_batch(messages)])
    except Exception:
        await svc.store.fail_tasks(
            task_ids, "the broker could not queue this task; submit it again", now()
        )
        await svc.store.count_queued(batch.endpoint_id, -len(task_ids))
        raise
    return BatchSubmitted(task_group_id=group_id, task_ids=task_ids)


async def _submit_context(
    svc: Services, endpoint_id: str, function_ids: list[str], task_group_id: str | None
) -> tuple[str | None, dict[str, Record], str | None]:
    """Owners and function records, from the replica's cache when it has them all."""
    cache = svc.owners
    owner = cache.get(f"ep:{endpoint_id}")
    group_owner = cache.get(f"tg:{task_group_id}") if task_group_id else None
    functions = {f: rec for f in function_ids if (rec := cache.get(f"fn:{f}")) is not None}
    if owner is None or len(functions) < len(function_ids) or (task_group_id and group_owner is None):
        owner, functions, group_owner = await svc.store.submit_context(
            endpoint_id, function_ids, task_group_id
        )
        if owner is not None:
            cache.put(f"ep:{endpoint_id}", owner)
        if group_owner is not None:
            cache.put(f"tg:{task_group_id}", group_owner)
        for f, rec in functions.items():
            cache.put(f"fn:{f}", rec)
    return owner, functions, group_owner
