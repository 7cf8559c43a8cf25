"""What the agent keeps from its tasks: no user token after registration, a process that other
processes of its account cannot read (farcall.endpoint.lockdown)."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from farcall.endpoint import daemon, lockdown
from farcall.endpoint.errors import EndpointError
from farcall.endpoint.registration import Registration, save_registration

TOKEN = "fct_user-token-of-the-owner"

DROPPED = """
import json, os, subprocess
from farcall.endpoint import lockdown
dropped = lockdown.drop_user_token()
with open("/proc/self/environ", "rb") as f:
    own = f.read()
child = subprocess.run(["cat", "/proc/self/environ"], capture_output=True).stdout
print(json.dumps({"dropped": dropped, "environ": "FARCALL_TOKEN" in os.environ,
                  "proc": TOKEN.encode() in own, "child": TOKEN.encode() in child}))
"""


def test_the_user_token_leaves_the_agents_environment_and_its_proc_file() -> None:
    """``del os.environ`` alone leaves the token in ``/proc/<pid>/environ``."""
    script = f"TOKEN = {TOKEN!r}\n" + DROPPED
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "FARCALL_TOKEN": TOKEN}, check=True)
    assert json.loads(done.stdout) == {"dropped": True, "environ": False, "proc": False,
                                       "child": False}


HOLDER = """
import ctypes, os, sys, time
from farcall.endpoint import lockdown
if os.geteuid() == 0:  # as root, become nobody (root reads every process's files)
    os.setgroups([])
    os.setgid(65534)
    os.setuid(65534)
if sys.argv[1] == "undumpable":
    assert lockdown.make_undumpable()
else:  # as an agent is before the call (a change of uid above cleared the flag)
    ctypes.CDLL(None).prctl(lockdown.PR_SET_DUMPABLE, 1, 0, 0, 0)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("mode", ["undumpable", "plain"])
def test_another_process_of_the_account_cannot_read_an_undumpable_ones_environ(
    mode: str
) -> None:
    """A task runs as the agent's account: once the agent is non-dumpable, the task cannot read
    its ``/proc/<pid>/environ`` (nor its memory); without, it can (the control)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, mode], stdout=subprocess.PIPE,
                              text=True, cwd="/", env={**os.environ, "OWNER_SECRET": "s3cret"})
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        nobody = 65534 if os.geteuid() == 0 else None  # root reads every process's files
        reader = subprocess.run(["cat", f"/proc/{holder.pid}/environ"], capture_output=True,
                                cwd="/", user=nobody, group=nobody,
                                extra_groups=[] if nobody is not None else None)
    finally:
        holder.kill()
        holder.wait()
    if mode == "undumpable":
        assert reader.returncode != 0 and b"s3cret" not in reader.stdout
        assert b"Permission denied" in reader.stderr
    else:
        assert reader.returncode == 0 and b"s3cret" in reader.stdout


def test_a_user_token_at_start_is_warned_about(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path))
    monkeypatch.setenv("FARCALL_TOKEN", TOKEN)
    (tmp_path / "config").write_text(f'token = "{TOKEN}"\n')
    with caplog.at_level(logging.WARNING, logger=lockdown.__name__):
        lockdown.warn_user_token(registered=True)
    env, file = (r.getMessage() for r in caplog.records)
    assert "FARCALL_TOKEN is set" in env and "not needed once the endpoint is registered" in env
    assert str(tmp_path / "config") in file and "any task on this endpoint" in file
    assert TOKEN not in env + file


def test_a_registered_endpoints_daemon_does_not_get_the_token(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``start --detach`` passes the user token to the daemon only when it must register."""
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path))
    monkeypatch.setenv("FARCALL_TOKEN", TOKEN)
    passed: list[dict[str, str]] = []

    class Exited:
        returncode = 1

        def __init__(self, *args: Any, env: dict[str, str], **kwargs: Any) -> None:
            passed.append(env)

        def poll(self) -> int:
            return 1

    monkeypatch.setattr(daemon.subprocess, "Popen", Exited)
    directory = tmp_path / "endpoints" / "lab"
    for registered in (False, True):  # the first start registers: it needs the token
        if registered:
            save_registration(directory, Registration("ep-1", "cred", "lab", "http://b"))
        with pytest.raises(EndpointError, match="exited at start"):
            daemon.start_detached("lab", directory, wait=5)
    with pytest.raises(EndpointError):
        daemon.start_detached("lab", directory, wait=5, register_again=True)
    assert [env.get("FARCALL_TOKEN") for env in passed] == [TOKEN, None, TOKEN]
