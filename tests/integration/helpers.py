"""The broker and endpoint processes the integration tests drive (their fixtures are in conftest)."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from harness import BIN
from harness.procs import ManagedProcess, wait_until


@dataclass
class Broker:
    url: str
    port: int
    env: dict[str, str]
    proc: ManagedProcess

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


@dataclass
class Endpoint:
    name: str
    home: Path
    env: dict[str, str]
    proc: ManagedProcess | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def dir(self) -> Path:
        return self.home / "endpoints" / self.name

    @property
    def endpoint_id(self) -> str:
        return str(json.loads((self.dir / "endpoint.json").read_text())["endpoint_id"])

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(BIN / "farcall-endpoint"), *args],
            env=self.env, capture_output=True, text=True, timeout=timeout,
        )

    def start(self, client: Any) -> str:
        log = self.home / f"{self.name}.log"
        self.proc = ManagedProcess(self.name, [str(BIN / "farcall-endpoint"), "start", self.name],
                                   self.env, log).start()
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
