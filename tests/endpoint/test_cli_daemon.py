"""farcall-endpoint as a daemon (start --detach, status, list, restart, stop, delete), as real
processes against the fake broker; also hooks, allowed_functions and configure --provider."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
import yaml

from farcall.endpoint.config import load_config
from farcall.endpoint.registration import Registration, load_registration, save_registration
from farcall.errors import FunctionNotAllowed
from tests.endpoint.fake_broker import CREDENTIAL, ENDPOINT_ID, FakeBroker
from tests.endpoint.helpers import make_task, value_of

WAIT = 30.0
"""Seconds ``start --detach`` may wait for the connection; a connected start returns long before."""


# ------------------------------------------------------------------ helpers


def alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie counts as gone)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def is_endpoint_process(pid: int) -> bool:
    """Whether ``pid`` is a live ``farcall.endpoint`` process (never kill anything else)."""
    try:
        process = psutil.Process(pid)
        return process.status() != psutil.STATUS_ZOMBIE and "farcall.endpoint" in process.cmdline()
    except psutil.Error:
        return False


class Daemons:
    """The endpoint daemons of one test; whatever is still running at the end gets killed."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.seen: set[int] = set()

    def pid(self, directory: Path) -> int:
        """The pid in ``directory``'s pid file (it must be there), remembered for the cleanup."""
        pid = int((directory / "endpoint.pid").read_text().strip())
        self.seen.add(pid)
        return pid

    def kill_all(self) -> None:
        pids = set(self.seen)
        for pid_file in self.home.glob("endpoints/*/endpoint.pid"):
            try:
                pids.add(int(pid_file.read_text().strip()))
            except (OSError, ValueError):
                pass
        for pid in pids:
            if not is_endpoint_process(pid):
                continue
            try:
                victims = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
            except psutil.NoSuchProcess:
                continue
            for victim in victims:
                try:
                    victim.send_signal(signal.SIGKILL)
                except psutil.NoSuchProcess:
                    pass
            psutil.wait_procs(victims, timeout=10)


@pytest.fixture
def daemons(env: dict[str, str]) -> Iterator[Daemons]:
    found = Daemons(Path(env["FARCALL_HOME"]))
    yield found
    found.kill_all()


def cli(env: dict[str, str], *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """``farcall-endpoint ARGS`` as a process without a terminal (stdin is /dev/null)."""
    return subprocess.run([sys.executable, "-m", "farcall.endpoint", *args], env=env, cwd=cwd,
                          stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=90)


def endpoint_dir(env: dict[str, str], name: str) -> Path:
    return Path(env["FARCALL_HOME"]) / "endpoints" / name


def edit_config(directory: Path, **changes: Any) -> None:
    """Change top-level keys of ``config.yaml`` (``None`` removes a key)."""
    path = directory / "config.yaml"
    config = yaml.safe_load(path.read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key, None)
        else:
            config[key] = value
    path.write_text(yaml.safe_dump(config))


def set_up(env: dict[str, str], broker: FakeBroker, name: str, engine: str = "ThreadPoolEngine",
           **changes: Any) -> Path:
    """Configure ``name`` with 2 workers for ``broker``, apply ``changes``, register it; its directory."""
    done = cli(env, "configure", name, "--engine", engine, "--broker-url", broker.url,
               "--max-workers", "2")
    assert done.returncode == 0, done.stderr
    directory = endpoint_dir(env, name)
    if changes:
        edit_config(directory, **changes)
    save_registration(directory, Registration(ENDPOINT_ID, CREDENTIAL, name, broker.url))
    return directory


def start_detached(env: dict[str, str], name: str) -> subprocess.CompletedProcess[str]:
    """``start NAME --detach``, which must succeed and report the connection."""
    started = cli(env, "start", name, "--detach", "--wait", str(WAIT))
    assert started.returncode == 0, f"{started.stdout}\n{started.stderr}"
    assert f"started endpoint {name} ({ENDPOINT_ID})" in started.stdout, started.stdout
    return started


def stop(env: dict[str, str], name: str) -> None:
    stopped = cli(env, "stop", name)
    assert stopped.returncode == 0, stopped.stderr
    assert f"stopped endpoint {name}" in stopped.stdout, stopped.stdout


def status_json(env: dict[str, str], name: str) -> dict[str, Any]:
    done = cli(env, "status", name, "--json")
    assert done.returncode == 0, done.stderr
    found: dict[str, Any] = json.loads(done.stdout)
    return found


def list_rows(env: dict[str, str]) -> dict[str, list[str]]:
    """``list`` as {NAME: [NAME, ENDPOINT ID, STATE, WORKERS]}, header row included."""
    done = cli(env, "list")
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.strip()]
    return {row[0]: row for row in rows}


