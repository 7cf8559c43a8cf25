"""``/v1/tasks`` and ``/v1/task_groups`` (farcall.broker.routes.tasks) on the in-process store
and queue: a batch recorded and queued whole, a batch the queue refused, task records as the
API shows them, cancelling. Listing: tests/broker/test_listing.py."""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from farcall.broker.errors import Unavailable
from farcall.broker.queue.memory import MemoryQueue
from farcall.broker.settings import Settings
from farcall.broker.store.memory import MemoryStore
from farcall.protocol.channel import ResultMessage, parse_task_batch
from farcall.protocol.common import TaskState, Versions, now
from tests.broker.conftest import MakeApi
from tests.broker.helpers import Api


def submit(api: Api, headers: dict[str, str], endpoint_id: str, function_ids: list[str],
           **kw: Any) -> httpx.Response:
    tasks = [{"function_id": f, "args": f"ARGS{i}"} for i, f in enumerate(function_ids)]
    return api.client.post(
        "/v1/tasks", json={"endpoint_id": endpoint_id, "tasks": tasks, **kw}, headers=headers
    )


def test_batch_submit_records_and_queues_every_task(api: Api) -> None:
    alice = api.user("alice")
    f1, f2 = api.function(alice, "PAYLOAD1"), api.function(alice, "PAYLOAD2")
    eid = api.endpoint(alice)["endpoint_id"]
    submitter = {"python": "3.11.7", "dill": "0.4.1", "farcall": "0.1.0"}
    r = submit(api, alice, eid, [f1, f2, f1, f1, f2], submitter=submitter)
    assert r.status_code == 200, r.text
    body = r.json()
    ids, gid = body["task_ids"], body["task_group_id"]
    assert len(set(ids)) == 5
    assert api.client.get(f"/v1/task_groups/{gid}", headers=alice).json()["task_ids"] == ids

    task = api.client.get(f"/v1/tasks/{ids[0]}", headers=alice).json()
    assert task["state"] == "waiting-for-endpoint" and task["endpoint_id"] == eid
    assert list(task["transitions"]) == ["received", "waiting-for-endpoint"]
    assert task["submitter"] == submitter and "data" not in task

    status = api.client.post(
        "/v1/tasks/status", json={"task_ids": [*ids, "unknown"]}, headers=alice
    )
    assert set(status.json()["tasks"]) == set(ids)

    st = api.client.get(f"/v1/endpoints/{eid}/status", headers=alice).json()
    assert st["queued_tasks"] == 5 and st["status"] == "offline"
    (message,) = api.call(api.queue.drain, eid)  # the batch is queued whole, as one message
    queued = parse_task_batch(message)
    assert [m.task_id for m in queued] == ids
    # tasks name their function; its body goes to the endpoint once per session, not per task
    assert [m.function_id for m in queued] == [f1, f2, f1, f1, f2]
    assert {m.function for m in queued} == {""}
    assert queued[3].args == "ARGS3" and queued[0].submitter.dill == "0.4.1"  # type: ignore[union-attr]

    more = submit(api, alice, eid, [f2], task_group_id=gid).json()
    assert more["task_group_id"] == gid
    assert (
        api.client.get(f"/v1/task_groups/{gid}", headers=alice).json()["task_ids"]
        == ids + more["task_ids"]
    )
    new_group = api.client.post("/v1/task_groups", json={}, headers=alice).json()[
        "task_group_id"
    ]
    into = submit(api, alice, eid, [f1], task_group_id=new_group).json()
    assert into["task_group_id"] == new_group


def test_tasks_the_queue_cannot_take_now_are_accepted_and_wait(make_api: MakeApi) -> None:
    """RabbitMQ down: the answer names the tasks, which wait for the requeue sweep."""
    class BrokenQueue(MemoryQueue):
        async def publish(self, endpoint_id: str, bodies: list[bytes]) -> None:
            raise Unavailable("RabbitMQ is not answering")

    api = make_api(Settings(), store=MemoryStore(), queue=BrokenQueue())
    alice = api.user("alice")
    eid = api.endpoint(alice)["endpoint_id"]
    r = submit(api, alice, eid, [api.function(alice)])
    assert r.status_code == 200
    (task_id,) = r.json()["task_ids"]
    waiting = api.client.get(f"/v1/tasks/{task_id}", headers=alice).json()
    assert waiting["state"] == "waiting-for-endpoint"


def test_a_submission_sent_again_with_its_request_id_gets_the_same_answer(api: Api) -> None:
    alice = api.user("alice")
    eid = api.endpoint(alice)["endpoint_id"]
    fid = api.function(alice)
    first = submit(api, alice, eid, [fid, fid], request_id="retry-me").json()
    again = submit(api, alice, eid, [fid, fid], request_id="retry-me").json()
    assert again == first
    other = submit(api, alice, eid, [fid], request_id="retry-me")
    assert other.status_code == 409 and "new request_id" in other.json()["message"]
    bad = submit(api, alice, eid, [fid], request_id="no spaces")
    assert bad.status_code == 422 and "request_id" in bad.text


@pytest.mark.parametrize(
    ("worker", "warned"),
    [({"python": "3.12.1", "dill": "0.3.9"}, True), ({"python": "3.11.9", "dill": "0.4.1"}, False)],
)
def test_task_record_warns_when_worker_versions_differ(
    api: Api, worker: dict[str, str], warned: bool
) -> None:
    alice = api.user("alice")
    eid = api.endpoint(alice)["endpoint_id"]
    submitter = {"python": "3.11.7", "dill": "0.4.1"}
    (task_id,) = submit(api, alice, eid, [api.function(alice)], submitter=submitter).json()[
        "task_ids"
    ]
    result = ResultMessage(task_id=task_id, state=TaskState.SUCCESS, data="10\nAA==",
                           worker=Versions(**worker))
    api.call(api.store.tasks.complete, eid, [result], now())
    task = api.client.get(f"/v1/tasks/{task_id}", headers=alice).json()
    assert task["worker"]["python"] == worker["python"]
    if warned:
        (warning,) = task["warnings"]
        assert "Python 3.11.7, dill 0.4.1" in warning and "Python 3.12.1, dill 0.3.9" in warning
    else:
        assert "warnings" not in task


def test_cancel_ends_queued_tasks_and_leaves_final_and_foreign_ones(api: Api) -> None:
    alice, bob = api.user("alice"), api.user("bob")
    eid = api.endpoint(alice)["endpoint_id"]
    first, second = submit(api, alice, eid, [api.function(alice)] * 2).json()["task_ids"]
    r = api.client.post("/v1/tasks/cancel", json={"task_ids": [first]}, headers=bob)
    assert r.status_code == 200 and r.json()["cancelled"] == [], "not bob's to cancel"
    r = api.client.post("/v1/tasks/cancel", json={"task_ids": [first]}, headers=alice)
    assert r.json()["cancelled"] == [first] and r.json()["unchanged"] == {}
    again = api.client.post("/v1/tasks/cancel", json={"task_ids": [first, second]},
                            headers=alice).json()
    assert again["cancelled"] == [second] and list(again["unchanged"]) == [first]
    task = api.client.get(f"/v1/tasks/{first}", headers=alice).json()
    assert task["state"] == "cancelled"
