"""The result stream: results stored by the endpoint channel are pushed to the group's clients."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import ClientConnection, connect

from farcall.broker.embedded import EmbeddedBroker
from farcall.broker.settings import Settings
from farcall.protocol.channel import ResultMessage, ResultsAck, ResultsFrame
from farcall.protocol.common import TaskState
from farcall.protocol.stream import ResultStreamFrame
from harness.services import AMQP_URL, REDIS_URL, drop_redis_prefix
from tests.broker.helpers import FakeEndpoint


def stream(broker_url: str, group: str, token: str) -> ClientConnection:
    url = broker_url.replace("http://", "ws://") + f"/v1/task_groups/{group}/results"
    return connect(
        url, additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=10, legacy=True
    )


def user(broker: EmbeddedBroker, name: str) -> tuple[str, httpx.Client]:
    token = broker.create_user(name)
    http = httpx.Client(
        base_url=broker.url, headers={"Authorization": f"Bearer {token}"}, timeout=10
    )
    return token, http


def submit(http: httpx.Client, n: int) -> tuple[str, str, list[str]]:
    ep = http.post("/v1/endpoints", json={"name": "e"}).json()
    fid = http.post("/v1/functions", json={"function": "FN"}).json()["function_id"]
    tasks = [{"function_id": fid, "args": str(i)} for i in range(n)]
    sub = http.post("/v1/tasks", json={"endpoint_id": ep["endpoint_id"], "tasks": tasks}).json()
    return ep["endpoint_id"], ep["credential"], [sub["task_group_id"], *sub["task_ids"]]


def run_endpoint(broker_url: str, endpoint_id: str, credential: str, n: int) -> list[str]:
    """Take n tasks and answer them all in one results frame; returns their ids."""
    ep = FakeEndpoint(broker_url, endpoint_id, credential)
    ep.hello(credit=n)
    ids = [t.task_id for t in ep.tasks(n)]
    ep.send(
        ResultsFrame(
            results=[ResultMessage(task_id=t, state=TaskState.SUCCESS, data=f"R{t}") for t in ids]
        )
    )
    assert isinstance(ep.recv(), ResultsAck)
    ep.close()
    return ids


def collect(ws: ClientConnection, n: int, timeout: float = 10) -> dict[str, str]:
    got: dict[str, str] = {}
    while len(got) < n:
        frame = ResultStreamFrame.model_validate_json(ws.recv(timeout=timeout))
        got.update({r.task_id: r.data for r in frame.results})
    return got


@pytest.fixture
def broker(broker_settings: Settings) -> Iterator[EmbeddedBroker]:
    with EmbeddedBroker(broker_settings) as b:
        yield b


def test_results_are_pushed_to_the_groups_stream(broker: EmbeddedBroker) -> None:
    token, http = user(broker, "alice")
    eid, credential, (group, *ids) = submit(http, 3)
    with stream(broker.url, group, token) as ws:
        done = run_endpoint(broker.url, eid, credential, 3)
        assert collect(ws, 3) == {t: f"R{t}" for t in done}
    assert sorted(done) == sorted(ids)


def test_stream_access_is_checked(broker: EmbeddedBroker) -> None:
    token, http = user(broker, "alice")
    bob, _ = user(broker, "bob")
    _, credential, (group, *_) = submit(http, 1)
    for who, status in ((bob, 404), ("fcu_nope", 401), (credential, 403)):
        with pytest.raises(InvalidStatus) as err:
            stream(broker.url, group, who)
        assert err.value.response.status_code == status
    with pytest.raises(InvalidStatus) as err:
        stream(broker.url, str(uuid.uuid4()), token)
    assert err.value.response.status_code == 404


@pytest.mark.usefixtures("services")
def test_results_reach_a_client_on_another_replica(real_prefix: str) -> None:
    settings = Settings(
        redis_url=REDIS_URL,
        amqp_url=AMQP_URL,
        redis_prefix=f"{real_prefix}:",
        queue_prefix=f"{real_prefix}.",
    )

    try:
        with EmbeddedBroker(settings) as a, EmbeddedBroker(settings.model_copy()) as b:
            token, http = user(a, "alice")
            eid, credential, (group, *ids) = submit(http, 2)
            with stream(a.url, group, token) as ws:
                run_endpoint(b.url, eid, credential, 2)
                assert set(collect(ws, 2)) == set(ids)
            http.delete(f"/v1/endpoints/{eid}")
    finally:
        drop_redis_prefix(f"{real_prefix}:")


def test_batches_submitted_on_the_stream_are_answered_in_kind(broker_settings: Settings) -> None:
    with EmbeddedBroker(broker_settings.model_copy(update={"max_payload_bytes": 65536})) as broker:
        _submissions_on_the_stream(broker)


def _submissions_on_the_stream(broker: EmbeddedBroker) -> None:
    from farcall.protocol.rest import BatchSubmission, TaskSpec
    from farcall.protocol.stream import RequestFailedFrame, SubmitFrame, SubmittedFrame, parse_stream_frame

    token, http = user(broker, "alice")
    bob_token, bob = user(broker, "bob")
    eid, credential, (group, *_) = submit(http, 1)
    fid = http.post("/v1/functions", json={"function": "FN"}).json()["function_id"]

    def ask(ws: ClientConnection, request_id: int, batch: BatchSubmission | str) -> object:
        body = batch if isinstance(batch, str) else SubmitFrame(
            request_id=request_id, batch=batch).model_dump_json()
        ws.send(body)
        return parse_stream_frame(ws.recv(timeout=10))

    good = BatchSubmission(endpoint_id=eid, task_group_id=group,
                           tasks=[TaskSpec(function_id=fid, args=f"A{i}") for i in range(4)])
    with stream(broker.url, group, token) as ws:
        answer = ask(ws, 7, good)
        assert isinstance(answer, SubmittedFrame) and answer.request_id == 7
        assert answer.task_group_id == group and len(answer.task_ids) == 4
        assert http.get(f"/v1/task_groups/{group}").json()["task_ids"][1:] == answer.task_ids

        unknown = good.model_copy(update={"endpoint_id": str(uuid.uuid4())})
        refused = ask(ws, 8, unknown)
        assert isinstance(refused, RequestFailedFrame) and refused.request_id == 8
        assert refused.status == 404 and "not found" in refused.message

        garbled = ask(ws, 0, '{"type": "submit", "request_id": 9, "batch": {"tasks": []}}')
        assert isinstance(garbled, RequestFailedFrame)
        assert (garbled.request_id, garbled.status) == (9, 422)

        big = good.model_copy(update={"tasks": [TaskSpec(function_id=fid, args="x" * 70_000)]})
        too_big = ask(ws, 10, big)
        assert isinstance(too_big, RequestFailedFrame) and too_big.status == 413

    # bob cannot submit to alice's endpoint through his own stream either
    bob_group = bob.post("/v1/task_groups", json={}).json()["task_group_id"]
    with stream(broker.url, bob_group, bob_token) as ws:
        denied = ask(ws, 1, good.model_copy(update={"task_group_id": bob_group}))
        assert isinstance(denied, RequestFailedFrame) and denied.status == 404
    assert credential