# ------------------------------------------------------------------ tests


def test_detached_start_status_list_task_and_stop(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons
) -> None:
    """start --detach returns once connected and leaves a daemon with pid, log and status files;
    status and list show it running with the heartbeat's workers; it runs a task; stop ends it."""
    directory = set_up(env, broker, "ep", engine="ProcessPoolEngine")
    began = time.monotonic()
    start_detached(env, "ep")
    assert time.monotonic() - began < WAIT / 2  # returned on the connection, not at the deadline
    assert broker.hello(1) is not None  # connected before the command returned
    pid = daemons.pid(directory)
    assert alive(pid)
    assert (directory / "endpoint.log").is_file()
    on_disk = json.loads((directory / "status.json").read_text())
    assert on_disk["pid"] == pid and on_disk["connected"] is True
    assert on_disk["endpoint_id"] == ENDPOINT_ID

    text = cli(env, "status", "ep")
    assert text.returncode == 0, text.stderr
    assert f"endpoint   ep ({ENDPOINT_ID})" in text.stdout, text.stdout
    assert f"state      running (pid {pid})" in text.stdout, text.stdout
    assert "workers    2 (2 idle)" in text.stdout, text.stdout
    status = status_json(env, "ep")
    assert status["state"] == "running" and status["pid"] == pid
    assert status["endpoint_id"] == ENDPOINT_ID and status["connected"] is True
    assert status["heartbeat"]["workers"] == 2 and status["heartbeat"]["idle_workers"] == 2
    assert status["heartbeat"]["engine"] == "ProcessPoolEngine"

    rows = list_rows(env)
    assert rows["NAME"] == ["NAME", "ENDPOINT", "ID", "STATE", "WORKERS"]
    assert rows["ep"] == ["ep", ENDPOINT_ID, "running", "2"]

    def cube(x: int) -> int:
        return x**3

    task = make_task(cube, 3)
    broker.send_tasks([task])
    broker.wait(lambda: broker.result_ids() == {task.task_id}, 30, "the task's result")
    assert value_of(broker.results()[0]) == 27

    stop(env, "ep")
    assert not alive(pid)  # stop returns only once the daemon has exited
    assert not (directory / "endpoint.pid").exists()
    text = cli(env, "status", "ep")
    assert text.returncode == 0 and "state      stopped" in text.stdout, text.stdout
    assert "workers" not in text.stdout
    status = status_json(env, "ep")
    assert status["state"] == "stopped" and status["pid"] is None
    assert list_rows(env)["ep"] == ["ep", ENDPOINT_ID, "stopped", "-"]
    assert "not running" in cli(env, "stop", "ep").stdout


def test_restart_replaces_the_daemon_and_reconnects_as_the_same_endpoint(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons
) -> None:
    """restart stops the daemon, starts a new process that connects again with the same id."""
    directory = set_up(env, broker, "ep")
    start_detached(env, "ep")
    first = daemons.pid(directory)
    assert broker.connections == 1

    restarted = cli(env, "restart", "ep", "--wait", str(WAIT))
    assert restarted.returncode == 0, restarted.stderr
    assert "stopped endpoint ep" in restarted.stdout, restarted.stdout
    assert f"started endpoint ep ({ENDPOINT_ID})" in restarted.stdout, restarted.stdout
    second = daemons.pid(directory)
    assert second != first and not alive(first) and alive(second)
    assert broker.hello(2) is not None  # a second connection, to the same endpoint id's route
    registration = load_registration(directory)
    assert registration is not None and registration.endpoint_id == ENDPOINT_ID
    status = status_json(env, "ep")
    assert status["state"] == "running" and status["pid"] == second
    assert status["endpoint_id"] == ENDPOINT_ID and status["connected"] is True

    def double(x: int) -> int:
        return 2 * x

    task = make_task(double, 21)
    broker.send_tasks([task])
    broker.wait(lambda: task.task_id in broker.result_ids(2), 30, "a result on the new connection")
    assert value_of(broker.results(2)[0]) == 42
    stop(env, "ep")
    assert not alive(second)


