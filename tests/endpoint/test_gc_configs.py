"""Globus Compute endpoint configs for 17 real clusters pass ``farcall-endpoint check``.

``gc_configs/`` holds a config of our own for each cluster Globus Compute publishes one for,
with the same keys and shapes and the site values filled in. Each runs through the real CLI
(a subprocess, a private FARCALL_HOME): it exits 0 and says which provider and launcher it
built. The cluster interfaces (ib0, hsn0...) are not on this machine: ``check`` warns and
``start`` refuses, before it contacts the broker. KubernetesProvider is pointed at a stand-in
API server, which ``check`` must not call.
"""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.endpoint.kube_fake import FakeKubeAPI

CORPUS = Path(__file__).parent / "gc_configs"
CLUSTERS = sorted(p.stem for p in CORPUS.glob("*.yaml"))
def cli(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farcall.endpoint", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def install(env: dict[str, str], name: str, text: str | None = None) -> dict[str, Any]:
    """Write the corpus config ``name`` (or ``text``) as endpoint ``name``; its YAML."""
    text = text if text is not None else (CORPUS / f"{name}.yaml").read_text()
    directory = Path(env["FARCALL_HOME"]) / "endpoints" / name
    directory.mkdir(parents=True)
    (directory / "config.yaml").write_text(text)  # as written: every key, comments and all
    return dict(yaml.safe_load(text))


def expected_launcher(provider: dict[str, Any]) -> str | None:
    """The launcher the provider section names, else the provider class's default (if any)."""
    if "launcher" in provider:
        return str(provider["launcher"]["type"])
    import parsl.providers

    param = inspect.signature(getattr(parsl.providers, provider["type"])).parameters.get("launcher")
    return None if param is None else type(param.default).__name__


@pytest.fixture
def kube(tmp_path: Path, env: dict[str, str]) -> Iterator[FakeKubeAPI]:
    with FakeKubeAPI() as server:
        env["KUBECONFIG"] = str(server.write_kubeconfig(tmp_path / "kubeconfig"))
        yield server


class Listener:
    """A TCP port standing in for the broker: counts the connections it gets."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.connections = 0
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}"

    def _accept(self) -> None:
        while not self.closed.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self.closed.set()
        self.sock.close()


@pytest.fixture
def broker_port(env: dict[str, str]) -> Iterator[Listener]:
    listener = Listener()
    env["FARCALL_BROKER_URL"] = listener.url
    env["FARCALL_TOKEN"] = "a-user-token"
    yield listener
    listener.close()


def test_the_corpus_has_every_cluster() -> None:
    assert CLUSTERS == sorted([
        "anvil", "bebop", "bridges-2", "delta", "expanse", "expanse_mpi", "faster", "frontera",
        "kubernetes", "midway", "midway_apptainer", "ospool", "perlmutter", "polaris",
        "stampede3", "uchicago_ai_cluster", "worker_pinning"])


@pytest.mark.parametrize("name", CLUSTERS)
def test_each_cluster_config_checks_and_builds_its_provider_and_launcher(
    name: str, env: dict[str, str], kube: FakeKubeAPI
) -> None:
    raw = install(env, name)
    done = cli(env, "check", name)
    assert done.returncode == 0, done.stderr
    provider = raw["engine"]["provider"]
    assert f"\n  provider: {provider['type']}" in done.stdout
    launcher = expected_launcher(provider)
    if launcher is None:
        assert "  launcher:" not in done.stdout
    else:
        assert f"\n  launcher: {launcher}" in done.stdout
    executor = "MPIExecutor" if raw["engine"]["type"] == "GlobusMPIEngine" else "HighThroughputExecutor"
    assert f"\n  executor: {executor}" in done.stdout
    engine = raw["engine"]["type"]
    farcall_engine = {"GlobusComputeEngine": "ParslEngine", "GlobusMPIEngine": "MPIEngine"}[engine]
    assert f"\n  engine: {engine} (farcall's {farcall_engine})" in done.stdout
    assert kube.requests == [], "check called the Kubernetes API"


def test_check_warns_of_an_interface_this_host_lacks_and_start_refuses_it(
    env: dict[str, str], broker_port: Listener
) -> None:
    install(env, "bebop")
    checked = cli(env, "check", "bebop")
    assert checked.returncode == 0, checked.stderr
    assert "address: address_by_interface(ifname=ib0), resolved when the endpoint starts" in checked.stdout
    warning = next(line for line in checked.stdout.splitlines() if line.startswith("WARNING engine.address"))
    assert "interface 'ib0' is not on this host" in warning and "lo (127.0.0.1)" in warning

    started = cli(env, "start", "bebop")
    assert started.returncode == 1
    assert "engine.address: interface 'ib0' is not on this host" in started.stderr
    assert "the interfaces here are: lo (127.0.0.1)" in started.stderr
    assert "{type: address_by_route}" in started.stderr  # the forms it accepts
    assert broker_port.connections == 0


def test_an_interface_this_host_has_resolves_in_check(env: dict[str, str]) -> None:
    text = (CORPUS / "bebop.yaml").read_text().replace("ifname: ib0", "ifname: lo")
    install(env, "bebop", text)
    checked = cli(env, "check", "bebop")
    assert checked.returncode == 0, checked.stderr
    assert "\n  address: 127.0.0.1 (address_by_interface(ifname=lo))" in checked.stdout
    assert "WARNING engine.address: interface" not in checked.stdout


def test_start_without_a_kube_config_fails_with_the_check_message_before_connecting(
    env: dict[str, str], broker_port: Listener, tmp_path: Path
) -> None:
    install(env, "kubernetes")
    env["KUBECONFIG"] = str(tmp_path / "no-such-kubeconfig")
    env["HOME"] = str(tmp_path)  # no ~/.kube/config either
    checked = cli(env, "check", "kubernetes")
    started = cli(env, "start", "kubernetes")
    assert checked.returncode == started.returncode == 1
    message = "engine.provider: KubernetesProvider found no Kubernetes configuration"
    assert message in checked.stderr and message in started.stderr
    assert "KUBECONFIG" in started.stderr
    assert broker_port.connections == 0


def test_every_engine_problem_of_a_file_is_reported_at_once(env: dict[str, str]) -> None:
    install(env, "broken", """
engine:
  type: GlobusComputeEngine
  max_workers_per_nod: 2
  strategy: {type: ElasticStrategy}
  address: {type: address_by_interface}
  job_status_kwargs: {strategy_perod: 5}
  provider:
    type: SlurmProvider
    partiton: debug
    acount: abc123
    launcher:
      type: SrunLaunch
""")
    done = cli(env, "check", "broken")
    assert done.returncode == 1
    assert "7 problems:" in done.stderr, done.stderr
    for key in ("engine.max_workers_per_nod: unknown key", "engine.strategy.type: 'ElasticStrategy'",
                "engine.address.ifname: address_by_interface needs ifname",
                "engine.job_status_kwargs.strategy_perod:",
                "engine.provider.partiton: not an option of SlurmProvider",
                "engine.provider.acount: not an option of SlurmProvider",
                "engine.provider.launcher.type: 'SrunLaunch' is not a Parsl launcher"):
        assert f"  - {key}" in done.stderr, key
    assert "valid choices: SimpleLauncher" in done.stderr
