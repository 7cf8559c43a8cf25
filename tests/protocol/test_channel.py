"""The endpoint channel's frames, and the task and result batches of queues and workers."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from farcall.protocol.channel import (
    DATA_RETRY_SECONDS,
    CancelFrame,
    Credit,
    DataAccess,
    Hello,
    ResultMessage,
    TaskMessage,
    TasksFrame,
    Welcome,
    dump_result_batch,
    dump_task_batch,
    join_task_batch,
    parse_broker_frame,
    parse_endpoint_frame,
    parse_result_batch,
    parse_task_batch,
    tasks_frame_json,
)
from farcall.protocol.common import MAX_SPEC_DEPTH, PROTOCOL_VERSION, TaskState

TASKS = [TaskMessage(task_id=f"t{i}", function_id="f1", args="11\ngAWVCQAAAAAAAABLAoWUfZSGlC4=",
                     resource_specification={"num_nodes": i}) for i in range(3)]


def test_a_queued_batch_is_a_json_array_of_tasks() -> None:
    body = dump_task_batch(TASKS)
    assert isinstance(json.loads(body), list)
    assert parse_task_batch(body) == TASKS
    assert parse_task_batch(body.decode()) == TASKS, "text reads as bytes do"


def test_a_single_task_object_of_protocol_v1_reads_as_a_batch_of_one() -> None:
    assert parse_task_batch(b"  \n" + TASKS[0].model_dump_json().encode()) == [TASKS[0]]


def test_a_task_queued_before_tasks_named_their_submitter_reads_as_no_ones() -> None:
    raw = TASKS[0].model_dump(mode="json")
    del raw["user_id"]
    (task,) = parse_task_batch(json.dumps([raw]))
    assert task.user_id == "", "an engine runs such tasks in one pool of their own"


def test_joining_task_json_writes_what_dump_task_batch_writes() -> None:
    assert join_task_batch([t.model_dump_json() for t in TASKS]) == dump_task_batch(TASKS)
    assert join_task_batch([]) == dump_task_batch([]) == b"[]"


def test_every_hop_refuses_a_task_nested_too_deep() -> None:
    deep: dict[str, object] = {"x": 1}
    for _ in range(MAX_SPEC_DEPTH):
        deep = {"x": deep}
    raw = TASKS[0].model_dump_json().replace('{"num_nodes":0}', json.dumps(deep))
    with pytest.raises(ValidationError, match="nested deeper"):
        parse_task_batch("[" + raw + "]")


def test_a_results_batch_round_trips() -> None:
    results = [ResultMessage(task_id="t0", state=TaskState.SUCCESS, data="11\nSwQu"),
               ResultMessage(task_id="t1", state=TaskState.FAILED, error="ZeroDivisionError")]
    assert parse_result_batch(dump_result_batch(results)) == results


def test_a_result_is_success_or_failed_only() -> None:
    with pytest.raises(ValidationError, match="state"):
        ResultMessage.model_validate({"task_id": "t0", "state": "running"})


def test_a_tasks_frame_built_from_task_json_parses_as_a_tasks_frame() -> None:
    frame = parse_broker_frame(tasks_frame_json([t.model_dump_json() for t in TASKS], {"f1": "03\nAAAA"}))
    assert frame == TasksFrame(tasks=TASKS, functions={"f1": "03\nAAAA"})
    assert parse_broker_frame(tasks_frame_json([TASKS[0].model_dump_json()])) == TasksFrame(tasks=TASKS[:1])


def test_frames_are_told_apart_by_their_type() -> None:
    assert parse_endpoint_frame('{"type": "credit", "n": 3}') == Credit(n=3)
    assert parse_endpoint_frame(b'{"type": "hello"}') == Hello()
    assert Hello().protocol == Welcome(endpoint_id="e").protocol == PROTOCOL_VERSION
    assert parse_broker_frame('{"type": "cancel", "task_ids": ["t1"]}') == CancelFrame(task_ids=["t1"])


@pytest.mark.parametrize(("raw", "says"), [
    ('{"type": "welcome", "endpoint_id": "e"}', "does not match any of the expected tags"),
    ('{"type": "unknown"}', "does not match any of the expected tags"),
    ('{"n": 3}', "Unable to extract tag using discriminator"),
    ('{"type": "credit", "n": -1}', "greater than or equal to 0"),
    ("not json", "Invalid JSON"),
])
def test_an_endpoint_frame_the_broker_cannot_read_is_refused(raw: str, says: str) -> None:
    with pytest.raises(ValidationError, match=says):
        parse_endpoint_frame(raw)


def test_a_broker_frame_is_not_read_as_an_endpoint_frame_or_back() -> None:
    with pytest.raises(ValidationError):
        parse_broker_frame('{"type": "credit", "n": 3}')
    with pytest.raises(ValidationError, match="greater than 0"):
        Hello(heartbeat_period=0)


def test_data_access_of_an_older_agent_reads_with_the_default_retry_budget() -> None:
    old = DataAccess.model_validate_json('{"url": "https://b", "grant": "ep:g", "max_task_bytes": 1}')
    assert old.retry_seconds == DATA_RETRY_SECONDS == 120.0
    for bad in (-1, "inf", "nan"):
        with pytest.raises(ValidationError, match="retry_seconds"):
            DataAccess.model_validate({"url": "https://b", "retry_seconds": bad})
