"""Fixtures of the endpoint tests: a stand-in broker, and the environment of CLI subprocesses."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from farcall.endpoint.embedded import BackgroundAgent
from tests.endpoint.fake_broker import FakeBroker
from tests.endpoint.helpers import Agents
from tests.endpoint.kube_fake import FakeKubeAPI


@pytest.fixture
def broker() -> Iterator[FakeBroker]:
    """A stand-in broker endpoint channel on loopback."""
    b = FakeBroker()
    yield b
    b.close()


@pytest.fixture
def start_agent(broker: FakeBroker) -> Iterator[Callable[..., BackgroundAgent]]:
    """Start agents against the stand-in broker; each is stopped at the end of the test."""
    agents = Agents(broker.url)
    yield agents.start
    agents.stop_all()


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """The environment for CLI subprocesses: no FARCALL_ settings but a private FARCALL_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FARCALL_")}
    env["FARCALL_HOME"] = str(tmp_path / "home")
    return env


@pytest.fixture
def kube_api(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeKubeAPI]:
    """A stand-in Kubernetes API server, and this process's kube config pointing at it."""
    with FakeKubeAPI() as server:
        kubeconfig = server.write_kubeconfig(tmp_path / "kubeconfig")
        monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
        from kubernetes.config import kube_config

        # The kubernetes package reads KUBECONFIG once, when first imported.
        monkeypatch.setattr(kube_config, "KUBE_CONFIG_DEFAULT_LOCATION", str(kubeconfig))
        yield server
