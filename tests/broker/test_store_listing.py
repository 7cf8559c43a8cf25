"""The store's index of each user's recent task groups and its task summaries, on memory and Redis."""

from __future__ import annotations

import uuid

import pytest

import farcall.broker.store.memory
import farcall.broker.store.redis
from farcall.broker.records import NewTasks, TaskGroupRecord
from farcall.broker.store.base import Store
from farcall.broker.store.redis import RedisStore
from farcall.protocol.channel import ResultMessage
from farcall.protocol.common import TaskState, now
from harness.services import REDIS_URL, drop_redis_prefix

pytestmark = pytest.mark.anyio


def _id() -> str:
    return uuid.uuid4().hex


def _batch(n: int, at: float, user: str = "u1", group: str | None = None) -> NewTasks:
    return NewTasks(
        user_id=user, task_group_id=group or _id(), endpoint_id="ep1",
        task_ids=[_id() for _ in range(n)], function_ids=["f1"] * n,
        received_at=at, waiting_at=at + 0.001, submitter=None, new_group=group is None,
    )


async def test_groups_are_listed_most_recently_submitted_to_first(store: Store) -> None:
    t = now()
    old, new = _batch(2, t - 30), _batch(1, t - 20)
    await store.tasks.create(old)
    await store.tasks.create(new)
    empty = TaskGroupRecord(task_group_id=_id(), user_id="u1", created_at=t - 10)
    await store.tasks.create_group(empty)
    await store.tasks.create(_batch(3, t - 40, user="u2"))  # someone else's

    groups = await store.tasks.recent_groups("u1", 10)
    assert [g.task_group_id for g in groups] == [empty.task_group_id, new.task_group_id,
                                                 old.task_group_id]
    assert [g.task_count for g in groups] == [0, 1, 2]
    assert groups[2].created_at == groups[2].last_active == t - 30

    more = _batch(2, t - 5, group=old.task_group_id)  # a later batch in the old group
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
    monkeypatch.setattr(farcall.broker.store.memory, "MAX_USER_GROUPS", 3)
    monkeypatch.setattr(farcall.broker.store.redis, "MAX_USER_GROUPS", 3)
    t = now()
    batches = [_batch(1, t - 100 + i) for i in range(5)]
    for b in batches[:4]:
        await store.tasks.create(b)
    await store.tasks.create_group(  # a group made empty (as an Executor does) counts too
        TaskGroupRecord(task_group_id=_id(), user_id="u1", created_at=t - 50))
    listed = [g.task_group_id for g in await store.tasks.recent_groups("u1", 10)]
    assert len(listed) == 3
    assert listed[1:] == [batches[3].task_group_id, batches[2].task_group_id]
    # an old group is still readable by its id
    assert await store.tasks.group_tasks(batches[0].task_group_id) == batches[0].task_ids


async def test_group_tasks_last_n(store: Store) -> None:
    b = _batch(5, now())
    await store.tasks.create(b)
    assert await store.tasks.group_tasks(b.task_group_id, last=2) == b.task_ids[-2:]
    assert await store.tasks.group_tasks(b.task_group_id, last=9) == b.task_ids
    assert await store.tasks.group_tasks(b.task_group_id, last=0) == []
    assert await store.tasks.group_tasks(b.task_group_id) == b.task_ids


async def test_summaries_read_state_and_times_not_results(store: Store) -> None:
    t = now()
    b = _batch(2, t)
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
        stale, fresh = _batch(1, t - 120), _batch(1, t)
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
