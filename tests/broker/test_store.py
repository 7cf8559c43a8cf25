"""The store contract, run against the in-process store and the real Redis."""

from __future__ import annotations

import asyncio
import uuid
from typing import Literal

import pytest

from farcall.broker.store.base import Store, Subscription
from farcall.broker.store.redis import RedisStore
from farcall.messages import ResultMessage, ResultStreamFrame, TaskResult, TaskState, Versions, now
from harness.services import REDIS_URL, drop_redis_prefix

pytestmark = pytest.mark.anyio


def _id() -> str:
    return uuid.uuid4().hex


def _task(task_id: str, group: str, endpoint: str, user: str = "u1") -> dict:
    t = now()
    return {
        "task_id": task_id,
        "user_id": user,
        "task_group_id": group,
        "endpoint_id": endpoint,
        "function_id": "f1",
        "state": TaskState.WAITING.value,
        "transitions": {"received": t, "waiting-for-endpoint": t + 0.001},
        "submitter": {"python": "3.11.7", "dill": "0.4.1", "farcall": "0.1.0"},
    }


async def _tasks(store: Store, n: int, endpoint: str = "ep1") -> tuple[str, list[str]]:
    group = _id()
    ids = [_id() for _ in range(n)]
    await store.create_tasks(
        [_task(t, group, endpoint) for t in ids],
        {"task_group_id": group, "user_id": "u1", "created_at": now()},
    )
    return group, ids


def _result(
    task_id: str, data: str = "ok",
    state: Literal[TaskState.SUCCESS, TaskState.FAILED] = TaskState.SUCCESS,
) -> ResultMessage:
    return ResultMessage(
        task_id=task_id,
        state=state,
        data=data,
        started_at=now() - 0.5,
        worker=Versions(python="3.11.7", dill="0.4.1"),
    )


async def test_users_and_tokens(store: Store) -> None:
    await store.create_user({"user_id": "u1", "name": "alice", "created_at": now()}, "hash-u1")
    p = await store.resolve_token("hash-u1")
    assert p is not None and (p.kind, p.id, p.token_hash) == ("user", "u1", "hash-u1")
    assert await store.resolve_token("nope") is None


async def test_functions(store: Store) -> None:
    rec = {
        "function_id": "f1",
        "user_id": "u1",
        "function_name": "sq",
        "description": "",
        "function": "PAYLOAD",
        "created_at": now(),
    }
    await store.put_function(rec)
    found = await store.get_functions(["f1", "missing"])
    assert list(found) == ["f1"] and found["f1"]["function"] == "PAYLOAD"
    assert found["f1"]["created_at"] == pytest.approx(rec["created_at"])
    await store.delete_function("f1")
    assert await store.get_functions(["f1"]) == {}


async def test_endpoints_status_and_credential_revocation(store: Store) -> None:
    eid = _id()
    await store.put_endpoint(
        {
            "endpoint_id": eid,
            "user_id": "u1",
            "name": "laptop",
            "description": "",
            "created_at": now(),
        },
        "cred-hash",
    )
    assert (await store.resolve_token("cred-hash")).kind == "endpoint"  # type: ignore[union-attr]
    ep = await store.get_endpoint(eid)
    assert ep is not None and ep["connected"] is False and ep["last_heartbeat"] is None
    await store.set_connected(eid, "s1", True, now())
    await store.set_connected(eid, "s2", True, now())
    await store.set_connected(eid, "s1", False, now())
    await store.set_heartbeat(eid, {"workers": 4, "details": {"a": 1}}, 123.5)
    ep = await store.get_endpoint(eid)
    assert ep is not None and ep["connected"] is True
    assert ep["heartbeat"] == {"workers": 4, "details": {"a": 1}} and ep["last_heartbeat"] == 123.5
    assert [e["endpoint_id"] for e in await store.list_endpoints("u1")] == [eid]
    assert await store.list_endpoints("u2") == []
    await store.delete_endpoint(eid)
    assert await store.get_endpoint(eid) is None
    assert await store.resolve_token("cred-hash") is None
    assert await store.list_endpoints("u1") == []


async def test_create_and_get_tasks_keep_transitions(store: Store) -> None:
    group, ids = await _tasks(store, 3)
    assert await store.get_task_group_owner(group) == "u1"
    assert await store.get_task_group_tasks(group) == ids
    records = await store.get_tasks([ids[1], "missing", ids[0]])
    assert records[1] is None
    rec = records[0]
    assert rec is not None and rec["task_id"] == ids[1] and rec["state"] == "waiting-for-endpoint"
    assert list(rec["transitions"]) == ["received", "waiting-for-endpoint"]
    assert rec["submitter"]["dill"] == "0.4.1" and rec["completed_at"] is None


