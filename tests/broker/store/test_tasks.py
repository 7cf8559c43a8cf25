"""``TaskStore``: task groups, tasks and their life cycle, open-task counts, the index of recent
groups and summaries, on the in-process store and the real Redis."""

from __future__ import annotations

import dataclasses

import pytest

import farcall.broker.store.memory.state
import farcall.broker.store.redis.tasks
from farcall.broker.records import TaskGroupRecord
from farcall.broker.store.base import (
    ABANDONED,
    AlreadySubmitted,
    OverQuota,
    Store,
    Submitted,
    owner_cancelled,
)
from farcall.broker.store.redis import RedisStore
from farcall.protocol.channel import ResultMessage
from farcall.protocol.common import Attempt, TaskState, now
from harness.services import REDIS_URL, drop_redis_prefix
from tests.broker.records import (
    SUBMITTER,
    endpoint_record,
    function_record,
    new_id,
    new_tasks,
    result_message,
    stored_task,
    submitted,
)

pytestmark = pytest.mark.anyio


async def test_create_and_get_tasks_keep_transitions(store: Store) -> None:
    group, ids = await submitted(store, 3)
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
    await store.endpoints.put(endpoint_record("ep1", "u1"), "cred")
    await store.functions.put(function_record())
    group, _ = await submitted(store, 1)
    ctx = await store.tasks.submission_context("ep1", ["f1", "nope"], group)
    assert (ctx.endpoint_owner, list(ctx.functions), ctx.group_owner) == ("u1", ["f1"], "u1")
    ctx = await store.tasks.submission_context("gone", [], None)
    assert (ctx.endpoint_owner, ctx.functions, ctx.group_owner) == (None, {}, None)


async def test_submission_context_carries_the_shares(store: Store) -> None:
    await store.endpoints.put(endpoint_record("ep1", "u1"), "cred")
    await store.endpoints.share("ep1", "u2", True)
    await store.functions.put(function_record("f1"))
    await store.functions.put(function_record("f2"))
    await store.functions.share("f1", "u2", None, True)
    await store.functions.share("f2", None, True, True)
    ctx = await store.tasks.submission_context("ep1", ["f1", "f2", "nope"], None)
    assert (ctx.endpoint_owner, ctx.endpoint_shared_with) == ("u1", frozenset({"u2"}))
    assert ctx.endpoint_usable_by("u2") and not ctx.endpoint_usable_by("u3")
    assert (ctx.functions["f1"].shared_with, ctx.functions["f1"].public) == (["u2"], False)
    assert (ctx.functions["f2"].shared_with, ctx.functions["f2"].public) == ([], True)
    assert list(ctx.functions) == ["f1", "f2"]
    ctx = await store.tasks.submission_context("gone", [], None)
    assert (ctx.endpoint_owner, ctx.endpoint_shared_with) == (None, frozenset())


async def test_cancel_is_final_and_only_queued_spares_running(store: Store) -> None:
    await store.endpoints.put(endpoint_record(), "cred")
    await store.endpoints.connect_session("ep1", "s", None, now())
    group, ids = await submitted(store, 4)
    await store.inflight.add("ep1", "s", {ids[0]: "b", ids[1]: "b"}, taken=2)
    await store.tasks.mark_running("ep1", {ids[1]: 5.0})
    await store.tasks.complete("ep1", [result_message(ids[3])], 6.0)
    done = await store.tasks.cancel("u1", [ids[0], ids[1], ids[2], ids[3], "nope"],
                                    only_queued=True, at=7.0)
    assert sorted(r.task_id for _, _, r in done.results) == sorted([ids[0], ids[2]])
    assert {g for g, _, _ in done.results} == {group}
    assert {e for _, e, _ in done.results} == {"ep1"}
    assert all(r.state == TaskState.CANCELLED for _, _, r in done.results)
    assert done.unchanged == {ids[1]: "running", ids[3]: "success", "nope": "not_found"}
    rec = await stored_task(store, ids[0])
    assert rec.state == TaskState.CANCELLED and rec.completed_at == 7.0 and rec.state.terminal
    assert set(await store.inflight.get("ep1")) == {ids[1]}  # the cancelled one left the set
    # a late result of a cancelled task is ignored; a foreign user cannot cancel
    assert await store.tasks.complete("ep1", [result_message(ids[0])], 8.0) == []
    assert (await stored_task(store, ids[0])).state == TaskState.CANCELLED
    other = await store.tasks.cancel("u2", [ids[1]], only_queued=False, at=9.0)
    assert other.results == [] and other.unchanged == {ids[1]: "not_found"}
    running = await store.tasks.cancel("u1", [ids[1]], only_queued=False, at=9.0)
    assert [r.task_id for _, _, r in running.results] == [ids[1]]
    # a cancelled task taken off the queue later is not put in flight
    assert await store.inflight.add("ep1", "s", {ids[2]: "b"}, taken=1) == []


