"""farcall as an operator runs it: a ``farcall-broker serve`` process and ``farcall-endpoint`` processes.

Only the public command lines are used, the way a user would. The integration
tests and the benchmark both drive these.
"""

from __future__ import annotations

import ssl
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
import yaml

from harness import BIN
from harness.procs import ManagedProcess, free_port, wait_until


class BrokerProcess:
    """``farcall-broker serve`` on a free loopback port, configured by ``env`` (``FARCALL_*``).

    With ``certfile`` and ``keyfile`` it serves HTTPS and WSS (``url`` is
    ``https://``); ``ca_file`` is then the CA its health check trusts. ``serve_args`` are more
    options of ``farcall-broker serve`` (``--forwarded-allow-ips``).
    """

    def __init__(self, env: dict[str, str], log_path: Path, name: str = "broker",
                 log_level: str = "info", *, certfile: Path | None = None,
                 keyfile: Path | None = None, ca_file: Path | None = None,
                 serve_args: Sequence[str] = ()) -> None:
        self.port = free_port()
        self.url = f"{'https' if certfile else 'http'}://127.0.0.1:{self.port}"
        self.env = env
        args = [str(BIN / "farcall-broker"), "serve", "--host", "127.0.0.1", "--port", str(self.port),
                "--log-level", log_level]
        if certfile is not None:
            assert keyfile is not None, "a certificate needs its key"
            args += ["--ssl-certfile", str(certfile), "--ssl-keyfile", str(keyfile)]
        args += serve_args
        self._verify: ssl.SSLContext | bool = (
            ssl.create_default_context(cafile=str(ca_file)) if ca_file is not None else True)
        self.proc = ManagedProcess(name, args, env, log_path)

    def start(self, timeout: float = 30) -> BrokerProcess:
        """Start (again) and return once ``/v1/health`` answers."""
        self.proc.start()
        wait_until(self.healthy, timeout, f"the broker on {self.url}\n{self.proc.output(4000)}")
        return self

    def healthy(self) -> bool:
        if not self.proc.alive():
            raise RuntimeError(f"the broker exited: {self.proc.output(4000)}")
        return httpx.get(f"{self.url}/v1/health", timeout=2, verify=self._verify).status_code == 200

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """``farcall-broker ARGS`` against this broker's store (its environment)."""
        return subprocess.run([str(BIN / "farcall-broker"), *args], env=self.env,
                              capture_output=True, text=True, timeout=60)

    def status_of(self, token: str) -> int:
        """The status ``GET /v1/endpoints`` answers ``token``: 200, or 401 once it is refused."""
        return httpx.get(f"{self.url}/v1/endpoints", headers={"Authorization": f"Bearer {token}"},
                         timeout=10, verify=self._verify).status_code

    def create_user(self, name: str) -> str:
        """``farcall-broker users create NAME``; the token it prints last."""
        done = self.cli("users", "create", name)
        if done.returncode != 0:
            raise RuntimeError(f"farcall-broker users create failed: {done.stderr or done.stdout}")
        return done.stdout.strip().splitlines()[-1].strip()

    def stop(self, timeout: float = 20.0) -> list[int]:
        return self.proc.stop(timeout)


class EndpointProcess:
    """One endpoint with its own ``FARCALL_HOME``: ``configure``, then ``start`` as a process.

    ``env`` must carry ``FARCALL_HOME``, and ``FARCALL_TOKEN`` for the first start
    (which registers the endpoint).
    """

    def __init__(self, name: str, env: dict[str, str]) -> None:
        self.name = name
        self.env = env
        self.home = Path(env["FARCALL_HOME"])
        self.proc: ManagedProcess | None = None

    @property
    def dir(self) -> Path:
        return self.home / "endpoints" / self.name

    @property
    def endpoint_id(self) -> str:
        from farcall.endpoint.registration import load_registration

        registration = load_registration(self.dir)
        assert registration is not None, f"endpoint {self.name} is not registered"
        return registration.endpoint_id

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """``farcall-endpoint ARGS`` in this endpoint's environment."""
        return subprocess.run([str(BIN / "farcall-endpoint"), *args],
                              env=self.env, capture_output=True, text=True, timeout=timeout)

    def configure(self, engine_type: str, workers: int, broker_url: str,
                  **overrides: Any) -> EndpointProcess:
        """``farcall-endpoint configure``, then set ``overrides`` (top-level keys of config.yaml,
        ``engine`` among them)."""
        self.home.mkdir(parents=True, exist_ok=True)
        done = self.cli("configure", self.name, "--engine", engine_type, "--max-workers",
                        str(workers), "--broker-url", broker_url)
        if done.returncode != 0:
            raise RuntimeError(f"farcall-endpoint configure failed: {done.stderr or done.stdout}")
        if overrides:
            path = self.dir / "config.yaml"
            config = yaml.safe_load(path.read_text())
            config.update(overrides)
            path.write_text(yaml.safe_dump(config))
        return self

    def spawn(self) -> float:
        """``farcall-endpoint start NAME`` as a process; the ``perf_counter`` time just before."""
        self.proc = ManagedProcess(f"endpoint {self.name}",
                                   [str(BIN / "farcall-endpoint"), "start", self.name],
                                   self.env, self.home / f"{self.name}.log", cwd=self.home)
        t0 = time.perf_counter()
        self.proc.start()
        return t0

    def wait_online(self, client: Any, timeout: float = 60) -> str:
        """Wait until the endpoint registered and ``client`` sees it online; its id."""
        proc = self.proc
        assert proc is not None, "spawn the endpoint first"

        def registered() -> bool:
            if not proc.alive():
                raise RuntimeError(f"the endpoint exited: {proc.output(4000)}")
            return (self.dir / "endpoint.json").exists()

        wait_until(registered, timeout, f"endpoint {self.name} to register\n{proc.output(4000)}")
        eid = self.endpoint_id
        wait_until(lambda: client.get_endpoint_status(eid)["status"] == "online", timeout,
                   f"endpoint {self.name} to be online\n{proc.output(4000)}")
        return eid

    def stop(self, timeout: float = 20.0) -> list[int]:
        """A graceful stop; the pids of leftovers that had to be ended after it."""
        return self.proc.stop(timeout) if self.proc is not None else []
