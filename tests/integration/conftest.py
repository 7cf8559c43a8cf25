"""Real processes on loopback: a broker (uvicorn) on real Redis and RabbitMQ, endpoints, users.

Every run uses its own Redis key prefix and RabbitMQ queue prefix, and removes
what it made, so runs never see each other's data.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from harness import BIN
from harness.services import AMQP_URL, REDIS_URL, drop_service_data
from tests.integration.helpers import Broker, Endpoint
from tests.schedulers import ensure_slurm, slurm_cancel, slurm_jobs


@pytest.fixture
def slurm(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, str]]:
    """The private Slurm's environment (``SLURM_CONF``, ``PATH``), also set in this process for
    Parsl's providers run in a test; jobs a failed test left behind are cancelled after it."""
    env = ensure_slurm()  # fails the test (no skip) when Slurm cannot be set up
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = set(slurm_jobs())
    yield env
    slurm_cancel(set(slurm_jobs()) - before)  # normally nothing is left; matters after a failure


@pytest.fixture(scope="session")
def run_id() -> str:
    return uuid.uuid4().hex[:10]


@pytest.fixture(scope="session")
def service_env(services: None, run_id: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARCALL_")}
    env.update(
        FARCALL_REDIS_URL=REDIS_URL,
        FARCALL_AMQP_URL=AMQP_URL,
        FARCALL_REDIS_PREFIX=f"fctest-{run_id}:",
        FARCALL_QUEUE_PREFIX=f"fctest-{run_id}.",
        # Many tests send bad tokens on purpose from 127.0.0.1; the per-address limit on failed
        # authentication has its own test (test_limits.py) with its own broker.
        FARCALL_AUTH_FAILURE_BURST="100000",
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


@pytest.fixture(scope="session")
def broker(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    b = Broker(service_env, tmp_path_factory.mktemp("broker") / "broker.log").start()
    yield b
    b.stop()
    drop_service_data(service_env["FARCALL_REDIS_PREFIX"], service_env["FARCALL_QUEUE_PREFIX"])


@pytest.fixture(scope="module")
def second_broker(broker: Broker, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Another broker process on the session broker's Redis and RabbitMQ (another replica)."""
    b = Broker(broker.env, tmp_path_factory.mktemp("replica") / "broker.log", name="replica")
    b.start()
    yield b
    b.stop()


@pytest.fixture(scope="session")
def token(broker: Broker) -> str:
    return broker.create_user(f"alice-{uuid.uuid4().hex[:6]}")


@contextmanager
def _endpoint_maker(broker: Broker, token: str, root: Path) -> Iterator[Callable[..., Endpoint]]:
    """``make(...)`` configures endpoints with homes under ``root``; all are stopped at the end."""
    made: list[Endpoint] = []

    def make(name: str = "ep", engine: str = "ProcessPoolEngine", workers: int = 2,
             user_token: str | None = None, engine_spec: dict[str, Any] | None = None,
             extra_env: dict[str, str] | None = None,
             config: dict[str, Any] | None = None) -> Endpoint:
        """Configure an endpoint; ``engine_spec`` replaces the config's engine section, ``config``
        sets other top-level keys of its config.yaml (``allowed_functions``, ...)."""
        env = dict(broker.env, FARCALL_HOME=str(root / f"home-{name}"),
                   FARCALL_BROKER_URL=broker.url, FARCALL_TOKEN=user_token or token,
                   **(extra_env or {}))
        ep = Endpoint(name, env)
        overrides = {} if engine_spec is None else {
            "engine": engine_spec, "heartbeat_period": 1, "stop_timeout": 5}
        overrides.update(config or {})
        ep.configure(engine, workers, broker.url, **overrides)
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.stop()
        if ep.proc and ep.proc.popen and ep.proc.popen.returncode not in (0, -signal.SIGTERM):
            print(ep.proc.output())


@pytest.fixture
def make_endpoint(broker: Broker, token: str, tmp_path: Path) -> Iterator[Callable[..., Endpoint]]:
    with _endpoint_maker(broker, token, tmp_path) as make:
        yield make


@pytest.fixture(scope="module")
def make_module_endpoint(
    broker: Broker, token: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Endpoint]]:
    """``make_endpoint`` for endpoints that the tests of one module share (each started once)."""
    with _endpoint_maker(broker, token, tmp_path_factory.mktemp("endpoints")) as make:
        yield make


@pytest.fixture
def client(broker: Broker, token: str) -> Iterator[Any]:
    from farcall import Client

    c = Client(broker_url=broker.url, token=token)
    yield c
    close = getattr(c, "close", None)
    if close:
        close()


@pytest.fixture
def endpoint(make_endpoint: Callable[..., Endpoint], client: Any) -> Iterator[Endpoint]:
    ep = make_endpoint()
    ep.start(client)
    yield ep
