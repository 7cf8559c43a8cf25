"""The ``/v1/timers`` routes (farcall.broker.routes.timers) on the in-process store and queue:
a timer is its creator's alone, needs a usable endpoint and function, a schedule that names a
time, pause/resume/delete, the quota, and a run in the app. The same on real processes, Redis
and RabbitMQ: tests/integration/test_timers.py."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pytest

from farcall.broker.settings import Settings
from harness.procs import wait_until
from tests.broker.conftest import MakeApi
from tests.broker.helpers import Api


@dataclass
class Env(Api):
    alice: dict[str, str]
    bob: dict[str, str]
    endpoint_id: str
    function_id: str

    def create(self, headers: dict[str, str] | None = None, **body: Any) -> Any:
        body = {"endpoint_id": self.endpoint_id, "function_id": self.function_id, "args": "A",
                **body}
        return self.client.post("/v1/timers", json=body, headers=headers or self.alice)


@pytest.fixture
def env(make_api: MakeApi) -> Env:
    api = make_api(Settings(auth_failure_rate=0, max_timers=3))
    alice, bob = api.user("alice"), api.user("bob")
    return Env(api.client, api.services, alice, bob, api.endpoint(alice)["endpoint_id"],
               api.function(alice))


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
    env.call(env.store.timers.stop, timer_id, "its function was deleted")
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
