"""Taking a batch in (farcall.broker.submission) on a memory store and queue, with a fake live
session (``sessions.LiveSession``): straight to a session with room, through the queue
otherwise (kept among the unqueued batches until the queue confirms them), tasks failed and
published when their queue is gone, a request sent again, the checks and the quota."""

from __future__ import annotations

import pytest

from farcall.broker import submission
from farcall.broker.errors import Conflict, TooManyRequests, Unavailable
from farcall.broker.queue.base import QueueMissing
from farcall.broker.services import Services
from farcall.broker.submission import NotUsable, submit_batch
from farcall.protocol.channel import TaskMessage, parse_task_batch
from farcall.protocol.common import TaskState, now
from farcall.protocol.stream import ResultStreamFrame
from tests.broker.helpers import FakeSession, batch, endpoint_and_function, next_frame

pytestmark = pytest.mark.anyio

ALICE = "alice-id"


async def live(svc: Services, endpoint_id: str, session: FakeSession) -> FakeSession:
    """``session`` made the endpoint's live one, in the store and on this replica."""
    await svc.store.endpoints.connect_session(endpoint_id, session.session_id, None, now())
    svc.sessions.take_over(endpoint_id, session)
    return session


async def queued_ids(svc: Services, endpoint_id: str) -> list[str]:
    return [t.task_id for body in await svc.queue.drain(endpoint_id)
            for t in parse_task_batch(body)]


async def test_a_batch_goes_straight_to_a_live_session_with_room(svc: Services) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    session = await live(svc, eid, FakeSession(credit=3))
    answer = await submit_batch(svc, ALICE, batch(eid, fid, 3))
    ((tasks, functions),) = session.sent
    assert [t[0] for t in tasks] == answer.task_ids and {t[1] for t in tasks} == {fid}
    assert TaskMessage.model_validate_json(tasks[2][2]).args == "A2"
    assert functions == {fid: "FN"}, "the body goes with the tasks"
    assert set(await svc.store.inflight.get(eid)) == set(answer.task_ids)
    assert await queued_ids(svc, eid) == [], "nothing queued"


@pytest.mark.parametrize("why", ["no room", "no session here", "not the live session"])
async def test_otherwise_the_batch_is_queued_whole(svc: Services, why: str) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    session = FakeSession(credit=2)
    if why == "no room":
        await live(svc, eid, session)
    elif why == "not the live session":  # another replica's session took over meanwhile
        await live(svc, eid, session)
        await svc.store.endpoints.connect_session(eid, "newer", None, now())
    answer = await submit_batch(svc, ALICE, batch(eid, fid, 3))
    assert session.sent == []
    assert await queued_ids(svc, eid) == answer.task_ids
    assert await svc.store.inflight.get(eid) == {}
    (record,) = await svc.store.tasks.get_many(answer.task_ids[:1])
    assert record is not None and record.state == TaskState.WAITING


async def test_every_task_says_who_submitted_it(svc: Services) -> None:
    """A shared endpoint keeps each user's tasks in workers of their own: the broker names the
    submitter in every task it sends, straight or through the queue."""
    eid, fid = await endpoint_and_function(svc, ALICE)
    session = await live(svc, eid, FakeSession(credit=2))
    await submit_batch(svc, ALICE, batch(eid, fid, 2))
    await submit_batch(svc, ALICE, batch(eid, fid, 3))  # no room left: queued
    ((sent, _),) = session.sent
    assert {TaskMessage.model_validate_json(body).user_id for _, _, body in sent} == {ALICE}
    queued = [t for body in await svc.queue.drain(eid) for t in parse_task_batch(body)]
    assert len(queued) == 3 and {t.user_id for t in queued} == {ALICE}


async def test_a_direct_send_that_fails_leaves_the_tasks_in_flight(svc: Services) -> None:
    """The session's next hello reconciles them; the client is told they were taken."""
    eid, fid = await endpoint_and_function(svc, ALICE)
    session = await live(svc, eid, FakeSession(credit=5))
    session.fail_sends = True
    answer = await submit_batch(svc, ALICE, batch(eid, fid, 2))
    assert set(await svc.store.inflight.get(eid)) == set(answer.task_ids)
    assert await queued_ids(svc, eid) == []


