"""The store contract, part by part, run against the in-process store and the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from typing import Literal

import pytest

from farcall.broker.records import EndpointRecord, FunctionRecord, NewTasks, TaskRecord
from farcall.broker.store.base import OverQuota, Store, Subscription
from farcall.broker.store.redis import RedisStore
from farcall.protocol.channel import Heartbeat, ResultMessage
from farcall.protocol.common import Attempt, TaskState, Versions, now
from farcall.protocol.stream import ResultStreamFrame, TaskResult
from harness.services import REDIS_URL, drop_redis_prefix

pytestmark = pytest.mark.anyio

SUBMITTER = Versions(python="3.11.7", dill="0.4.1", farcall="0.1.0")


def _id() -> str:
    return uuid.uuid4().hex


def _batch(n: int, endpoint: str = "ep1", user: str = "u1") -> NewTasks:
    t = now()
    return NewTasks(
        user_id=user, task_group_id=_id(), endpoint_id=endpoint,
        task_ids=[_id() for _ in range(n)], function_ids=["f1"] * n,
        received_at=t, waiting_at=t + 0.001, submitter=SUBMITTER, new_group=True,
    )


async def _tasks(store: Store, n: int, endpoint: str = "ep1") -> tuple[str, list[str]]:
    batch = _batch(n, endpoint)
    await store.tasks.create(batch)
    return batch.task_group_id, batch.task_ids


async def _task(store: Store, task_id: str) -> TaskRecord:
    (rec,) = await store.tasks.get_many([task_id])
    assert rec is not None, f"task {task_id} is not in the store"
    return rec


def _endpoint(eid: str = "ep1", user: str = "u1") -> EndpointRecord:
    return EndpointRecord(endpoint_id=eid, user_id=user, name="laptop", created_at=now())


def _result(
    task_id: str, data: str = "ok",
    state: Literal[TaskState.SUCCESS, TaskState.FAILED] = TaskState.SUCCESS,
) -> ResultMessage:
    return ResultMessage(
        task_id=task_id,
        state=state,
        data=data,
        started_at=now() - 0.5,
        worker=Versions(python="3.11.7", dill="0.4.1"),
    )


async def test_functions(store: Store) -> None:
    rec = FunctionRecord(function_id="f1", user_id="u1", function_name="sq", function="PAYLOAD",
                         created_at=now())
    await store.functions.put(rec)
    found = await store.functions.get_many(["f1", "missing"])
    assert list(found) == ["f1"] and found["f1"] == rec
    await store.functions.delete("f1")
    assert await store.functions.get_many(["f1"]) == {}


async def test_endpoints_status_and_credential_revocation(store: Store) -> None:
    eid = _id()
    await store.endpoints.put(_endpoint(eid), "cred-hash")
    principal = await store.users.resolve_token("cred-hash")
    assert principal is not None and principal.kind == "endpoint" and principal.id == eid
    ep = await store.endpoints.get(eid)
    assert ep is not None and ep.connected is False and ep.last_heartbeat is None
    assert await store.endpoints.connect_session(eid, "s1", None, now()) is None
    assert await store.endpoints.connect_session(eid, "s2", None, now()) == "s1"
    await store.endpoints.disconnect_session(eid, "s1", now())
    assert await store.endpoints.live_session(eid) == "s2"  # the old one ending changes nothing
    await store.endpoints.set_heartbeat(eid, Heartbeat(workers=4, details={"a": 1}), 123.5)
    ep = await store.endpoints.get(eid)
    assert ep is not None and ep.connected is True
    assert ep.heartbeat == Heartbeat(workers=4, details={"a": 1}) and ep.last_heartbeat == 123.5
    seen = ep.last_seen
    assert seen is not None
    assert ep.online(30, at=seen + 1) and not ep.online(30, at=seen + 31)
    await store.endpoints.disconnect_session(eid, "s2", now())
    assert await store.endpoints.live_session(eid) is None
    ep = await store.endpoints.get(eid)
    assert ep is not None and ep.connected is False
    assert [e.endpoint_id for e in await store.endpoints.list("u1")] == [eid]
    assert await store.endpoints.list("u2") == []
    await store.endpoints.delete(eid)
    assert await store.endpoints.get(eid) is None
    assert await store.users.resolve_token("cred-hash") is None
    assert await store.endpoints.list("u1") == []


async def test_create_and_get_tasks_keep_transitions(store: Store) -> None:
    group, ids = await _tasks(store, 3)
    assert await store.tasks.group_owner(group) == "u1"
    assert await store.tasks.group_tasks(group) == ids
    records = await store.tasks.get_many([ids[1], "missing", ids[0]])
    assert records[1] is None
    rec = records[0]
    assert rec is not None and rec.task_id == ids[1] and rec.state == TaskState.WAITING
    assert list(rec.transitions) == ["received", "waiting-for-endpoint"]
    assert rec.submitter == SUBMITTER and rec.completed_at is None
    assert (rec.user_id, rec.task_group_id, rec.endpoint_id, rec.function_id) == (
        "u1", group, "ep1", "f1")


async def test_submission_context_in_one_call(store: Store) -> None:
    await store.endpoints.put(_endpoint("ep1", "u1"), "cred")
    await store.functions.put(FunctionRecord(function_id="f1", user_id="u1", function="P",
                                             created_at=now()))
    group, _ = await _tasks(store, 1)
    ctx = await store.tasks.submission_context("ep1", ["f1", "nope"], group)
    assert (ctx.endpoint_owner, list(ctx.functions), ctx.group_owner) == ("u1", ["f1"], "u1")
    ctx = await store.tasks.submission_context("gone", [], None)
    assert (ctx.endpoint_owner, ctx.functions, ctx.group_owner) == (None, {}, None)


async def test_offline_timeout_follows_the_heartbeat_period(store: Store) -> None:
    """A 60 s endpoint stays online through a quiet minute; a 1 s one is offline in seconds."""
    for eid, period in (("slow", 60.0), ("fast", 1.0)):
        await store.endpoints.put(_endpoint(eid), f"cred-{eid}")
        await store.endpoints.connect_session(eid, "s", period, 1000.0)
    slow, fast = await store.endpoints.get("slow"), await store.endpoints.get("fast")
    assert slow is not None and fast is not None
    assert slow.heartbeat_period == 60.0 and fast.heartbeat_period == 1.0
    assert slow.online(30, at=1000.0 + 90) and not slow.online(30, at=1000.0 + 200)
    assert fast.online(30, at=1000.0 + 5) and not fast.online(30, at=1000.0 + 9)


async def test_only_the_live_session_puts_tasks_in_flight(store: Store) -> None:
    await store.endpoints.put(_endpoint(), "cred")
    _, ids = await _tasks(store, 2)
    await store.endpoints.connect_session("ep1", "old", None, now())
    await store.endpoints.connect_session("ep1", "new", None, now())
    assert await store.inflight.add("ep1", "old", {ids[0]: "b"}, taken=1) is None
    assert await store.inflight.get("ep1") == {}
    assert await store.inflight.add("ep1", "new", {ids[0]: "b"}, taken=1) == [ids[0]]
    # a submission sent straight to a replaced session counts as queued instead
    batch = _batch(3)
    assert await store.tasks.create(batch, inflight={t: "b" for t in batch.task_ids},
                                    session_id="old") is False
    assert set(await store.inflight.get("ep1")) == {ids[0]}
    ep = await store.endpoints.get("ep1")
    assert ep is not None and ep.queued_tasks == 1 + 3


async def test_cancel_is_final_and_only_queued_spares_running(store: Store) -> None:
    await store.endpoints.put(_endpoint(), "cred")
    await store.endpoints.connect_session("ep1", "s", None, now())
    group, ids = await _tasks(store, 4)
    await store.inflight.add("ep1", "s", {ids[0]: "b", ids[1]: "b"}, taken=2)
    await store.tasks.mark_running("ep1", {ids[1]: 5.0})
    await store.tasks.complete("ep1", [_result(ids[3])], 6.0)
    done = await store.tasks.cancel("u1", [ids[0], ids[1], ids[2], ids[3], "nope"],
                                    only_queued=True, at=7.0)
    assert sorted(r.task_id for _, _, r in done.results) == sorted([ids[0], ids[2]])
    assert {g for g, _, _ in done.results} == {group}
    assert {e for _, e, _ in done.results} == {"ep1"}
    assert all(r.state == TaskState.CANCELLED for _, _, r in done.results)
    assert done.unchanged == {ids[1]: "running", ids[3]: "success", "nope": "not_found"}
    rec = await _task(store, ids[0])
    assert rec.state == TaskState.CANCELLED and rec.completed_at == 7.0 and rec.state.terminal
    assert set(await store.inflight.get("ep1")) == {ids[1]}  # the cancelled one left the set
    # a late result of a cancelled task is ignored; a foreign user cannot cancel
    assert await store.tasks.complete("ep1", [_result(ids[0])], 8.0) == []
    assert (await _task(store, ids[0])).state == TaskState.CANCELLED
    other = await store.tasks.cancel("u2", [ids[1]], only_queued=False, at=9.0)
    assert other.results == [] and other.unchanged == {ids[1]: "not_found"}
    running = await store.tasks.cancel("u1", [ids[1]], only_queued=False, at=9.0)
    assert [r.task_id for _, _, r in running.results] == [ids[1]]
    # a cancelled task taken off the queue later is not put in flight
    assert await store.inflight.add("ep1", "s", {ids[2]: "b"}, taken=1) == []


async def test_reconcile_requeues_lost_tasks_and_fails_repeat_crashers(store: Store) -> None:
    await store.endpoints.put(_endpoint(), "cred")
    group, ids = await _tasks(store, 4)
    held, lost, crasher, finished = ids

    async def session(sid: str, tasks: list[str]) -> None:
        await store.endpoints.connect_session("ep1", sid, None, now())
        await store.inflight.add("ep1", sid, {t: f"body-{t}" for t in tasks}, taken=0)

    await session("s1", ids)
    await store.tasks.complete("ep1", [_result(finished)], now())
    await store.inflight.add("ep1", "s1", {finished: "b"}, taken=0)  # a stale copy
    for crash in (1, 2):
        found = await store.inflight.reconcile("ep1", {held}, {crasher}, 3, float(crash))
        assert found.again == {lost: f"body-{lost}", crasher: f"body-{crasher}"}
        assert found.failed == []
        await store.inflight.remove("ep1", list(found.again))
        await session(f"s{crash + 1}", [lost, crasher])
    rec = await _task(store, lost)
    assert [a.at for a in rec.attempts] == [1.0, 2.0]
    assert "session ended" in rec.attempts[0].error
    assert "agent process died" in (await _task(store, crasher)).attempts[0].error
    found = await store.inflight.reconcile("ep1", {held, lost}, {crasher}, 3, 3.0)
    assert found.again == {}
    assert [(g, r.task_id, r.state) for g, r in found.failed] == [
        (group, crasher, TaskState.FAILED)]
    rec = await _task(store, crasher)
    assert rec.state == TaskState.FAILED and "died 3 times" in rec.error
    assert len(rec.attempts) == 3
    assert set(await store.inflight.get("ep1")) == {held, lost}


async def test_fail_returns_what_it_failed_and_attempts_merge(store: Store) -> None:
    group, ids = await _tasks(store, 2)
    failed = await store.tasks.fail(ids, "endpoint deleted", 5.0)
    assert [(g, r.task_id, r.state, r.error) for g, r in failed] == [
        (group, t, TaskState.FAILED, "endpoint deleted") for t in ids]
    assert await store.tasks.fail(ids, "again", 6.0) == []
    _, (retried,) = await _tasks(store, 1)
    result = _result(retried).model_copy(update={"attempts": [Attempt(at=1.0, error="lost")]})
    await store.tasks.complete("ep1", [result], 7.0)
    assert (await _task(store, retried)).attempts == [Attempt(at=1.0, error="lost")]


async def test_inflight_running_complete_first_result_wins(store: Store) -> None:
    group, ids = await _tasks(store, 3)
    _, (foreign,) = await _tasks(store, 1, endpoint="ep2")
    await store.endpoints.connect_session("ep1", "s", None, now())
    accepted = await store.inflight.add(
        "ep1", "s", {t: f"body-{t}" for t in [*ids, foreign, "missing"]}, taken=5
    )
    assert accepted == ids
    assert await store.inflight.get("ep1") == {t: f"body-{t}" for t in ids}

    await store.tasks.mark_running("ep1", {ids[0]: 10.0, foreign: 11.0})
    rec, frec = await _task(store, ids[0]), await _task(store, foreign)
    assert rec.state == TaskState.RUNNING and rec.transitions["running"] == 10.0
    assert frec.state == TaskState.WAITING

    done = await store.tasks.complete(
        "ep1", [_result(ids[0], "first"), _result(ids[1], "x", TaskState.FAILED)], 20.0
    )
    assert [(g, r.task_id, r.state) for g, r in done] == [
        (group, ids[0], TaskState.SUCCESS),
        (group, ids[1], TaskState.FAILED),
    ]
    again = await store.tasks.complete(
        "ep1", [_result(ids[0], "second"), _result(foreign, "evil")], 21.0)
    assert again == []
    rec, frec = await _task(store, ids[0]), await _task(store, foreign)
    assert rec.data == "first" and rec.state == TaskState.SUCCESS and rec.completed_at == 20.0
    assert rec.worker is not None and rec.worker.python == "3.11.7"
    assert frec.state == TaskState.WAITING
    # running after success must not go backwards; terminal tasks are not put in flight again
    await store.tasks.mark_running("ep1", {ids[0]: 30.0})
    assert (await _task(store, ids[0])).state == TaskState.SUCCESS
    assert await store.inflight.add("ep1", "s", {ids[0]: "b", ids[2]: "b"}, taken=2) == [ids[2]]
    assert set(await store.inflight.get("ep1")) == {ids[2]}
    await store.inflight.remove("ep1", [ids[2]])
    assert await store.inflight.get("ep1") == {}


async def test_queued_count_follows_submission_dispatch_and_requeue(store: Store) -> None:
    await store.endpoints.put(_endpoint(), "cred")

    async def queued() -> int:
        ep = await store.endpoints.get("ep1")
        assert ep is not None
        return ep.queued_tasks

    assert await queued() == 0
    _, ids = await _tasks(store, 4)
    assert await queued() == 4
    await store.endpoints.connect_session("ep1", "s", None, now())
    await store.inflight.add("ep1", "s", {t: "body" for t in ids[:3]}, taken=3)
    assert await queued() == 1
    await store.endpoints.count_queued("ep1", 2)  # two lost tasks queued again
    assert await queued() == 3


async def test_fail_tasks_is_terminal(store: Store) -> None:
    _, ids = await _tasks(store, 2)
    await store.tasks.fail(ids[:1], "could not queue", 5.0)
    rec = await _task(store, ids[0])
    assert rec.state == TaskState.FAILED and rec.error == "could not queue"
    assert rec.completed_at == 5.0 and rec.transitions["failed"] == 5.0
    assert await store.tasks.complete("ep1", [_result(ids[0])], 6.0) == []


async def test_result_fanout(store: Store) -> None:
    sub_a = await store.pubsub.subscribe("g1")
    sub_b = await store.pubsub.subscribe("g1")
    other = await store.pubsub.subscribe("g2")
    frame = ResultStreamFrame(
        results=[TaskResult(task_id="t", state=TaskState.SUCCESS)]
    ).model_dump_json()
    await store.pubsub.publish("g1", frame)

    async def first(sub: Subscription) -> str:
        async for f in sub:
            return f
        return ""

    assert await asyncio.wait_for(first(sub_a), 5) == frame
    assert await asyncio.wait_for(first(sub_b), 5) == frame
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first(other), 0.2)
    for s in (sub_a, sub_b, other):
        await s.close()


async def test_records_handed_out_are_copies(store: Store) -> None:
    """Changing a record a store returned must not change what the store holds."""
    _, (task_id,) = await _tasks(store, 1)
    rec = await _task(store, task_id)
    rec.transitions["bogus"] = 1.0
    assert "bogus" not in (await _task(store, task_id)).transitions
    await store.endpoints.put(_endpoint(), "cred")
    ep = await store.endpoints.get("ep1")
    assert ep is not None
    ep.heartbeat.details["bogus"] = 1
    again = await store.endpoints.get("ep1")
    assert again is not None and "bogus" not in again.heartbeat.details


@pytest.mark.usefixtures("services")
async def test_results_get_ttl_on_redis(real_prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=f"{real_prefix}:", result_ttl=3600)
    try:
        _, ids = await _tasks(store, 2)
        await store.tasks.complete("ep1", [_result(ids[0])], now())
        assert 0 < await store.db.r.ttl(store.db.k("task", ids[0])) <= 3600
        assert await store.db.r.ttl(store.db.k("task", ids[1])) == -1
    finally:
        await store.close()
        drop_redis_prefix(f"{real_prefix}:")


@pytest.mark.usefixtures("services")
async def test_each_frame_reaches_a_subscriber_once_from_any_replica(real_prefix: str) -> None:
    """Frames of this replica are handed over directly and not again through Redis."""
    here = RedisStore(REDIS_URL, prefix=f"{real_prefix}:")
    there = RedisStore(REDIS_URL, prefix=f"{real_prefix}:")
    sub = await here.pubsub.subscribe("g")
    try:
        await here.pubsub.publish("g", "one")
        await here.pubsub.publish("g", "two")
        await there.pubsub.publish("g", "last")  # through Redis, after any echo of the two above

        async def until_last() -> list[str]:
            got = []
            async for frame in sub:
                got.append(frame)
                if frame == "last":
                    return got
            return got

        assert await asyncio.wait_for(until_last(), 5) == ["one", "two", "last"]
    finally:
        await sub.close()
        await here.close()
        await there.close()


async def test_a_large_batch_is_created_whole_and_in_order(store: Store) -> None:
    await store.endpoints.put(_endpoint(), "cred")
    batch = _batch(2500)
    ids = batch.task_ids
    direct = {t: f"body-{t}" for t in ids[:1200]}
    await store.endpoints.connect_session("ep1", "s", None, now())
    assert await store.tasks.create(batch, inflight=direct, session_id="s")
    assert await store.tasks.group_tasks(batch.task_group_id) == ids
    assert await store.tasks.group_owner(batch.task_group_id) == "u1"
    assert await store.inflight.get("ep1") == direct
    ep = await store.endpoints.get("ep1")
    assert ep is not None and ep.queued_tasks == 2500 - 1200
    last = await _task(store, ids[-1])
    assert last.task_group_id == batch.task_group_id and last.state == TaskState.WAITING


async def test_open_tasks_count_down_once_on_every_way_to_end(store: Store) -> None:
    """Result, failure, cancel and a crash-failure in reconcile each take a task off the count
    once; a second ending of the same task, running, and other users' tasks change nothing."""
    await store.endpoints.put(_endpoint(), "cred")
    await store.endpoints.connect_session("ep1", "s", None, now())
    _, ids = await _tasks(store, 6)
    await store.tasks.create(_batch(2, user="u2"))
    assert (await store.tasks.open_tasks("u1"), await store.tasks.open_tasks("u2")) == (6, 2)
    done, failed, cancelled, crasher, running, waiting = ids
    await store.inflight.add("ep1", "s", {crasher: "b", running: "b"}, taken=2)
    await store.tasks.mark_running("ep1", {running: 1.0})
    assert await store.tasks.open_tasks("u1") == 6

    await store.tasks.complete("ep1", [_result(done)], 2.0)
    await store.tasks.complete("ep1", [_result(done)], 2.1)
    assert await store.tasks.open_tasks("u1") == 5
    await store.tasks.fail([failed, done], "could not queue", 3.0)
    await store.tasks.fail([failed], "again", 3.1)
    assert await store.tasks.open_tasks("u1") == 4
    await store.tasks.cancel("u1", [cancelled, done, failed], only_queued=False, at=4.0)
    await store.tasks.cancel("u1", [cancelled], only_queued=False, at=4.1)
    await store.tasks.complete("ep1", [_result(cancelled)], 4.2)
    assert await store.tasks.open_tasks("u1") == 3
    found = await store.inflight.reconcile("ep1", {running}, {crasher}, 1, 5.0)
    assert [r.task_id for _, r in found.failed] == [crasher]
    await store.tasks.complete("ep1", [_result(crasher)], 5.1)
    assert await store.tasks.open_tasks("u1") == 2
    await store.tasks.complete("ep1", [_result(running)], 6.0)
    await store.tasks.cancel("u1", [waiting], only_queued=True, at=6.0)
    assert (await store.tasks.open_tasks("u1"), await store.tasks.open_tasks("u2")) == (0, 2)
    assert await store.tasks.open_tasks("nobody") == 0


