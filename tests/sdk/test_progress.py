"""Progress bars: ``farcall.as_completed(..., progress=True)`` and ``Executor.map(..., progress=True)``
count finished and failed futures, and close when the iteration ends, also early."""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest

import farcall
import farcall.progress
from farcall import Executor
from farcall.progress import Progress
from tests.helpers import fragile, wait_for_file
from tests.sdk.helpers import Stack


@pytest.fixture
def bars(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Progress]]:
    """Every bar made in the test (as_completed's and map's)."""
    made: list[Progress] = []

    class Recorded(Progress):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    monkeypatch.setattr(farcall.progress, "Progress", Recorded)
    yield made


def _finished(*outcomes: object) -> list[Future[Any]]:
    """Done futures: an exception instance fails its future, anything else is its result."""
    futures: list[Future[Any]] = []
    for outcome in outcomes:
        f: Future[Any] = Future()
        if isinstance(outcome, BaseException):
            f.set_exception(outcome)
        else:
            f.set_result(outcome)
        futures.append(f)
    return futures


def test_as_completed_counts_done_and_failed(
    bars: list[Progress], capsys: pytest.CaptureFixture[str]
) -> None:
    futures = _finished(1, ValueError("bad"), 3)
    cancelled: Future[Any] = Future()
    cancelled.cancel()
    cancelled.set_running_or_notify_cancel()  # as an executor does: now it counts as done
    got = list(farcall.as_completed([*futures, cancelled], progress=True))
    assert set(got) == {*futures, cancelled}
    (bar,) = bars
    assert (bar.done, bar.failed, bar.closed) == (4, 2, True)
    err = capsys.readouterr().err  # tqdm.auto in a terminal: text on stderr
    assert "4/4" in err and "failed=2" in err


def test_as_completed_follows_futures_finishing_later(bars: list[Progress]) -> None:
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        gate = threading.Event()
        futures = [pool.submit(gate.wait, 10) for _ in range(3)]
        it = farcall.as_completed(futures, timeout=30, progress=True)
        gate.set()
        assert set(it) == set(futures)
    assert (bars[0].done, bars[0].failed, bars[0].closed) == (3, 0, True)


def test_as_completed_closes_its_bar_on_an_early_stop(bars: list[Progress]) -> None:
    pending: Future[Any] = Future()
    for f in farcall.as_completed([*_finished(1, 2), pending], progress=True):
        assert f.done()
        break
    (bar,) = bars
    assert bar.closed and bar.done == 1

    with pytest.raises(TimeoutError):
        for _ in farcall.as_completed([pending], timeout=0.05, progress=True):
            pass
    assert bars[1].closed and bars[1].done == 0


def test_without_progress_it_is_the_standard_as_completed(bars: list[Progress]) -> None:
    pending: Future[Any] = Future()
    done = _finished(1)
    assert list(farcall.as_completed(done)) == done
    with pytest.raises(TimeoutError):
        list(farcall.as_completed([pending], 0.05))
    assert bars == []


def test_a_closed_bar_counts_nothing_more() -> None:
    f: Future[Any] = Future()
    bar = Progress(2, disable=True)
    bar.watch([f])
    bar.close()
    f.set_exception(RuntimeError("late"))
    assert (bar.done, bar.failed) == (0, 0)


def test_map_with_progress(
    stack: Stack, bars: list[Progress], capsys: pytest.CaptureFixture[str]
) -> None:
    with Executor(endpoint_id=stack.endpoint_id, client=stack.client()) as ex:
        assert list(ex.map(fragile, [1, 2, 4], progress=True)) == [1.0, 0.5, 0.25]
        (bar,) = bars
        assert (bar.done, bar.failed, bar.closed) == (3, 0, True)
        assert "3/3" in capsys.readouterr().err

        with pytest.raises(ZeroDivisionError):
            list(ex.map(fragile, [1, 0], progress=True))
        assert (bars[1].done, bars[1].failed, bars[1].closed) == (2, 1, True)
        assert "failed=1" in capsys.readouterr().err


def test_map_closes_its_bar_when_stopped_early(stack: Stack, bars: list[Progress],
                                               tmp_path: Path) -> None:
    """The calls left are cancelled after the bar is closed: a stop is not a failure."""
    gate = tmp_path / "go"
    with Executor(endpoint_id=stack.endpoint_id, client=stack.client()) as ex:
        results = ex.map(wait_for_file, [str(tmp_path / "now")] + [str(gate)] * 3, progress=True)
        (tmp_path / "now").touch()
        assert next(results) == str(tmp_path / "now")
        results.close()
        (bar,) = bars
        assert bar.closed and bar.done == 1 and bar.failed == 0
        gate.touch()  # lets whatever had started finish
