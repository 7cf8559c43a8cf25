"""The wire is a promise: saved frames of every message type read with today's code and write
back unchanged.

Tasks wait in durable RabbitMQ queues across upgrades, and endpoints and SDKs of an older release
talk to a newer broker, so a renamed, removed or retyped field breaks peers that are already
running. The samples in ``frames/v<PROTOCOL_VERSION>`` were made once from real payloads
(``farcall.serialize``) and reviewed by hand; this test never rewrites them. When one fails:

- you added a field (compatible: old frames still read): add it, with a realistic value, to the
  sample of every message type that has it;
- you renamed, removed or retyped one: frames already queued break. Keep the old name (an alias)
  or bump ``PROTOCOL_VERSION`` and save samples of the new version in a new folder.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import pytest
from pydantic import BaseModel, ValidationError

import farcall.protocol
from farcall.protocol.channel import (
    BrokerFrame,
    EndpointFrame,
    ResultMessage,
    TaskMessage,
    TasksFrame,
    dump_result_batch,
    dump_task_batch,
    join_task_batch,
    parse_broker_frame,
    parse_endpoint_frame,
    parse_result_batch,
    parse_task_batch,
    tasks_frame_json,
)
from farcall.protocol.common import PROTOCOL_VERSION, Message
from farcall.protocol.control import ControlMessage, parse_control
from farcall.protocol.stream import StreamFrame, parse_stream_frame
from harness import REPO

FRAMES = Path(__file__).parent / "frames"
CURRENT = FRAMES / f"v{PROTOCOL_VERSION}"

SHAPES = {
    "task_batch": "a message queued for an endpoint in RabbitMQ (dump_task_batch)",
    "task_batch_single": "a queued message of one task object, as protocol v1 brokers wrote it",
    "result_batch": "a worker's results of one chunk (dump_result_batch)",
    "tasks_frame_json": "a TasksFrame the broker builds from task JSON (tasks_frame_json)",
}
"""Saved frames that are not one model's: the batches and the hand-built frame."""


def message_types() -> dict[str, type[BaseModel]]:
    """Every model the protocol package defines (but the shared base and private wrappers), by
    walking its modules: a new message type is found without being listed here."""
    found: dict[str, type[BaseModel]] = {}
    for info in pkgutil.iter_modules(farcall.protocol.__path__):
        module = importlib.import_module(f"farcall.protocol.{info.name}")
        for name, value in vars(module).items():
            if (isinstance(value, type) and issubclass(value, BaseModel) and value is not Message
                    and value.__module__ == module.__name__ and not name.startswith("_")):
                found[name] = value
    return found


TYPES = message_types()


def _members(union: Any) -> tuple[type[Message], ...]:
    """The models of a discriminated union (``Annotated[A | B, Field(discriminator=...)]``)."""
    return get_args(get_args(union)[0])


def _one_task(raw: bytes) -> TaskMessage:
    (task,) = parse_task_batch(raw)
    return task


def _one_result(raw: bytes) -> ResultMessage:
    (result,) = parse_result_batch(b"[" + raw + b"]")
    return result


PARSERS: dict[type[BaseModel], Callable[[bytes], BaseModel]] = {
    **dict.fromkeys(_members(EndpointFrame), parse_endpoint_frame),
    **dict.fromkeys(_members(BrokerFrame), parse_broker_frame),
    **dict.fromkeys(_members(StreamFrame), parse_stream_frame),
    **dict.fromkeys(_members(ControlMessage), parse_control),
    TaskMessage: _one_task,
    ResultMessage: _one_result,
}
"""The parse function of each conversation, for the message types it reads."""


def _missing_fields(value: Any, where: str = "") -> list[str]:
    """Fields of every model inside ``value`` that its frame did not carry."""
    if isinstance(value, BaseModel):
        missing = [where + name for name in type(value).model_fields if name not in value.model_fields_set]
        for name in type(value).model_fields:
            missing += _missing_fields(getattr(value, name), f"{where}{name}.")
        return missing
    if isinstance(value, list | tuple):
        return [m for i, item in enumerate(value) for m in _missing_fields(item, f"{where}{i}.")]
    if isinstance(value, dict):
        return [m for k, item in value.items() for m in _missing_fields(item, f"{where}{k}.")]
    return []


def assert_round_trips(model: type[BaseModel], raw: bytes) -> BaseModel:
    """``raw`` reads as ``model`` (and through its conversation's parser) and writes back as the
    same JSON value."""
    parsed = model.model_validate_json(raw)
    written = parsed.model_dump(mode="json")
    assert written == json.loads(raw), (
        f"{model.__name__} no longer writes its saved frame back unchanged: a field was added, "
        "renamed, removed or retyped (see this module's docstring for what to do)")
    parse = PARSERS.get(model)
    if parse is not None:
        via = parse(raw)
        assert type(via) is model and via == parsed, f"{parse.__name__} read it as {via!r}"
    return parsed


def _frame(name: str) -> bytes:
    return (CURRENT / f"{name}.json").read_bytes()