def test_failing_endpoint_setup_fails_detached_start_with_the_log_tail(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons
) -> None:
    """start --detach with an endpoint_setup that exits 3 returns 1 at once and shows why."""
    directory = set_up(env, broker, "ep", endpoint_setup="echo preparing scratch; exit 3")
    began = time.monotonic()
    done = cli(env, "start", "ep", "--detach", "--wait", str(WAIT))
    assert time.monotonic() - began < WAIT / 2
    assert done.returncode == 1, done.stdout
    assert "exited at start" in done.stderr, done.stderr
    assert "endpoint_setup failed (exit code 3)" in done.stderr, done.stderr
    assert "preparing scratch" in done.stderr, done.stderr
    assert not (directory / "endpoint.pid").exists()
    assert broker.connections == 0
    assert "state      stopped" in cli(env, "status", "ep").stdout


def test_setup_and_teardown_hooks_run_around_the_daemon(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons, tmp_path: Path
) -> None:
    """endpoint_setup runs before the daemon connects; endpoint_teardown only after it stops."""
    setup, teardown = tmp_path / "setup.marker", tmp_path / "teardown.marker"
    directory = set_up(env, broker, "ep",
                       endpoint_setup=f"pwd > {shlex.quote(str(setup))}",
                       endpoint_teardown=f"touch {shlex.quote(str(teardown))}")
    start_detached(env, "ep")
    pid = daemons.pid(directory)
    assert setup.read_text().strip() == str(directory)  # ran, in the endpoint's directory
    assert not teardown.exists()
    stop(env, "ep")
    assert not alive(pid)
    assert teardown.exists()


def test_allowed_functions_refuses_other_functions_without_running_them(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons, tmp_path: Path
) -> None:
    """With allowed_functions set, an allowed function runs; another one fails with
    FunctionNotAllowed and never runs."""

    def allowed(marker: str) -> str:
        import pathlib

        pathlib.Path(marker).write_text("ran")
        return "allowed ran"

    def refused(marker: str) -> str:
        import pathlib

        pathlib.Path(marker).write_text("ran")
        return "refused ran"

    ran, not_ran = tmp_path / "allowed.marker", tmp_path / "refused.marker"
    good, bad = make_task(allowed, str(ran)), make_task(refused, str(not_ran))
    assert good.function_id != bad.function_id
    directory = set_up(env, broker, "ep", allowed_functions=[good.function_id])
    start_detached(env, "ep")
    daemons.pid(directory)

    broker.send_tasks([good, bad])
    broker.wait(lambda: broker.result_ids() == {good.task_id, bad.task_id}, 30, "both results")
    results = {r.task_id: r for r in broker.results()}
    assert value_of(results[good.task_id]) == "allowed ran"
    assert ran.read_text() == "ran"
    with pytest.raises(FunctionNotAllowed, match=bad.function_id):
        value_of(results[bad.task_id])
    assert not not_ran.exists()
    assert bad.task_id not in broker.started_ids()
    stop(env, "ep")


def test_delete_local_only_removes_a_stopped_endpoint(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons
) -> None:
    """delete --yes refuses when the broker cannot be told; with --local-only it removes the files."""
    directory = set_up(env, broker, "ep")
    start_detached(env, "ep")
    pid = daemons.pid(directory)
    stop(env, "ep")
    assert not alive(pid) and (directory / "endpoint.log").is_file()

    # no FARCALL_TOKEN: the broker cannot be asked to delete the endpoint
    kept = cli(env, "delete", "ep", "--yes")
    assert kept.returncode == 1 and "--local-only" in kept.stderr, kept.stderr
    assert directory.is_dir()
    deleted = cli(env, "delete", "ep", "--yes", "--local-only")
    assert deleted.returncode == 0, deleted.stderr
    assert f"removed {directory}" in deleted.stdout
    assert "not deleted at the broker" in deleted.stderr
    assert not directory.exists()
    assert "ep" not in list_rows(env)


