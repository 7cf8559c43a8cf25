"""Issue 21, the broker's side of multi-user endpoints, on two broker replicas with Redis and
RabbitMQ. The test plays the manager (and the user endpoints it would start) with raw WebSocket
sessions speaking the protocol's typed frames: the manager's hello publishes its schema; a
submission that breaks it is a 422 with the schema's message; a valid one makes the submitter's
user endpoint, whose manager (on the other replica) is told to start it with the right user,
configuration and credential; a session opened with that credential gets the tasks, and its
answers reach the submitter's futures. One configuration, one user endpoint; another user never
sees the tasks; a start is asked again after the (short, here) start period, and at the
manager's next hello; deleting the manager deletes its user endpoints.

The manager's real runtime (identity mapping, privilege drop) is tested end to end elsewhere.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from farcall import Client, Executor
from farcall.errors import BrokerError, NotFound
from farcall.protocol.channel import (
    ErrorFrame,
    Heartbeat,
    HeartbeatFrame,
    Hello,
    ResultMessage,
    ResultsAck,
    ResultsFrame,
    StartUserEndpoint,
    TasksFrame,
    Welcome,
    parse_broker_frame,
)
from farcall.protocol.common import TaskState
from farcall.serialize import serialize, unpack_args
from harness.procs import wait_until
from tests.integration.helpers import Broker, own_replicas

pytestmark = pytest.mark.integration

START_SECONDS = 1.5
"""The brokers' FARCALL_USER_ENDPOINT_START_SECONDS: short, so a test sees a start asked again."""
DEADLINE = 30.0
SCHEMA = {
    "type": "object",
    "properties": {"account": {"type": "string", "pattern": "^[a-z0-9]+$"},
                   "nodes": {"type": "integer", "minimum": 1, "maximum": 16}},
    "required": ["account"],
    "additionalProperties": False,
}


@dataclass
class Site:
    submit_to: Broker
    """The replica the users' clients talk to."""
    manager_at: Broker
    """The replica the manager's (and the user endpoints') sessions open on."""
    admin: Client
    users: dict[str, Client]
    """alice and bob (the manager is shared with them) and eve (it is not)."""


