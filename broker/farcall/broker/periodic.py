"""``Periodic``: a loop a broker process runs for its lifetime (timers, the requeue sweep).

A few times a second (``period``) it calls ``step``; a step that found a full batch of work is
followed by the next at once. The loop outlives store and queue outages: a failing step is
logged (at WARNING at most every ``TROUBLE_LOG_EVERY``), and the loop backs off and tries again.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging

from farcall.backoff import Backoff
from farcall.protocol.common import now
from farcall.quietlog import QuietLog

TROUBLE_LOG_EVERY = 30.0
"""A failing step (the store down) is logged at WARNING at most this often."""
STOP_GRACE = 5.0
"""Seconds ``stop`` lets a step under way finish before it cancels it."""


class Periodic(abc.ABC):
    """``start`` it once the services are up, ``stop`` it before they close."""

    name = "periodic"

    def __init__(self, period: float, log: logging.Logger) -> None:
        self.period = period
        self._log = log
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._trouble = QuietLog(log, TROUBLE_LOG_EVERY, logging.WARNING)

    @abc.abstractmethod
    async def step(self, at: float) -> bool:
        """Do the work due at ``at``; True when there may be more right away. Raises when the
        store or queue does not answer."""

    def start(self) -> None:
        self._stopping = asyncio.Event()  # of this loop: an app may be started again on another
        self._task = asyncio.get_running_loop().create_task(self._loop(), name=self.name)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    async def stop(self) -> None:
        """Stop after the step under way (cancelled past ``STOP_GRACE``), so a graceful
        shutdown finishes what it started."""
        task, self._task = self._task, None
        if task is None:
            return
        self._stopping.set()
        try:
            await asyncio.wait_for(asyncio.shield(task), STOP_GRACE)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _loop(self) -> None:
        backoff = Backoff(cap=5.0)
        while not self._stopping.is_set():
            try:
                more = await self.step(now())
            except Exception as e:  # noqa: BLE001 - the store may be down: try again later
                self._trouble("%s: failed (%r); trying again", self.name, e)
                await self._pause(max(self.period, backoff.next_delay()))
                continue
            backoff.reset()
            if not more:
                await self._pause(self.period)

    async def _pause(self, seconds: float) -> None:
        """Wait ``seconds``, or less if ``stop`` is called."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