def test_the_samples_are_of_the_current_protocol_version() -> None:
    versions = sorted(int(p.name[1:]) for p in FRAMES.iterdir() if p.is_dir() and p.name[:1] == "v")
    assert versions and versions[-1] == PROTOCOL_VERSION, (
        f"PROTOCOL_VERSION is {PROTOCOL_VERSION} but the newest saved frames are v{versions[-1:]}: "
        f"save a sample of every message type of v{PROTOCOL_VERSION} in "
        f"{CURRENT.relative_to(REPO)} (keep the older folders)")


def test_the_walk_finds_the_message_types_of_every_conversation() -> None:
    assert {"Versions", "TaskSpec", "TimerSchedule", "TaskMessage", "Hello", "SubmitFrame",
            "CancelTasks", "TokenRevocation"} <= set(TYPES)
    assert all(not name.startswith("_") for name in TYPES) and "Message" not in TYPES
    framed = [TYPES[n] for n in ("Hello", "Welcome", "SubmittedFrame", "CancelTasks")]
    assert set(framed) <= set(PARSERS), "each read through its conversation's parser too"


@pytest.mark.parametrize("name", sorted(TYPES))
def test_a_saved_frame_reads_and_writes_back_unchanged(name: str) -> None:
    path = CURRENT / f"{name}.json"
    assert path.is_file(), (
        f"{name} is a message type of protocol v{PROTOCOL_VERSION} without a saved frame: add "
        f"{path.relative_to(REPO)}, a realistic sample with every field set (payloads made by "
        "farcall.serialize), reviewed by hand")
    parsed = assert_round_trips(TYPES[name], path.read_bytes())
    assert not _missing_fields(parsed), (
        f"{path.relative_to(REPO)} leaves out {_missing_fields(parsed)}: give every field a "
        "realistic value, so the test pins it")


def test_every_saved_frame_is_of_a_message_type() -> None:
    names = {p.stem for p in CURRENT.glob("*.json")}
    assert names - set(TYPES) - set(SHAPES) == set(), (
        "saved frames of message types that are gone: a removed or renamed message type breaks "
        "peers that still send it; keep it, or bump PROTOCOL_VERSION")
    assert set(SHAPES) <= names


def test_a_queued_task_batch_reads_and_writes_back_unchanged() -> None:
    raw = _frame("task_batch")
    tasks = parse_task_batch(raw)
    assert len(tasks) == 3 and all(isinstance(t, TaskMessage) for t in tasks)
    assert json.loads(dump_task_batch(tasks)) == json.loads(raw)
    assert json.loads(join_task_batch([t.model_dump_json() for t in tasks])) == json.loads(raw)


def test_a_queued_single_task_of_protocol_v1_still_reads() -> None:
    raw = _frame("task_batch_single")
    (task,) = parse_task_batch(raw)
    assert task.model_dump(mode="json") == json.loads(raw)
    assert json.loads(dump_task_batch([task])) == [json.loads(raw)], "written back as a batch of one"


def test_a_worker_results_batch_reads_and_writes_back_unchanged() -> None:
    raw = _frame("result_batch")
    results = parse_result_batch(raw)
    assert [r.state for r in results] == ["success", "failed", "success", "success"]
    assert json.loads(dump_result_batch(results)) == json.loads(raw)


def test_a_tasks_frame_built_from_task_json_reads_and_writes_back_unchanged() -> None:
    raw = _frame("tasks_frame_json")
    frame = parse_broker_frame(raw)
    assert isinstance(frame, TasksFrame) and len(frame.tasks) == 2 and len(frame.functions) == 1
    built = tasks_frame_json([t.model_dump_json() for t in frame.tasks], frame.functions)
    assert json.loads(built) == json.loads(raw) == frame.model_dump(mode="json")


@pytest.mark.parametrize(("name", "field", "renamed"), [
    ("TaskMessage", "args", "arguments"),  # required: the old frame no longer reads
    ("TaskMessage", "walltime", "time_limit"),  # optional: it reads, but loses its value
    ("Credit", "n", "count"),
    ("TimerSchedule", "stop_at", "until"),
])
def test_a_renamed_field_fails_the_round_trip(name: str, field: str, renamed: str) -> None:
    """The check above can fail: a frame whose field was renamed (as by a code change the other
    way round) does not round-trip."""
    sample = json.loads(_frame(name))
    sample[renamed] = sample.pop(field)
    with pytest.raises((AssertionError, ValidationError)):
        assert_round_trips(TYPES[name], json.dumps(sample).encode())


def test_a_retyped_value_fails_the_round_trip() -> None:
    """pydantic reads ``"32"`` as 32 (lax mode), so reading alone would not notice; writing back does."""
    sample = json.loads(_frame("Credit"))
    sample["n"] = str(sample["n"])
    with pytest.raises(AssertionError, match="writes its saved frame back unchanged"):
        assert_round_trips(TYPES["Credit"], json.dumps(sample).encode())
