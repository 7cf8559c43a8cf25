"""Real processes on loopback: a broker (uvicorn) on real Redis and RabbitMQ, endpoints, users.

Every run uses its own Redis key prefix and RabbitMQ queue prefix, and removes
what it made, so runs never see each other's data.
"""

from __future__ import annotations

import os
import signal
import subprocess
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from harness import AMQP_URL, BIN, REDIS_URL, REPO, answers, drop_service_data, free_port, wait_until


@pytest.fixture(scope="session")
def services() -> None:
    """Redis and RabbitMQ answer on loopback; start (or install and start) them when they do not."""
    if not (answers(6379) and answers(5672)):
        subprocess.run([str(REPO / "scripts" / "ensure_services.sh")], check=True)
    assert answers(6379), "Redis does not answer on 127.0.0.1:6379"
    assert answers(5672), "RabbitMQ does not answer on 127.0.0.1:5672"


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
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
        PYTHONUNBUFFERED="1",
    )
    return env


class Proc:
    """A child process with its output in a log file, shown when a test fails."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.popen: subprocess.Popen[bytes] | None = None
        self.start()

    def start(self) -> None:
        out = open(self.log, "ab")  # noqa: SIM115 - owned by the child for its lifetime
        self.popen = subprocess.Popen(
            self.args, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=self.log.parent
        )
        out.close()

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 20) -> int | None:
        if not self.popen or self.popen.poll() is not None:
            return self.popen.returncode if self.popen else None
        self.popen.send_signal(sig)
        try:
            return self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            return self.popen.wait(10)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@dataclass
class Broker:
    url: str
    port: int
    env: dict[str, str]
    proc: Proc

    def start(self) -> None:
        self.proc.start()
        wait_until(self.healthy, 30, f"broker health on {self.url}\n{self.proc.output()}")

    def healthy(self) -> bool:
        return httpx.get(f"{self.url}/v1/health", timeout=2).status_code == 200

    def create_user(self, name: str) -> str:
        out = subprocess.run(
            [str(BIN / "farcall-broker"), "users", "create", name],
            env=self.env, capture_output=True, text=True, timeout=60, check=True,
        ).stdout
        return out.strip().splitlines()[-1].strip()


@pytest.fixture(scope="session")
def broker(service_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    port = free_port()
    logdir = tmp_path_factory.mktemp("broker")
    args = [str(BIN / "farcall-broker"), "serve", "--host", "127.0.0.1", "--port", str(port)]
    b = Broker(f"http://127.0.0.1:{port}", port, service_env, Proc(args, service_env, logdir / "broker.log"))
    wait_until(b.healthy, 30, f"broker health\n{b.proc.output()}")
    yield b
    b.proc.stop()
    drop_service_data(service_env["FARCALL_REDIS_PREFIX"], service_env["FARCALL_QUEUE_PREFIX"])


@pytest.fixture(scope="session")
def token(broker: Broker) -> str:
    return broker.create_user(f"alice-{uuid.uuid4().hex[:6]}")


@dataclass
class Endpoint:
    name: str
    home: Path
    env: dict[str, str]
    proc: Proc | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.home / "endpoints" / self.name

    @property
    def endpoint_id(self) -> str:
        import json

        return str(json.loads((self.dir / "endpoint.json").read_text())["endpoint_id"])

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "farcall-endpoint"), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def start(self, client: Any) -> str:
        log = self.home / f"{self.name}.log"
        self.proc = Proc([str(BIN / "farcall-endpoint"), "start", self.name], self.env, log)
        wait_until(lambda: (self.dir / "endpoint.json").exists(), 30, f"registration\n{self.proc.output()}")
        eid = self.endpoint_id
        wait_until(
            lambda: client.get_endpoint_status(eid)["status"] == "online",
            30,
            f"endpoint {eid} online\n{self.proc.output()}",
        )
        return eid

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


@pytest.fixture
def make_endpoint(
    broker: Broker, token: str, tmp_path: Path
) -> Iterator[Callable[..., Endpoint]]:
    made: list[Endpoint] = []

    def make(name: str = "ep", engine: str = "ProcessPoolEngine", workers: int = 2,
             user_token: str | None = None, engine_spec: dict[str, Any] | None = None,
             extra_env: dict[str, str] | None = None) -> Endpoint:
        """Configure an endpoint; ``engine_spec`` replaces the config's engine section."""
        home = tmp_path / f"home-{name}"
        home.mkdir()
        env = dict(broker.env, FARCALL_HOME=str(home), FARCALL_BROKER_URL=broker.url,
                   FARCALL_TOKEN=user_token or token, **(extra_env or {}))
        ep = Endpoint(name, home, env)
        done = ep.cli("configure", name, "--engine", engine, "--max-workers", str(workers),
                      "--broker-url", broker.url)
        assert done.returncode == 0, done.stderr + done.stdout
        if engine_spec is not None:
            import yaml

            path = ep.dir / "config.yaml"
            config = yaml.safe_load(path.read_text())
            config.update(engine=engine_spec, heartbeat_period=1, stop_timeout=5)
            path.write_text(yaml.safe_dump(config))
        made.append(ep)
        return ep

    yield make
    for ep in made:
        ep.stop()
        if ep.proc and ep.proc.popen and ep.proc.popen.returncode not in (0, -signal.SIGTERM):
            print(ep.proc.output())


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