async def test_dispatch_running_complete_first_result_wins(store: Store) -> None:
    group, ids = await _tasks(store, 3)
    other_group, (foreign,) = await _tasks(store, 1, endpoint="ep2")
    accepted = await store.dispatch(
        "ep1", {t: f"body-{t}" for t in [*ids, foreign, "missing"]}, taken=5
    )
    assert accepted == ids
    assert await store.get_inflight("ep1") == {t: f"body-{t}" for t in ids}

    await store.mark_running("ep1", {ids[0]: 10.0, foreign: 11.0})
    rec, frec = await store.get_tasks([ids[0], foreign])
    assert rec["state"] == "running" and rec["transitions"]["running"] == 10.0  # type: ignore[index]
    assert frec["state"] == "waiting-for-endpoint"  # type: ignore[index]

    done = await store.complete(
        "ep1", [_result(ids[0], "first"), _result(ids[1], "x", TaskState.FAILED)], 20.0
    )
    assert [(g, r.task_id, r.state) for g, r in done] == [
        (group, ids[0], TaskState.SUCCESS),
        (group, ids[1], TaskState.FAILED),
    ]
    again = await store.complete("ep1", [_result(ids[0], "second"), _result(foreign, "evil")], 21.0)
    assert again == []
    rec, frec = await store.get_tasks([ids[0], foreign])
    assert rec["data"] == "first" and rec["state"] == "success" and rec["completed_at"] == 20.0  # type: ignore[index]
    assert rec["worker"]["python"] == "3.11.7"  # type: ignore[index]
    assert frec["state"] == "waiting-for-endpoint"  # type: ignore[index]
    # running after success must not go backwards; terminal tasks are not dispatched again
    await store.mark_running("ep1", {ids[0]: 30.0})
    assert (await store.get_tasks([ids[0]]))[0]["state"] == "success"  # type: ignore[index]
    assert await store.dispatch("ep1", {ids[0]: "b", ids[2]: "b"}, taken=2) == [ids[2]]
    assert set(await store.get_inflight("ep1")) == {ids[2]}
    await store.remove_inflight("ep1", [ids[2]])
    assert await store.get_inflight("ep1") == {}


async def test_queued_count_follows_submission_dispatch_and_requeue(store: Store) -> None:
    await store.put_endpoint(
        {"endpoint_id": "ep1", "user_id": "u1", "name": "n", "created_at": now()}, "cred"
    )

    async def queued() -> int:
        ep = await store.get_endpoint("ep1")
        assert ep is not None
        return int(ep["queued_tasks"])

    assert await queued() == 0
    _, ids = await _tasks(store, 4)
    assert await queued() == 4
    await store.dispatch("ep1", {t: "body" for t in ids[:3]}, taken=3)
    assert await queued() == 1
    await store.count_queued("ep1", 2)  # two lost tasks queued again
    assert await queued() == 3


async def test_fail_tasks_is_terminal(store: Store) -> None:
    _, ids = await _tasks(store, 2)
    await store.fail_tasks(ids[:1], "could not queue", 5.0)
    rec = (await store.get_tasks(ids[:1]))[0]
    assert rec is not None and rec["state"] == "failed" and rec["error"] == "could not queue"
    assert await store.complete("ep1", [_result(ids[0])], 6.0) == []


async def test_result_fanout(store: Store) -> None:
    sub_a = await store.subscribe_results("g1")
    sub_b = await store.subscribe_results("g1")
    other = await store.subscribe_results("g2")
    frame = ResultStreamFrame(
        results=[TaskResult(task_id="t", state=TaskState.SUCCESS)]
    ).model_dump_json()
    await store.publish_results("g1", frame)

    async def first(sub: Subscription) -> str:
        async for f in sub:
            return f
        return ""

    assert await asyncio.wait_for(first(sub_a), 5) == frame
    assert await asyncio.wait_for(first(sub_b), 5) == frame
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(first(other), 0.2)
    for s in (sub_a, sub_b, other):
        await s.close()


@pytest.mark.usefixtures("services")
async def test_results_get_ttl_on_redis(real_prefix: str) -> None:
    store = RedisStore(REDIS_URL, prefix=f"{real_prefix}:", result_ttl=3600)
    try:
        _, ids = await _tasks(store, 2)
        await store.complete("ep1", [_result(ids[0])], now())
        assert 0 < await store._r.ttl(store.k("task", ids[0])) <= 3600
        assert await store._r.ttl(store.k("task", ids[1])) == -1
    finally:
        await store.close()
        drop_redis_prefix(f"{real_prefix}:")


@pytest.mark.usefixtures("services")
async def test_each_frame_reaches_a_subscriber_once_from_any_replica(real_prefix: str) -> None:
    """Frames of this replica are handed over directly and not again through Redis."""
    here = RedisStore(REDIS_URL, prefix=f"{real_prefix}:")
    there = RedisStore(REDIS_URL, prefix=f"{real_prefix}:")
    sub = await here.subscribe_results("g")
    try:
        await here.publish_results("g", "one")
        await here.publish_results("g", "two")
        await there.publish_results("g", "last")  # through Redis, after any echo of the two above

        async def until_last() -> list[str]:
            got = []
            async for frame in sub:
                got.append(frame)
                if frame == "last":
                    return got
            return got

        assert await asyncio.wait_for(until_last(), 5) == ["one", "two", "last"]
    finally:
        await sub.close()
        await here.close()
        await there.close()


async def test_a_large_batch_is_created_whole_and_in_order(store: Store) -> None:
    await store.put_endpoint(
        {"endpoint_id": "ep1", "user_id": "u1", "name": "n", "created_at": now()}, "cred"
    )
    group = _id()
    ids = [_id() for _ in range(2500)]
    direct = {t: f"body-{t}" for t in ids[:1200]}
    await store.create_tasks(
        [_task(t, group, "ep1") for t in ids],
        {"task_group_id": group, "user_id": "u1", "created_at": now()},
        inflight=direct,
    )
    assert await store.get_task_group_tasks(group) == ids
    assert await store.get_task_group_owner(group) == "u1"
    assert await store.get_inflight("ep1") == direct
    ep = await store.get_endpoint("ep1")
    assert ep is not None and ep["queued_tasks"] == 2500 - 1200
    last = (await store.get_tasks([ids[-1]]))[0]
    assert last is not None and last["task_group_id"] == group and last["state"] == "waiting-for-endpoint"
