"""A log line for a recurring event, written at most once per interval: for what can repeat
without end (refused connections at the broker, 429s at a client) and must not fill a log."""

from __future__ import annotations

import logging
import threading
import time


class QuietLog:
    """Log at ``level`` at most once per ``every`` seconds; the repeats in between go to
    ``rest`` (a lower level) or, with ``rest`` None, are counted and the next line says how
    many were left out. Thread-safe."""

    def __init__(self, logger: logging.Logger, every: float = 10.0, level: int = logging.INFO,
                 rest: int | None = None) -> None:
        self.logger, self.every, self.level, self.rest = logger, every, level, rest
        self._next = 0.0
        self._skipped = 0
        self._lock = threading.Lock()

    def __call__(self, message: str, *args: object) -> None:
        at = time.monotonic()
        with self._lock:
            loud = at >= self._next
            skipped = 0
            if loud:
                self._next = at + self.every
                skipped, self._skipped = self._skipped, 0
            elif self.rest is None:
                self._skipped += 1
        if not loud:
            if self.rest is not None:
                self.logger.log(self.rest, message, *args)
            return
        if skipped:
            message += " (and %d more like it in the last %.0f s)"
            args = (*args, skipped, self.every)
        self.logger.log(self.level, message, *args)
