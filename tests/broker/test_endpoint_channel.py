"""The endpoint channel, driven by a fake endpoint over a real WebSocket to an embedded broker.

Runs on the in-process store/queue and on the real Redis and RabbitMQ.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from websockets.exceptions import ConnectionClosed, InvalidStatus

from farcall.broker import endpoint_channel
from farcall.broker.embedded import EmbeddedBroker
from farcall.broker.errors import Unavailable
from farcall.broker.settings import Settings
from farcall.broker.store.base import Subscription
from farcall.protocol.channel import (
    CancelFrame,
    Credit,
    ErrorFrame,
    Heartbeat,
    HeartbeatFrame,
    Hello,
    ResultMessage,
    ResultsAck,
    ResultsFrame,
    RunningFrame,
)
from farcall.protocol.common import TaskState, now
from farcall.protocol.control import STOPPED_CLOSE_CODE
from harness.procs import wait_until
from tests.broker.helpers import FakeEndpoint, on_loop
from tests.broker.records import new_tasks


@dataclass
class Setup:
    broker: EmbeddedBroker
    http: httpx.Client
    endpoint_id: str
    credential: str
    function_id: str

    def submit(self, n: int) -> tuple[str, list[str]]:
        tasks = [{"function_id": self.function_id, "args": f"A{i}"} for i in range(n)]
        r = self.http.post("/v1/tasks", json={"endpoint_id": self.endpoint_id, "tasks": tasks})
        assert r.status_code == 200, r.text
        return r.json()["task_group_id"], r.json()["task_ids"]

    def submit_records(self, n: int) -> tuple[str, list[str]]:
        """Task records made in the store directly (nothing queued or sent), as a submission would."""
        store = self.broker.app.state.services.store
        owner = on_loop(self.broker, store.endpoints.get(self.endpoint_id)).user_id
        batch = new_tasks(n, endpoint=self.endpoint_id, user=owner, function_id=self.function_id)
        group, ids = batch.task_group_id, batch.task_ids
        on_loop(self.broker, store.endpoints.connect_session(self.endpoint_id, "old", None, now()))
        went = on_loop(self.broker, store.tasks.create(batch, inflight={t: "{}" for t in ids},
                                                       session_id="old"))
        assert went
        return group, ids

    def task(self, task_id: str) -> dict:
        return self.http.get(f"/v1/tasks/{task_id}").json()

    def connect(self) -> FakeEndpoint:
        return FakeEndpoint(self.broker.url, self.endpoint_id, self.credential)

    def inflight(self) -> set[str]:
        return set(
            on_loop(
                self.broker, self.broker.app.state.services.store.inflight.get(self.endpoint_id)
            )
        )


def new_endpoint(http: httpx.Client) -> tuple[str, str]:
    ep = http.post("/v1/endpoints", json={"name": "fake"}).json()
    return ep["endpoint_id"], ep["credential"]


@pytest.fixture
def setup(broker_settings: Settings) -> Iterator[Setup]:
    with EmbeddedBroker(broker_settings) as broker:
        token = broker.create_user("alice")
        with httpx.Client(
            base_url=broker.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
        ) as http:
            eid, credential = new_endpoint(http)
            fid = http.post("/v1/functions", json={"function": "FN"}).json()["function_id"]
            yield Setup(broker, http, eid, credential, fid)


def _result(task_id: str, data: str) -> ResultMessage:
    return ResultMessage(task_id=task_id, state=TaskState.SUCCESS, data=data, started_at=now())


def test_dispatch_respects_credit_and_stores_results_once(setup: Setup) -> None:
    _, ids = setup.submit(5)
    ep = setup.connect()
    ep.hello(credit=2)
    first = ep.tasks(2)
    assert (
        [t.task_id for t in first] == ids[:2]
        and first[0].function == "FN"
        and first[1].args == "A1"
    )
    ep.silent_for(0.5)
    # the whole queued batch is in flight: two sent, three waiting in the session for credit
    assert setup.inflight() == set(ids)
    status_url = f"/v1/endpoints/{setup.endpoint_id}/status"
    assert setup.http.get(status_url).json()["queued_tasks"] == 0

    ep.send(RunningFrame(started={ids[0]: 1234.5}))
    wait_until(lambda: setup.task(ids[0])["state"] == "running", 10, "task running")
    assert setup.task(ids[0])["transitions"]["running"] == 1234.5

    ep.send(Credit(n=1))
    assert [t.task_id for t in ep.tasks(1)] == [ids[2]]
    ep.silent_for(0.3)

    ep.send(ResultsFrame(results=[_result(ids[0], "one")], credit=2))
    ack = ep.recv()
    assert isinstance(ack, ResultsAck) and ack.task_ids == [ids[0]]
    assert [t.task_id for t in ep.tasks(2)] == ids[3:]
    ep.send(ResultsFrame(results=[_result(ids[0], "again"), _result(ids[1], "two")]))
    ack = ep.recv()
    assert isinstance(ack, ResultsAck) and ack.task_ids == [ids[0], ids[1]]

    rec = setup.task(ids[0])
    assert rec["state"] == "success" and rec["data"] == "one"
    assert list(rec["transitions"]) == ["received", "waiting-for-endpoint", "running", "success"]
    assert setup.task(ids[1])["data"] == "two"
    assert setup.inflight() == set(ids[2:])

    ep.send(
        HeartbeatFrame(
            heartbeat=Heartbeat(workers=3, idle_workers=1, pending_tasks=2, engine="threads")
        )
    )
    st = wait_until(
        lambda: (s := setup.http.get(status_url).json())["workers"] == 3 and s, 10, "heartbeat"
    )
    assert st["status"] == "online" and st["engine"] == "threads" and st["pending_tasks"] == 2
    ep.close()
    wait_until(lambda: setup.http.get(status_url).json()["status"] == "offline", 10, "offline")


def test_reconnect_reconciles_lost_in_flight_tasks(setup: Setup) -> None:
    _, ids = setup.submit(3)
    ep = setup.connect()
    ep.hello(credit=3)
    assert {t.task_id for t in ep.tasks(3)} == set(ids)
    ep.close()

    again = setup.connect()
    again.hello(credit=10, held=[ids[0]])  # still runs ids[0]; ids[1], ids[2] were lost
    assert {t.task_id for t in again.tasks(2)} == {ids[1], ids[2]}
    again.silent_for(0.5)
    again.send(ResultsFrame(results=[_result(t, t) for t in ids]))
    assert isinstance(again.recv(), ResultsAck)
    assert all(setup.task(t)["state"] == "success" for t in ids)
    assert setup.inflight() == set()
    again.close()


def test_finished_tasks_are_not_dispatched_again(setup: Setup) -> None:
    _, ids = setup.submit(2)
    ep = setup.connect()
    ep.hello(credit=2)
    ep.tasks(2)
    ep.send(ResultsFrame(results=[_result(ids[0], "done")]))
    assert isinstance(ep.recv(), ResultsAck)
    ep.close()
    again = setup.connect()
    again.hello(credit=10)  # holds nothing: only ids[1] is lost and not finished
    assert [t.task_id for t in again.tasks(1)] == [ids[1]]
    again.silent_for(0.5)
    again.close()


def test_a_result_for_another_endpoints_task_is_ignored(setup: Setup) -> None:
    _, (tid,) = setup.submit(1)
    other_id, other_credential = new_endpoint(setup.http)
    intruder = FakeEndpoint(setup.broker.url, other_id, other_credential)
    intruder.hello(credit=1)
    intruder.send(ResultsFrame(results=[_result(tid, "forged")]))
    assert isinstance(intruder.recv(), ResultsAck)
    assert setup.task(tid)["state"] == "waiting-for-endpoint"
    intruder.close()


def test_credentials_are_checked_on_connect(setup: Setup) -> None:
    user_token = setup.http.headers["Authorization"].split()[1]
    other_id, other_credential = new_endpoint(setup.http)
    for credential, status in (("fce_wrong", 401), (user_token, 403), (other_credential, 403)):
        with pytest.raises(InvalidStatus) as err:
            FakeEndpoint(setup.broker.url, setup.endpoint_id, credential)
        assert err.value.response.status_code == status


def test_first_frame_must_be_hello(setup: Setup) -> None:
    ep = setup.connect()
    ep.send(Credit(n=1))
    assert isinstance(ep.recv(), ErrorFrame)
    with pytest.raises(ConnectionClosed):
        ep.recv()


def test_no_delivery_stays_unacked_while_the_endpoint_has_no_credit(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(endpoint_channel, "PARK_AFTER", 0.2)
    ids = [setup.submit(1)[1][0] for _ in range(5)]  # five queued messages
    ep = setup.connect()
    ep.hello(credit=2)
    assert [t.task_id for t in ep.tasks(2)] == ids[:2]
    status_url = f"/v1/endpoints/{setup.endpoint_id}/status"
    # prefetched deliveries go back to the queue once the consumer parks
    wait_until(lambda: setup.http.get(status_url).json()["queued_tasks"] == 3, 10, "parked")
    ep.send(Credit(n=3))
    assert [t.task_id for t in ep.tasks(3)] == ids[2:]
    ep.close()


def test_tasks_submitted_while_connected_are_sent_once(setup: Setup) -> None:
    """With credit to spare, new tasks go out directly, recorded in flight, not queued."""
    ep = setup.connect()
    ep.hello(credit=10)
    _, ids = setup.submit(3)
    assert sorted(t.task_id for t in ep.tasks(3)) == sorted(ids)
    assert setup.inflight() == set(ids)
    status_url = f"/v1/endpoints/{setup.endpoint_id}/status"
    assert setup.http.get(status_url).json()["queued_tasks"] == 0
    ep.send(ResultsFrame(results=[_result(t, "ok") for t in ids]))
    assert isinstance(ep.recv(), ResultsAck)
    _, later = setup.submit(1)  # credit left: 7; nothing of the first three comes again
    assert [t.task_id for t in ep.tasks(1)] == later
    ep.silent_for(0.5)
    ep.close()


def test_a_directly_sent_task_lost_with_its_session_comes_back(setup: Setup) -> None:
    ep = setup.connect()
    ep.hello(credit=5)
    _, (task_id,) = setup.submit(1)
    assert [t.task_id for t in ep.tasks(1)] == [task_id]
    ep.close()  # gone without a result
    again = setup.connect()
    again.hello(credit=5)  # holds nothing: the broker queues the lost task again
    assert [t.task_id for t in again.tasks(1)] == [task_id]
    again.send(ResultsFrame(results=[_result(task_id, "late")]))
    assert isinstance(again.recv(), ResultsAck)
    wait_until(lambda: setup.task(task_id)["state"] == "success", 10, "task done")
    again.close()


def test_tasks_left_waiting_go_out_when_credit_returns(setup: Setup) -> None:
    """Two direct sends racing for the same credit leave tasks waiting; returned credit frees them."""
    from farcall.protocol.channel import TaskMessage

    ep = setup.connect()
    ep.hello(credit=1)
    _, (first,) = setup.submit(1)  # sent directly, the credit is used up
    assert [t.task_id for t in ep.tasks(1)] == [first]
    ep.send(Credit(n=1))  # the dispatch loop now waits on the (empty) queue
    wait_until(lambda: on_loop(setup.broker, _credit_of(setup)) == 1, 10, "credit 1")
    session = _session(setup)
    _, ids = setup.submit_records(2)
    bodies = [(t, setup.function_id,
               TaskMessage(task_id=t, function_id=setup.function_id, args="A").model_dump_json())
              for t in ids]
    on_loop(setup.broker, session.send_direct(bodies, {setup.function_id: "FN"}))  # one waits
    assert [t.task_id for t in ep.tasks(1)] == ids[:1]
    ep.send(ResultsFrame(results=[_result(first, "r")], credit=1))
    assert isinstance(ep.recv(), ResultsAck)
    assert [t.task_id for t in ep.tasks(1)] == ids[1:]
    ep.close()


def _session(setup: Setup) -> endpoint_channel.EndpointSession:
    """The endpoint's live session on the broker."""
    session = setup.broker.app.state.services.sessions.get(setup.endpoint_id)
    assert isinstance(session, endpoint_channel.EndpointSession), session
    return session


