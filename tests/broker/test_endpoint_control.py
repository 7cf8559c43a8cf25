"""Where an endpoint is told to cancel, to give way, or that it was deleted
(farcall.broker.endpoint_control), on a memory store and queue with fake live sessions: the
typed control messages on the endpoint's channel, and what changes in the store first. The
same through a real channel session: tests/broker/test_endpoint_channel.py."""

from __future__ import annotations

import pytest

from farcall.broker import endpoint_control
from farcall.broker.services import Services
from farcall.broker.store.base import Subscription
from farcall.broker.submission import submit_batch
from farcall.protocol.common import TaskState, now
from farcall.protocol.control import (
    AnyControl,
    CancelTasks,
    EndpointRemoved,
    SessionReplaced,
    parse_control,
)
from farcall.protocol.stream import ResultStreamFrame
from tests.broker.helpers import FakeSession, batch, endpoint_and_function, next_frame

pytestmark = pytest.mark.anyio

ALICE = "alice-id"


async def heard(control: Subscription) -> AnyControl:
    return parse_control(await next_frame(control))


async def test_a_control_message_reaches_the_endpoints_channel_typed(svc: Services) -> None:
    control = await svc.store.pubsub.subscribe_control("ep1")
    await endpoint_control.send_control(svc, "ep1", CancelTasks(task_ids=["t1"]))
    assert await heard(control) == CancelTasks(task_ids=["t1"])
    await control.close()


async def test_cancelling_ends_the_tasks_then_tells_each_endpoint_its_own(svc: Services) -> None:
    ep1, fid = await endpoint_and_function(svc, ALICE)
    ep2, fid2 = await endpoint_and_function(svc, ALICE)
    first = await submit_batch(svc, ALICE, batch(ep1, fid, 2))
    second = await submit_batch(svc, ALICE, batch(ep2, fid2, 1, first.task_group_id))
    wanted = [*first.task_ids, *second.task_ids]
    controls = [await svc.store.pubsub.subscribe_control(e) for e in (ep1, ep2)]
    stream = await svc.store.pubsub.subscribe_results(first.task_group_id)

    done = await endpoint_control.cancel_tasks(svc, ALICE, [*wanted, "unknown"])

    assert sorted(r.task_id for _, _, r in done.results) == sorted(wanted)
    assert done.unchanged == {"unknown": "not_found"}
    assert await heard(controls[0]) == CancelTasks(task_ids=first.task_ids)
    assert await heard(controls[1]) == CancelTasks(task_ids=second.task_ids)
    frame = ResultStreamFrame.model_validate_json(await next_frame(stream))
    assert sorted(r.task_id for r in frame.results) == sorted(wanted)
    assert {r.state for r in frame.results} == {TaskState.CANCELLED}
    for sub in (*controls, stream):
        await sub.close()


async def test_another_users_tasks_are_not_cancelled(svc: Services) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    answer = await submit_batch(svc, ALICE, batch(eid, fid, 1))
    done = await endpoint_control.cancel_tasks(svc, "bob-id", answer.task_ids)
    assert done.results == []
    (record,) = await svc.store.tasks.get_many(answer.task_ids)
    assert record is not None and record.state == TaskState.WAITING


async def test_a_session_replaced_on_this_replica_is_ended_here(svc: Services) -> None:
    old, new = FakeSession("old"), FakeSession("new")
    control = await svc.store.pubsub.subscribe_control("ep")
    await endpoint_control.replace_session(svc, "ep", old, None)
    await endpoint_control.replace_session(svc, "ep", new, "old")
    assert old.ended and not new.ended
    assert svc.sessions.get("ep") is new
    await endpoint_control.send_control(svc, "ep", EndpointRemoved())
    assert await heard(control) == EndpointRemoved(), "no SessionReplaced was sent before it"
    await control.close()


@pytest.mark.parametrize("here", [None, "a session that is not the previous one"])
async def test_a_session_replaced_elsewhere_is_told_through_the_channel(
    svc: Services, here: str | None
) -> None:
    other = FakeSession("unrelated")
    if here:
        svc.sessions.take_over("ep", other)
    control = await svc.store.pubsub.subscribe_control("ep")
    new = FakeSession("new")
    await endpoint_control.replace_session(svc, "ep", new, "old-on-another-replica")
    assert await heard(control) == SessionReplaced(session_id="new")
    assert svc.sessions.get("ep") is new and not other.ended
    await control.close()


async def test_deleting_fails_queued_and_inflight_tasks_ends_the_session_and_drops_the_queue(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    queued = await submit_batch(svc, ALICE, batch(eid, fid, 2))
    await svc.store.endpoints.connect_session(eid, "s1", None, now())
    session = FakeSession("s1", credit=1)
    svc.sessions.take_over(eid, session)
    inflight = await submit_batch(svc, ALICE, batch(eid, fid, 1, queued.task_group_id))
    assert session.sent and list(await svc.store.inflight.get(eid)) == inflight.task_ids
    deleted: list[str] = []
    real_delete = svc.queue.delete

    async def delete(endpoint_id: str) -> None:
        deleted.append(endpoint_id)
        await real_delete(endpoint_id)

    monkeypatch.setattr(svc.queue, "delete", delete)
    control = await svc.store.pubsub.subscribe_control(eid)
    stream = await svc.store.pubsub.subscribe_results(queued.task_group_id)

    await endpoint_control.delete_endpoint(svc, eid)

    assert await heard(control) == EndpointRemoved()
    frame = ResultStreamFrame.model_validate_json(await next_frame(stream))
    assert sorted(r.task_id for r in frame.results) == sorted(queued.task_ids + inflight.task_ids)
    assert all(r.state == TaskState.FAILED and f"endpoint {eid} was deleted" in r.error
               for r in frame.results)
    assert await svc.store.endpoints.get(eid) is None
    assert svc.endpoint_access.get(eid) is None
    assert deleted == [eid]
    for sub in (control, stream):
        await sub.close()
