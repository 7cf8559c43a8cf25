"""Fixtures every test tree may use, and the marks that choose the fast lane.

``./run test --fast`` runs ``-m "not services and not slow and not integration"``: the unit lane,
without Redis or RabbitMQ and without tests that start processes taking seconds. The marks are
given here by rule, not test by test, so a test keeps its marks when its file moves within its
directory:

- ``integration`` and ``slow``: every test under ``INTEGRATION_DIRS``;
- ``services``: a test that requests a fixture of ``SERVICE_FIXTURES`` (itself or through a
  fixture), or that a parametrized fixture runs on a real backend (a param in ``SERVICE_PARAMS``);
- ``slow``: a test matched by a rule of ``SLOW`` (each with its reason), or whose code names a
  way of starting processes (``PROCESS_NAMES``).

A test that reaches the ``services`` fixture some other way (``request.getfixturevalue``) without
the mark fails in any run that selected no ``services`` test, the fast lane included: give its
fixture param a name of ``SERVICE_PARAMS`` or request ``services`` in its signature.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from types import CodeType

import pytest

from harness.services import ensure_services

INTEGRATION_DIRS = ("tests/integration/", "tests/faults/")
SERVICE_FIXTURES = frozenset({"services", "private_redis"})
"""Fixtures that need Redis or RabbitMQ: the shared ones, or a ``redis-server`` of the test's own
(``harness.private_services``)."""
SERVICE_PARAMS = frozenset({"redis", "rabbitmq", "real"})
"""The params that put a parametrized store, queue, blob or broker fixture on the real services."""
_NO_SERVICES_SELECTED = pytest.StashKey[bool]()


@dataclass(frozen=True)
class Slow:
    """Tests whose node id (path from the repository root, ``::``, name) matches ``where`` (a glob,
    ``*`` spanning folders) and that use one of ``fixtures`` (any test, when none are given), with
    ``param`` as that fixture's param when one is given, take seconds: ``why``."""

    where: str
    why: str
    fixtures: tuple[str, ...] = ()
    param: str = ""

    def matches(self, item: pytest.Item) -> bool:
        if not fnmatch(item.nodeid, self.where):
            return False
        if not self.fixtures:
            return True
        used = [f for f in self.fixtures if f in getattr(item, "fixturenames", ())]
        callspec = getattr(item, "callspec", None)
        return bool(used) and (not self.param or (
            callspec is not None and any(callspec.params.get(f) == self.param for f in used)))


SLOW = (
    Slow("tests/endpoint/*parsl*", "a Parsl engine starts an interchange and worker processes, "
         "seconds each", fixtures=("make_engine", "engine")),
    Slow("tests/*", "a ProcessPoolEngine starts and kills worker processes",
         fixtures=("engine",), param="ProcessPoolEngine"),
    Slow("tests/endpoint/*", "a ProcessPoolEngine starts and kills worker processes", fixtures=("pool",)),
    Slow("tests/endpoint/*", "runs farcall-endpoint commands as processes (the CLI's environment)",
         fixtures=("env",)),
    Slow("tests/broker/*test_cli*", "runs farcall-broker commands as processes"),
    Slow("tests/broker/*", "asks globus-action-provider-tools in a process of its own virtualenv "
         "(made with pip on first use)", fixtures=("judge",)),
    Slow("tests/endpoint/*::test_sessions_dropped_right_after_their_welcome_are_retried_further_apart",
         "waits out reconnect backoffs that grow to seconds"),
    Slow("tests/sdk/*::test_a_timer_runs_its_function_and_lists_its_runs",
         "waits for a timer's runs, at least a second apart"),
    Slow("tests/test_typecheck.py::*", "runs mypy over the packages"),
    Slow("tests/test_docs.py::*", "runs each documentation page in a new interpreter"),
)

PROCESS_NAMES = frozenset({"ProcessPoolEngine", "subprocess", "Popen"})
"""A test whose own code (its nested functions included) names one of these starts processes:
``slow`` too, wherever its file is and whatever it is called."""


def _names(code: CodeType) -> set[str]:
    found = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, CodeType):
            found |= _names(const)
    return found


def _starts_processes(item: pytest.Item) -> bool:
    function = getattr(item, "function", None)
    return function is not None and not PROCESS_NAMES.isdisjoint(_names(function.__code__))


def _needs_services(item: pytest.Item) -> bool:
    if not SERVICE_FIXTURES.isdisjoint(getattr(item, "fixturenames", ())):
        return True
    callspec = getattr(item, "callspec", None)
    return callspec is not None and any(
        isinstance(v, str) and v in SERVICE_PARAMS for v in callspec.params.values())


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test before ``-m`` chooses among them."""
    for item in items:
        if item.nodeid.startswith(INTEGRATION_DIRS):
            item.add_marker(pytest.mark.integration)
            item.add_marker(pytest.mark.slow)
        if _needs_services(item):
            item.add_marker(pytest.mark.services)
        if _starts_processes(item) or any(rule.matches(item) for rule in SLOW):
            item.add_marker(pytest.mark.slow)


def pytest_collection_finish(session: pytest.Session) -> None:
    session.config.stash[_NO_SERVICES_SELECTED] = not any(
        item.get_closest_marker("services") for item in session.items)


@pytest.fixture(scope="session")
def services(request: pytest.FixtureRequest) -> None:
    """Redis and RabbitMQ answer on loopback: started (or installed and started) when they do not.

    A test that needs them fails when they cannot be brought up; it never skips.
    """
    if request.config.stash.get(_NO_SERVICES_SELECTED, False):
        pytest.fail(
            "this test reaches Redis and RabbitMQ (the services fixture) but is not marked "
            "'services', so a run that leaves those out (the fast lane) ran it: request "
            "'services' in its signature or name its fixture's real-backend param one of "
            f"{sorted(SERVICE_PARAMS)} (tests/conftest.py)",
            pytrace=False)
    ensure_services()
