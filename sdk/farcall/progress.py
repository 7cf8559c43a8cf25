"""Progress bars over futures: ``farcall.as_completed(..., progress=True)`` and
``Executor.map(..., progress=True)``.

The bar is ``tqdm.auto``'s, so a notebook shows the Jupyter widget and a terminal shows
text. It counts futures as they finish and, in its postfix, how many of those failed
(raised or were cancelled). tqdm is imported only when a bar is asked for.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import Future
from typing import Any, TypeVar, cast

F = TypeVar("F", bound=Future[Any])


class Progress:
    """A bar over ``total`` futures; ``finished(future)`` counts one that is done (once).

    Safe to call from any thread (a future's done-callback runs on the result stream's
    thread), and a no-op once the bar is closed, so a callback that fires late changes
    nothing. ``options`` go to ``tqdm`` (``file=`` for instance).
    """

    def __init__(self, total: int, desc: str | None = None, **options: Any) -> None:
        from tqdm.auto import tqdm

        self.failed = 0
        self._lock = threading.Lock()
        self._closed = False
        self._counted: set[Future[Any]] = set()
        self._watched: list[Future[Any]] = []
        self._bar = tqdm(total=total, desc=desc, unit="task", **options)
        self._bar.set_postfix(failed=0)

    @property
    def done(self) -> int:
        """Futures counted so far, failed ones included."""
        return int(self._bar.n)

    @property
    def closed(self) -> bool:
        return self._closed

    def finished(self, future: Future[Any]) -> None:
        """Count ``future`` (done: its result, exception or cancellation is known)."""
        with self._lock:
            if not self._closed:
                self._count(future)

    def _count(self, future: Future[Any]) -> None:
        if future in self._counted:
            return
        self._counted.add(future)
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
            self._bar.set_postfix(failed=self.failed, refresh=False)
        self._bar.update(1)

    def watch(self, futures: Iterable[Future[Any]]) -> None:
        """Count each of ``futures`` when it finishes, whoever waits for it."""
        for future in futures:
            self._watched.append(future)
            future.add_done_callback(self.finished)

    def close(self) -> None:
        """Count the watched futures done by now, and leave the bar as it stands; later
        ``finished`` calls do nothing. (A future's waiters wake before its callbacks run,
        so a caller may stop at a failure its callback has not counted yet.)"""
        with self._lock:
            if self._closed:
                return
            for future in self._watched:
                if future.done():
                    self._count(future)
            self._closed = True
            self._bar.close()


def as_completed(
    futures: Iterable[F], timeout: float | None = None, *, progress: bool = False
) -> Iterator[F]:
    """The futures as they finish, as ``concurrent.futures.as_completed`` gives them
    (``TimeoutError`` when they are not all done within ``timeout`` seconds).

    With ``progress`` a bar counts them as they come, and how many failed; it is closed
    when the iteration ends, also early (a ``break``, an exception, the timeout).
    """
    if not progress:
        return cast(Iterator[F], concurrent.futures.as_completed(futures, timeout))
    return _counted(set(futures), timeout)


def _counted(futures: set[F], timeout: float | None) -> Iterator[F]:
    bar = Progress(len(futures))
    try:
        for future in concurrent.futures.as_completed(futures, timeout):
            bar.finished(future)
            yield cast(F, future)
    finally:
        bar.close()
