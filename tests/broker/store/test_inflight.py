"""``InflightStore``: the tasks a channel session took, on the in-process store and the real Redis."""

from __future__ import annotations

import pytest

from farcall.broker.store.base import Store
from farcall.protocol.common import TaskState, now
from tests.broker.records import (
    endpoint_record,
    new_tasks,
    result_message,
    stored_task,
    submitted,
)

pytestmark = pytest.mark.anyio


async def test_only_the_live_session_puts_tasks_in_flight(store: Store) -> None:
    await store.endpoints.put(endpoint_record(), "cred")
    _, ids = await submitted(store, 2)
    await store.endpoints.connect_session("ep1", "old", None, now())
    await store.endpoints.connect_session("ep1", "new", None, now())
    assert await store.inflight.add("ep1", "old", {ids[0]: "b"}, taken=1) is None
    assert await store.inflight.get("ep1") == {}
    assert await store.inflight.add("ep1", "new", {ids[0]: "b"}, taken=1) == [ids[0]]
    # a submission sent straight to a replaced session counts as queued instead
    batch = new_tasks(3)
    assert await store.tasks.create(batch, inflight={t: "b" for t in batch.task_ids},
                                    session_id="old") is False
    assert set(await store.inflight.get("ep1")) == {ids[0]}
    ep = await store.endpoints.get("ep1")
    assert ep is not None and ep.queued_tasks == 1 + 3


async def test_reconcile_requeues_lost_tasks_and_fails_repeat_crashers(store: Store) -> None:
    await store.endpoints.put(endpoint_record(), "cred")
    group, ids = await submitted(store, 4)
    held, lost, crasher, finished = ids

    async def session(sid: str, tasks: list[str]) -> None:
        await store.endpoints.connect_session("ep1", sid, None, now())
        await store.inflight.add("ep1", sid, {t: f"body-{t}" for t in tasks}, taken=0)

    await session("s1", ids)
    await store.tasks.complete("ep1", [result_message(finished)], now())
    await store.inflight.add("ep1", "s1", {finished: "b"}, taken=0)  # a stale copy
    for crash in (1, 2):
        found = await store.inflight.reconcile("ep1", {held}, {crasher}, 3, float(crash))
        assert found.again == {lost: f"body-{lost}", crasher: f"body-{crasher}"}
        assert found.failed == []
        await store.inflight.remove("ep1", list(found.again))
        await session(f"s{crash + 1}", [lost, crasher])
    rec = await stored_task(store, lost)
    assert [a.at for a in rec.attempts] == [1.0, 2.0]
    assert "session ended" in rec.attempts[0].error
    assert "agent process died" in (await stored_task(store, crasher)).attempts[0].error
    found = await store.inflight.reconcile("ep1", {held, lost}, {crasher}, 3, 3.0)
    assert found.again == {}
    assert [(g, r.task_id, r.state) for g, r in found.failed] == [
        (group, crasher, TaskState.FAILED)]
    rec = await stored_task(store, crasher)
    assert rec.state == TaskState.FAILED and "died 3 times" in rec.error
    assert len(rec.attempts) == 3
    assert set(await store.inflight.get("ep1")) == {held, lost}
