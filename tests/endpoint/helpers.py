"""Building tasks the way the SDK does, for the endpoint's unit tests."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Callable
from typing import Any

from farcall.endpoint.agent import Agent
from farcall.endpoint.embedded import BackgroundAgent
from farcall.endpoint.engines import build_engine
from farcall.endpoint.engines.base import Engine
from farcall.protocol.channel import ResultMessage, TaskMessage
from farcall.protocol.common import Versions
from farcall.serialize import deserialize, pack_args, rebuild_exception, serialize_function
from farcall.version import local_versions
from tests.endpoint.fake_broker import CREDENTIAL, ENDPOINT_ID


def make_task(fn: Callable[..., Any], *args: Any, task_id: str | None = None,
              **kwargs: Any) -> TaskMessage:
    function = serialize_function(fn)
    return TaskMessage(
        task_id=task_id or uuid.uuid4().hex,
        function_id=hashlib.sha256(function.encode()).hexdigest()[:32],
        function=function,
        args=pack_args(args, kwargs),
        submitter=Versions(**local_versions()),
    )


def value_of(result: ResultMessage) -> Any:
    """The task's return value, or its rebuilt remote exception raised here."""
    if result.state == "success":
        return deserialize(result.data)
    raise rebuild_exception(result.data, result.error, result.task_id)


class Collector:
    """Engine callbacks that record results and start events; waits with a deadline."""

    def __init__(self) -> None:
        import threading

        self.results: dict[str, ResultMessage] = {}
        self.started: dict[str, float] = {}
        self.duplicates: list[str] = []
        self._cond = threading.Condition()

    def on_done(self, result: ResultMessage) -> None:
        with self._cond:
            if result.task_id in self.results:
                self.duplicates.append(result.task_id)
            self.results[result.task_id] = result
            self._cond.notify_all()

    def on_start(self, task_id: str, at: float) -> None:
        with self._cond:
            self.started[task_id] = at
            self._cond.notify_all()

    def wait(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        with self._cond:
            if not self._cond.wait_for(condition, timeout):
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def wait_results(self, task_ids: list[str], timeout: float = 30) -> list[ResultMessage]:
        self.wait(lambda: all(t in self.results for t in task_ids), timeout,
                  f"{len(task_ids)} results ({len(self.results)} so far)")
        return [self.results[t] for t in task_ids]


class Agents:
    """Starts agents against a fake broker in background threads; ``stop_all`` at teardown.

    The default engine is a ThreadPoolEngine of 2 threads, 50 tasks each (capacity 100).
    """

    def __init__(self, broker_url: str) -> None:
        self.broker_url = broker_url
        self.runners: list[BackgroundAgent] = []

    def start(self, credential: str = CREDENTIAL, connect: bool = True,
              engine: Engine | None = None, **options: Any) -> BackgroundAgent:
        if engine is None:
            engine = build_engine({"type": "ThreadPoolEngine", "max_workers": 2, "prefetch": 50})
        options = {"heartbeat_period": 0.2, "max_backoff": 0.3, "stop_timeout": 20, **options}
        agent = Agent(self.broker_url, ENDPOINT_ID, credential, engine, **options)
        runner = BackgroundAgent(agent)
        runner.start()
        self.runners.append(runner)
        if connect:
            runner.wait_connected(10)
        return runner

    def stop_all(self) -> None:
        for r in self.runners:
            r.stop(timeout=30)
            assert not r.alive, "agent thread did not stop"


def ipv6_first(monkeypatch: Any) -> None:
    """Make ``localhost`` resolve to ``::1`` before ``127.0.0.1`` for the test (as some hosts
    do; here /etc/hosts names 127.0.0.1 only), where brokers bind 127.0.0.1 only."""
    import socket

    real = socket.getaddrinfo

    def resolve(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        found = real(host, port, *args, **kwargs)
        if host != "localhost":
            return found
        v6 = (socket.AF_INET6, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", ("::1", int(port), 0, 0))
        return [v6, *found]

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
