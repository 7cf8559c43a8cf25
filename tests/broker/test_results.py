"""Where results are published (farcall.broker.results), on a memory store: one frame per task
group, an endpoint's result stored once and published once, its blobs renewed."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable

import pytest

from farcall.broker.results import publish_results, store_results
from farcall.broker.services import Services
from farcall.broker.submission import submit_batch
from farcall.protocol.channel import ResultMessage
from farcall.protocol.common import TaskState, now
from farcall.protocol.stream import ResultStreamFrame, TaskResult
from farcall.serialize import ref_payload
from tests.broker.helpers import batch, endpoint_and_function, next_frame

pytestmark = pytest.mark.anyio

ALICE = "alice-id"


async def frame_of(svc: Services, group: str, publish: Awaitable[None]) -> ResultStreamFrame:
    """The frame group ``group``'s stream hears while ``publish`` runs."""
    stream = await svc.store.pubsub.subscribe_results(group)
    try:
        await publish
        return ResultStreamFrame.model_validate_json(await next_frame(stream))
    finally:
        await stream.close()


async def test_each_group_hears_its_own_results_in_one_frame(svc: Services) -> None:
    def failed(task_id: str) -> TaskResult:
        return TaskResult(task_id=task_id, state=TaskState.FAILED, error="why")

    streams = {g: await svc.store.pubsub.subscribe_results(g) for g in ("g1", "g2")}
    await publish_results(svc, [("g1", failed("a")), ("g2", failed("b")), ("g1", failed("c"))])
    got = {g: ResultStreamFrame.model_validate_json(await next_frame(s)) for g, s in streams.items()}
    for s in streams.values():
        await s.close()
    assert [r.task_id for r in got["g1"].results] == ["a", "c"]
    assert [r.task_id for r in got["g2"].results] == ["b"]


async def test_an_endpoints_result_is_stored_and_published_once(svc: Services) -> None:
    eid, fid = await endpoint_and_function(svc, ALICE)
    answer = await submit_batch(svc, ALICE, batch(eid, fid, 1))
    (task_id,) = answer.task_ids
    result = ResultMessage(task_id=task_id, state=TaskState.SUCCESS, data="10\nAA==",
                           started_at=now())
    stream = await svc.store.pubsub.subscribe_results(answer.task_group_id)
    await store_results(svc, eid, [result])
    frame = ResultStreamFrame.model_validate_json(await next_frame(stream))
    assert [(r.task_id, r.state, r.data) for r in frame.results] == [
        (task_id, TaskState.SUCCESS, "10\nAA==")]
    (record,) = await svc.store.tasks.get_many([task_id])
    assert record is not None and record.state == TaskState.SUCCESS

    late = result.model_copy(update={"data": "other"})
    await store_results(svc, eid, [late])  # a repeat: the first result stays, nothing published
    marker = TaskResult(task_id="marker", state=TaskState.FAILED, error="")
    await publish_results(svc, [(answer.task_group_id, marker)])
    assert ResultStreamFrame.model_validate_json(await next_frame(stream)).results == [marker]
    await stream.close()
    (record,) = await svc.store.tasks.get_many([task_id])
    assert record is not None and record.data == "10\nAA=="


async def test_result_blobs_are_renewed_for_as_long_as_results_live(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    touched: list[tuple[list[str], float]] = []

    async def touch(blob_ids: list[str], ttl: float) -> None:
        touched.append((blob_ids, ttl))

    monkeypatch.setattr(svc.blobs, "touch", touch)
    blob_id = uuid.uuid4().hex
    results = [
        ResultMessage(task_id="t1", state=TaskState.SUCCESS, data=ref_payload(blob_id, 10)),
        ResultMessage(task_id="t2", state=TaskState.SUCCESS, data="10\nAA=="),
    ]
    await store_results(svc, "ep", results)
    assert touched == [([blob_id], svc.settings.result_ttl)]


async def test_a_blob_store_that_fails_to_renew_does_not_lose_the_result(
    svc: Services, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def touch(blob_ids: list[str], ttl: float) -> None:
        raise OSError("the blob directory is gone")

    monkeypatch.setattr(svc.blobs, "touch", touch)
    eid, fid = await endpoint_and_function(svc, ALICE)
    answer = await submit_batch(svc, ALICE, batch(eid, fid, 1))
    ref = ref_payload(uuid.uuid4().hex, 10)
    result = ResultMessage(task_id=answer.task_ids[0], state=TaskState.SUCCESS, data=ref)
    frame = await frame_of(svc, answer.task_group_id, store_results(svc, eid, [result]))
    assert [r.data for r in frame.results] == [ref]