async def test_a_batch_past_the_open_task_limit_changes_nothing(store: Store) -> None:
    await store.endpoints.put(_endpoint(), "cred")
    await store.endpoints.connect_session("ep1", "s", None, now())
    first = _batch(3)
    assert await store.tasks.create(first, max_open=5) is False
    over = _batch(3)
    with pytest.raises(OverQuota) as refused:
        await store.tasks.create(over, inflight={t: "b" for t in over.task_ids}, session_id="s",
                                 max_open=5)
    assert (refused.value.open_tasks, refused.value.limit) == (3, 5)
    assert await store.tasks.get_many(over.task_ids) == [None] * 3
    assert await store.tasks.group_owner(over.task_group_id) is None
    assert await store.tasks.group_tasks(over.task_group_id) == []
    assert await store.inflight.get("ep1") == {}
    ep = await store.endpoints.get("ep1")
    assert ep is not None and ep.queued_tasks == 3
    assert await store.tasks.open_tasks("u1") == 3
    # exactly up to the limit is fine; another user has a count of their own
    assert await store.tasks.create(_batch(2), max_open=5) is False
    assert await store.tasks.create(_batch(5, user="u2"), max_open=5) is False
    with pytest.raises(OverQuota):
        await store.tasks.create(_batch(1), max_open=5)
    # ending one task makes room for one; no limit (0) admits anything
    await store.tasks.complete("ep1", [_result(first.task_ids[0])], now())
    await store.tasks.create(_batch(1), max_open=5)
    await store.tasks.create(_batch(4), max_open=0)
    assert await store.tasks.open_tasks("u1") == 9


@pytest.mark.usefixtures("services")
async def test_open_task_count_read_and_raised_from_zero_on_redis(real_prefix: str) -> None:
    """A count left below zero (tasks created before counting began, then ended) reads as 0
    and is not subtracted from the next batch."""
    store = RedisStore(REDIS_URL, prefix=f"{real_prefix}:", result_ttl=3600)
    try:
        _, ids = await _tasks(store, 1)
        await store.db.r.delete(store.db.k("user", "u1", "open"))  # as if created before
        await store.tasks.complete("ep1", [_result(ids[0])], now())
        assert await store.db.r.get(store.db.k("user", "u1", "open")) == "0"
        await store.db.r.set(store.db.k("user", "u1", "open"), -3)
        assert await store.tasks.open_tasks("u1") == 0
        await store.tasks.create(_batch(2), max_open=2)
        assert await store.tasks.open_tasks("u1") == 2
    finally:
        await store.close()
        drop_redis_prefix(f"{real_prefix}:")