async def test_fail_returns_what_it_failed_and_attempts_merge(store: Store) -> None:
    group, ids = await submitted(store, 2)
    failed = await store.tasks.fail(ids, "endpoint deleted", 5.0)
    assert [(g, r.task_id, r.state, r.error) for g, r in failed] == [
        (group, t, TaskState.FAILED, "endpoint deleted") for t in ids]
    assert await store.tasks.fail(ids, "again", 6.0) == []
    _, (retried,) = await submitted(store, 1)
    result = result_message(retried).model_copy(update={"attempts": [Attempt(at=1.0, error="lost")]})
    await store.tasks.complete("ep1", [result], 7.0)
    assert (await stored_task(store, retried)).attempts == [Attempt(at=1.0, error="lost")]


async def test_inflight_running_complete_first_result_wins(store: Store) -> None:
    group, ids = await submitted(store, 3)
    _, (foreign,) = await submitted(store, 1, endpoint="ep2")
    await store.endpoints.connect_session("ep1", "s", None, now())
    accepted = await store.inflight.add(
        "ep1", "s", {t: f"body-{t}" for t in [*ids, foreign, "missing"]}, taken=5
    )
    assert accepted == ids
    assert await store.inflight.get("ep1") == {t: f"body-{t}" for t in ids}

    await store.tasks.mark_running("ep1", {ids[0]: 10.0, foreign: 11.0})
    rec, frec = await stored_task(store, ids[0]), await stored_task(store, foreign)
    assert rec.state == TaskState.RUNNING and rec.transitions["running"] == 10.0
    assert frec.state == TaskState.WAITING

    done = await store.tasks.complete(
        "ep1", [result_message(ids[0], "first"), result_message(ids[1], "x", TaskState.FAILED)], 20.0
    )
    assert [(g, r.task_id, r.state) for g, r in done] == [
        (group, ids[0], TaskState.SUCCESS),
        (group, ids[1], TaskState.FAILED),
    ]
    again = await store.tasks.complete(
        "ep1", [result_message(ids[0], "second"), result_message(foreign, "evil")], 21.0)
    assert again == []
    rec, frec = await stored_task(store, ids[0]), await stored_task(store, foreign)
    assert rec.data == "first" and rec.state == TaskState.SUCCESS and rec.completed_at == 20.0
    assert rec.worker is not None and rec.worker.python == "3.11.7"
    assert frec.state == TaskState.WAITING
    # running after success must not go backwards; terminal tasks are not put in flight again
    await store.tasks.mark_running("ep1", {ids[0]: 30.0})
    assert (await stored_task(store, ids[0])).state == TaskState.SUCCESS
    assert await store.inflight.add("ep1", "s", {ids[0]: "b", ids[2]: "b"}, taken=2) == [ids[2]]
    assert set(await store.inflight.get("ep1")) == {ids[2]}
    await store.inflight.remove("ep1", [ids[2]])
    assert await store.inflight.get("ep1") == {}


async def test_fail_tasks_is_terminal(store: Store) -> None:
    _, ids = await submitted(store, 2)
    await store.tasks.fail(ids[:1], "could not queue", 5.0)
    rec = await stored_task(store, ids[0])
    assert rec.state == TaskState.FAILED and rec.error == "could not queue"
    assert rec.completed_at == 5.0 and rec.transitions["failed"] == 5.0
    assert await store.tasks.complete("ep1", [result_message(ids[0])], 6.0) == []


async def test_task_records_handed_out_are_copies(store: Store) -> None:
    """Changing a task record a store returned must not change what the store holds."""
    _, (task_id,) = await submitted(store, 1)
    rec = await stored_task(store, task_id)
    rec.transitions["bogus"] = 1.0
    assert "bogus" not in (await stored_task(store, task_id)).transitions


