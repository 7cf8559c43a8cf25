"""The Action Provider API on the in-process broker: documents judged by the published
globus-action-provider-tools (tests/ap_judge.py), both route styles, both input forms, rights,
idempotency, release_after, and errors in the specification's form. Tasks are finished by
hand in the store here; tests/integration/test_action_provider.py runs them on real endpoints.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pytest

from farcall.broker import action_runner
from farcall.broker.actions import identity_urn
from farcall.broker.errors import Conflict
from farcall.broker.records import ActionRecord
from farcall.broker.settings import Settings
from farcall.broker.submission import submit_batch
from farcall.protocol.channel import ResultMessage
from farcall.protocol.common import TaskState, now
from farcall.protocol.rest import BatchSubmission, TaskSpec
from farcall.serialize import serialize, serialize_json, unpack_args
from harness.procs import wait_until
from tests.ap_judge import Judge
from tests.broker.conftest import MakeApi
from tests.broker.helpers import Api

AP = "/action-provider"
LIMIT = 64 * 1024


@pytest.fixture(scope="module")
def judge() -> Iterator[Judge]:
    j = Judge()
    yield j
    j.close()


@dataclass
class Env(Api):
    judge: Judge

    def endpoint_id(self, headers: dict[str, str]) -> str:
        return self.endpoint(headers)["endpoint_id"]

    def run(self, headers: dict[str, str], body: dict[str, Any], expect: int = 202,
            path: str = "/run", **request: Any) -> dict[str, Any]:
        doc = self.judge.request({"request_id": uuid.uuid4().hex, "body": body, **request})
        r = self.client.post(AP + path, json=doc, headers=headers)
        assert r.status_code == expect, r.text
        return self.judge.status(r.json()) if expect in (200, 202) else r.json()

    def status(self, headers: dict[str, str], action_id: str, style: str = "old") -> Any:
        path = f"{AP}/{action_id}/status" if style == "old" else f"{AP}/actions/{action_id}"
        r = self.client.get(path, headers=headers)
        return self.judge.status(r.json()) if r.status_code == 200 else r

    def finish(self, task_id: str, value: Any = None, error: str = "",
               data: str | None = None) -> None:
        """Complete a task as its endpoint would: ``value`` as JSON, or fail it with ``error``."""
        (rec,) = self.call(self.store.tasks.get_many, [task_id])
        assert rec is not None
        state: Literal[TaskState.SUCCESS, TaskState.FAILED] = (
            TaskState.FAILED if error else TaskState.SUCCESS)
        result = ResultMessage(task_id=task_id, state=state, error=error,
                               data=data if data is not None else
                               "" if error else serialize_json(value))
        self.call(self.store.tasks.complete, rec.endpoint_id, [result], now())

    def queued_args(self, endpoint_id: str) -> list[tuple[tuple[Any, ...], dict[str, Any]]]:
        from farcall.protocol.channel import parse_task_batch

        bodies = self.call(self.queue.drain, endpoint_id)
        tasks = [t for body in bodies for t in parse_task_batch(body)]
        assert all(t.result_format == "json" for t in tasks)
        return [unpack_args(t.args) for t in tasks]


@pytest.fixture
def env(make_api: MakeApi, judge: Judge) -> Env:
    api = make_api(Settings(max_payload_bytes=LIMIT, auth_failure_rate=0))
    return Env(api.client, api.services, judge)


def _task_ids(status: dict[str, Any]) -> list[str]:
    return [e["task_id"] for e in status["details"]["results"]]


def test_introspection_is_public_and_judged(env: Env) -> None:
    r = env.client.get(AP + "/")
    assert r.status_code == 200
    doc = env.judge.description(r.json())
    assert doc["types"] == ["ACTION"] and doc["synchronous"] is False
    assert doc["api_version"] == "1.0" and doc["log_supported"] is True
    assert doc["globus_auth_scope"].endswith("/action-provider")
    assert "public" in doc["visible_to"] and "all_authenticated_users" in doc["runnable_by"]
    uid = str(uuid.uuid4())
    for body in ({"endpoint_id": uid, "tasks": [{"function_id": uid, "args": [1],
                                                 "kwargs": {"a": [None]}}]},
                 {"endpoint": uid, "function": uid, "args": 3, "payload": {"x": 1},
                  "tasks": [{"endpoint": uid, "function": uid, "args": [], "payload": {}}]}):
        env.judge.body(doc["input_schema"], body)
    assert env.judge.errors("Body", {"endpoint_id": uid}, doc["input_schema"])


def test_run_poll_release_in_both_route_styles(env: Env) -> None:
    alice_id, alice = env.new_user("alice")
    fid, ep = env.function(alice), env.endpoint_id(alice)
    for style in ("old", "new"):
        started = env.run(alice, {"endpoint_id": ep, "tasks": [
            {"function_id": fid, "args": [1, "two"], "kwargs": {"three": 3.0}},
            {"function_id": fid}]}, path="/run" if style == "old" else "/actions",
            label="a test", release_after="PT1H")
        assert started["status"] == "ACTIVE" and started["display_status"] == "0/2 tasks done"
        assert started["creator_id"] == identity_urn(alice_id) == f"urn:globus:auth:identity:{alice_id}"
        assert started["label"] == "a test" and started["release_after"] == "PT1H"
        assert env.queued_args(ep) == [((1, "two"), {"three": 3.0}), ((), {})]
        first, second = _task_ids(started)
        env.finish(first, {"out": [1, None]})
        polled = env.status(alice, started["action_id"], style)
        assert polled["status"] == "ACTIVE" and polled["display_status"] == "1/2 tasks done"
        env.finish(second, None)
        done = env.status(alice, started["action_id"], style)
        assert done["status"] == "SUCCEEDED" and "completion_time" in done
        assert done["details"]["results"] == [
            {"task_id": first, "status": "success", "output": {"out": [1, None]}},
            {"task_id": second, "status": "success", "output": None}]
        assert done["details"]["result"] == [{"out": [1, None]}, None]
        log = env.client.get(f"{AP}/{started['action_id']}/log" if style == "old" else
                             f"{AP}/actions/{started['action_id']}/log", headers=alice)
        codes = [e["code"] for e in env.judge.log(log.json())["entries"]]
        assert codes[0] == "ActionStarted" and codes[-1] == "ActionSucceeded"
        assert codes.count("TaskSucceeded") == 2
        released = (env.client.post(f"{AP}/{started['action_id']}/release", headers=alice)
                    if style == "old" else
                    env.client.delete(f"{AP}/actions/{started['action_id']}", headers=alice))
        assert released.status_code == 200 and env.judge.status(released.json()) == done
        gone = env.status(alice, started["action_id"], style)
        assert gone.status_code == 404 and gone.json()["code"] == "ActionNotFound"


def test_a_failed_task_fails_the_action_with_its_error(env: Env) -> None:
    _, alice = env.new_user("alice")
    fid, ep = env.function(alice), env.endpoint_id(alice)
    started = env.run(alice, {"endpoint_id": ep, "tasks": [{"function_id": fid}] * 3})
    ok, bad, pickled = _task_ids(started)
    env.finish(ok, 1)
    env.finish(bad, error="Traceback (most recent call last):\nValueError: bad input 7\n")
    env.finish(pickled, data=serialize({1, 2}))  # an endpoint that ignored result_format
    done = env.status(alice, started["action_id"])
    assert done["status"] == "FAILED" and done["display_status"] == "2 of 3 tasks failed"
    results = done["details"]["results"]
    assert results[0] == {"task_id": ok, "status": "success", "output": 1}
    assert results[1]["status"] == "failed" and "ValueError: bad input 7" in results[1]["exception"]
    assert results[2]["status"] == "failed" and "not JSON" in results[2]["exception"]
    assert done["details"]["code"] == "TaskFailed"
    assert "ValueError: bad input 7" in done["details"]["description"]


def test_the_earlier_form_runs_each_task_on_its_endpoint_in_order(env: Env) -> None:
    _, alice = env.new_user("alice")
    fid, ep1, ep2 = env.function(alice), env.endpoint_id(alice), env.endpoint_id(alice)
    started = env.run(alice, {
        "endpoint": ep1, "function": fid, "args": "one", "kwargs": {"k": 1},
        "tasks": [{"endpoint": ep2, "function": fid, "args": [2], "payload": {"p": 2}},
                  {"function": fid, "args": [3, 3]}]})
    assert env.queued_args(ep1) == [(("one",), {"k": 1}), ((3, 3), {})]
    assert env.queued_args(ep2) == [((2,), {"p": 2})]
    ids = _task_ids(started)
    for i, task_id in enumerate(ids):
        env.finish(task_id, i)
    assert env.status(alice, started["action_id"])["details"]["result"] == [0, 1, 2]
    tasks = env.client.post("/v1/tasks/status", json={"task_ids": ids}, headers=alice).json()
    assert [tasks["tasks"][t]["endpoint_id"] for t in ids] == [ep1, ep2, ep1]
    assert len({t["task_group_id"] for t in tasks["tasks"].values()}) == 1, "one task group"


def test_a_request_id_is_idempotent_per_user(env: Env) -> None:
    _, alice = env.new_user("alice")
    _, bob = env.new_user("bob")
    fid, ep = env.function(alice), env.endpoint_id(alice)
    request = {"request_id": "nightly-42", "body": {"endpoint_id": ep, "tasks": [
        {"function_id": fid}]}}
    first = env.client.post(AP + "/run", json=request, headers=alice)
    again = env.client.post(AP + "/actions", json=request, headers=alice)
    assert (first.status_code, again.status_code) == (202, 200)
    assert env.judge.status(again.json())["action_id"] == first.json()["action_id"]
    assert len(env.queued_args(ep)) == 1, "the repeated request ran nothing more"
    changed = env.client.post(AP + "/run", json={**request, "label": "other"}, headers=alice)
    assert changed.status_code == 409 and changed.json()["code"] == "ActionConflict"
    # Bob's request id is his own; his request fails for want of Alice's endpoint, not as a repeat.
    theirs = env.client.post(AP + "/run", json=request, headers=bob)
    assert theirs.status_code == 400 and "not found" in theirs.json()["description"]


def test_who_may_see_and_manage_an_action(env: Env) -> None:
    _, alice = env.new_user("alice")
    monitor_id, monitor = env.new_user("monitor")
    manager_id, manager = env.new_user("manager")
    _, stranger = env.new_user("stranger")
    fid, ep = env.function(alice), env.endpoint_id(alice)
    started = env.run(alice, {"endpoint_id": ep, "tasks": [{"function_id": fid}]},
                      monitor_by=[identity_urn(monitor_id)], manage_by=[identity_urn(manager_id)])
    action = started["action_id"]
    assert started["monitor_by"] == [identity_urn(monitor_id)]
    for path in (f"{AP}/{action}/status", f"{AP}/actions/{action}", f"{AP}/{action}/log"):
        r = env.client.get(path, headers=stranger)
        assert r.status_code == 404 and r.json()["code"] == "ActionNotFound", path
        assert env.client.get(path, headers=monitor).status_code == 200, path
    for method, path in (("POST", f"{AP}/{action}/cancel"), ("POST", f"{AP}/{action}/release"),
                         ("POST", f"{AP}/actions/{action}/cancel"),
                         ("DELETE", f"{AP}/actions/{action}")):
        assert env.client.request(method, path, headers=stranger).status_code == 404, path
        r = env.client.request(method, path, headers=monitor)
        assert r.status_code == 403 and r.json()["code"] == "Forbidden", path
    assert env.status(monitor, action)["status"] == "ACTIVE"
    release = env.client.post(f"{AP}/{action}/release", headers=manager)
    assert release.status_code == 409 and release.json()["code"] == "ActionConflict"
    cancelled = env.client.post(f"{AP}/{action}/cancel", headers=manager)
    doc = env.judge.status(cancelled.json())
    assert doc["status"] == "FAILED" and doc["details"]["code"] == "ActionCancelled"
    assert doc["details"]["results"][0]["status"] == "cancelled"
    assert env.client.delete(f"{AP}/actions/{action}", headers=manager).status_code == 200
    assert env.status(alice, action).status_code == 404


def test_cancel_after_the_end_changes_nothing(env: Env) -> None:
    _, alice = env.new_user("alice")
    fid, ep = env.function(alice), env.endpoint_id(alice)
    started = env.run(alice, {"endpoint_id": ep, "tasks": [{"function_id": fid}]})
    env.finish(_task_ids(started)[0], "fine")
    r = env.client.post(f"{AP}/actions/{started['action_id']}/cancel", headers=alice)
    assert env.judge.status(r.json())["status"] == "SUCCEEDED"


def test_release_after_is_honoured(env: Env) -> None:
    _, alice = env.new_user("alice")
    fid, ep = env.function(alice), env.endpoint_id(alice)
    started = env.run(alice, {"endpoint_id": ep, "tasks": [{"function_id": fid}]},
                      release_after="PT1S")
    assert started["release_after"] == "PT1S"
    env.finish(_task_ids(started)[0], 5)
    ended = time.monotonic()
    assert env.status(alice, started["action_id"])["status"] == "SUCCEEDED"
    wait_until(lambda: env.status(alice, started["action_id"]).status_code == 404, 10,
               "the action to be released 1 s after it ended")
    assert time.monotonic() - ended >= 0.9
    capped = env.run(alice, {"endpoint_id": ep, "tasks": [{"function_id": fid}]},
                     release_after="P90D")
    assert capped["release_after"] == "P30D", "release_after is capped at 30 days"


def test_tasks_never_submitted_fail_the_action(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    alice_id, alice = env.new_user("alice")
    record = ActionRecord(action_id=str(uuid.uuid4()), user_id=alice_id, request_id="r",
                          request_digest="d", created_at=now() - 1, release_after=60,
                          task_count=2)
    env.call(env.store.actions.create, record, 60)
    assert env.status(alice, record.action_id)["status"] == "ACTIVE"
    monkeypatch.setattr(action_runner, "SUBMIT_GRACE", 0.5)
    done = env.status(alice, record.action_id)
    assert done["status"] == "FAILED" and done["details"]["code"] == "NotSubmitted"


class BrokerDied(Exception):  # noqa: N818 - stands for a kill -9 in the unit tests
    """Raised where the broker would have died: nothing after it runs."""


def _die_before_recording(env: Env, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The next action update recording submitted tasks dies first; the ids of the actions
    that died so."""
    real = env.store.actions.update
    died: list[str] = []

    async def update(action: ActionRecord, ttl: float) -> bool:
        if not died and action.task_ids:
            died.append(action.action_id)
            raise BrokerDied
        return await real(action, ttl)

    monkeypatch.setattr(env.store.actions, "update", update)
    return died