async def test_a_batch_the_queue_cannot_take_now_waits_for_the_sweep(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    """RabbitMQ down: the batch is accepted, recorded and kept among the unqueued ones."""
    eid, fid = await endpoint_and_function(svc, ALICE)

    async def refuse(endpoint_id: str, bodies: list[bytes]) -> None:
        raise Unavailable("RabbitMQ is not answering")

    monkeypatch.setattr(svc.queue, "publish", refuse)
    answer = await submit_batch(svc, ALICE, batch(eid, fid, 2))
    records = await svc.store.tasks.get_many(answer.task_ids)
    assert all(r is not None and r.state == TaskState.WAITING for r in records)
    (kept,) = await svc.store.unqueued.claim(now() + 1, now() + 1, 10)
    assert [t.task_id for t in parse_task_batch(kept.body)] == answer.task_ids
    assert kept.endpoint_id == eid


async def test_a_queued_batch_leaves_the_unqueued_ones(svc: Services) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    answer = await submit_batch(svc, ALICE, batch(eid, fid, 2))
    assert await queued_ids(svc, eid) == answer.task_ids
    assert await svc.store.unqueued.claim(now() + 100, now() + 100, 10) == []


async def test_a_batch_for_a_deleted_queue_is_failed_and_published(svc: Services) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    group = (await submit_batch(svc, ALICE, batch(eid, fid, 1))).task_group_id
    await svc.queue.delete(eid)
    stream = await svc.store.pubsub.subscribe_results(group)
    with pytest.raises(QueueMissing):
        await submit_batch(svc, ALICE, batch(eid, fid, 2, group))
    task_ids = (await svc.store.tasks.group_tasks(group))[1:]
    frame = ResultStreamFrame.model_validate_json(await next_frame(stream))
    await stream.close()
    assert [r.task_id for r in frame.results] == task_ids
    assert all(r.state == TaskState.FAILED and "submit it again" in r.error for r in frame.results)
    ep = await svc.store.endpoints.get(eid)
    assert ep is not None and ep.queued_tasks == 1, "only the first batch counts as queued"
    assert await svc.store.unqueued.claim(now() + 100, now() + 100, 10) == []


async def test_a_request_sent_again_gets_the_same_tasks_once(svc: Services) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    wanted = batch(eid, fid, 3).model_copy(update={"request_id": "campaign-7:batch-1"})
    first = await submit_batch(svc, ALICE, wanted)
    again = await submit_batch(svc, ALICE, wanted)
    assert again == first
    assert await queued_ids(svc, eid) == first.task_ids, "queued once"
    assert await svc.store.tasks.open_tasks(ALICE) == 3


@pytest.mark.parametrize("change", ["another endpoint", "more tasks"])
async def test_a_request_id_used_for_another_submission_is_refused(
    svc: Services, change: str
) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    other_eid, _ = await endpoint_and_function(svc, ALICE)
    await submit_batch(svc, ALICE, batch(eid, fid, 2).model_copy(update={"request_id": "r1"}))
    different = batch(other_eid, fid, 2) if change == "another endpoint" else batch(eid, fid, 3)
    with pytest.raises(Conflict, match="use a new request_id"):
        await submit_batch(svc, ALICE, different.model_copy(update={"request_id": "r1"}))


async def test_an_abandoned_request_is_refused(svc: Services) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    await svc.store.tasks.submitted(ALICE, "r1", abandon=True)
    with pytest.raises(Conflict, match="new request_id"):
        await submit_batch(svc, ALICE, batch(eid, fid, 1).model_copy(update={"request_id": "r1"}))
    assert await queued_ids(svc, eid) == []


async def test_ids_that_are_not_the_submitters_are_named(svc: Services) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    other_eid, other_fid = await endpoint_and_function(svc, "bob-id")
    for wanted, what in [(batch(other_eid, fid, 1), f"endpoint {other_eid}"),
                         (batch(eid, other_fid, 1), f"function {other_fid}"),
                         (batch(eid, fid, 1, group="nope"), "task group nope")]:
        with pytest.raises(NotUsable) as refused:
            await submit_batch(svc, ALICE, wanted)
        assert refused.value.what == what and what in refused.value.message
    assert await queued_ids(svc, eid) == []


async def test_over_the_open_task_quota_answers_429_and_records_nothing(svc: Services) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    svc.settings.max_open_tasks = 2
    await submit_batch(svc, ALICE, batch(eid, fid, 2))
    with pytest.raises(TooManyRequests) as refused:
        await submit_batch(svc, ALICE, batch(eid, fid, 1))
    assert refused.value.code == "quota_exceeded"
    assert refused.value.retry_after == submission.QUOTA_RETRY
    assert "FARCALL_MAX_OPEN_TASKS" in refused.value.message
    assert len(await queued_ids(svc, eid)) == 2