@pytest.mark.usefixtures("services")
async def test_results_get_ttl_on_redis(real_prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=f"{real_prefix}:", result_ttl=3600)
    try:
        _, ids = await submitted(store, 2)
        await store.tasks.complete("ep1", [result_message(ids[0])], now())
        assert 0 < await store.db.r.ttl(store.db.k("task", ids[0])) <= 3600
        assert await store.db.r.ttl(store.db.k("task", ids[1])) == -1
    finally:
        await store.close()
        drop_redis_prefix(f"{real_prefix}:")


async def test_a_large_batch_is_created_whole_and_in_order(store: Store) -> None:
    await store.endpoints.put(endpoint_record(), "cred")
    batch = new_tasks(2500)
    ids = batch.task_ids
    direct = {t: f"body-{t}" for t in ids[:1200]}
    await store.endpoints.connect_session("ep1", "s", None, now())
    assert await store.tasks.create(batch, inflight=direct, session_id="s")
    assert await store.tasks.group_tasks(batch.task_group_id) == ids
    assert await store.tasks.group_owner(batch.task_group_id) == "u1"
    assert await store.inflight.get("ep1") == direct
    ep = await store.endpoints.get("ep1")
    assert ep is not None and ep.queued_tasks == 2500 - 1200
    last = await stored_task(store, ids[-1])
    assert last.task_group_id == batch.task_group_id and last.state == TaskState.WAITING


async def test_open_tasks_count_down_once_on_every_way_to_end(store: Store) -> None:
    """Result, failure, cancel and a crash-failure in reconcile each take a task off the count
    once; a second ending of the same task, running, and other users' tasks change nothing."""
    await store.endpoints.put(endpoint_record(), "cred")
    await store.endpoints.connect_session("ep1", "s", None, now())
    _, ids = await submitted(store, 6)
    await store.tasks.create(new_tasks(2, user="u2"))
    assert (await store.tasks.open_tasks("u1"), await store.tasks.open_tasks("u2")) == (6, 2)
    assert await store.tasks.open_task_ids("u1") == sorted(ids)
    done, failed, cancelled, crasher, running, waiting = ids
    await store.inflight.add("ep1", "s", {crasher: "b", running: "b"}, taken=2)
    await store.tasks.mark_running("ep1", {running: 1.0})
    assert await store.tasks.open_tasks("u1") == 6

    await store.tasks.complete("ep1", [result_message(done)], 2.0)
    await store.tasks.complete("ep1", [result_message(done)], 2.1)
    assert await store.tasks.open_tasks("u1") == 5
    await store.tasks.fail([failed, done], "could not queue", 3.0)
    await store.tasks.fail([failed], "again", 3.1)
    assert await store.tasks.open_tasks("u1") == 4
    await store.tasks.cancel("u1", [cancelled, done, failed], only_queued=False, at=4.0)
    await store.tasks.cancel("u1", [cancelled], only_queued=False, at=4.1)
    await store.tasks.complete("ep1", [result_message(cancelled)], 4.2)
    assert await store.tasks.open_tasks("u1") == 3
    assert await store.tasks.open_task_ids("u1") == sorted([crasher, running, waiting])
    found = await store.inflight.reconcile("ep1", {running}, {crasher}, 1, 5.0)
    assert [r.task_id for _, r in found.failed] == [crasher]
    await store.tasks.complete("ep1", [result_message(crasher)], 5.1)
    assert await store.tasks.open_tasks("u1") == 2
    await store.tasks.complete("ep1", [result_message(running)], 6.0)
    await store.tasks.cancel("u1", [waiting], only_queued=True, at=6.0)
    assert (await store.tasks.open_tasks("u1"), await store.tasks.open_tasks("u2")) == (0, 2)
    assert await store.tasks.open_tasks("nobody") == 0
    assert await store.tasks.open_task_ids("u1") == [] and len(
        await store.tasks.open_task_ids("u2")) == 2


async def test_an_endpoints_owner_cancels_any_task_on_it_saying_so(store: Store) -> None:
    """u1 owns ep1; u2's task there is u1's to cancel (its error names the owner), u2's task on
    an endpoint of u2's is not; the broker (None) cancels any, with the error it gives."""
    await store.endpoints.put(endpoint_record(), "cred")
    await store.endpoints.put(endpoint_record("ep2", "u2"), "cred2")
    theirs = new_tasks(2, user="u2")
    await store.tasks.create(theirs)
    elsewhere = dataclasses.replace(new_tasks(1, user="u2"), endpoint_id="ep2")
    await store.tasks.create(elsewhere)
    done = await store.tasks.cancel("u1", [*theirs.task_ids[:1], *elsewhere.task_ids], False, 1.0)
    assert [r.task_id for _, _, r in done.results] == theirs.task_ids[:1]
    assert done.results[0][2].error == owner_cancelled("ep1")
    assert done.unchanged == {elsewhere.task_ids[0]: "not_found"}
    done = await store.tasks.cancel(None, [theirs.task_ids[1]], False, 2.0, error="unshared")
    assert done.results[0][2].error == "unshared"
    (rec,) = await store.tasks.get_many([theirs.task_ids[1]])
    assert rec is not None and (rec.state, rec.error) == (TaskState.CANCELLED, "unshared")
    assert await store.tasks.open_task_ids("u2") == elsewhere.task_ids


