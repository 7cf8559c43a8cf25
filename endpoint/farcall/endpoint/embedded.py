"""An endpoint inside the caller's process, for demos and tests.

``farcall demo`` and the tests use exactly this::

    with EmbeddedEndpoint(broker_url, token) as ep:
        with Executor(endpoint_id=ep.endpoint_id) as ex:
            ...
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from types import TracebackType
from typing import Any

from farcall.endpoint.agent import Agent
from farcall.endpoint.engines import build_engine
from farcall.endpoint.errors import EndpointError
from farcall.endpoint.registration import register_endpoint

log = logging.getLogger(__name__)


class BackgroundAgent:
    """Runs an ``Agent`` on its own event loop in a daemon thread."""

    def __init__(self, agent: Agent) -> None:
        self.agent = agent
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="farcall-agent", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(self.agent.run())
        except BaseException as e:  # noqa: BLE001 - reported by wait_connected / stop
            self.error = e
            log.exception("endpoint agent failed")

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def wait_connected(self, timeout: float) -> None:
        """Return once the agent has a session with the broker; raise if it died or timed out."""
        deadline = time.monotonic() + timeout
        while not self.agent.connected.wait(0.05):
            if not self._thread.is_alive() or time.monotonic() > deadline:
                break
        if self.agent.connected.is_set():
            return
        if self.error is not None:
            raise EndpointError(f"the endpoint agent stopped: {self.error}") from self.error
        raise EndpointError(
            f"the endpoint did not connect to {self.agent.broker_url} within {timeout:.0f} s"
        )

    def stop(self, timeout: float | None = None) -> None:
        """Graceful stop; waits for the agent thread (``timeout`` ``None`` = its own deadlines)."""
        self.agent.request_stop()
        if timeout is None:
            timeout = self.agent.stop_timeout + 15
        self._thread.join(timeout)
        if self._thread.is_alive():
            self.agent.request_stop()  # second request: abandon running tasks
            self._thread.join(10)


class EmbeddedEndpoint:
    """Registers an endpoint with ``token`` and runs its agent in a background thread.

    ``endpoint_id`` is set once the context is entered; ``__enter__`` returns after
    the agent has connected, so tasks submitted right away run at once.
    """

    def __init__(
        self,
        broker_url: str,
        token: str,
        name: str = "demo",
        engine: str = "ProcessPoolEngine",
        max_workers: int = 2,
        *,
        heartbeat_period: float = 10.0,
        stop_timeout: float = 10.0,
        connect_timeout: float = 30.0,
        engine_options: dict[str, Any] | None = None,
    ) -> None:
        self.broker_url = broker_url.rstrip("/")
        self.token = token
        self.name = name
        self.engine_spec: dict[str, Any] = {
            "type": engine,
            "max_workers": max_workers,
            **(engine_options or {}),
        }
        self.heartbeat_period = heartbeat_period
        self.stop_timeout = stop_timeout
        self.connect_timeout = connect_timeout
        self.endpoint_id: str | None = None
        self._runner: BackgroundAgent | None = None

    def start(self) -> EmbeddedEndpoint:
        engine = build_engine(self.engine_spec)  # a bad engine name fails before registering
        registration = register_endpoint(self.broker_url, self.token, self.name)
        self.endpoint_id = registration.endpoint_id
        agent = Agent(
            self.broker_url,
            registration.endpoint_id,
            registration.credential,
            engine,
            heartbeat_period=self.heartbeat_period,
            stop_timeout=self.stop_timeout,
            display_name=self.name,
        )
        self._runner = BackgroundAgent(agent)
        self._runner.start()
        try:
            self._runner.wait_connected(self.connect_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self._runner is not None:
            self._runner.stop()
            self._runner = None

    @property
    def agent(self) -> Agent | None:
        return self._runner.agent if self._runner else None

    def __enter__(self) -> EmbeddedEndpoint:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