async def _credit_of(setup: Setup) -> int:
    return _session(setup).credit


def test_welcome_says_the_largest_frame_the_broker_reads_and_the_broker_id(setup: Setup) -> None:
    ep = setup.connect()
    welcome = ep.hello(credit=1)
    assert welcome.max_frame_bytes == Settings().max_frame_bytes
    assert welcome.broker_id and welcome.broker_id == setup.http.get("/v1/health").json()["broker_id"]
    ep.close()


def test_a_new_session_replaces_the_old_one_at_once(setup: Setup) -> None:
    """A silent drop: the old session still looks open, the agent reconnects. The new session
    takes over at once: the old one is closed and what it held goes to the new one."""
    _, ids = setup.submit(3)
    old = setup.connect()
    old.hello(credit=3)
    assert {t.task_id for t in old.tasks(3)} == set(ids)
    new = setup.connect()
    new.hello(credit=10, held=[ids[0]])
    assert {t.task_id for t in new.tasks(2)} == {ids[1], ids[2]}
    with pytest.raises(ConnectionClosed) as closed:
        old.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == endpoint_channel.REPLACED
    # new tasks go to the live session only
    _, (later,) = setup.submit(1)
    assert [t.task_id for t in new.tasks(1)] == [later]
    new.close()


def test_a_loop_that_swallows_its_cancel_does_not_keep_a_failed_session_open(
        setup: Setup, monkeypatch: pytest.MonkeyPatch) -> None:
    """When one loop of a session fails, the others are cancelled. On Python 3.11 a cancel that
    lands as an ``asyncio.wait_for`` finishes (redis-py sends every command through one) is
    swallowed and the loop runs on; the session must end all the same, not stay connected with
    no dispatch loop (after a Redis restart, no task went out again)."""
    session = endpoint_channel.EndpointSession
    read_loop = session._read_loop

    async def read_loop_that_swallows_a_cancel(self: endpoint_channel.EndpointSession) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await read_loop(self)

    async def dispatch_loop_that_fails(self: endpoint_channel.EndpointSession) -> None:
        await asyncio.sleep(0.2)
        raise Unavailable("the store is not answering")

    monkeypatch.setattr(session, "_read_loop", read_loop_that_swallows_a_cancel)
    monkeypatch.setattr(session, "_dispatch_loop", dispatch_loop_that_fails)
    ep = setup.connect()
    ep.hello(credit=1)
    with pytest.raises(ConnectionClosed) as closed:
        ep.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == 1011


