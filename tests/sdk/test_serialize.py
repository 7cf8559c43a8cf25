"""Payloads: functions by value or by source, data, remote exceptions with their tracebacks."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import traceback
from pathlib import Path

import pytest

from farcall.errors import DeserializationError, SerializationError, TaskExecutionFailed
from farcall.serialize import (
    DATA_DILL,
    DATA_JSON,
    DATA_PICKLE,
    FUNCTION_DILL,
    FUNCTION_SOURCE,
    deserialize,
    deserialize_function,
    deserialize_json,
    pack_args,
    pack_json_args,
    payload_strategy,
    rebuild_exception,
    serialize,
    serialize_exception,
    serialize_function,
    serialize_json,
    unpack_args,
)


def test_closure_and_lambda_travel_by_value() -> None:
    factor = 3

    def scale(x: int) -> int:
        return x * factor

    for fn, expected in ((scale, 12), (lambda x: x + factor, 7)):
        payload = serialize_function(fn)
        assert payload_strategy(payload) == FUNCTION_DILL
        assert deserialize_function(payload)(4) == expected


def test_source_strategy_reexecutes_the_definition() -> None:
    def double(x: int) -> int:
        return 2 * x

    payload = serialize_function(double, strategy="source")
    assert payload_strategy(payload) == FUNCTION_SOURCE
    assert deserialize_function(payload)(21) == 42


def test_auto_falls_back_to_source_when_dill_cannot_pickle(monkeypatch: pytest.MonkeyPatch) -> None:
    import dill

    def unpicklable(*_: object, **__: object) -> bytes:
        raise TypeError("cannot pickle this")

    def triple(x: int) -> int:
        return 3 * x

    monkeypatch.setattr(dill, "dumps", unpicklable)
    payload = serialize_function(triple)
    assert payload_strategy(payload) == FUNCTION_SOURCE
    monkeypatch.undo()
    assert deserialize_function(payload)(5) == 15


def test_unknown_strategy_and_non_callable_are_refused() -> None:
    with pytest.raises(SerializationError, match="unknown function strategy"):
        serialize_function(len, strategy="pickle")
    with pytest.raises(SerializationError, match="expected a function"):
        serialize_function(42)  # type: ignore[arg-type]


def test_data_round_trip_and_header_checks() -> None:
    payload = pack_args((1, [2, 3]), {"k": {"v"}})
    assert payload_strategy(payload) == DATA_PICKLE
    assert unpack_args(payload) == ((1, [2, 3]), {"k": {"v"}})
    with pytest.raises(DeserializationError, match="no farcall header"):
        deserialize("not a payload")
    with pytest.raises(DeserializationError, match="not a data strategy"):
        deserialize(serialize_function(len))
    with pytest.raises(SerializationError, match="picklable"):
        serialize(_Unpicklable())


class _Unpicklable:
    def __reduce__(self) -> str:
        raise TypeError("no")


def _raise_in_frame() -> None:
    raise ValueError("deep failure")


def test_exception_is_rebuilt_with_its_traceback() -> None:
    try:
        _raise_in_frame()
    except ValueError as e:
        data, text = serialize_exception(e)
    assert "_raise_in_frame" in text
    rebuilt = rebuild_exception(data, text, "t1")
    assert isinstance(rebuilt, ValueError) and str(rebuilt) == "deep failure"
    names = [f.name for f in traceback.extract_tb(rebuilt.__traceback__)]
    assert "_raise_in_frame" in names


class _Locked(Exception):
    def __init__(self) -> None:
        super().__init__("holds a generator")
        self.pending = (i for i in range(3))  # generators cannot be pickled, even by dill


def test_unpicklable_exception_becomes_task_execution_failed_with_text() -> None:
    try:
        raise _Locked()
    except _Locked as e:
        data, text = serialize_exception(e)
    assert data == ""
    rebuilt = rebuild_exception(data, text, "t2")
    assert isinstance(rebuilt, TaskExecutionFailed)
    assert rebuilt.task_id == "t2"
    assert "holds a generator" in str(rebuilt) and "_Locked" in rebuilt.remote_traceback


def test_plain_data_uses_pickle_and_main_objects_travel_by_value(tmp_path: Path) -> None:


    assert payload_strategy(serialize({"a": [1, 2.5, "x"], "b": (None, True)})) == DATA_PICKLE
    assert deserialize(serialize({"a": [1, 2.5]})) == {"a": [1, 2.5]}
    assert payload_strategy(serialize([lambda x: x])) == DATA_DILL  # pickle cannot: dill can
    # An instance of a class defined in a script's __main__ must load in another interpreter
    # that never saw the class (a worker), so it cannot go by reference.
    made = subprocess.run(
        [sys.executable, "-c", textwrap.dedent("""
            from dataclasses import dataclass
            from farcall.serialize import serialize
            @dataclass
            class Point:
                x: int
                y: int
                def norm1(self):
                    return abs(self.x) + abs(self.y)
            print(serialize(Point(3, -4)))
        """)], capture_output=True, text=True, check=True,
    ).stdout.strip()
    payload = made.replace("\\n", "\n")
    assert payload_strategy(payload) == DATA_DILL
    loaded = subprocess.run(
        [sys.executable, "-c", "import sys; from farcall.serialize import deserialize; "
         "p = deserialize(sys.stdin.read()); print(p.norm1())"],
        input=payload, capture_output=True, text=True, check=True,
    ).stdout.strip()
    assert loaded == "7"


def test_a_payload_from_a_newer_farcall_says_so() -> None:
    with pytest.raises(DeserializationError, match="newer farcall"):
        deserialize("99\nAAAA")


def test_json_payloads_carry_plain_json_and_nothing_else() -> None:
    value = {"text": "é ✓", "n": [1, 2.5, None, True], "nested": {"k": []}}
    payload = serialize_json(value)
    assert payload_strategy(payload) == DATA_JSON
    assert deserialize_json(payload) == value
    assert deserialize(payload) == value, "the general reader reads JSON payloads too"
    args = pack_json_args([1, "a"], {"k": None})
    assert payload_strategy(args) == DATA_JSON
    assert unpack_args(args) == ((1, "a"), {"k": None})


@pytest.mark.parametrize("value", [{1, 2}, float("inf"), b"bytes", object()])
def test_a_value_that_is_not_json_is_refused(value: object) -> None:
    with pytest.raises(SerializationError, match="as JSON"):
        serialize_json(value)


def test_the_json_reader_refuses_every_other_strategy() -> None:
    with pytest.raises(DeserializationError, match="not JSON"):
        deserialize_json(serialize([1, 2]))