async def test_a_batch_past_the_open_task_limit_changes_nothing(store: Store) -> None:
    await store.endpoints.put(endpoint_record(), "cred")
    await store.endpoints.connect_session("ep1", "s", None, now())
    first = new_tasks(3)
    assert await store.tasks.create(first, max_open=5) is False
    over = new_tasks(3)
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
    assert await store.tasks.create(new_tasks(2), max_open=5) is False
    assert await store.tasks.create(new_tasks(5, user="u2"), max_open=5) is False
    with pytest.raises(OverQuota):
        await store.tasks.create(new_tasks(1), max_open=5)
    # ending one task makes room for one; no limit (0) admits anything
    await store.tasks.complete("ep1", [result_message(first.task_ids[0])], now())
    await store.tasks.create(new_tasks(1), max_open=5)
    await store.tasks.create(new_tasks(4), max_open=0)
    assert await store.tasks.open_tasks("u1") == 9


@pytest.mark.usefixtures("services")
async def test_open_task_count_read_and_raised_from_zero_on_redis(real_prefix: str) -> None:
    """A count left below zero (tasks created before counting began, then ended) reads as 0
    and is not subtracted from the next batch."""
    store = RedisStore(REDIS_URL, prefix=f"{real_prefix}:", result_ttl=3600)
    try:
        _, ids = await submitted(store, 1)
        await store.db.r.delete(store.db.k("user", "u1", "open"))  # as if created before
        await store.tasks.complete("ep1", [result_message(ids[0])], now())
        assert await store.db.r.get(store.db.k("user", "u1", "open")) == "0"
        await store.db.r.set(store.db.k("user", "u1", "open"), -3)
        assert await store.tasks.open_tasks("u1") == 0
        await store.tasks.create(new_tasks(2), max_open=2)
        assert await store.tasks.open_tasks("u1") == 2
    finally:
        await store.close()
        drop_redis_prefix(f"{real_prefix}:")


async def test_groups_are_listed_most_recently_submitted_to_first(store: Store) -> None:
    t = now()
    old, new = new_tasks(2, t - 30), new_tasks(1, t - 20)
    await store.tasks.create(old)
    await store.tasks.create(new)
    empty = TaskGroupRecord(task_group_id=new_id(), user_id="u1", created_at=t - 10)
    await store.tasks.create_group(empty)
    await store.tasks.create(new_tasks(3, t - 40, user="u2"))  # someone else's

    groups = await store.tasks.recent_groups("u1", 10)
    assert [g.task_group_id for g in groups] == [empty.task_group_id, new.task_group_id,
                                                 old.task_group_id]
    assert [g.task_count for g in groups] == [0, 1, 2]
    assert groups[2].created_at == groups[2].last_active == t - 30

    more = new_tasks(2, t - 5, group=old.task_group_id)  # a later batch in the old group
    await store.tasks.create(more)
    groups = await store.tasks.recent_groups("u1", 2)
    assert [(g.task_group_id, g.task_count) for g in groups] == [(old.task_group_id, 4),
                                                                 (empty.task_group_id, 0)]
    assert groups[0].created_at == t - 30 and groups[0].last_active == t - 5
    rest = await store.tasks.recent_groups("u1", 10, offset=2)
    assert [g.task_group_id for g in rest] == [new.task_group_id]
    assert [g.task_count for g in await store.tasks.recent_groups("u2", 10)] == [3]
    assert await store.tasks.recent_groups("nobody", 10) == []


