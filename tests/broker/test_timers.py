"""Timers in the broker: the schedule's times, the scheduler's runs (on a clock the test sets),
and the ``/v1/timers`` routes, on the in-process store and queue. The same on real processes,
Redis and RabbitMQ: tests/integration/test_timers.py."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from fastapi.testclient import TestClient

from farcall.broker import auth, schedule
from farcall.broker.app import create_app
from farcall.broker.queue.memory import MemoryQueue
from farcall.broker.records import TimerRecord
from farcall.broker.scheduler import TimerScheduler
from farcall.broker.services import Services
from farcall.broker.settings import Settings
from farcall.broker.store.memory import MemoryStore
from farcall.protocol.common import now
from farcall.protocol.timers import TimerSchedule
from harness.procs import wait_until
from tests.broker.records import endpoint_record, function_record

DAY = 86400.0
T0 = 1_800_000_000.0
"""2027-01-15 08:00 UTC: a whole hour, so cron times are easy to read."""


# ---- the schedule


def test_interval_runs_from_start_on_a_fixed_grid() -> None:
    every = TimerSchedule(interval=10, start=T0)
    assert schedule.first_run(every, T0) == T0
    assert schedule.first_run(every, T0 - 100) == T0, "a start in the future waits"
    assert schedule.next_run(every, T0 + 0.3) == T0 + 10, "a late run does not shift the grid"
    assert schedule.next_run(every, T0 + 10) == T0 + 20
    assert schedule.next_run(every, T0 + 95.5) == T0 + 100, "missed runs are skipped, not made up"
    assert schedule.resume_run(every, T0 + 20) == T0 + 20
    assert schedule.resume_run(every, T0 + 20.1) == T0 + 30


def test_a_start_in_the_past_runs_now_or_at_the_next_time_of_the_grid() -> None:
    every = TimerSchedule(interval=10, start=T0)
    assert schedule.first_run(every, T0 + schedule.START_SLACK) == T0 + schedule.START_SLACK
    assert schedule.first_run(every, T0 + 31) == T0 + 40


def test_cron_times_are_utc_and_count_from_start() -> None:
    nightly = TimerSchedule(cron="0 2 * * *")
    assert schedule.first_run(nightly, T0) == T0 - 6 * 3600 + DAY
    assert schedule.next_run(nightly, T0 + 18 * 3600) == T0 + 18 * 3600 + DAY
    hourly = TimerSchedule(cron="0 * * * *", start=T0 + 3600)
    assert schedule.first_run(hourly, T0) == T0 + 3600, "a cron time at start counts"
    assert schedule.next_run(hourly, T0 + 3600) == T0 + 7200
    assert schedule.next_run(hourly, T0 + 5 * 3600 + 1) == T0 + 6 * 3600


def test_stop_at_ends_the_schedule() -> None:
    every = TimerSchedule(interval=10, start=T0, stop_at=T0 + 20)
    assert schedule.next_run(every, T0 + 10) == T0 + 20, "a run at stop_at is the last"
    assert schedule.next_run(every, T0 + 20) is None
    assert schedule.first_run(TimerSchedule(cron="0 2 * * *", stop_at=T0 + 60), T0) is None
    assert schedule.first_run(TimerSchedule(cron="0 0 31 2 *"), T0) is None, "no 31 February"


def test_cron_that_croniter_refuses_says_why() -> None:
    with pytest.raises(schedule.InvalidSchedule, match="out of range"):
        schedule.check(TimerSchedule(cron="61 * * * *"))
    schedule.check(TimerSchedule(cron="*/15 9-17 * * 1-5"))


# ---- the scheduler, on the test's clock


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
    user, endpoint_id, function_id = "u1", str(uuid.uuid4()), str(uuid.uuid4())
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


# ---- the routes


@dataclass
class Env:
    client: TestClient
    store: MemoryStore
    alice: dict[str, str]
    bob: dict[str, str]
    endpoint_id: str
    function_id: str

    def create(self, headers: dict[str, str] | None = None, **body: Any) -> Any:
        body = {"endpoint_id": self.endpoint_id, "function_id": self.function_id, "args": "A",
                **body}
        return self.client.post("/v1/timers", json=body, headers=headers or self.alice)


@pytest.fixture
def env() -> Iterator[Env]:
    store = MemoryStore()
    app = create_app(Settings(auth_failure_rate=0, max_timers=3), store=store, queue=MemoryQueue())
    with TestClient(app) as client:
        def user(name: str) -> dict[str, str]:
            _, token = client.portal.call(auth.create_user, store.users, name)  # type: ignore[union-attr]
            return {"Authorization": f"Bearer {token}"}

        alice, bob = user("alice"), user("bob")
        endpoint_id = client.post("/v1/endpoints", json={"name": "ep"},
                                  headers=alice).json()["endpoint_id"]
        function_id = client.post("/v1/functions", json={"function": "FN"},
                                  headers=alice).json()["function_id"]
        yield Env(client, store, alice, bob, endpoint_id, function_id)


def test_the_routes_are_in_the_openapi_document(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    assert set(paths["/v1/timers"]) == {"get", "post"}
    assert set(paths["/v1/timers/{timer_id}"]) == {"get", "delete"}
    assert "409" in paths["/v1/timers/{timer_id}/pause"]["post"]["responses"]


def test_a_timer_is_its_creators_alone(env: Env) -> None:
    r = env.create(cron="0 2 * * *", name="nightly")
    assert r.status_code == 200, r.text
    timer_id = r.json()["timer_id"]
    mine = env.client.get("/v1/timers", headers=env.alice).json()["timers"]
    assert [(t["timer_id"], t["name"], t["state"]) for t in mine] == [
        (timer_id, "nightly", "active")]
    assert "runs" not in mine[0]
    one = env.client.get(f"/v1/timers/{timer_id}", headers=env.alice).json()
    assert one["runs"] == [] and one["schedule"]["cron"] == "0 2 * * *"
    assert env.client.get("/v1/timers", headers=env.bob).json() == {"timers": []}
    for method, path in [("GET", ""), ("POST", "/pause"), ("POST", "/resume"), ("DELETE", "")]:
        r = env.client.request(method, f"/v1/timers/{timer_id}{path}", headers=env.bob)
        assert r.status_code == 404 and "GET /v1/timers" in r.json()["message"], (method, path)
    assert env.client.get(f"/v1/timers/{timer_id}").status_code == 401


def test_creating_needs_the_endpoint_and_function_to_be_usable(env: Env) -> None:
    r = env.create(env.bob, interval=60)
    assert r.status_code == 404 and "endpoint" in r.json()["message"]
    r = env.client.post(f"/v1/endpoints/{env.endpoint_id}/share", json={"username": "bob"},
                        headers=env.alice)
    assert r.status_code == 200
    r = env.create(env.bob, interval=60)
    assert r.status_code == 404 and "function" in r.json()["message"]
    env.client.post(f"/v1/functions/{env.function_id}/share", json={"username": "bob"},
                    headers=env.alice)
    assert env.create(env.bob, interval=60).status_code == 200


@pytest.mark.parametrize(("body", "status", "says"), [
    ({}, 422, "exactly one of interval"),
    ({"interval": 60, "cron": "* * * * *"}, 422, "exactly one of interval"),
    ({"interval": 0.5}, 422, "greater than or equal to 1"),
    ({"cron": "* * * *"}, 422, "has 4 fields; give 5"),
    ({"cron": "* 25 * * *"}, 400, "out of range"),
    ({"cron": "0 0 31 2 *"}, 400, "names no time to run"),
    ({"interval": 60, "stop_after_runs": 0}, 422, "greater than or equal to 1"),
    ({"interval": 60, "stop_at": 1000.0}, 400, "stop_at is in the past"),
    ({"interval": 60, "start": 2000.0, "stop_at": 1000.0}, 422, "stop_at is not after start"),
])
def test_a_bad_schedule_says_what_is_wrong(env: Env, body: dict[str, Any], status: int,
                                           says: str) -> None:
    r = env.create(**body)
    assert r.status_code == status and says in r.json()["message"], r.text


def test_pause_resume_and_delete(env: Env) -> None:
    timer_id = env.create(cron="0 2 * * *").json()["timer_id"]
    paused = env.client.post(f"/v1/timers/{timer_id}/pause", headers=env.alice).json()
    assert paused["state"] == "paused" and paused["next_run"] is None
    again = env.client.post(f"/v1/timers/{timer_id}/pause", headers=env.alice)
    assert again.status_code == 200 and again.json()["state"] == "paused"
    resumed = env.client.post(f"/v1/timers/{timer_id}/resume", headers=env.alice).json()
    assert resumed["state"] == "active" and resumed["next_run"] % 86400 == 7200
    env.client.portal.call(env.store.timers.stop, timer_id, "its function was deleted")  # type: ignore[union-attr]
    for verb in ("pause", "resume"):
        r = env.client.post(f"/v1/timers/{timer_id}/{verb}", headers=env.alice)
        assert r.status_code == 409 and "its function was deleted" in r.json()["message"]
    r = env.client.delete(f"/v1/timers/{timer_id}", headers=env.alice)
    assert r.json() == {"timer_id": timer_id, "deleted": True}
    assert env.client.get(f"/v1/timers/{timer_id}", headers=env.alice).status_code == 404


def test_a_user_has_at_most_max_timers(env: Env) -> None:
    for _ in range(3):
        assert env.create(cron="0 2 * * *").status_code == 200
    r = env.create(cron="0 2 * * *")
    assert r.status_code == 403 and "FARCALL_MAX_TIMERS" in r.json()["message"]
    assert env.create(env.bob, cron="0 2 * * *").status_code == 404, "bob's own check first"


def test_a_timer_runs_in_the_app(env: Env) -> None:
    timer_id = env.create(interval=1, stop_after_runs=1).json()["timer_id"]

    def finished() -> Any:
        info = env.client.get(f"/v1/timers/{timer_id}", headers=env.alice).json()
        return info if info["state"] == "finished" else None

    info = wait_until(finished, 10, "the timer's one run")
    task_id = info["runs"][0]["task_id"]
    task = env.client.get(f"/v1/tasks/{task_id}", headers=env.alice).json()
    assert task["function_id"] == env.function_id and task["state"] == "waiting-for-endpoint"