def test_an_action_whose_broker_died_after_submitting_shows_what_ran(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, alice = env.new_user("alice")
    fid, ep = env.function(alice), env.endpoint_id(alice)
    _die_before_recording(env, monkeypatch)
    doc = env.judge.request({"request_id": "once", "body": {"endpoint_id": ep, "tasks": [
        {"function_id": fid, "args": [2]}]}})
    with pytest.raises(BrokerDied):
        env.client.post(AP + "/run", json=doc, headers=alice)
    assert env.queued_args(ep) == [((2,), {})], "the task was submitted before the broker died"
    again = env.client.post(AP + "/run", json=doc, headers=alice)
    assert again.status_code == 200, "the same request id names the same action"
    (task_id,) = _task_ids(env.judge.status(again.json()))
    assert task_id, "the resent request found the task the first one submitted"
    assert env.queued_args(ep) == [], "and created no other"
    env.finish(task_id, 4)
    done = env.status(alice, again.json()["action_id"])
    assert done["status"] == "SUCCEEDED" and done["details"]["result"] == [4]


def test_status_finds_the_tasks_of_an_action_whose_broker_died(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, alice = env.new_user("alice")
    fid, ep = env.function(alice), env.endpoint_id(alice)
    died = _die_before_recording(env, monkeypatch)
    doc = env.judge.request({"request_id": "r", "body": {"endpoint_id": ep, "tasks": [
        {"function_id": fid, "args": [1]}]}})
    with pytest.raises(BrokerDied):
        env.client.post(AP + "/run", json=doc, headers=alice)
    (action_id,) = died
    monkeypatch.setattr(action_runner, "SUBMIT_GRACE", 0.0)  # overdue: still the truth
    (task_id,) = _task_ids(env.status(alice, action_id))
    env.finish(task_id, "ran")
    assert env.status(alice, action_id)["details"]["result"] == ["ran"]


def test_an_action_never_submitted_is_given_up_and_stays_so(
    env: Env, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Overdue with a batch never submitted: that batch is given up (a broker that stalled
    cannot submit it later), its calls fail, the tasks submitted are cancelled."""
    alice_id, alice = env.new_user("alice")
    fid, ep1, ep2 = env.function(alice), env.endpoint_id(alice), env.endpoint_id(alice)
    record = ActionRecord(action_id=str(uuid.uuid4()), user_id=alice_id, request_id="r",
                          request_digest="d", created_at=now() - 1, release_after=60,
                          task_count=3, batches=2, call_batch=[0, 1, 0])
    env.call(env.store.actions.create, record, 60)
    first = env.call(submit_batch, env.services, alice_id, BatchSubmission(
        endpoint_id=ep1, request_id=f"action:{record.action_id}:0",
        tasks=[TaskSpec(function_id=fid, args="A", result_format="json")] * 2))
    assert env.status(alice, record.action_id)["status"] == "ACTIVE", "not overdue yet"
    monkeypatch.setattr(action_runner, "SUBMIT_GRACE", 0.5)
    done = env.status(alice, record.action_id)
    assert done["status"] == "FAILED" and done["details"]["code"] == "NotSubmitted"
    results = done["details"]["results"]
    assert [e["task_id"] for e in results] == [first.task_ids[0], None, first.task_ids[1]]
    assert [e["status"] for e in results] == ["cancelled", "failed", "cancelled"]
    assert "never submitted" in results[1]["exception"]
    with pytest.raises(Conflict, match="new request_id"):
        env.call(submit_batch, env.services, alice_id, BatchSubmission(
            endpoint_id=ep2, request_id=f"action:{record.action_id}:1",
            tasks=[TaskSpec(function_id=fid, args="A")]))


@pytest.mark.parametrize(("request_doc", "code", "says"), [
    ({"body": {}}, 422, "request_id"),
    ({"request_id": "r", "body": {"endpoint_id": "e", "tasks": []}}, 422, "tasks"),
    ({"request_id": "r", "body": {"endpoint_id": "e", "tasks": [{"function_id": "f"}],
                                  "user_endpoint_config": {}}}, 422, "user_endpoint_config"),
    ({"request_id": "r", "body": {"endpoint": "e", "function": "f", "kwargs": {},
                                  "payload": {}}}, 422, "not both"),
    ({"request_id": "r", "body": {"tasks": [{"function": "f"}]}}, 422, "no endpoint"),
    ({"request_id": "r", "body": {}}, 422, "no task"),
    ({"request_id": "r", "body": {"endpoint_id": "e", "tasks": [{"function_id": "f"}]},
      "manage_by": ["bob"]}, 422, "manage_by"),
    ({"request_id": "r", "body": {"endpoint_id": "e", "tasks": [{"function_id": "f"}]},
      "release_after": "30 days"}, 422, "ISO 8601"),
    ({"request_id": "r", "body": {"endpoint_id": str(uuid.uuid4()),
                                  "tasks": [{"function_id": "f"}]}}, 400, "not found"),
    ({"request_id": "r", "body": {"endpoint_id": "e", "tasks": [
        {"function_id": "f", "args": [float("nan")]}]}}, 400, "not plain JSON"),
])
def test_bad_input_is_refused_in_the_specifications_form(
    env: Env, request_doc: dict[str, Any], code: int, says: str
) -> None:
    _, alice = env.new_user("alice")
    r = env.client.post(AP + "/run", content=json.dumps(request_doc),  # NaN and all
                        headers={**alice, "Content-Type": "application/json"})
    assert r.status_code == code, r.text
    body = r.json()
    assert set(body) == {"code", "description"}
    assert body["code"] == {400: "BadActionRequest", 422: "RequestValidationError"}[code]
    assert says in body["description"], body


def test_auth_limits_and_errors_under_the_provider(env: Env) -> None:
    _, alice = env.new_user("alice")
    r = env.client.post(AP + "/run", json={"request_id": "r", "body": {}})
    assert r.status_code == 401 and r.json()["code"] == "UnauthorizedRequest"
    ep = env.client.post("/v1/endpoints", json={"name": "e"}, headers=alice).json()
    r = env.client.get(f"{AP}/actions/x", headers={"Authorization": f"Bearer {ep['credential']}"})
    assert r.status_code == 403 and r.json()["code"] == "Forbidden"
    r = env.client.post(AP + "/run", content=b"x" * (LIMIT + 1), headers=alice)
    assert r.status_code == 413 and r.json()["code"] == "PayloadTooLarge"
    r = env.client.post(AP + "/run", content=b"{no", headers={**alice,
                                                             "Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["code"] == "BadActionRequest"
    # /v1 keeps farcall's own error body.
    r = env.client.post("/v1/tasks", content=b"x" * (LIMIT + 1), headers=alice)
    assert r.status_code == 413 and r.json()["error"] == "payload_too_large"


def test_the_rate_limit_applies_under_the_provider(make_api: MakeApi) -> None:
    api = make_api(Settings(rate_limit=0.001, rate_burst=2, auth_failure_rate=0))
    headers = api.user("alice")
    answers = [api.client.get(f"{AP}/actions/x", headers=headers) for _ in range(3)]
    assert [a.status_code for a in answers] == [404, 404, 429]
    assert answers[2].json()["code"] == "TooManyRequests" and answers[2].headers["Retry-After"]


def test_the_sub_application_stays_out_of_the_v1_document(env: Env) -> None:
    paths = env.client.get("/openapi.json").json()["paths"]
    assert "/v1/whoami" in paths and not any(p.startswith(AP) for p in paths)
