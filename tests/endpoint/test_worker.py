"""worker.run_batch and worker.execute: the code that runs inside every worker."""

from __future__ import annotations

import logging
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farcall import blobs
from farcall.endpoint import dataplane, worker
from farcall.endpoint.errors import ResultTooLarge
from farcall.errors import BrokerError, DataExpired, DeserializationError, TaskTimeout
from farcall.protocol.channel import (
    DataAccess,
    ResultMessage,
    TaskMessage,
    join_task_batch,
    parse_result_batch,
)
from farcall.protocol.common import TaskState, Versions
from farcall.quietlog import QuietLog
from farcall.serialize import (
    DATA_JSON,
    deserialize_json,
    is_ref,
    pack,
    pack_args,
    pack_json_args,
    parse_ref,
    payload_strategy,
    ref_payload,
    unpack_blob,
)
from farcall.transport import Transport
from farcall.version import local_versions
from tests.dataplane import GRANT, DataPlane
from tests.endpoint.helpers import make_task, value_of


def run(task_json: str) -> ResultMessage:
    """``task_json`` run the way every engine but the thread pool runs it: a batch of one."""
    (result,) = parse_result_batch(worker.run_batch(join_task_batch([task_json])))
    return result


def test_success_carries_value_times_and_worker_versions() -> None:
    def add(a: int, b: int = 0) -> int:
        return a + b

    task = make_task(add, 2, b=40)
    result = run(task.model_dump_json())
    assert result.task_id == task.task_id
    assert result.state == TaskState.SUCCESS
    assert value_of(result) == 42
    assert result.started_at is not None and result.finished_at is not None
    assert result.started_at <= result.finished_at
    assert result.worker == Versions(**local_versions())


def test_exception_is_rebuilt_with_the_remote_frame() -> None:
    def boom(x: int) -> None:
        raise ValueError(f"bad {x}")

    result = run(make_task(boom, 7).model_dump_json())
    assert result.state == TaskState.FAILED
    assert "ValueError: bad 7" in result.error
    assert "in boom" in result.error
    assert "run_batch" not in result.error and "in execute" not in result.error
    with pytest.raises(ValueError, match="bad 7") as caught:
        value_of(result)
    assert "boom" in "".join(traceback.format_exception(caught.value))


def test_sys_exit_in_a_task_fails_only_the_task() -> None:
    def leave() -> None:
        raise SystemExit(3)

    result = run(make_task(leave).model_dump_json())
    assert result.state == TaskState.FAILED
    assert "SystemExit" in result.error


def test_unpicklable_return_value_fails_clearly() -> None:
    def gen() -> object:
        return (i for i in range(3))  # generators cannot be pickled

    result = run(make_task(gen).model_dump_json())
    assert result.state == TaskState.FAILED
    assert "SerializationError" in result.error


@pytest.mark.parametrize("broken", ["function", "args"])
def test_unloadable_payload_names_both_sides_versions(broken: str) -> None:
    def f() -> int:
        return 1

    task = make_task(f)
    task.submitter = Versions(python="3.9.1", dill="0.3.5", farcall="0.0.1")
    bad = "01\n" + "A" * 16 if broken == "function" else "10\n" + "AAAA"
    task = task.model_copy(update={broken: bad, "function_id": "broken-" + broken})
    result = run(task.model_dump_json())
    assert result.state == TaskState.FAILED
    mine = local_versions()
    for text in ("Python 3.9.1", "dill 0.3.5", f"Python {mine['python']}", f"dill {mine['dill']}",
                 "source"):
        assert text in result.error, text
    with pytest.raises(DeserializationError, match="submitter: Python 3.9.1, dill 0.3.5"):
        value_of(result)


