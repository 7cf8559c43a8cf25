"""farcall-endpoint configure / start / list / stop as real processes, against the fake broker."""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from farcall.endpoint import embedded
from farcall.endpoint.embedded import EmbeddedEndpoint
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.registration import Registration, save_registration
from harness.procs import wait_until
from tests.endpoint.fake_broker import CREDENTIAL, ENDPOINT_ID, FakeBroker
from tests.endpoint.helpers import make_task, value_of


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "farcall.endpoint", *args], env=env,
                          capture_output=True, text=True, timeout=90)


def test_configure_start_list_stop(broker: FakeBroker, env: dict[str, str], tmp_path: Path) -> None:
    done = cli(env, "configure", "ep", "--engine", "ProcessPoolEngine", "--broker-url",
               broker.url, "--max-workers", "2")
    assert done.returncode == 0, done.stderr
    directory = Path(env["FARCALL_HOME"]) / "endpoints" / "ep"
    assert (directory / "config.yaml").is_file()
    listed = cli(env, "list").stdout
    assert "ep" in listed and "stopped" in listed

    # registered before (as a first start would), and a stale pid file left by a crash
    save_registration(directory, Registration(ENDPOINT_ID, CREDENTIAL, "ep", broker.url))
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (directory / "endpoint.pid").write_text(f"{gone.pid}\n")

    log = tmp_path / "endpoint.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "farcall.endpoint", "start", "ep"],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        broker.wait(lambda: broker.hello(1), 30, f"endpoint connects\n{log.read_text()}")
        pid_file = directory / "endpoint.pid"
        assert pid_file.read_text().strip() == str(proc.pid)
        listed = cli(env, "list").stdout
        assert ENDPOINT_ID in listed and "running" in listed, listed
        again = cli(env, "start", "ep")
        assert again.returncode == 1 and "already running" in again.stderr

        def cube(x: int) -> int:
            return x**3

        task = make_task(cube, 3)
        broker.send_tasks([task])
        broker.wait(lambda: broker.result_ids() == {task.task_id}, 30, "result")
        assert value_of(broker.results()[0]) == 27

        stopped = cli(env, "stop", ENDPOINT_ID)  # by id, as Globus Compute operators may
        assert stopped.returncode == 0, stopped.stderr
        assert "stopped endpoint ep" in stopped.stdout
        assert proc.wait(30) == 0, log.read_text()
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
    assert not pid_file.exists()
    assert "stopped" in cli(env, "list").stdout
    assert "not running" in cli(env, "stop", "ep").stdout


def test_start_refuses_a_broker_the_endpoint_is_not_registered_with(
    broker: FakeBroker, env: dict[str, str]
) -> None:
    """In the foreground and as a daemon, before it connects (``--register-again`` reaching the
    daemon: test_daemon.py; registering again: tests/integration/test_endpoint_identity.py)."""
    assert cli(env, "configure", "ep", "--engine", "ThreadPoolEngine",
               "--broker-url", broker.url).returncode == 0
    directory = Path(env["FARCALL_HOME"]) / "endpoints" / "ep"
    elsewhere = "http://127.0.0.1:9"
    save_registration(directory, Registration(ENDPOINT_ID, CREDENTIAL, "ep", elsewhere, "other"))
    for args in (["start", "ep"], ["start", "ep", "--detach", "--wait", "30"]):
        done = cli(env, *args)
        assert done.returncode == 1, done
        for part in (elsewhere, "broker id other", broker.url, f"broker id {broker.broker_id}",
                     "farcall-endpoint start ep --register-again"):
            assert part in done.stderr, (args, part, done.stderr)
    assert broker.connections == 0


def test_start_without_config_or_broker_fails_clearly(env: dict[str, str]) -> None:
    done = cli(env, "start", "nothing")
    assert done.returncode == 1 and "farcall-endpoint configure nothing" in done.stderr
    assert cli(env, "configure", "nourl").returncode == 0
    done = cli(env, "start", "nourl")
    assert done.returncode == 1 and "FARCALL_BROKER_URL" in done.stderr
    assert cli(env, "configure", "x", "--engine", "Nope").returncode == 2


def test_embedded_endpoint_runs_tasks_and_stops(
    broker: FakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    registered: list[tuple[str, str, str]] = []

    def fake_register(url: str, token: str, name: str) -> Registration:
        registered.append((url, token, name))
        return Registration(ENDPOINT_ID, CREDENTIAL, name, url)

    monkeypatch.setattr(embedded, "register_endpoint", fake_register)
    with EmbeddedEndpoint(broker.url, "fcu_token", engine="ThreadPoolEngine") as ep:
        assert ep.endpoint_id == ENDPOINT_ID
        assert registered == [(broker.url, "fcu_token", "demo")]
        assert broker.hello(1) is not None  # connected before __enter__ returned

        def neg(x: int) -> int:
            return -x

        task = make_task(neg, 5)
        broker.send_tasks([task])
        broker.wait(lambda: broker.result_ids() == {task.task_id}, 30, "result")
        agent = ep.agent
    assert agent is not None and not agent.connected.is_set()
    wait_until(lambda: ep.agent is None, 5, "agent released")


def test_embedded_endpoint_rejects_unknown_engine_before_registering() -> None:
    with pytest.raises(EndpointConfigError, match="valid choices"):
        EmbeddedEndpoint("http://127.0.0.1:9", "t", engine="Nope").start()
