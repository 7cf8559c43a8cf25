"""``farcall.quietlog.QuietLog``: one line per interval, the repeats counted or logged lower."""

from __future__ import annotations

import logging

import pytest

from farcall import quietlog
from farcall.quietlog import QuietLog
from tests.helpers import FakeClock


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    return FakeClock.install(monkeypatch, quietlog)


def test_repeats_are_counted_in_the_next_line(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    quiet = QuietLog(logging.getLogger("test.quiet"), every=10.0)
    with caplog.at_level(logging.DEBUG, logger="test.quiet"):
        for _ in range(100):
            quiet("refused %s", "x")
        clock.now += 10
        quiet("refused %s", "y")
    assert [r.getMessage() for r in caplog.records] == [
        "refused x", "refused y (and 99 more like it in the last 10 s)"]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_repeats_go_to_the_lower_level_when_one_is_given(
    clock: FakeClock, caplog: pytest.LogCaptureFixture
) -> None:
    quiet = QuietLog(logging.getLogger("test.quiet"), 60.0, logging.WARNING, rest=logging.DEBUG)
    with caplog.at_level(logging.DEBUG, logger="test.quiet"):
        for _ in range(3):
            quiet("waiting %d s", 1)
        clock.now += 60
        quiet("waiting %d s", 2)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "waiting 1 s"), (logging.DEBUG, "waiting 1 s"),
        (logging.DEBUG, "waiting 1 s"), (logging.WARNING, "waiting 2 s")]
