"""The one retry policy (``farcall.retry``): what is sent again, within what budget, and what is
raised or returned once it is spent; on scripted attempts, no network."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

import pytest

from farcall import retry
from farcall.errors import BrokerError, FarcallError, RateLimited
from farcall.quietlog import QuietLog
from farcall.retry import Retry, exchange, server_error, unavailable
from farcall.transport import Response, TransportError

URL = "http://broker"


def _answer(status: int, body: object = None) -> Response:
    return Response(status, "reason", json.dumps(body or {}).encode())


def _script(*steps: int | BaseException) -> tuple[Callable[[], Response], list[int]]:
    """A ``send`` that plays ``steps`` in order (a status answers, an exception is raised), then
    answers 200; and the list of attempts made."""
    made: list[int] = []

    def send() -> Response:
        made.append(1)
        step = steps[len(made) - 1] if len(made) <= len(steps) else 200
        if isinstance(step, BaseException):
            raise step
        return _answer(step, {"retry_after": 0.01} if step == 429 else None)

    return send, made


def _unreachable(e: TransportError) -> FarcallError:
    return BrokerError(0, f"unreachable: {e}")


@pytest.fixture(autouse=True)
def quick(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff of a few milliseconds, so a test spends its budget in attempts, not in sleeps."""
    monkeypatch.setattr(retry, "BACKOFF_CAP", 0.02)


def test_transport_errors_and_transient_statuses_are_sent_again_until_an_answer() -> None:
    send, made = _script(TransportError("refused"), 503, TransportError("cut off"), 429)
    answer = exchange(send, Retry(10), URL, _unreachable)
    assert answer.status == 200 and len(made) == 5


def test_which_statuses_are_transient_is_the_callers_choice() -> None:
    send, made = _script(502)
    assert exchange(send, Retry(10), URL, _unreachable).status == 502 and len(made) == 1
    send, made = _script(502, 500, 504)
    assert exchange(send, Retry(10), URL, _unreachable, server_error).status == 200
    assert len(made) == 4
    assert [s for s in (400, 404, 413, 429, 500, 503, 599) if server_error(s)] == [500, 503, 599]
    assert [s for s in (500, 502, 503) if unavailable(s)] == [503]


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413])
def test_a_4xx_that_cannot_change_is_returned_at_once(status: int) -> None:
    send, made = _script(status)
    assert exchange(send, Retry(10), URL, _unreachable, server_error).status == status
    assert len(made) == 1


def test_past_the_budget_the_last_failure_is_raised_or_returned() -> None:
    send, made = _script(*[TransportError("refused")] * 10_000)
    started = time.monotonic()
    with pytest.raises(BrokerError, match="unreachable: refused"):
        exchange(send, Retry(0.2), URL, _unreachable)
    assert 0.1 < time.monotonic() - started < 2 and len(made) > 2
    send, made = _script(*[503] * 10_000)
    assert exchange(send, Retry(0.1), URL, _unreachable).status == 503
    send, made = _script(*[429] * 10_000)
    with pytest.raises(RateLimited, match="rate limited this token"):
        exchange(send, Retry(0.1), URL, _unreachable)


def test_a_budget_of_zero_makes_one_attempt() -> None:
    send, made = _script(TransportError("refused"))
    with pytest.raises(BrokerError):
        exchange(send, Retry(0), URL, _unreachable)
    assert len(made) == 1


def test_the_budget_counts_from_the_first_failure_not_from_the_first_attempt() -> None:
    """A long transfer cut off near its end still gets its whole budget to be sent again."""
    made: list[int] = []

    def send() -> Response:
        made.append(1)
        if len(made) == 1:
            time.sleep(0.5)  # a transfer that ran longer than the whole budget, then was cut
            raise TransportError("cut off")
        return _answer(201)

    assert exchange(send, Retry(0.3), URL, _unreachable).status == 201 and len(made) == 2


def test_retries_share_a_quiet_log(caplog: pytest.LogCaptureFixture) -> None:
    """Many transfers retrying at once (a broker restart) write one WARNING, not one each."""
    logger = logging.getLogger("tests.retry")
    say = QuietLog(logger, 60, logging.WARNING)
    caplog.set_level(logging.DEBUG, "tests.retry")
    for _ in range(20):
        send, _made = _script(TransportError("refused"), 503)
        exchange(send, Retry(10, say=say), URL, _unreachable)
    warnings = [r for r in caplog.records if r.name == "tests.retry"]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert "retrying for up to 10 s" in warnings[0].getMessage()