def test_cancel_drops_queued_tasks_and_stops_sent_ones(setup: Setup) -> None:
    _, ids = setup.submit(3)
    ep = setup.connect()
    ep.hello(credit=1)
    (sent,) = ep.tasks(1)
    r = setup.http.post("/v1/tasks/cancel", json={"task_ids": ids + ["nope"]})
    assert r.status_code == 200, r.text
    assert sorted(r.json()["cancelled"]) == sorted(ids)
    assert r.json()["unchanged"] == {"nope": "not_found"}
    frame = ep.recv()
    assert isinstance(frame, CancelFrame) and frame.task_ids == [sent.task_id]
    assert all(setup.task(t)["state"] == "cancelled" for t in ids)
    # the endpoint answers the stopped task; that answer changes nothing
    ep.send(ResultsFrame(results=[_result(sent.task_id, "late")], credit=5))
    assert isinstance(ep.recv(), ResultsAck)
    assert setup.task(sent.task_id)["state"] == "cancelled"
    ep.silent_for(0.5)  # the two waiting tasks are never sent
    assert setup.inflight() == set()
    ep.close()


def test_only_queued_cancel_leaves_running_tasks(setup: Setup) -> None:
    _, ids = setup.submit(2)
    ep = setup.connect()
    ep.hello(credit=2)
    ep.tasks(2)
    ep.send(RunningFrame(started={ids[0]: now()}))
    wait_until(lambda: setup.task(ids[0])["state"] == "running", 10, "running")
    r = setup.http.post("/v1/tasks/cancel", json={"task_ids": ids, "only_queued": True})
    assert r.json() == {"cancelled": [ids[1]], "unchanged": {ids[0]: "running"}}
    frame = ep.recv()
    assert isinstance(frame, CancelFrame) and frame.task_ids == [ids[1]]
    ep.close()