async def test_the_index_keeps_only_the_latest_groups(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(farcall.broker.store.memory.state, "MAX_USER_GROUPS", 3)
    monkeypatch.setattr(farcall.broker.store.redis.tasks, "MAX_USER_GROUPS", 3)
    t = now()
    batches = [new_tasks(1, t - 100 + i) for i in range(5)]
    for b in batches[:4]:
        await store.tasks.create(b)
    await store.tasks.create_group(  # a group made empty (as an Executor does) counts too
        TaskGroupRecord(task_group_id=new_id(), user_id="u1", created_at=t - 50))
    listed = [g.task_group_id for g in await store.tasks.recent_groups("u1", 10)]
    assert len(listed) == 3
    assert listed[1:] == [batches[3].task_group_id, batches[2].task_group_id]
    # an old group is still readable by its id
    assert await store.tasks.group_tasks(batches[0].task_group_id) == batches[0].task_ids


async def test_group_tasks_last_n(store: Store) -> None:
    b = new_tasks(5, now())
    await store.tasks.create(b)
    assert await store.tasks.group_tasks(b.task_group_id, last=2) == b.task_ids[-2:]
    assert await store.tasks.group_tasks(b.task_group_id, last=9) == b.task_ids
    assert await store.tasks.group_tasks(b.task_group_id, last=0) == []
    assert await store.tasks.group_tasks(b.task_group_id) == b.task_ids


async def test_summaries_read_state_and_times_not_results(store: Store) -> None:
    t = now()
    b = new_tasks(2, t)
    await store.tasks.create(b)
    done, waiting = b.task_ids
    await store.tasks.complete("ep1", [ResultMessage(task_id=done, state=TaskState.SUCCESS,
                                                     data="BIG RESULT")], t + 1)
    first, second, unknown = await store.tasks.summaries([done, waiting, "unknown"])
    assert unknown is None
    assert first is not None and second is not None
    assert (first.task_id, first.state, first.user_id) == (done, TaskState.SUCCESS, "u1")
    assert first.task_group_id == b.task_group_id and first.function_id == "f1"
    assert first.endpoint_id == "ep1"
    assert first.completed_at == t + 1 and first.transitions == {"received": t}
    assert first.data == "" and first.error == ""
    assert (second.state, second.completed_at) == (TaskState.WAITING, None)


async def test_redis_lists_no_group_idle_past_the_result_lifetime(real_prefix: str,
                                                                  services: None) -> None:
    """Such a group's records expired with it; the next new group drops it from the index."""
    s = RedisStore(REDIS_URL, prefix=f"{real_prefix}:", result_ttl=60)
    await s.start()
    try:
        t = now()
        stale, fresh = new_tasks(1, t - 120), new_tasks(1, t)
        await s.tasks.create(stale)
        await s.tasks.create(fresh)
        groups = await s.tasks.recent_groups("u1", 10)
        assert [g.task_group_id for g in groups] == [fresh.task_group_id]
        index = await s.db.r.zrange(s.db.k("user", "u1", "groups"), 0, -1)
        assert index == [fresh.task_group_id]
        assert 0 < await s.db.r.ttl(s.db.k("user", "u1", "groups")) <= 60
    finally:
        await s.close()
        drop_redis_prefix(f"{real_prefix}:")


async def test_a_request_creates_its_tasks_once(store: Store) -> None:
    first = dataclasses.replace(new_tasks(2), request_id="req-1")
    await store.tasks.create(first)
    again = dataclasses.replace(new_tasks(2), request_id="req-1")
    with pytest.raises(AlreadySubmitted) as caught:
        await store.tasks.create(again, max_open=1)  # the quota is not checked for a repeat
    assert caught.value.prior == Submitted("ep1", first.task_group_id, first.task_ids)
    assert await store.tasks.get_many(again.task_ids) == [None, None], "nothing created"
    assert await store.tasks.open_tasks("u1") == 2
    assert await store.tasks.submitted("u1", "req-1") == caught.value.prior
    assert await store.tasks.submitted("u2", "req-1") is None, "request ids are per user"
    other = dataclasses.replace(new_tasks(1, user="u2"), request_id="req-1")
    await store.tasks.create(other)


async def test_an_abandoned_request_creates_nothing_later(store: Store) -> None:
    assert await store.tasks.submitted("u1", "late") is None
    assert await store.tasks.submitted("u1", "late", abandon=True) == ABANDONED
    with pytest.raises(AlreadySubmitted) as caught:
        await store.tasks.create(dataclasses.replace(new_tasks(1), request_id="late"))
    assert caught.value.prior.abandoned
    done = dataclasses.replace(new_tasks(1), request_id="done")
    await store.tasks.create(done)
    found = await store.tasks.submitted("u1", "done", abandon=True)
    assert found is not None and found.task_ids == done.task_ids, "abandoning comes too late"
