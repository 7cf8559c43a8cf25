"""Taking in a batch of tasks: check it, record it, send it on; shared by REST and the stream.

A batch is recorded in one store round trip and queued whole, as one confirmed
message in the endpoint's queue. Tasks name their function by id; the body
travels to the endpoint once per session (see ``endpoint_channel``).

Recording and queueing are two services, so a crash can fall between them: the store keeps
a recorded batch among the unqueued ones until the queue has confirmed it, and a replica's
sweep (``requeue``) queues a batch left there. A queue that is down leaves the batch to that
sweep too, so an accepted task is never failed for an outage. A submission with a
``request_id`` creates its tasks once: sent again (the answer was lost), it gets the same ids.

A batch for a multi-user endpoint goes to the submitter's user endpoint for its
``user_endpoint_config`` instead (``user_endpoints``): recorded and queued there, and, when that
user endpoint has no session, its manager is asked to start it. An ordinary endpoint's batch
pays nothing for this: whether an endpoint is a manager comes with its access lists.

When the endpoint's channel session is on this replica with credit to spare
(``Services.sessions``, seen as a ``sessions.LiveSession``), the batch skips the
queue: its tasks are recorded in flight with their records (the same store round
trip) and sent to the session at once. That is as safe as the queue: a task in
flight whose result never came is queued again when the endpoint next says hello
(the session's reconcile), and a task record exists only as long as the store
keeps it either way.
"""

from __future__ import annotations

import logging
import uuid

from farcall.broker import user_endpoints
from farcall.broker.errors import (
    Conflict,
    InvalidRequest,
    ObjectNotFound,
    TooManyRequests,
    Unavailable,
    Unprocessable,
    clip,
)
from farcall.broker.queue.base import QueueMissing
from farcall.broker.records import NewTasks
from farcall.broker.results import publish_results
from farcall.broker.services import Services
from farcall.broker.store.base import AlreadySubmitted, OverQuota, SubmissionContext, Submitted
from farcall.protocol.channel import TaskMessage, dump_task_batch, join_task_batch
from farcall.protocol.common import now
from farcall.protocol.rest import BatchSubmission, BatchSubmitted

log = logging.getLogger(__name__)

QUOTA_RETRY = 2.0
"""Seconds a client over its open-task quota is told to wait before submitting again."""


class NotUsable(ObjectNotFound):
    """An id in a submission that is not the submitter's (nor shared with them); ``what`` names
    it (``"endpoint <id>"``, ``"function <id>"``, ``"task group <id>"``) for callers that say it
    their own way (a timer's stop reason)."""

    def __init__(self, message: str, what: str) -> None:
        super().__init__(message)
        self.what = what


async def authorize(
    svc: Services, user: str, endpoint_id: str, function_ids: list[str],
    task_group_id: str | None = None,
) -> SubmissionContext:
    """What submitting ``function_ids`` to ``endpoint_id`` (in ``task_group_id``) needs to know,
    if ``user`` may: raises ``NotUsable`` (an ``ObjectNotFound``) for an id that is not theirs
    (nor shared with them). A timer is checked with it when created, and again at each run by
    ``submit_batch``."""
    context = await _submission_context(svc, endpoint_id, function_ids, task_group_id)
    if not context.endpoint_usable_by(user):
        raise NotUsable(
            f"endpoint {endpoint_id} not found; list yours (and those shared with you) "
            "with GET /v1/endpoints", f"endpoint {endpoint_id}")
    for function_id in function_ids:
        f = context.functions.get(function_id)
        if f is None or not f.usable_by(user):
            raise NotUsable(f"function {function_id} not found; register it first",
                            f"function {function_id}")
    if task_group_id and context.group_owner != user:
        raise NotUsable(
            f"task group {task_group_id} not found; omit task_group_id to get a new one",
            f"task group {task_group_id}")
    return context