def test_deleting_an_endpoint_fails_its_waiting_tasks(setup: Setup) -> None:
    _, ids = setup.submit(3)
    ep = setup.connect()
    ep.hello(credit=1)
    (sent,) = ep.tasks(1)
    r = setup.http.delete(f"/v1/endpoints/{setup.endpoint_id}")
    assert r.status_code == 200, r.text
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ep.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == endpoint_channel.DELETED
    for t in ids:
        rec = setup.task(t)
        assert rec["state"] == "failed" and "was deleted" in rec["error"], rec
    with pytest.raises(InvalidStatus):
        setup.connect()


def test_stopping_an_endpoint_ends_its_session_and_keeps_its_tasks(setup: Setup) -> None:
    _, ids = setup.submit(2)
    ep = setup.connect()
    ep.hello(credit=1)
    (sent,) = ep.tasks(1)
    r = setup.http.post(f"/v1/endpoints/{setup.endpoint_id}/stop")
    assert r.json() == {"endpoint_id": setup.endpoint_id, "stopping": True}, r.text
    with pytest.raises(ConnectionClosed) as closed:
        while True:
            ep.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == STOPPED_CLOSE_CODE
    assert {setup.task(t)["state"] for t in ids} == {"waiting-for-endpoint"}
    again = setup.connect()  # started again later: its tasks are there
    again.hello(credit=2, held=[sent.task_id])
    assert {t.task_id for t in again.tasks(1)} == set(ids) - {sent.task_id}


