"""The data plane's client side: blobs over HTTP (transport, errors), ``Client`` uploads and
downloads, and the ``Executor``'s size checks, uploads and off-thread downloads.

HTTP goes to a small data-plane server on loopback (tests/dataplane.py); the Executor's
tests use the fake broker (tests/sdk/fake_broker.py).
The real broker and endpoint are in tests/integration/test_big_data.py.
"""

from __future__ import annotations

import http.client
import threading
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from farcall import Client, Executor, blobs
from farcall.errors import (
    AuthenticationError,
    BrokerError,
    DataExpired,
    DeserializationError,
    PermissionDenied,
    TaskTooLarge,
)
from farcall.outcome import outcome_of
from farcall.protocol.common import TaskState
from farcall.protocol.stream import TaskResult
from farcall.serialize import INLINE_BYTES, pack, parse_ref, ref_payload, unpack_blob
from farcall.transport import Transport
from tests.dataplane import GRANT, TOKEN, DataPlane
from tests.sdk.fake_broker import FakeBroker


@pytest.fixture
def plane() -> Iterator[DataPlane]:
    p = DataPlane()
    yield p
    p.close()


@pytest.fixture
def transport(plane: DataPlane) -> Iterator[Transport]:
    t = Transport(plane.url + "/v1", {"Authorization": f"Bearer {TOKEN}"})
    yield t
    t.close()


def test_an_array_goes_up_as_parts_and_comes_back_as_a_view_of_one_buffer(
    plane: DataPlane, transport: Transport, monkeypatch: pytest.MonkeyPatch
) -> None:
    array = np.arange(2_000_000, dtype=np.float64)  # 16 MB
    sent: list[Any] = []
    real_send = http.client.HTTPConnection.send

    def send(self: http.client.HTTPConnection, data: Any) -> None:
        sent.append(data)
        real_send(self, data)

    monkeypatch.setattr(http.client.HTTPConnection, "send", send)
    frames = pack({"x": array})
    ref = blobs.upload(transport, frames)
    monkeypatch.setattr(http.client.HTTPConnection, "send", real_send)

    blob_id, size = parse_ref(ref)
    assert size == frames.nbytes == len(plane.blobs[blob_id])
    assert plane.blobs[blob_id] == b"".join(frames.blob_parts())
    # the array's memory went to the socket as it is: a view of it, not a joined copy
    assert any(isinstance(d, memoryview) and np.shares_memory(np.asarray(d), array) for d in sent)
    assert all(len(d) <= array.nbytes for d in sent)

    blob = blobs.download(transport, ref)
    assert isinstance(blob, memoryview) and not blob.readonly and blob.nbytes == size
    back = unpack_blob(blob)["x"]
    np.testing.assert_array_equal(back, array)
    assert np.shares_memory(back, np.frombuffer(blob, dtype=np.uint8))  # zero copy
    back[0] = -1.0  # writable, as the user's own array was
    assert unpack_blob(blobs.download(transport, ref))["x"][0] == 0.0


def test_a_grant_header_opens_the_data_plane_as_a_token_does(plane: DataPlane) -> None:
    worker = Transport(plane.url + "/v1", {})
    try:
        ref = blobs.upload(worker, pack(b"y" * 10), {blobs.GRANT_HEADER: GRANT})
        assert unpack_blob(blobs.download(worker, ref, {blobs.GRANT_HEADER: GRANT})) == b"y" * 10
        with pytest.raises(Exception, match="401"):
            blobs.download(worker, ref, {blobs.GRANT_HEADER: "ep-1:wrong"})
    finally:
        worker.close()


def test_an_expired_blob_says_it_expired_with_the_result(transport: Transport) -> None:
    with pytest.raises(DataExpired, match="expired") as caught:
        blobs.download(transport, ref_payload("gone", 10))
    assert "FARCALL_RESULT_TTL" in str(caught.value) and caught.value.status == 404


def test_a_blob_over_the_limit_surfaces_the_brokers_message(plane: DataPlane, transport: Transport) -> None:
    plane.limit = 1000
    with pytest.raises(TaskTooLarge, match="over the limit of 1000 bytes; raise FARCALL_MAX_TASK_BYTES"):
        blobs.upload(transport, pack(b"z" * 5000))
    assert plane.blobs == {}


def test_a_blob_cut_short_is_not_loaded(plane: DataPlane, transport: Transport) -> None:
    ref = blobs.upload(transport, pack(b"a" * 100))
    blob_id, size = parse_ref(ref)
    with pytest.raises(DeserializationError, match="cut short"):
        blobs.download(transport, ref_payload(blob_id, size + 1))


