"""``TimerStore``: timers, their next runs and runs, on the in-process store and the real Redis."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from farcall.broker.records import TimerRecord
from farcall.broker.store.base import Store
from farcall.broker.store.redis import RedisStore
from farcall.protocol.timers import TIMER_RUNS_KEPT, TimerRun
from harness.services import REDIS_URL, drop_redis_prefix
from tests.broker.records import timer_record

pytestmark = pytest.mark.anyio


async def _made(store: Store, **fields: Any) -> TimerRecord:
    timer = timer_record(**fields)
    assert await store.timers.create(timer)
    return timer


async def test_create_get_list_delete(store: Store) -> None:
    first = await _made(store, submitter={"python": "3.11.7", "dill": "0.4.1"})
    second = await _made(store, next_run=None, state="paused", created_at=first.created_at + 1)
    await _made(store, user="u2")
    assert await store.timers.get(first.timer_id) == first
    assert await store.timers.get("unknown") is None
    assert [t.timer_id for t in await store.timers.by_user("u1")] == [first.timer_id,
                                                                 second.timer_id]
    assert await store.timers.by_user("nobody") == []
    assert await store.timers.delete(first.timer_id)
    assert not await store.timers.delete(first.timer_id), "a second delete finds nothing"
    assert await store.timers.get(first.timer_id) is None
    assert [t.timer_id for t in await store.timers.by_user("u1")] == [second.timer_id]
    assert await store.timers.due(1e9, 10) == [(await store.timers.by_user("u2"))[0]]


async def test_a_user_has_at_most_max_timers(store: Store) -> None:
    for _ in range(3):
        assert await store.timers.create(timer_record(), max_timers=3)
    assert not await store.timers.create(timer_record(), max_timers=3)
    assert len(await store.timers.by_user("u1")) == 3, "a refused timer must not be stored"
    assert await store.timers.create(timer_record(user="u2"), max_timers=3), "the limit is per user"
    assert await store.timers.create(timer_record(), max_timers=0), "0 is no limit"


async def test_due_finds_active_timers_whose_time_came_earliest_first(store: Store) -> None:
    assert await store.timers.due(1e9, 10) == []
    late = await _made(store, next_run=300.0)
    early = await _made(store, next_run=200.0)
    await _made(store, next_run=None, state="paused")
    await _made(store, next_run=None, state="finished")
    assert [t.timer_id for t in await store.timers.due(250.0, 10)] == [early.timer_id]
    due = await store.timers.due(300.0, 10)
    assert [t.timer_id for t in due] == [early.timer_id, late.timer_id]
    assert due[0] == early and due[0].runs == []
    assert [t.timer_id for t in await store.timers.due(300.0, 1)] == [early.timer_id]


async def test_a_run_is_claimed_once_by_concurrent_callers(store: Store) -> None:
    timer = await _made(store, next_run=100.0)
    claims = await asyncio.gather(
        *(store.timers.claim(timer.timer_id, 100.0, 110.0, 101.0 + i) for i in range(10)))
    won = [c for c in claims if c is not None]
    assert len(won) == 1 and won[0].number == 1 and won[0].task_id is None
    found = await store.timers.get(timer.timer_id)
    assert found is not None
    assert found.run_count == 1 and found.next_run == 110.0 and found.state == "active"
    assert found.runs == won
    assert await store.timers.due(105.0, 10) == [], "claimed: due again only at 110"
    assert [t.timer_id for t in await store.timers.due(110.0, 10)] == [timer.timer_id]
    assert await store.timers.claim(timer.timer_id, 100.0, 120.0, 111.0) is None, "stale due_at"
    second = await store.timers.claim(timer.timer_id, 110.0, 120.0, 111.0)
    assert second == TimerRun(number=2, at=111.0)


async def test_replicas_on_one_redis_claim_each_run_once(real_prefix: str, services: None) -> None:
    replicas = [RedisStore(REDIS_URL, prefix=f"{real_prefix}:") for _ in range(3)]
    try:
        timer = timer_record(next_run=100.0)
        assert await replicas[0].timers.create(timer)
        for due_at in (100.0, 110.0, 120.0):
            claims = await asyncio.gather(*(
                s.timers.claim(timer.timer_id, due_at, due_at + 10, due_at + 1)
                for s in replicas for _ in range(3)))
            assert len([c for c in claims if c is not None]) == 1, f"run due at {due_at}"
        found = await replicas[1].timers.get(timer.timer_id)
        assert found is not None and found.run_count == 3
        assert [r.number for r in found.runs] == [1, 2, 3]
    finally:
        for s in replicas:
            await s.close()
        drop_redis_prefix(f"{real_prefix}:")


async def test_the_last_run_finishes_the_timer(store: Store) -> None:
    counted = await _made(store, next_run=100.0)
    assert await store.timers.claim(counted.timer_id, 100.0, 110.0, 100.0, stop_after_runs=2)
    run = await store.timers.claim(counted.timer_id, 110.0, 120.0, 110.0, stop_after_runs=2)
    assert run is not None and run.number == 2
    ended = await _made(store, next_run=100.0)
    assert await store.timers.claim(ended.timer_id, 100.0, None, 100.0)
    for timer in (counted, ended):
        found = await store.timers.get(timer.timer_id)
        assert found is not None and found.state == "finished" and found.next_run is None
    assert await store.timers.due(1e9, 10) == []


async def test_pause_resume_and_stop(store: Store) -> None:
    timer = await _made(store, next_run=100.0)
    assert await store.timers.pause(timer.timer_id, "its owner was disabled")
    assert not await store.timers.pause(timer.timer_id), "paused already"
    found = await store.timers.get(timer.timer_id)
    assert found is not None and found.reason == "its owner was disabled"
    assert await store.timers.due(1e9, 10) == []
    assert await store.timers.claim(timer.timer_id, 100.0, 110.0, 100.0) is None
    assert not await store.timers.resume("unknown", 150.0)
    assert await store.timers.resume(timer.timer_id, 150.0)
    assert not await store.timers.resume(timer.timer_id, 160.0), "active already"
    found = await store.timers.get(timer.timer_id)
    assert found is not None and (found.state, found.next_run, found.reason) == (
        "active", 150.0, None), "resuming clears the pause's reason"
    assert [t.timer_id for t in await store.timers.due(150.0, 10)] == [timer.timer_id]

    assert await store.timers.stop(timer.timer_id, "function f1 was deleted")
    assert not await store.timers.stop(timer.timer_id, "again")
    assert not await store.timers.resume(timer.timer_id, 200.0), "stopped is for good"
    found = await store.timers.get(timer.timer_id)
    assert found is not None
    assert (found.state, found.reason, found.next_run) == (
        "stopped", "function f1 was deleted", None)
    assert await store.timers.due(1e9, 10) == []

    paused = await _made(store, next_run=100.0)
    assert await store.timers.pause(paused.timer_id)
    assert await store.timers.resume(paused.timer_id, None), "a schedule that ended meanwhile"
    found = await store.timers.get(paused.timer_id)
    assert found is not None and (found.state, found.next_run) == ("finished", None)
    stopped_paused = await _made(store, next_run=100.0)
    assert await store.timers.pause(stopped_paused.timer_id)
    assert await store.timers.stop(stopped_paused.timer_id, "unshared")


async def test_runs_keep_the_latest_and_take_their_task(store: Store) -> None:
    timer = await _made(store, next_run=0.0)
    total = TIMER_RUNS_KEPT + 3
    for i in range(total):
        run = await store.timers.claim(timer.timer_id, float(i), float(i + 1), float(i) + 0.5)
        assert run is not None
        await store.timers.attach(timer.timer_id, run.model_copy(update={"task_id": f"t{i}"}))
    await store.timers.attach(
        timer.timer_id, TimerRun(number=total, at=total - 0.5, error="could not queue"))
    await store.timers.attach(timer.timer_id, TimerRun(number=1, at=0.5, task_id="forgotten"))
    await store.timers.attach("unknown", TimerRun(number=1, at=0.5, task_id="nowhere"))
    found = await store.timers.get(timer.timer_id)
    assert found is not None and found.run_count == total
    assert [r.number for r in found.runs] == list(range(4, total + 1)), "the latest, oldest first"
    assert found.runs[0] == TimerRun(number=4, at=3.5, task_id="t3")
    assert found.runs[-1] == TimerRun(number=total, at=total - 0.5, error="could not queue")
    assert (await store.timers.by_user("u1"))[0].runs == [], "lists leave runs out"


async def test_a_claimed_run_is_unsubmitted_until_attached(store: Store) -> None:
    timer, gone = await _made(store), await _made(store)
    run = await store.timers.claim(timer.timer_id, 100.0, 110.0, 100.5)
    lost = await store.timers.claim(gone.timer_id, 100.0, 110.0, 100.5)
    assert run is not None and lost is not None
    assert await store.timers.unsubmitted(100.5, 101.0, 10) == [], "claimed at 100.5, not before"
    await store.timers.delete(gone.timer_id)
    assert await store.timers.unsubmitted(101.0, 102.0, 10) == [(timer.timer_id, run.number)]
    assert await store.timers.unsubmitted(101.0, 102.0, 10) == [], "a sweep restarts its wait"
    await store.timers.attach(timer.timer_id, run.model_copy(update={"task_id": "t1"}))
    assert await store.timers.unsubmitted(1e12, 1e12, 10) == []