def test_a_session_whose_credential_is_rotated_while_it_starts_is_ended(
    setup: Setup, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rotation lands after the credential was checked and before the session listens to
    its control channel, so its ``CredentialRotated`` would reach no one: the session looks
    again once it listens, and ends."""
    svc = setup.broker.app.state.services
    subscribe = svc.store.pubsub.subscribe_control

    async def rotate_first(endpoint_id: str) -> Subscription:
        await svc.store.endpoints.rotate_credential(endpoint_id, "new-credential-hash")
        return await subscribe(endpoint_id)

    ep = setup.connect()
    monkeypatch.setattr(svc.store.pubsub, "subscribe_control", rotate_first)
    ep.send(Hello(credit=1))
    with pytest.raises(ConnectionClosed) as closed:
        ep.recv(timeout=10)
    assert closed.value.rcvd is not None and closed.value.rcvd.code == endpoint_channel.ROTATED
    monkeypatch.undo()
    with pytest.raises(InvalidStatus):
        setup.connect()


def test_a_task_that_keeps_crashing_the_agent_fails_after_three_crashes(setup: Setup) -> None:
    _, (poison, fine) = setup.submit(2)
    for _ in range(4):  # the first session only receives it; three crashes follow
        ep = setup.connect()
        ep.hello(credit=2, crashed=[poison])
        sent = {t.task_id for t in ep.tasks(1 if setup.task(poison)["state"] == "failed" else 2)}
        ep.close()
        if poison not in sent:
            break
    rec = setup.task(poison)
    assert rec["state"] == "failed" and "died 3 times" in rec["error"], rec
    assert len(rec["attempts"]) == 3
    assert setup.task(fine)["state"] == "waiting-for-endpoint"
    assert len(setup.task(fine)["attempts"]) >= 2


@pytest.mark.parametrize("depth", [20, 250, 600, 5000])
def test_a_deep_resource_specification_is_refused_at_submission(setup: Setup, depth: int) -> None:
    nested = '{"a":' * depth + "{}" + "}" * depth
    body = (f'{{"endpoint_id": "{setup.endpoint_id}", "tasks": [{{"function_id": '
            f'"{setup.function_id}", "args": "A", "resource_specification": {nested}}}]}}')
    r = setup.http.post("/v1/tasks", content=body, headers={"content-type": "application/json"})
    assert r.status_code in (400, 422), r.text
    assert "nested" in r.text or "depth" in r.text or "recursion" in r.text.lower(), r.text
