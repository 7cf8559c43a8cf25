"""Payloads: functions by value or by source, data, remote exceptions with their tracebacks."""

from __future__ import annotations

import threading
import traceback

import numpy as np
import pytest

from farcall.errors import DeserializationError, SerializationError, TaskExecutionFailed
from farcall.serialize import (
    DATA_CLOUDPICKLE,
    DATA_DILL,
    DATA_JSON,
    DATA_PICKLE,
    FUNCTION_CLOUDPICKLE,
    FUNCTION_DILL,
    FUNCTION_SOURCE,
    deserialize,
    deserialize_function,
    deserialize_json,
    pack,
    pack_args,
    pack_json_args,
    payload_strategy,
    rebuild_exception,
    serialize,
    serialize_exception,
    serialize_function,
    serialize_json,
    unpack_args,
    unpack_blob,
)
from harness.serialization_cases import CASES, Case, Outcome, round_trip


def test_closure_and_lambda_travel_by_value() -> None:
    factor = 3

    def scale(x: int) -> int:
        return x * factor

    for fn, expected in ((scale, 12), (lambda x: x + factor, 7)):
        payload = serialize_function(fn)
        assert payload_strategy(payload) == FUNCTION_CLOUDPICKLE
        assert deserialize_function(payload)(4) == expected
        dilled = serialize_function(fn, strategy="dill")
        assert payload_strategy(dilled) == FUNCTION_DILL
        assert deserialize_function(dilled)(4) == expected


def test_source_strategy_reexecutes_the_definition() -> None:
    def double(x: int) -> int:
        return 2 * x

    payload = serialize_function(double, strategy="source")
    assert payload_strategy(payload) == FUNCTION_SOURCE
    assert deserialize_function(payload)(21) == 42


def test_auto_falls_back_to_dill_then_source(monkeypatch: pytest.MonkeyPatch) -> None:
    import dill

    import farcall.serialize

    def unpicklable(*_: object, **__: object) -> bytes:
        raise TypeError("cannot pickle this")

    def triple(x: int) -> int:
        return 3 * x

    monkeypatch.setattr(farcall.serialize, "cloudpickle_dumps", unpicklable)
    payload = serialize_function(triple)
    assert payload_strategy(payload) == FUNCTION_DILL
    monkeypatch.setattr(dill, "dumps", unpicklable)
    payload = serialize_function(triple)
    assert payload_strategy(payload) == FUNCTION_SOURCE
    with pytest.raises(SerializationError, match="cloudpickle: TypeError.*dill: TypeError"):
        serialize_function(len)  # no source to fall back on either
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


def test_plain_data_uses_pickle_then_cloudpickle_then_dill() -> None:
    assert payload_strategy(serialize({"a": [1, 2.5, "x"], "b": (None, True)})) == DATA_PICKLE
    assert deserialize(serialize({"a": [1, 2.5]})) == {"a": [1, 2.5]}
    by_value = serialize([lambda x: x + 1])  # pickle cannot: cloudpickle can
    assert payload_strategy(by_value) == DATA_CLOUDPICKLE
    assert deserialize(by_value)[0](1) == 2
    guarded = serialize(_Guarded())  # cloudpickle cannot pickle a lock: dill can
    assert payload_strategy(guarded) == DATA_DILL
    assert deserialize(guarded).lock.acquire(blocking=False)


class _Guarded:
    def __init__(self) -> None:
        self.lock = threading.Lock()


def test_buffers_stay_out_of_band_only_from_the_library_that_succeeded() -> None:
    array = np.arange(1000, dtype=np.float64)
    # The standard pickle meets the array first, then fails on the lambda; cloudpickle then
    # pickles everything: the buffers are the array's once, not twice.
    frames = pack((array, lambda: 1))
    assert frames.code == DATA_CLOUDPICKLE and len(frames.buffers) == 1
    assert frames.buffers[0].nbytes == array.nbytes and len(frames.main) < 1000
    back, fn = unpack_blob(b"".join(frames.blob_parts()))
    assert np.array_equal(back, array) and fn() == 1
    assert deserialize(frames.payload())[0].sum() == array.sum()
    dilled = pack((array, _Guarded()))  # dill keeps buffers in band: it ignores buffer_callback
    assert dilled.code == DATA_DILL and dilled.buffers == []
    assert np.array_equal(unpack_blob(b"".join(dilled.blob_parts()))[0], array)


# Every notebook case of harness/serialization_cases.py, made in a script's __main__ and loaded
# in a process without its definitions (a worker): as data (``dumps``) and, for functions, as
# the task's function (``serialize_function``). Two subprocesses per kind serve every case.


@pytest.fixture(scope="module")
def data_round_trips() -> dict[str, Outcome]:
    return round_trip("farcall")


@pytest.fixture(scope="module")
def function_round_trips() -> dict[str, Outcome]:
    return round_trip("farcall function")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_a_notebook_object_loads_where_its_definitions_are_missing(
        case: Case, data_round_trips: dict[str, Outcome],
        function_round_trips: dict[str, Outcome]) -> None:
    outcome = data_round_trips[case.name]
    assert outcome.status == "pass", f"{case.title}: {outcome.status} {outcome.error}"
    plain = case.name in ("plain_data", "numpy_array")
    expected = DATA_PICKLE if plain else DATA_DILL if case.name == "holds_lock" else DATA_CLOUDPICKLE
    assert outcome.code == expected
    if case.call is not None:
        fn = function_round_trips[case.name]
        assert (fn.status, fn.code) == ("pass", FUNCTION_CLOUDPICKLE), fn.error


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