def test_delete_needs_yes_without_a_terminal_and_an_existing_endpoint(
    broker: FakeBroker, env: dict[str, str]
) -> None:
    """delete without --yes and without a TTY fails asking for --yes; an unknown name fails clearly."""
    directory = set_up(env, broker, "ep")
    unconfirmed = cli(env, "delete", "ep", "--local-only")
    assert unconfirmed.returncode == 1
    assert "cannot be undone; pass --yes" in unconfirmed.stderr, unconfirmed.stderr
    assert (directory / "config.yaml").is_file() and (directory / "endpoint.json").is_file()

    unknown = cli(env, "delete", "ghost", "--yes", "--local-only")
    assert unknown.returncode == 1
    assert "endpoint 'ghost' does not exist" in unknown.stderr, unknown.stderr
    assert "Traceback" not in unknown.stderr


def test_stale_pid_file_does_not_block_detached_start(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons
) -> None:
    """A pid file naming a process that has exited is ignored and replaced by the new daemon's."""
    directory = set_up(env, broker, "ep")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    (directory / "endpoint.pid").write_text(f"{gone.pid}\n")
    assert status_json(env, "ep")["state"] == "stopped"

    start_detached(env, "ep")
    pid = daemons.pid(directory)
    assert pid != gone.pid and alive(pid)
    assert broker.hello(1) is not None
    stop(env, "ep")
    assert not (directory / "endpoint.pid").exists()


def test_detached_start_with_a_relative_farcall_home(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons, tmp_path: Path
) -> None:
    """FARCALL_HOME relative to the caller's directory still finds the config in the daemon
    (which runs in the endpoint's directory)."""
    directory = set_up(env, broker, "ep")
    relative = {**env, "FARCALL_HOME": os.path.relpath(env["FARCALL_HOME"], tmp_path)}
    started = cli(relative, "start", "ep", "--detach", "--wait", str(WAIT), cwd=tmp_path)
    assert started.returncode == 0, f"{started.stdout}\n{started.stderr}"
    assert f"started endpoint ep ({ENDPOINT_ID})" in started.stdout, started.stdout
    pid = daemons.pid(directory)
    assert broker.hello(1) is not None
    stopped = cli(relative, "stop", "ep", cwd=tmp_path)
    assert stopped.returncode == 0, stopped.stderr
    assert not alive(pid)


def test_configure_parsl_engine_with_slurm_provider(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """configure --engine ParslEngine --provider SlurmProvider writes a config load_config accepts,
    with a SlurmProvider and its launcher; --provider with the default engine fails clearly."""
    done = cli(env, "configure", "hpc", "--engine", "ParslEngine", "--provider", "SlurmProvider")
    assert done.returncode == 0, done.stderr
    monkeypatch.setenv("FARCALL_HOME", env["FARCALL_HOME"])
    config = load_config("hpc")
    assert config.engine["type"] == "ParslEngine"
    provider = config.engine["provider"]
    assert provider["type"] == "SlurmProvider"
    assert provider["launcher"] == {"type": "SrunLauncher"}

    refused = cli(env, "configure", "cpu", "--provider", "SlurmProvider")
    assert refused.returncode == 1
    assert "--provider SlurmProvider needs --engine ParslEngine" in refused.stderr, refused.stderr
    assert not (endpoint_dir(env, "cpu") / "config.yaml").exists()


def test_detached_start_logs_where_log_dir_stdout_and_stderr_say_with_debug(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons
) -> None:
    """Globus Compute's log_dir, stdout, stderr and debug keys, honoured by start --detach; the
    warnings of the file are printed by the start."""
    directory = set_up(env, broker, "ep", log_dir="logs", stdout="out.log", stderr="err.log",
                       debug=True, amqp_port=443)
    started = start_detached(env, "ep")
    assert "amqp_port: ignored" in started.stderr, started.stderr
    assert str(directory / "logs" / "err.log") in started.stdout  # "log: ..." names it
    pid = daemons.pid(directory)
    log = directory / "logs" / "err.log"
    assert " DEBUG " in log.read_text() and "connected to" in log.read_text()
    assert (directory / "logs" / "out.log").is_file()
    assert not (directory / "endpoint.log").exists()
    stop(env, "ep")
    assert not alive(pid)


def test_a_detached_start_that_fails_shows_the_tail_of_its_stderr_file(
    broker: FakeBroker, env: dict[str, str], daemons: Daemons
) -> None:
    set_up(env, broker, "ep", stderr="err.log", endpoint_setup="echo no scratch; exit 3")
    done = cli(env, "start", "ep", "--detach", "--wait", str(WAIT))
    assert done.returncode == 1, done.stdout
    assert "err.log" in done.stderr and "endpoint_setup failed (exit code 3)" in done.stderr