@pytest.fixture(scope="module")
def site(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    log_dir = tmp_path_factory.mktemp("multi-user")
    settings = {"FARCALL_USER_ENDPOINT_START_SECONDS": str(START_SECONDS)}
    with own_replicas(service_env, log_dir, "multi-user", 2, settings=settings) as (one, two):
        clients = {name: Client(broker_url=one.url, token=one.create_user(
            f"{name}-{uuid.uuid4().hex[:6]}")) for name in ("admin", "alice", "bob", "eve")}
        admin = clients.pop("admin")
        yield Site(one, two, admin, clients)
        for c in (admin, *clients.values()):
            c.close()


def channel_url(broker: Broker, endpoint_id: str) -> str:
    return Client(broker_url=broker.url, token="unused").websocket_url(
        f"/endpoints/{endpoint_id}/connect")


@contextmanager
def session(broker: Broker, endpoint_id: str, credential: str, hello: Hello
            ) -> Iterator[ClientConnection]:
    """An endpoint's channel session opened by hand: hello sent, welcome read."""
    with connect(channel_url(broker, endpoint_id),
                 additional_headers={"Authorization": f"Bearer {credential}"}) as ws:
        ws.send(hello.model_dump_json())
        welcome = parse_broker_frame(ws.recv(timeout=10))
        assert isinstance(welcome, Welcome) and welcome.endpoint_id == endpoint_id, welcome
        yield ws


def manager_hello() -> Hello:
    return Hello(credit=0, heartbeat=Heartbeat(), multi_user=True, user_config_schema=SCHEMA)


@dataclass
class Manager:
    endpoint_id: str
    credential: str


@contextmanager
def manager(site: Site) -> Iterator[Manager]:
    """A multi-user endpoint of the admin's, registered and shared with alice and bob (no
    single-user warning: its manager has said what it is); deleted after."""
    registered = site.admin.register_endpoint(f"site-{uuid.uuid4().hex[:6]}")
    found = Manager(registered["endpoint_id"], registered["credential"])
    with session(site.manager_at, found.endpoint_id, found.credential, manager_hello()):
        pass  # its hello publishes what it is
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("alice", "bob"):
            site.admin.share_endpoint(found.endpoint_id, site.users[name].whoami()["username"])
    try:
        yield found
    finally:
        try:
            site.admin.delete_endpoint(found.endpoint_id)
        except NotFound:
            pass


def next_start(ws: ClientConnection, timeout: float = DEADLINE) -> StartUserEndpoint:
    """The next StartUserEndpoint the manager's session gets (nothing else may come first)."""
    frame = parse_broker_frame(ws.recv(timeout=timeout))
    assert isinstance(frame, StartUserEndpoint), frame
    return frame


def config_hash(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
                          ).hexdigest()


def serve_tasks(ws: ClientConnection, n: int, fn: Any) -> list[str]:
    """Act as the user endpoint's agent: take ``n`` tasks, answer each with ``fn(*args)``; the
    task ids, once the broker acked the results."""
    ids: list[str] = []
    deadline = time.monotonic() + DEADLINE
    while len(ids) < n:
        frame = parse_broker_frame(ws.recv(timeout=max(0.1, deadline - time.monotonic())))
        assert isinstance(frame, TasksFrame), frame
        results = []
        for task in frame.tasks:
            args, kwargs = unpack_args(task.args)
            results.append(ResultMessage(task_id=task.task_id, state=TaskState.SUCCESS,
                                         data=serialize(fn(*args, **kwargs))))
            ids.append(task.task_id)
        ws.send(ResultsFrame(results=results, credit=len(results)).model_dump_json())
        ack = parse_broker_frame(ws.recv(timeout=10))
        assert isinstance(ack, ResultsAck) and set(ack.task_ids) == {r.task_id for r in results}
    return ids


def double(x: int) -> int:
    return 2 * x


def test_the_hello_publishes_the_schema_and_values_that_break_it_are_refused(site: Site) -> None:
    alice = site.users["alice"]
    with manager(site) as m:
        info = alice.get_endpoint(m.endpoint_id)
        assert info["multi_user"] is True and info["parent_id"] is None
        fid = alice.register_function(double)
        with pytest.raises(BrokerError) as refused:
            alice.run(1, endpoint_id=m.endpoint_id, function_id=fid,
                      user_endpoint_config={"account": "ABC!"})
        assert refused.value.status == 422
        assert "'ABC!' does not match '^[a-z0-9]+$'" in str(refused.value)
        with Executor(endpoint_id=m.endpoint_id, client=alice,
                      user_endpoint_config={"account": "abc", "nodes": 99}) as ex:
            with pytest.raises(BrokerError, match="99 is greater than the maximum of 16"):
                ex.submit(double, 1).result(DEADLINE)  # on the result stream: the same check
        assert [e["endpoint_id"] for e in alice.get_endpoints() if e["parent_id"]] == [], (
            "no user endpoint made for refused values")


def test_a_bad_schema_is_refused_at_hello(site: Site) -> None:
    registered = site.admin.register_endpoint(f"bad-{uuid.uuid4().hex[:6]}")
    with connect(channel_url(site.manager_at, registered["endpoint_id"]),
                 additional_headers={"Authorization": f"Bearer {registered['credential']}"}) as ws:
        ws.send(Hello(credit=0, multi_user=True,
                      user_config_schema={"type": "no-such-type"}).model_dump_json())
        frame = parse_broker_frame(ws.recv(timeout=10))
    assert isinstance(frame, ErrorFrame) and "not a valid JSON Schema" in frame.message
    site.admin.delete_endpoint(registered["endpoint_id"])


def test_tasks_run_on_the_users_own_endpoint_started_by_the_manager(site: Site) -> None:
    alice, bob, eve = (site.users[n] for n in ("alice", "bob", "eve"))
    config = {"account": "abc123", "nodes": 2}
    with manager(site) as m, \
            session(site.manager_at, m.endpoint_id, m.credential, manager_hello()) as mws, \
            Executor(endpoint_id=m.endpoint_id, client=alice, user_endpoint_config=config) as ex:
        futures = [ex.submit(double, i) for i in range(3)]

        start = next_start(mws)
        me = alice.whoami()
        assert (start.user_id, start.username) == (me["identity_id"], me["username"])
        assert start.identities == [{"id": me["identity_id"], "sub": me["identity_id"],
                                     "username": me["username"]}]
        assert start.user_endpoint_config == config and start.config_hash == config_hash(config)
        assert start.endpoint_id != m.endpoint_id and start.credential.startswith("fce_")
        with session(site.manager_at, start.endpoint_id, start.credential,
                     Hello(credit=10)) as child:
            served = serve_tasks(child, 3, double)
            assert [f.result(DEADLINE) for f in futures] == [0, 2, 4]
        assert sorted(served) == sorted(str(f.task_id) for f in futures)

        task = alice.get_task(str(futures[0].task_id))
        assert task["endpoint_id"] == start.endpoint_id
        status = alice.get_endpoint_status(start.endpoint_id)
        assert status["parent_id"] == m.endpoint_id and status["multi_user"] is False
        for other in (bob, eve):
            with pytest.raises(NotFound):
                other.get_task(str(futures[0].task_id))
            assert str(futures[0].task_id) not in [t["task_id"] for t in other.list_tasks()]
            with pytest.raises(NotFound):
                other.get_endpoint_status(start.endpoint_id)
        with pytest.raises(NotFound):
            eve.run(1, endpoint_id=m.endpoint_id, function_id=alice.register_function(double),
                    user_endpoint_config=config)


def test_one_user_endpoint_per_user_and_configuration(site: Site) -> None:
    alice, bob = site.users["alice"], site.users["bob"]
    first, second = {"account": "abc"}, {"account": "abc", "nodes": 4}
    with manager(site) as m, \
            session(site.manager_at, m.endpoint_id, m.credential, manager_hello()) as mws:
        a = alice.register_function(double)
        b = bob.register_function(double)
        runs = [alice.run(1, endpoint_id=m.endpoint_id, function_id=a, user_endpoint_config=first),
                alice.run(2, endpoint_id=m.endpoint_id, function_id=a,
                          user_endpoint_config={"account": "abc"}),
                alice.run(3, endpoint_id=m.endpoint_id, function_id=a, user_endpoint_config=second)]
        bobs = bob.run(4, endpoint_id=m.endpoint_id, function_id=b, user_endpoint_config=first)
        where = [alice.get_task(t)["endpoint_id"] for t in runs]
        assert where[0] == where[1] and len({*where, bob.get_task(bobs)["endpoint_id"]}) == 3
        starts = {s.endpoint_id: s for s in (next_start(mws) for _ in range(3))}
        assert set(starts) == {*where, bob.get_task(bobs)["endpoint_id"]}, "each asked for once"
        assert starts[where[2]].user_endpoint_config == second
        assert starts[bob.get_task(bobs)["endpoint_id"]].username == bob.whoami()["username"]
        listed = {e["endpoint_id"] for e in alice.get_endpoints() if e["parent_id"] == m.endpoint_id}
        assert listed == {where[0], where[2]}, "alice sees her user endpoints, not bob's"


def test_a_start_is_asked_again_after_the_period_and_at_the_managers_hello(site: Site) -> None:
    alice = site.users["alice"]
    with manager(site) as m:
        fid = alice.register_function(double)
        with session(site.manager_at, m.endpoint_id, m.credential, manager_hello()) as mws:
            task_id = alice.run(5, endpoint_id=m.endpoint_id, function_id=fid,
                                user_endpoint_config={"account": "abc"})
            first = next_start(mws)
            asked = time.monotonic()
            # The user endpoint never connects (a start lost, a child that crashed): the
            # manager's heartbeats bring the start again, once the period is over.
            again: StartUserEndpoint | None = None
            while again is None:
                assert time.monotonic() - asked < DEADLINE, "the start was never asked again"
                mws.send(HeartbeatFrame(heartbeat=Heartbeat()).model_dump_json())
                try:
                    frame = parse_broker_frame(mws.recv(timeout=0.2))
                except TimeoutError:
                    continue
                assert isinstance(frame, StartUserEndpoint), frame
                again = frame
            assert time.monotonic() - asked >= START_SECONDS - 0.2, "asked again too soon"
            assert again == first, "the same user endpoint, the same credential"
        wait_until(lambda: _claim_over(asked), DEADLINE, "the start period to end")
        with session(site.manager_at, m.endpoint_id, m.credential, manager_hello()) as mws:
            assert next_start(mws, timeout=10) == first, "asked at the manager's hello"
            with session(site.manager_at, first.endpoint_id, first.credential,
                         Hello(credit=1)) as child:
                assert serve_tasks(child, 1, double) == [task_id]
        assert alice.get_result(task_id) == 10


def _claim_over(asked: float) -> bool:
    return time.monotonic() - asked > 2 * START_SECONDS + 0.5


def test_deleting_the_manager_deletes_its_user_endpoints(site: Site) -> None:
    alice = site.users["alice"]
    with manager(site) as m, \
            session(site.manager_at, m.endpoint_id, m.credential, manager_hello()) as mws:
        task_id = alice.run(6, endpoint_id=m.endpoint_id,
                            function_id=alice.register_function(double),
                            user_endpoint_config={"account": "gone"})
        start = next_start(mws)
        site.admin.delete_endpoint(m.endpoint_id)
        with pytest.raises(NotFound):
            alice.get_endpoint_status(start.endpoint_id)
        wait_until(lambda: alice.get_task(task_id)["state"] == "failed", DEADLINE,
                   "the waiting task to fail")
        assert "was deleted" in alice.get_task(task_id)["error"]