def test_function_is_deserialized_once_per_function_id(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = worker.deserialize_function

    def counting(payload: str) -> Callable[..., Any]:
        calls.append(payload)
        return real(payload)

    monkeypatch.setattr(worker, "deserialize_function", counting)

    def double(x: int) -> int:
        return 2 * x

    first = make_task(double, 1)
    for i in range(5):
        task = first.model_copy(update={"task_id": f"t{i}", "args": pack_args((i,), {})})
        assert value_of(run(task.model_dump_json())) == 2 * i
    assert len(calls) == 1


def test_malformed_task_json_still_answers() -> None:
    result = run('{"task_id": "x1"}')
    assert result.task_id == "x1" and result.state == TaskState.FAILED


def test_a_batch_answers_every_task_in_order_even_a_malformed_one() -> None:
    def inc(x: int) -> int:
        return x + 1

    good = [make_task(inc, i) for i in range(3)]
    payload = join_task_batch([good[0].model_dump_json(), '{"task_id": "x2", "function": 5}',
                               good[1].model_dump_json(), '{"no_id": 1}', good[2].model_dump_json()])
    results = parse_result_batch(worker.run_batch(payload))
    assert [r.task_id for r in results] == [good[0].task_id, "x2", good[1].task_id, "",
                                            good[2].task_id]
    assert [value_of(results[i]) for i in (0, 2, 4)] == [1, 2, 3]
    assert results[1].state == results[3].state == TaskState.FAILED


def test_a_payload_that_is_not_json_still_answers() -> None:
    (result,) = parse_result_batch(worker.run_batch(b"not json"))
    assert result.task_id == "" and result.state == TaskState.FAILED


def test_execute_runs_in_this_thread_and_keeps_the_given_start_time() -> None:
    def where() -> int:
        import threading

        return threading.get_ident()

    result = worker.execute(make_task(where), started=123.0)
    assert value_of(result) == threading.get_ident() and result.started_at == 123.0


# ------------------------------------------------------------------ walltime inside the worker


def _timed_json(fn: Callable[..., Any], walltime: float, *args: Any) -> str:
    task = make_task(fn, *args)
    task.walltime = walltime
    return task.model_dump_json()


def test_walltime_raises_task_timeout_inside_the_function() -> None:
    """In a worker process's main thread: the traceback shows where the task was."""

    def sleepy() -> None:
        import time

        time.sleep(30)

    before = signal.getsignal(signal.SIGALRM)
    outer = signal.setitimer(signal.ITIMER_REAL, 0)  # pytest-timeout's, given back below
    signal.setitimer(signal.ITIMER_REAL, 120)
    try:
        result = run(_timed_json(sleepy, 0.2))
        delay, _ = signal.getitimer(signal.ITIMER_REAL)
        assert 100 < delay <= 120  # the timer that was set is set again
    finally:
        signal.setitimer(signal.ITIMER_REAL, *outer)
    assert signal.getsignal(signal.SIGALRM) is before
    assert result.state == TaskState.FAILED and "in sleepy" in result.error
    with pytest.raises(TaskTimeout, match=r"ran past its walltime of 0.2 s.*raise walltime="):
        value_of(result)


@pytest.mark.parametrize("then", ["returns", "raises"])
def test_a_task_that_catches_task_timeout_still_times_out(then: str) -> None:
    def stubborn(then: str) -> str:
        import time

        try:
            time.sleep(30)
        except TimeoutError:
            if then == "raises":
                raise KeyError("cleanup failed") from None
        return "finished anyway"

    result = run(_timed_json(stubborn, 0.2, then))
    with pytest.raises(TaskTimeout, match="walltime of 0.2 s") as caught:
        value_of(result)
    if then == "raises":
        assert "KeyError: 'cleanup failed'" in "".join(caught.value.__notes__)


def test_no_walltime_alarm_outside_a_main_thread() -> None:
    """Threads cannot be interrupted by a signal; the thread engine enforces walltimes itself."""

    def nap() -> str:
        import time

        time.sleep(0.3)
        return "done"

    answer: list[ResultMessage] = []
    thread = threading.Thread(target=lambda: answer.append(run(_timed_json(nap, 0.05))))
    thread.start()
    thread.join(30)
    assert value_of(answer[0]) == "done"


def test_a_worker_that_cannot_be_stopped_from_outside_ends_itself(tmp_path: Path) -> None:
    """``exit_past_walltime`` (Parsl's workers): a task that ignores TaskTimeout ends the process."""

    def stubborn() -> None:
        import time

        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                time.sleep(60)
            except TimeoutError:
                pass

    payload = tmp_path / "batch.json"
    payload.write_bytes(join_task_batch([_timed_json(stubborn, 0.2)]))
    code = ("import sys; from farcall.endpoint import worker; worker.EXIT_GRACE = 0.3; "
            f"worker.run_batch(open({str(payload)!r}, 'rb').read(), exit_past_walltime=True)")
    done = subprocess.run([sys.executable, "-c", code], timeout=60, capture_output=True, text=True)
    assert done.returncode == worker.EXIT_PAST_WALLTIME, done.stderr
    assert "past its walltime" in done.stderr


def _json_task(fn: Callable[..., Any], args: list[Any], kwargs: dict[str, Any]) -> str:
    task = make_task(fn)
    return task.model_copy(update={"args": pack_json_args(args, kwargs),
                                   "result_format": "json"}).model_dump_json()


def test_json_arguments_in_json_result_out() -> None:
    def describe(*args: Any, **kwargs: Any) -> dict[str, Any]:
        return {"args": list(args), "kwargs": kwargs, "none": None}

    result = run(_json_task(describe, [1, "two", [3.5]], {"k": {"nested": True}}))
    assert result.state == TaskState.SUCCESS
    assert payload_strategy(result.data) == DATA_JSON
    assert deserialize_json(result.data) == {
        "args": [1, "two", [3.5]], "kwargs": {"k": {"nested": True}}, "none": None}


@pytest.mark.parametrize("value", [{1, 2}, float("nan"), Path("/tmp"), {"a": object()}])
def test_a_result_that_is_not_json_fails_the_task_saying_so(value: Any) -> None:
    def give() -> Any:
        return value

    result = run(_json_task(give, [], {}))
    assert result.state == TaskState.FAILED
    assert "the action provider needs a JSON-serializable return value" in result.error
    assert "SerializationError" in result.error


def test_the_pickle_format_is_unchanged_by_default() -> None:
    result = run(make_task(lambda: {1, 2}).model_dump_json())
    assert result.state == TaskState.SUCCESS and value_of(result) == {1, 2}


# ---------------------------------------------------------------- the data plane


@pytest.fixture
def plane() -> Iterator[DataPlane]:
    p = DataPlane()
    yield p
    p.close()


def _with_data(task: TaskMessage, plane: DataPlane, max_task_bytes: int = 1 << 30,
               retry_seconds: float = 30) -> TaskMessage:
    task.data = DataAccess(url=plane.url, grant=GRANT, max_task_bytes=max_task_bytes,
                           retry_seconds=retry_seconds)
    return task


def _scale(a: Any, factor: int = 1) -> Any:
    return a * factor


def test_big_arguments_are_fetched_and_a_big_result_uploaded_with_the_grant(plane: DataPlane) -> None:
    import numpy as np

    array = np.arange(1_000_000)  # 8 MB
    uploader = Transport(plane.url + "/v1", {blobs.GRANT_HEADER: GRANT})
    try:
        ref = blobs.upload(uploader, pack(((array,), {"factor": 3})))
    finally:
        uploader.close()
    task = _with_data(make_task(_scale), plane)
    task.args = ref
    result = run(task.model_dump_json())  # across a process boundary's JSON, as engines send it
    assert result.state == TaskState.SUCCESS, result.error
    assert is_ref(result.data)
    assert plane.uploads[-1][blobs.GRANT_HEADER] == GRANT
    np.testing.assert_array_equal(unpack_blob(plane.blobs[parse_ref(result.data)[0]]), array * 3)


def test_a_small_result_stays_inline_with_the_data_plane(plane: DataPlane) -> None:
    result = worker.execute(_with_data(make_task(_scale, 21, factor=2), plane))
    assert value_of(result) == 42 and plane.blobs == {}


def test_a_result_over_the_limit_fails_its_task_and_the_next_one_runs(plane: DataPlane) -> None:
    def big() -> bytes:
        return b"x" * (3 << 20)

    result = worker.execute(_with_data(make_task(big), plane, max_task_bytes=2 << 20))
    assert result.state == TaskState.FAILED
    with pytest.raises(ResultTooLarge) as caught:
        value_of(result)
    message = str(caught.value)
    assert f"{2 << 20:,} bytes" in message and "3,145," in message
    assert "raise FARCALL_MAX_TASK_BYTES on the broker" in message and plane.blobs == {}
    assert value_of(worker.execute(_with_data(make_task(_scale, 5), plane))) == 5


def test_a_broker_refusing_the_upload_fails_the_task_with_result_too_large(plane: DataPlane) -> None:
    def big() -> bytes:
        return b"x" * (3 << 20)

    plane.limit = 2 << 20  # the broker's limit went down after the endpoint's welcome
    result = worker.execute(_with_data(make_task(big), plane))
    with pytest.raises(ResultTooLarge, match="FARCALL_MAX_TASK_BYTES"):
        value_of(result)
    assert plane.served["POST"] == 1, "a 413 is not sent again"


def test_expired_arguments_fail_the_task_saying_so(plane: DataPlane) -> None:
    task = _with_data(make_task(_scale), plane)
    task.args = ref_payload("gone", 100)
    result = worker.execute(task)
    with pytest.raises(DataExpired, match="expired"):
        value_of(result)
    assert plane.served["GET"] == 1, "an expired blob is not asked for again"


def _big_arguments(plane: DataPlane, retry_seconds: float = 30) -> TaskMessage:
    uploader = Transport(plane.url + "/v1", {blobs.GRANT_HEADER: GRANT})
    try:
        ref = blobs.upload(uploader, pack(((b"a" * (2 << 20),), {"factor": 2})))
    finally:
        uploader.close()
    task = _with_data(make_task(_scale), plane, retry_seconds=retry_seconds)
    task.args = ref
    return task


def test_a_worker_rides_out_a_restarting_broker_under_its_transfers(
    plane: DataPlane, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Cut-off reads, 5xx and 429 on the way in and out: each transfer is made again, whole, and
    the task succeeds; the retries are logged once per interval, not once each."""
    for name in ("_retrying", "_rate_limited"):
        monkeypatch.setattr(dataplane, name, QuietLog(dataplane.log, 60, logging.WARNING))
    caplog.set_level(logging.INFO, "farcall")
    task = _big_arguments(plane)
    plane.faults = ["cut", 503, "short", 429, 502]
    uploads = plane.served["POST"]
    result = run(task.model_dump_json())
    assert result.state == TaskState.SUCCESS, result.error
    assert plane.served["GET"] == 6 and plane.served["POST"] == uploads + 1
    assert unpack_blob(plane.blobs[parse_ref(result.data)[0]]) == b"a" * (4 << 20)

    def big() -> bytes:
        return b"r" * (3 << 20)

    plane.faults = ["cut", 500, 503, 429]
    result = run(_with_data(make_task(big), plane).model_dump_json())
    assert result.state == TaskState.SUCCESS, result.error
    assert plane.served["POST"] == uploads + 1 + 5
    assert unpack_blob(plane.blobs[parse_ref(result.data)[0]]) == b"r" * (3 << 20)
    said = [r.getMessage() for r in caplog.records if r.name == dataplane.log.name]
    assert len(said) == 2 and all(r.levelno == logging.WARNING for r in caplog.records
                                  if r.name == dataplane.log.name)
    assert "retrying for up to 30 s" in said[0] and "rate limiting" in said[1]


def test_the_endpoints_data_retry_seconds_bounds_the_retries(plane: DataPlane) -> None:
    task = _big_arguments(plane, retry_seconds=0)  # one attempt, as workers made before
    plane.faults = ["cut"]
    result = worker.execute(task)
    with pytest.raises(BrokerError, match="cannot reach the broker's data plane"):
        value_of(result)

    task = _big_arguments(plane, retry_seconds=0.5)
    plane.faults = [503] * 10_000
    started = time.monotonic()
    result = worker.execute(task)
    assert time.monotonic() - started < 5
    with pytest.raises(BrokerError, match="503"):
        value_of(result)


def test_without_the_data_plane_a_big_result_travels_inline_as_before() -> None:
    def big() -> bytes:
        return b"y" * (2 << 20)

    result = worker.execute(make_task(big))
    assert not is_ref(result.data) and value_of(result) == b"y" * (2 << 20)
