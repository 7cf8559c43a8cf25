"""daemon: the pid file, status file and hooks that farcall-endpoint manages agents with.

The daemon as a real detached process is in test_cli_daemon; these run in this process.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from farcall.endpoint import daemon
from farcall.endpoint.errors import EndpointError


def test_pid_file_is_held_while_running_and_refuses_a_second_agent(tmp_path: Path) -> None:
    directory = tmp_path / "ep"
    other = subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        with daemon.pid_file(directory):
            assert daemon.running_pid(directory) == os.getpid()
            (directory / daemon.PID_FILE).write_text(f"{other.pid}\n")
            with pytest.raises(EndpointError, match=rf"already running \(pid {other.pid}\).*stop ep"):
                with daemon.pid_file(directory):
                    pass
        assert (directory / daemon.PID_FILE).exists(), "another agent's pid file must stay"
    finally:
        other.communicate(b"")
    assert daemon.running_pid(directory) is None, "a stale pid file counts as not running"
    with daemon.pid_file(directory):
        pass
    assert not (directory / daemon.PID_FILE).exists()


def test_state_follows_the_pid_file_and_the_status_file(tmp_path: Path) -> None:
    assert daemon.state(tmp_path) == ("stopped", None)
    with daemon.pid_file(tmp_path):
        assert daemon.state(tmp_path) == ("connecting", None)
        daemon.write_status(tmp_path, {"connected": True, "broker_url": "http://b"})
        state, status = daemon.state(tmp_path)
        assert state == "running" and status == daemon.read_status(tmp_path)
        assert status is not None and status["pid"] == os.getpid()


def test_failing_setup_stops_the_start_and_teardown_runs_after_a_failing_body(
    tmp_path: Path,
) -> None:
    with pytest.raises(EndpointError, match="endpoint_setup failed.*oops.*Fix the command"):
        with daemon.hooks("echo oops >&2; exit 3", "touch torn-down", tmp_path):
            pytest.fail("the body must not run after a failed setup")
    assert not (tmp_path / "torn-down").exists()
    with pytest.raises(RuntimeError), daemon.hooks("touch set-up", "touch torn-down; exit 1", tmp_path):
        assert (tmp_path / "set-up").exists()
        raise RuntimeError("the agent failed")  # not masked by the teardown's failure
    assert (tmp_path / "torn-down").exists()


@pytest.mark.parametrize("register_again", [False, True])
def test_a_detached_start_passes_register_again_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, register_again: bool
) -> None:
    """The daemon is ``farcall-endpoint start NAME`` again, with ``--register-again`` when asked
    (here an interpreter that prints its arguments and exits, so its log says what it got)."""
    fake = tmp_path / "python"
    fake.write_text('#!/bin/sh\necho "argv: $*"\nexit 3\n')
    fake.chmod(0o755)
    monkeypatch.setattr(daemon.sys, "executable", str(fake))
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path))
    with pytest.raises(EndpointError, match="exited at start") as caught:
        daemon.start_detached("ep", tmp_path / "ep", 30, register_again=register_again)
    flag = " --register-again" if register_again else ""
    assert f"argv: -m farcall.endpoint start ep{flag}\n" in str(caught.value) + "\n"


def test_log_files_follow_log_dir_stdout_and_stderr(tmp_path: Path) -> None:
    """Globus Compute's keys: log_dir relative to the endpoint's directory, the files to it."""
    ep = tmp_path / "ep"
    assert daemon.log_files(ep) == (ep / "endpoint.log", ep / "endpoint.log")
    assert daemon.log_files(ep, "logs") == (ep / "logs/endpoint.log", ep / "logs/endpoint.log")
    assert daemon.log_files(ep, "/var/log/x", "./out.log", "err.log") == (
        Path("/var/log/x/out.log"), Path("/var/log/x/err.log"))
    assert daemon.log_files(ep, None, None, "/tmp/e.log") == (ep / "endpoint.log",
                                                              Path("/tmp/e.log"))
    assert daemon.log_files(ep, "~/logs")[0] == Path.home() / "logs" / "endpoint.log"
