"""The timer scheduler (farcall.broker.scheduler) on the in-process store and queue, on a clock
the test sets: each run fires once across replicas, missed runs fire once, a timer whose
function or endpoint is gone stops, a timer whose owner may not act pauses, runs count against
the owner's rate limit, the loop outlives a failing store. The same on real
processes, Redis and RabbitMQ: tests/integration/test_timers.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest

from farcall.broker import access, auth, schedule
from farcall.broker.queue.memory import MemoryQueue
from farcall.broker.records import TimerRecord
from farcall.broker.scheduler import TimerScheduler
from farcall.broker.services import Services
from farcall.broker.settings import Settings
from farcall.broker.store.memory import MemoryStore
from farcall.broker.submission import submit_batch
from farcall.protocol.common import now
from farcall.protocol.rest import BatchSubmission, TaskSpec
from farcall.protocol.timers import TimerSchedule
from tests.broker.records import endpoint_record, function_record

T0 = 1_800_000_000.0
"""2027-01-15 08:00 UTC."""


@dataclass
class Stage:
    svc: Services
    scheduler: TimerScheduler
    user: str
    endpoint_id: str
    function_id: str

    async def timer(self, at: float = T0, **when: Any) -> TimerRecord:
        """A timer created at ``at``, starting then unless ``when`` says otherwise."""
        plan = TimerSchedule(**{"start": at, **when})
        timer = TimerRecord(
            timer_id=str(uuid.uuid4()), user_id=self.user, endpoint_id=self.endpoint_id,
            function_id=self.function_id, args="ARGS", schedule=plan,
            next_run=schedule.first_run(plan, at), created_at=at)
        assert await self.svc.store.timers.create(timer)
        return timer

    async def get(self, timer: TimerRecord) -> TimerRecord:
        found = await self.svc.store.timers.get(timer.timer_id)
        assert found is not None
        return found

    async def queued(self) -> int:
        return len(await self.svc.queue.drain(self.endpoint_id))


@pytest.fixture
async def stage() -> AsyncIterator[Stage]:
    svc = Services.build(Settings(), MemoryStore(), MemoryQueue())
    user, _ = await auth.create_user(svc.store.users, "u1")  # a timer runs while its owner may
    endpoint_id, function_id = str(uuid.uuid4()), str(uuid.uuid4())
    await svc.store.endpoints.put(endpoint_record(endpoint_id, user, created_at=T0), "h")
    await svc.store.functions.put(function_record(function_id, user, created_at=T0))
    await svc.queue.declare(endpoint_id)
    yield Stage(svc, TimerScheduler(svc), user, endpoint_id, function_id)


@pytest.mark.anyio
async def test_each_run_fires_once_and_the_last_finishes_the_timer(stage: Stage) -> None:
    timer = await stage.timer(interval=10, stop_after_runs=3)
    assert await stage.scheduler.tick(T0 - 1) == 0, "not due yet"
    assert await stage.scheduler.tick(T0 + 0.2) == 1
    assert await stage.scheduler.tick(T0 + 0.3) == 0, "a run fires once"
    other = TimerScheduler(stage.svc)  # another replica on the same store
    await asyncio.gather(stage.scheduler.tick(T0 + 10.1), other.tick(T0 + 10.1))
    assert await stage.queued() == 2
    found = await stage.get(timer)
    assert found.run_count == 2, "two replicas that both saw the run due fired it once"
    await stage.scheduler.tick(T0 + 20.1)
    found = await stage.get(timer)
    assert (found.state, found.next_run, found.run_count) == ("finished", None, 3)
    assert [(r.number, r.at) for r in found.runs] == [(1, T0 + 0.2), (2, T0 + 10.1),
                                                       (3, T0 + 20.1)]
    tasks = await stage.svc.store.tasks.get_many([r.task_id or "" for r in found.runs])
    assert all(t is not None and t.user_id == stage.user and t.function_id == stage.function_id
               for t in tasks), "each run is a task of the timer's creator"
    assert await stage.scheduler.tick(T0 + 100) == 0


@pytest.mark.anyio
async def test_runs_missed_while_no_broker_ran_fire_once(stage: Stage) -> None:
    timer = await stage.timer(interval=10)
    assert await stage.scheduler.tick(T0 + 95.5) == 1, "9 runs were due: one fires"
    assert await stage.scheduler.tick(T0 + 99) == 0
    assert (await stage.get(timer)).next_run == T0 + 100, "then the schedule goes on from now"
    assert await stage.scheduler.tick(T0 + 100) == 1
    assert await stage.queued() == 2


@pytest.mark.anyio
@pytest.mark.parametrize("gone", ["function", "endpoint", "unshared"])
async def test_a_timer_whose_function_or_endpoint_is_gone_stops_saying_which(
    stage: Stage, gone: str
) -> None:
    timer = await stage.timer(interval=10)
    await stage.scheduler.tick(T0)
    store = stage.svc.store
    if gone == "function":
        await store.functions.delete(stage.function_id)
        stage.svc.functions.pop(stage.function_id)
    elif gone == "endpoint":
        await store.endpoints.delete(stage.endpoint_id)
        stage.svc.endpoint_access.pop(stage.endpoint_id)
    else:  # the endpoint's owner stops sharing it with the timer's creator
        await store.endpoints.put(endpoint_record(stage.endpoint_id, "owner", created_at=T0), "h")
        stage.svc.endpoint_access.pop(stage.endpoint_id)
    assert await stage.scheduler.tick(T0 + 10) == 1
    found = await stage.get(timer)
    named = stage.function_id if gone == "function" else stage.endpoint_id
    assert found.state == "stopped" and found.next_run is None
    assert found.reason is not None and named in found.reason and "deleted" in found.reason
    assert found.runs[-1].task_id is None and found.runs[-1].error == found.reason
    assert await stage.scheduler.tick(T0 + 20) == 0


@pytest.mark.anyio
async def test_a_run_refused_by_the_quota_is_lost_and_the_timer_goes_on(stage: Stage) -> None:
    stage.svc.settings.max_open_tasks = 1
    timer = await stage.timer(interval=10)
    await stage.scheduler.tick(T0)
    await stage.scheduler.tick(T0 + 10)
    found = await stage.get(timer)
    assert found.state == "active" and found.next_run == T0 + 20
    assert found.runs[0].task_id and found.runs[1].task_id is None
    assert found.runs[1].error is not None and "FARCALL_MAX_OPEN_TASKS" in found.runs[1].error


@pytest.mark.anyio
async def test_the_loop_outlives_a_store_that_fails(stage: Stage) -> None:
    calls = {"n": 0}
    real_due = stage.svc.store.timers.due

    async def flaky(at: float, limit: int) -> list[TimerRecord]:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise ConnectionError("the store is down")
        return await real_due(at, limit)

    stage.svc.store.timers.due = flaky  # type: ignore[method-assign]
    scheduler = TimerScheduler(stage.svc, period=0.01)
    timer = await stage.timer(now(), interval=10)
    scheduler.start()
    try:
        for _ in range(200):
            if (await stage.get(timer)).run_count:
                break
            await asyncio.sleep(0.02)
    finally:
        await scheduler.stop()
    assert calls["n"] > 3 and (await stage.get(timer)).run_count == 1


@pytest.mark.anyio
async def test_stop_lets_the_run_being_fired_get_its_task(stage: Stage) -> None:
    publish = stage.svc.queue.publish
    publishing = asyncio.Event()

    async def slow_publish(endpoint_id: str, bodies: list[bytes]) -> None:
        publishing.set()
        await asyncio.sleep(0.2)
        await publish(endpoint_id, bodies)

    stage.svc.queue.publish = slow_publish  # type: ignore[method-assign]
    timer = await stage.timer(now(), interval=10)
    scheduler = TimerScheduler(stage.svc, period=0.01)
    scheduler.start()
    await asyncio.wait_for(publishing.wait(), 5)
    await scheduler.stop()
    (run,) = (await stage.get(timer)).runs
    assert run.task_id and await stage.queued() == 1


@pytest.mark.anyio
@pytest.mark.parametrize("died", ["after claiming", "after submitting"])
async def test_a_run_whose_broker_died_gets_its_one_task_from_the_sweep(
    stage: Stage, died: str
) -> None:
    """Claimed and never attached: the sweep submits it under the run's request id, so the run
    shows its task, which exists once whether or not the first submission got through."""
    timer = await stage.timer(interval=10)
    run = await stage.svc.store.timers.claim(timer.timer_id, T0, T0 + 10, T0 + 0.1)
    assert run is not None
    if died == "after submitting":
        first = await submit_batch(stage.svc, stage.user, BatchSubmission(
            endpoint_id=stage.endpoint_id, request_id=f"timer:{timer.timer_id}:{run.number}",
            tasks=[TaskSpec(function_id=stage.function_id, args="ARGS")]))
    after = stage.svc.settings.requeue_after
    assert await stage.scheduler.resubmit(T0 + 0.1 + after / 2) == 0, "not before requeue_after"
    assert await stage.scheduler.resubmit(T0 + 0.2 + after) == 1
    (found,) = (await stage.get(timer)).runs
    assert found.task_id and found.error is None
    if died == "after submitting":
        assert found.task_id == first.task_ids[0]
    assert await stage.queued() == 1, "one task for the run"
    assert await stage.scheduler.resubmit(T0 + 10 * after) == 0, "attached: swept no more"


@pytest.mark.anyio
@pytest.mark.parametrize("why", ["disabled", "no token"])
async def test_a_timer_whose_owner_may_not_act_pauses_saying_why(stage: Stage, why: str) -> None:
    timer = await stage.timer(interval=10)
    users = stage.svc.store.users
    if why == "disabled":
        await users.set_disabled(stage.user, True)
    else:
        for token in await users.list_tokens(stage.user):
            await users.revoke_token(token.token_id)
    assert await stage.scheduler.tick(T0 + 0.2) == 1
    found = await stage.get(timer)
    assert (found.state, found.run_count, await stage.queued()) == ("paused", 0, 0)
    assert found.reason == (access.DISABLED_TIMER if why == "disabled" else access.NO_TOKEN_TIMER)
    assert await stage.scheduler.tick(T0 + 10.2) == 0, "a paused timer is not due"


@pytest.mark.anyio
async def test_runs_count_against_the_owners_rate_limit(stage: Stage) -> None:
    svc = Services.build(Settings(rate_limit=0.001, rate_burst=2), stage.svc.store, stage.svc.queue)
    scheduler = TimerScheduler(svc)
    timers = [await stage.timer(interval=10) for _ in range(3)]
    assert await scheduler.tick(T0 + 0.2) == 3
    runs = [(await stage.get(t)).runs for t in timers]
    errors = [r[0].error for r in runs]
    assert sum(1 for r in runs if r[0].task_id) == 2 and await stage.queued() == 2
    assert sum(1 for e in errors if e and "FARCALL_RATE_LIMIT" in e) == 1, errors
    assert [(await stage.get(t)).state for t in timers] == ["active"] * 3, "the next runs go on"