def test_client_transfers_ride_out_cut_reads_5xx_and_429(plane: DataPlane) -> None:
    """A broker restarting under a transfer: the Client sends it again, whole, within its budget."""
    client = Client(plane.url, TOKEN, retry_seconds=30)
    try:
        frames = pack(np.arange(300_000))  # 2.4 MB
        plane.faults = ["cut", 503, 500, 429]
        ref = client.upload_blob(frames)
        assert plane.served["POST"] == 5 and len(plane.blobs) == 1  # a cut upload stores nothing
        plane.faults = ["cut", 502, "short", 429, 504]
        np.testing.assert_array_equal(unpack_blob(client.download_blob(ref)), np.arange(300_000))
        assert plane.served["GET"] == 6
    finally:
        client.close()


@pytest.mark.parametrize(("status", "error"), [
    (400, BrokerError), (401, AuthenticationError), (403, PermissionDenied), (404, DataExpired),
])
def test_a_4xx_that_cannot_change_fails_a_download_at_once(
    plane: DataPlane, status: int, error: type[Exception]
) -> None:
    client = Client(plane.url, TOKEN, retry_seconds=30)
    try:
        ref = client.upload_blob(pack(np.ones(300_000)))
        plane.faults = [status]
        with pytest.raises(error):
            client.download_blob(ref)
        assert plane.served["GET"] == 1
    finally:
        client.close()


def test_a_single_attempt_fails_on_the_first_cut(plane: DataPlane, transport: Transport) -> None:
    """What a worker did before it retried (``blobs.once``): one cut read fails the transfer."""
    ref = blobs.upload(transport, pack(b"a" * 100_000))
    plane.faults = ["cut"]
    with pytest.raises(BrokerError, match="cannot reach the broker's data plane"):
        blobs.download(transport, ref)
    plane.faults = [503]
    with pytest.raises(BrokerError, match="503"):
        blobs.upload(transport, pack(b"a" * 100_000))


def test_client_limits_are_asked_once(plane: DataPlane) -> None:
    client = Client(plane.url, TOKEN)
    calls: list[str] = []
    real = client._http.request

    def counting(method: str, path: str, *args: Any) -> Any:
        calls.append(path)
        return real(method, path, *args)

    client._http.request = counting  # type: ignore[method-assign,assignment]
    try:
        assert client.limits().max_task_bytes == plane.limit
        assert client.limits().inline_bytes == INLINE_BYTES
        assert calls == ["/limits"]
    finally:
        client.close()


def test_client_uploads_big_arguments_and_checks_them_first(plane: DataPlane) -> None:
    client = Client(plane.url, TOKEN)
    try:
        frames = pack(np.ones(300_000))  # 2.4 MB
        ref = client.upload_blob(frames)
        np.testing.assert_array_equal(unpack_blob(client.download_blob(ref)), np.ones(300_000))
        client._limits = None
        plane.limit = 2 * INLINE_BYTES
        with pytest.raises(TaskTooLarge, match="raise FARCALL_MAX_TASK_BYTES on the broker") as e:
            client.upload_blob(frames)
        assert (e.value.size, e.value.limit) == (frames.nbytes, 2 * INLINE_BYTES)
        assert len(plane.blobs) == 1  # checked before anything was sent
    finally:
        client.close()


def test_outcome_of_a_reference_goes_through_fetch() -> None:
    blob = bytearray(b"".join(pack([1, 2, 3]).blob_parts()))
    result = TaskResult(task_id="t1", state=TaskState.SUCCESS, data=ref_payload("b1", len(blob)))
    assert outcome_of(result, lambda ref: blob).unwrap() == [1, 2, 3]
    expired = DataExpired(404, "gone")

    def fails(ref: str) -> bytearray:
        raise expired

    assert outcome_of(result, fails).value is expired
    missing = outcome_of(result)
    assert not missing.ok and isinstance(missing.value, DeserializationError)


# ---------------------------------------------------------------- Client on the fake broker


def test_run_and_batch_run_send_big_arguments_as_references(fake: FakeBroker) -> None:
    client = fake.client()
    big = np.arange(300_000)
    task_id = client.run(big, endpoint_id="e", function_id="f", scale=2)
    batch = client.create_batch()
    batch.add("f", (1,))
    batch.add("f", (big,))
    client.batch_run("e", batch)
    tasks = [t for body in fake.calls("/tasks") for t in body["tasks"]]
    refs = [t["args"] for t in tasks if t["args"].startswith("30\n")]
    assert len(refs) == 2 and not tasks[1]["args"].startswith("30\n")
    args, kwargs = unpack_blob(fake.blobs[parse_ref(refs[0])[0]])
    np.testing.assert_array_equal(args[0], big)
    assert kwargs == {"scale": 2} and fake.submitted[task_id]["args"] == refs[0]


