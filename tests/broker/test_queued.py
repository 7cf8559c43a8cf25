"""Reading queued messages (farcall.broker.queued): a whole batch at once, and a task that
cannot be read failing alone without taking its batch with it."""

from __future__ import annotations

import json

from farcall.broker.queued import queued_task_ids, read_queued
from farcall.protocol.channel import TaskMessage, dump_task_batch


def task(task_id: str) -> TaskMessage:
    return TaskMessage(task_id=task_id, function_id="f", args="A")


def test_a_batch_is_read_whole() -> None:
    tasks, unreadable = read_queued(dump_task_batch([task("a"), task("b")]))
    assert [t.task_id for t in tasks] == ["a", "b"] and unreadable == {}


def test_a_task_that_cannot_be_read_fails_alone() -> None:
    items = [task("a").model_dump(), {"task_id": "bad", "args": 5}, task("c").model_dump()]
    tasks, unreadable = read_queued(json.dumps(items).encode())
    assert [t.task_id for t in tasks] == ["a", "c"]
    assert list(unreadable) == ["bad"] and "submit it again" in unreadable["bad"]


def test_what_names_no_task_is_dropped() -> None:
    assert read_queued(b"not json") == ([], {})
    tasks, unreadable = read_queued(json.dumps([{"no": "id"}, task("a").model_dump()]).encode())
    assert [t.task_id for t in tasks] == ["a"] and unreadable == {}


def test_queued_task_ids_name_readable_and_unreadable_tasks() -> None:
    bodies = [dump_task_batch([task("a")]), json.dumps([{"task_id": "bad"}]).encode()]
    assert queued_task_ids(bodies) == ["a", "bad"]