async def submit_batch(svc: Services, user: str, batch: BatchSubmission) -> BatchSubmitted:
    """Accept ``batch`` for ``user``; raises ``ObjectNotFound`` for an id that is not theirs."""
    received = now()
    function_ids = list(dict.fromkeys(t.function_id for t in batch.tasks))
    context = await authorize(svc, user, batch.endpoint_id, function_ids, batch.task_group_id)
    functions = context.functions
    endpoint_id = batch.endpoint_id
    if context.endpoint_multi_user:
        endpoint_id = await user_endpoints.route(svc, user, batch.endpoint_id,
                                                 batch.user_endpoint_config or {})
    elif context.endpoint_parent:
        raise InvalidRequest(
            f"endpoint {clip(endpoint_id)} is a user endpoint of multi-user endpoint "
            f"{context.endpoint_parent}: submit to {context.endpoint_parent} with the same "
            "user_endpoint_config instead")
    elif batch.user_endpoint_config is not None:
        raise Unprocessable(
            f"endpoint {clip(endpoint_id)} is not a multi-user endpoint (or its agent has not "
            "connected since it became one), so it takes no user_endpoint_config; leave "
            "user_endpoint_config out")

    messages = [
        TaskMessage.model_construct(
            task_id=str(uuid.uuid4()),
            function_id=spec.function_id,
            args=spec.args,
            resource_specification=spec.resource_specification,
            submitter=batch.submitter,
            user_id=user,
            walltime=spec.walltime,
            max_retries=spec.max_retries,
            result_format=spec.result_format,
        )
        for spec in batch.tasks
    ]
    task_ids = [m.task_id for m in messages]
    new = NewTasks(
        request_id=batch.request_id or "",
        user_id=user,
        task_group_id=batch.task_group_id or str(uuid.uuid4()),
        endpoint_id=endpoint_id,
        task_ids=task_ids,
        function_ids=[m.function_id for m in messages],
        received_at=received,
        waiting_at=now(),
        submitter=batch.submitter,
        new_group=not batch.task_group_id,
    )
    answer = BatchSubmitted(task_group_id=new.task_group_id, task_ids=task_ids)
    session = svc.sessions.get(endpoint_id)
    direct = None
    if session is not None and session.can_take(len(messages)):
        direct = [(m.task_id, m.function_id, m.model_dump_json()) for m in messages]
    inflight = {task_id: body for task_id, _, body in direct} if direct else None
    queued = b"" if direct else dump_task_batch(messages)
    try:
        went = await svc.store.tasks.create(
            new, inflight=inflight, session_id=session.session_id if session else "",
            max_open=svc.settings.max_open_tasks, queued_body=queued)
    except AlreadySubmitted as e:
        return _answered_before(batch, endpoint_id, e.prior)
    except OverQuota as e:
        raise TooManyRequests(
            f"you have {e.open_tasks} tasks waiting or running and this batch of {len(task_ids)} "
            f"would pass the broker's limit of {e.limit} (FARCALL_MAX_OPEN_TASKS); wait for some "
            "to finish", QUOTA_RETRY, code="quota_exceeded") from None
    if went and direct and session is not None:
        # Recorded in flight, the tasks are as safe as dispatched ones: if the session ends
        # before their results, the endpoint's next hello queues them again (reconcile).
        try:
            await session.send_direct(direct, {f: functions[f].function for f in function_ids})
        except Exception as e:  # noqa: BLE001 - reconcile at the next hello queues them again
            log.info("direct send to endpoint %s failed: %r", endpoint_id, e)
        return answer
    if direct:
        queued = join_task_batch([body for _, _, body in direct])
    try:
        await svc.queue.publish(endpoint_id, [queued])
    except QueueMissing:
        # The endpoint's queue is gone (the endpoint was deleted): the tasks are final.
        failed = await svc.store.tasks.fail(
            task_ids, "the broker could not queue this task; submit it again", now()
        )
        await svc.store.endpoints.count_queued(endpoint_id, -len(task_ids))
        await svc.store.unqueued.done([new.batch_id])
        await publish_results(svc, failed)
        raise
    except Unavailable as e:
        log.warning("endpoint %s: the queue is down (%s); %d tasks wait for the sweep to queue "
                    "them", endpoint_id, e, len(task_ids))
    else:
        await svc.store.unqueued.done([new.batch_id])
    if endpoint_id != batch.endpoint_id and session is None:
        await user_endpoints.want(svc, batch.endpoint_id, endpoint_id)
    return answer


def _answered_before(batch: BatchSubmission, endpoint_id: str, prior: Submitted
                     ) -> BatchSubmitted:
    """The answer to a submission sent again under its ``request_id``."""
    rid = clip(batch.request_id or "")
    if prior.abandoned:
        raise Conflict(f"request_id {rid!r} was given up on (its submission never completed, "
                       "and the broker said so); submit with a new request_id")
    if prior.endpoint_id != endpoint_id or len(prior.task_ids) != len(batch.tasks):
        raise Conflict(f"request_id {rid!r} submitted {len(prior.task_ids)} tasks to endpoint "
                       f"{prior.endpoint_id} before; use a new request_id for a new submission")
    return BatchSubmitted(task_group_id=prior.task_group_id, task_ids=list(prior.task_ids))


async def _submission_context(
    svc: Services, endpoint_id: str, function_ids: list[str], task_group_id: str | None
) -> SubmissionContext:
    """Access lists and function records, from the replica's caches when they have them all."""
    access = svc.endpoint_access.get(endpoint_id)
    group_owner = svc.group_owners.get(task_group_id) if task_group_id else None
    functions = {f: rec for f in function_ids if (rec := svc.functions.get(f)) is not None}
    if access is not None and len(functions) == len(function_ids) and (
        not task_group_id or group_owner is not None
    ):
        return SubmissionContext(access[0], access[1], functions, group_owner, access[2], access[3])
    context = await svc.store.tasks.submission_context(endpoint_id, function_ids, task_group_id)
    if context.endpoint_owner is not None:
        svc.endpoint_access.put(endpoint_id, (
            context.endpoint_owner, context.endpoint_shared_with, context.endpoint_multi_user,
            context.endpoint_parent))
    if task_group_id and context.group_owner is not None:
        svc.group_owners.put(task_group_id, context.group_owner)
    for f, rec in context.functions.items():
        svc.functions.put(f, rec)
    return context
