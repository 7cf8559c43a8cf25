"""Every problem of an endpoint's ``config.yaml`` at once, and its warnings.

Reading a config runs inside :func:`collecting`. A check that finds a problem records it
with :func:`error` (dotted key, what was found, what to write instead) and goes on, so one
run of ``farcall-endpoint check`` names every problem of the file; the reader raises
:class:`ConfigProblems` with all of them at the end. A key farcall takes but does not act on
as Globus Compute would (``amqp_port``, ``subscription_id``...) is recorded with :func:`warn`:
the endpoint logs each warning once, as one ``WARNING`` line, when it starts.

Outside :func:`collecting` (a unit test building one engine), :func:`error` raises at once and
:func:`warn` logs.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field

from farcall.endpoint.errors import EndpointConfigError

__all__ = ["ConfigProblems", "Problem", "Report", "collecting", "current", "error", "warn"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One finding about one key: ``engine.address: ... (write ...)``."""

    key: str
    """Dotted key in the file (``engine.provider.partition``); ``""`` for the whole file."""
    message: str
    """What was found, and what to write instead (or, for a warning, what farcall does)."""

    def __str__(self) -> str:
        return f"{self.key}: {self.message}" if self.key else self.message


class ConfigProblems(EndpointConfigError):
    """The config has problems; ``problems`` lists every one, in the file's order of checks."""

    def __init__(self, source: str, problems: list[Problem]) -> None:
        self.source = source
        self.problems = list(problems)
        if len(self.problems) == 1:
            text = f"{source}: {self.problems[0]}"
        else:
            text = f"{source}: {len(self.problems)} problems:\n" + "\n".join(
                f"  - {p}" for p in self.problems)
        super().__init__(text)


@dataclass
class Report:
    """What the checks of one config found."""

    errors: list[Problem] = field(default_factory=list)
    warnings: list[Problem] = field(default_factory=list)

    def error(self, key: str, message: str) -> None:
        problem = Problem(key, message)
        if problem not in self.errors:
            self.errors.append(problem)

    def warn(self, key: str, message: str) -> None:
        problem = Problem(key, message)
        if problem not in self.warnings:
            self.warnings.append(problem)

    def raise_if_errors(self, source: str) -> None:
        if self.errors:
            raise ConfigProblems(source, self.errors)


_current: contextvars.ContextVar[Report | None] = contextvars.ContextVar("farcall_config_report",
                                                                         default=None)


@contextlib.contextmanager
def collecting(report: Report | None = None) -> Iterator[Report]:
    """Collect problems and warnings into ``report`` (a new one by default) inside the block.

    Nested blocks share the outermost report, so a check run inside another check adds to it.
    """
    outer = _current.get()
    if outer is not None and report is None:
        yield outer
        return
    report = report if report is not None else Report()
    token = _current.set(report)
    try:
        yield report
    finally:
        _current.reset(token)


def current() -> Report | None:
    """The report being collected, if any."""
    return _current.get()


def error(key: str, message: str) -> None:
    """Record a problem (or, outside :func:`collecting`, raise it as ``EndpointConfigError``)."""
    report = _current.get()
    if report is None:
        raise EndpointConfigError(str(Problem(key, message)))
    report.error(key, message)


def warn(key: str, message: str) -> None:
    """Record a warning (or, outside :func:`collecting`, log it)."""
    report = _current.get()
    if report is None:
        log.warning("%s", Problem(key, message))
        return
    report.warn(key, message)