def test_batch_run_refuses_an_oversized_task_before_sending_anything(fake: FakeBroker) -> None:
    fake.limits = fake.limits.model_copy(update={"max_task_bytes": 16 * INLINE_BYTES})
    client = fake.client()
    batch = client.create_batch()
    batch.add("f", (np.ones(100_000),))
    batch.add("f", (np.ones(1_000_000),))  # 8 MB
    with pytest.raises(TaskTooLarge, match="task 1 of the batch are 8,000,"):
        client.batch_run("e", batch)
    assert fake.blobs == {} and fake.calls("/tasks") == []


def test_get_result_downloads_a_big_result(fake: FakeBroker) -> None:
    client = fake.client()
    task_id = client.run(1, endpoint_id="e", function_id="f")
    value = np.arange(500_000)
    fake.blobs["r1"] = b"".join(pack(value).blob_parts())
    fake.records[task_id].update(state="success", data=ref_payload("r1", len(fake.blobs["r1"])))
    np.testing.assert_array_equal(client.get_result(task_id), value)
    np.testing.assert_array_equal(client.get_batch_result([task_id])[task_id]["result"], value)
    del fake.blobs["r1"]
    with pytest.raises(DataExpired, match="expired"):
        client.get_result(task_id)


def test_a_timer_with_big_arguments_is_refused_before_any_request(fake: FakeBroker) -> None:
    with pytest.raises(ValueError, match="a timer keeps its arguments .* pass the path or URL"):
        fake.client().create_timer("e", "f", (np.ones(300_000),), interval=60)
    assert fake.requests == []


# ---------------------------------------------------------------- Executor on the fake broker


def _double(x: Any) -> Any:
    return x * 2


def test_an_oversized_call_fails_alone_and_the_rest_of_its_batch_goes(fake: FakeBroker) -> None:
    fake.limits = fake.limits.model_copy(update={"max_task_bytes": 16 * INLINE_BYTES})
    fake.hold.clear()  # the first batch waits, so the next calls queue up as one batch
    with Executor(endpoint_id="endpoint-1", client=fake.client(), batch_size=10) as ex:
        first = ex.submit(_double, 0)
        assert fake.posting.wait(10)
        calls = [ex.submit(_double, np.ones(n)) for n in (10, 300_000, 1_000_000, 20)]
        fake.hold.set()
        too_big = calls[2]
        with pytest.raises(TaskTooLarge) as caught:
            too_big.result(timeout=10)
        message = str(caught.value)
        assert "8,000," in message and f"{16 * INLINE_BYTES:,} bytes" in message
        assert "raise FARCALL_MAX_TASK_BYTES on the broker" in message and "_double" in message
        assert "fewer tasks" not in message
        sent = [c for c in [first, *calls] if c is not too_big]
        assert _wait(lambda: all(_sent(c) for c in sent)) and too_big.task_id is None
        for c in sent:
            fake.finish(str(c.task_id), "ok")
    second_batch = fake.calls("/tasks")[1]["tasks"]
    assert len(second_batch) == 3
    assert [t["args"].startswith("30\n") for t in second_batch] == [False, True, False]
    assert len(fake.blobs) == 1


def _sent(future: Any) -> bool:
    return future.task_id is not None


def test_big_results_are_downloaded_off_the_stream_thread(
    fake: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = fake.client()
    gate = threading.Event()
    real = client.download_blob

    def slow(ref: str) -> memoryview:
        assert threading.current_thread().name.startswith("farcall-download")
        assert gate.wait(10)
        return real(ref)

    monkeypatch.setattr(client, "download_blob", slow)
    value = np.arange(400_000)
    fake.blobs["r1"] = b"".join(pack(value).blob_parts())
    with Executor(endpoint_id="endpoint-1", client=client) as ex:
        big, small = ex.submit(_double, 1), ex.submit(_double, 2)
        assert _wait(lambda: _sent(big) and _sent(small))
        stream = fake.streams[0]
        stream.push([TaskResult(task_id=str(big.task_id), state=TaskState.SUCCESS,
                                data=ref_payload("r1", len(fake.blobs["r1"])))])  # returns at once
        fake.finish(str(small.task_id), 4)
        assert small.result(timeout=5) == 4 and not big.done()
        gate.set()
        np.testing.assert_array_equal(big.result(timeout=10), value)


def _wait(condition: Any, timeout: float = 10) -> bool:
    from harness.procs import wait_until

    return bool(wait_until(condition, timeout, "the condition"))
