"""429 answers: the Client and the result stream wait what the broker asks, within
``retry_seconds``, then raise ``RateLimited`` saying what to do; on the fake broker."""

from __future__ import annotations

import logging
import re
import time
from concurrent.futures import wait
from typing import Any

import pytest

import farcall.broker.submission
import farcall.retry
from farcall import Client, Executor
from farcall.broker.embedded import EmbeddedBroker
from farcall.broker.settings import Settings
from farcall.client import SUBMITTER, broker_error
from farcall.endpoint.embedded import EmbeddedEndpoint
from farcall.errors import NotFound, RateLimited
from farcall.protocol.rest import BatchSubmission, TaskSpec
from farcall.serialize import pack_args
from harness.procs import wait_until
from tests.sdk.fake_broker import FakeBroker, FakeStream

SLOW_DOWN = {"error": "rate_limited", "message": "too many requests", "retry_after": 0.05}
QUOTA = {"error": "quota_exceeded", "message": "you have 100 open tasks, the most allowed",
         "retry_after": 0.05}


def _warnings(caplog: pytest.LogCaptureFixture, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and text in r.getMessage()]


def test_a_429_is_waited_out_and_the_request_sent_again(caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeBroker()
    fake.script("GET", "/tokens", 429, SLOW_DOWN, times=3)
    caplog.set_level(logging.DEBUG, "farcall.client")
    assert fake.client(retry_seconds=10).list_tokens() == []
    assert len(fake.calls("/tokens")) == 4
    assert len(_warnings(caplog, "the broker is rate limiting this token; waiting")) == 1


def test_a_429_for_ever_raises_rate_limited_once_retry_seconds_are_spent() -> None:
    fake = FakeBroker()
    fake.script("GET", "/tokens", 429, SLOW_DOWN, times=None)
    client = fake.client(retry_seconds=0.5)
    started = time.monotonic()
    with pytest.raises(RateLimited) as info:
        client.list_tokens()
    spent = time.monotonic() - started
    assert 0.4 <= spent < 5  # the whole budget, less at most one wait it could not afford
    assert len(fake.calls("/tokens")) >= 3
    error = info.value
    assert error.status == 429 and error.error == "rate_limited" and error.retry_after == 0.05
    assert re.search(r"rate limited this token for 0\.[45] s \(it asks to wait 0\.05 s more\)", str(error))
    assert "send requests less often" in str(error) and "FARCALL_RATE_LIMIT" in str(error)


def test_a_wait_longer_than_the_budget_gives_up_at_once() -> None:
    fake = FakeBroker()
    fake.script("GET", "/tokens", 429, {**SLOW_DOWN, "retry_after": 120}, times=None)
    with pytest.raises(RateLimited, match="it asks to wait 120 s more") as info:
        fake.client(retry_seconds=5).list_tokens()
    assert info.value.retry_after == 120
    assert len(fake.calls("/tokens")) == 1


def test_without_retry_after_in_the_body_it_waits_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeBroker()
    fake.script("GET", "/tokens", 429, {"error": "rate_limited", "message": "slow down"}, times=1)
    with pytest.raises(RateLimited) as info:  # the default second is over a half-second budget
        fake.client(retry_seconds=0.5).list_tokens()
    assert info.value.retry_after is None and len(fake.calls("/tokens")) == 1

    monkeypatch.setattr(farcall.retry, "DEFAULT_RETRY_AFTER", 0.05)
    fake.script("GET", "/tokens", 429, {"error": "rate_limited", "message": "slow down"}, times=1)
    assert fake.client(retry_seconds=10).list_tokens() == []
    assert len(fake.calls("/tokens")) == 3


def test_503_and_429_share_one_budget_and_then_succeed() -> None:
    fake = FakeBroker()
    fake.script("GET", "/tokens", 503, {"error": "unavailable", "message": "the store is down"})
    fake.script("GET", "/tokens", 429, SLOW_DOWN)
    assert fake.client(retry_seconds=10).list_tokens() == []
    assert len(fake.calls("/tokens")) == 3


def test_the_open_task_quota_is_waited_for_then_says_what_to_do() -> None:
    fake = FakeBroker()
    fake.script("POST", "/tasks", 429, QUOTA, times=2)
    client = fake.client(retry_seconds=10)
    task_id = client.run(1, endpoint_id="ep-1", function_id="fn-1")
    assert task_id in fake.records and len(fake.calls("/tasks")) == 3

    fake.script("POST", "/tasks", 429, QUOTA, times=None)
    with pytest.raises(RateLimited) as info:
        fake.client(retry_seconds=0.2).run(1, endpoint_id="ep-1", function_id="fn-1")
    message = str(info.value)
    assert info.value.error == "quota_exceeded"
    assert "quota of open tasks is reached (you have 100 open tasks, the most allowed)" in message
    assert "Wait for tasks to finish" in message and "FARCALL_MAX_OPEN_TASKS" in message


@pytest.mark.parametrize("retry_after, expected", [
    (2, 2.0), (0.5, 0.5), ("soon", None), (-1, None), (True, None), (float("nan"), None), (None, None),
])
def test_broker_error_maps_429_to_rate_limited(retry_after: Any, expected: float | None) -> None:
    error = broker_error(429, "slow down", "rate_limited", {"retry_after": retry_after})
    assert isinstance(error, RateLimited) and error.retry_after == expected
    given = broker_error(429, "slow down", "rate_limited", None, retry_after=3.0)
    assert isinstance(given, RateLimited) and given.retry_after == 3.0


# ------------------------------------------------------------------ the result stream


def _stream(fake: FakeBroker, retry_seconds: float) -> FakeStream:
    fake.stream_submits = True
    return fake.stream(fake.client(retry_seconds=retry_seconds), "group-1", on_results=lambda r: None,
                       poll=lambda: None, on_refused=lambda e: None, done=lambda: False)


def _batch(endpoint_id: str = "ep-1") -> BatchSubmission:
    tasks = [TaskSpec(function_id="fn-1", args=pack_args((v,), {})) for v in (1, 2)]
    return BatchSubmission(endpoint_id=endpoint_id, tasks=tasks, task_group_id="group-1",
                           submitter=SUBMITTER)


def test_a_batch_refused_429_on_the_stream_is_sent_again_on_it() -> None:
    fake = FakeBroker()
    fake.script("POST", "/tasks", 429, SLOW_DOWN, times=2)
    answer = _stream(fake, retry_seconds=10).real.submit(_batch())
    assert answer is not None and len(answer.task_ids) == 2
    assert len(fake.stream_requests) == 3 and len(fake.calls("/tasks")) == 3


def test_a_stream_refusing_429_for_ever_raises_rate_limited() -> None:
    fake = FakeBroker()
    fake.script("POST", "/tasks", 429, QUOTA, times=None)
    with pytest.raises(RateLimited, match="FARCALL_MAX_OPEN_TASKS") as info:
        _stream(fake, retry_seconds=0.3).real.submit(_batch())
    assert info.value.retry_after == 0.05 and len(fake.stream_requests) >= 2


def test_other_stream_answers_are_unchanged() -> None:
    fake = FakeBroker()
    stream = _stream(fake, retry_seconds=10).real
    fake.script("POST", "/tasks", 503, {"error": "unavailable", "message": "the queue is down"})
    assert stream.submit(_batch()) is None  # goes by HTTP, which retries 503s
    fake.script("POST", "/tasks", 404, {"error": "not_found", "message": "no endpoint ep-2"})
    with pytest.raises(NotFound, match="no endpoint ep-2"):
        stream.submit(_batch("ep-2"))
    assert len(fake.stream_requests) == 2


def test_the_executor_waits_out_a_429_on_the_stream(
    fake: FakeBroker, caplog: pytest.LogCaptureFixture
) -> None:
    fake.stream_submits = True
    fake.script("POST", "/tasks", 429, SLOW_DOWN, times=2)
    caplog.set_level(logging.DEBUG, "farcall.client")
    with Executor(endpoint_id="ep-1", client=fake.client(retry_seconds=10)) as ex:
        futures = [ex.submit_to_registered_function("fn-1", (i,)) for i in range(3)]
        wait_until(lambda: all(f.task_id for f in futures), 10, "task ids")
        for i, future in enumerate(futures):
            assert future.task_id is not None
            fake.finish(future.task_id, i * 10)
        assert [f.result(10) for f in futures] == [0, 10, 20]
    sent = [len(batch["tasks"]) for batch in fake.stream_requests]
    assert sum(sent[2:]) == 3 and len(fake.calls("/tasks")) == len(sent)  # all on the stream
    assert len(_warnings(caplog, "rate limiting this token")) == 1


def test_the_executor_fails_its_futures_with_rate_limited_when_it_gives_up(fake: FakeBroker) -> None:
    fake.stream_submits = True
    fake.script("POST", "/tasks", 429, SLOW_DOWN, times=None)
    with Executor(endpoint_id="ep-1", client=fake.client(retry_seconds=0.3)) as ex:
        futures = [ex.submit_to_registered_function("fn-1", (i,)) for i in range(3)]
        done, not_done = wait(futures, timeout=10)
    assert not not_done
    for future in futures:
        error = future.exception()
        assert isinstance(error, RateLimited) and "FARCALL_RATE_LIMIT" in str(error)


# ------------------------------------------------------------------ the embedded broker


def test_the_client_keeps_to_the_brokers_rate_limit() -> None:
    with EmbeddedBroker(Settings(rate_limit=20, rate_burst=2)) as broker:
        client = Client(broker_url=broker.url, token=broker.create_user("busy"), retry_seconds=30)
        started = time.monotonic()
        for _ in range(8):
            assert len(client.list_tokens()) == 1
        assert time.monotonic() - started >= 0.25  # 6 requests past the burst, at 20/s

        impatient = Client(broker_url=broker.url, token=client.token, retry_seconds=0)
        with pytest.raises(RateLimited, match="FARCALL_RATE_LIMIT") as info:
            for _ in range(8):
                impatient.list_tokens()
        assert info.value.retry_after is not None and 0 < info.value.retry_after <= 1


def test_an_executor_waits_for_its_open_task_quota_on_the_stream(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def pause(x: int) -> int:
        import time

        time.sleep(0.05)
        return x

    monkeypatch.setattr(farcall.broker.submission, "QUOTA_RETRY", 0.1)
    caplog.set_level(logging.DEBUG, "farcall.client")
    with EmbeddedBroker(Settings(max_open_tasks=2)) as broker:
        token = broker.create_user("quota")
        with EmbeddedEndpoint(broker.url, token, engine="ThreadPoolEngine", max_workers=2) as endpoint:
            client = Client(broker_url=broker.url, token=token, retry_seconds=60)
            by_http: list[int] = []
            submit_tasks = client.submit_tasks

            def counting(endpoint_id: str, tasks: Any, task_group_id: str | None = None,
                         request_id: str | None = None,
                         user_endpoint_config: dict[str, Any] | None = None) -> Any:
                by_http.append(len(tasks))
                return submit_tasks(endpoint_id, tasks, task_group_id, request_id,
                                    user_endpoint_config)

            client.submit_tasks = counting  # type: ignore[method-assign]
            with Executor(endpoint_id=endpoint.endpoint_id, client=client, batch_size=1) as ex:
                futures = [ex.submit(pause, i) for i in range(8)]
                assert [f.result(60) for f in futures] == list(range(8))
    assert _warnings(caplog, "the open-task quota is reached; waiting")
    assert by_http == []  # every batch, refused or not, went on the result stream
