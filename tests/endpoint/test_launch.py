"""The launch of a user endpoint: the privilege drop (or, for a manager run by an ordinary
account, staying that account), its environment, its files, its refusals.

The whole path (as real accounts, exec'ing the agent) is tests/integration/test_multi_user.py's.
"""

from __future__ import annotations

import json
import os
import pwd
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from farcall.endpoint.multiuser import launch as launch_module
from farcall.endpoint.multiuser.events import EVENTS_FD_VARIABLE
from farcall.endpoint.multiuser.launch import (
    LaunchSpec,
    LaunchUser,
    become,
    drop_privileges,
    user_environment,
    write_files,
)
from farcall.endpoint.multiuser.privileges import CAP_SETUID
from farcall.endpoint.registration import load_registration

needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="changing user needs root")


def spec(home: Path, **changes: object) -> LaunchSpec:
    values: dict[str, object] = dict(
        user=LaunchUser(name="ada", uid=4242, gid=4242, home=str(home), shell="/bin/bash"),
        directory_name="site.1234abcd", endpoint_id="1234abcd-0000-0000-0000-000000000000",
        credential="fce_secret", broker_url="http://127.0.0.1:9", config="heartbeat_period: 2\n",
        environment={"HOME": "/root", "SCRATCH": "/scratch/ada", "PATH": "/opt/site/bin"},
        events_fd=7)
    values.update(changes)
    return LaunchSpec.model_validate(values)


def in_child(action: object) -> dict[str, object]:
    """Run ``action()`` in a forked child; what it returned (JSON) or the error it raised."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(r)
        try:
            out = {"value": action()}  # type: ignore[operator]
        except BaseException as e:  # noqa: BLE001
            out = {"error": f"{type(e).__name__}: {e}"}
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as f:
        data = f.read()
    os.waitpid(pid, 0)
    return dict(json.loads(data))


@needs_root
def test_the_drop_is_for_good_and_takes_the_users_groups() -> None:
    nobody = pwd.getpwnam("nobody")

    def drop() -> object:
        drop_privileges("nobody", nobody.pw_uid, nobody.pw_gid)
        try:
            os.setuid(0)
            regained = True
        except PermissionError:
            regained = False
        return [os.getresuid(), os.getresgid(), sorted(os.getgroups()), regained]

    found = in_child(drop)
    uid, gid = nobody.pw_uid, nobody.pw_gid
    assert found == {"value": [[uid] * 3, [gid] * 3, sorted(os.getgrouplist("nobody", gid)), False]}


@needs_root
def test_an_ordinary_account_launching_itself_changes_no_id() -> None:
    """A manager run by an ordinary account starts its owner's user endpoint as that account:
    the launch neither calls setresuid nor initgroups (which would fail without privilege),
    and still proves root cannot be gained."""
    nobody = pwd.getpwnam("nobody")
    user = LaunchUser(name="nobody", uid=nobody.pw_uid, gid=nobody.pw_gid, home="/nonexistent")

    def as_nobody() -> object:
        os.setgroups([])
        os.setresgid(nobody.pw_gid, nobody.pw_gid, nobody.pw_gid)
        os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
        before = [os.getresuid(), os.getresgid(), os.getgroups()]
        become(user)
        return before == [os.getresuid(), os.getresgid(), os.getgroups()]

    assert in_child(as_nobody) == {"value": True}

    def with_capability() -> object:
        os.setresuid(nobody.pw_uid, nobody.pw_uid, nobody.pw_uid)
        launch_module.effective_capabilities = lambda: 1 << CAP_SETUID
        become(user)
        return "became"

    found = str(in_child(with_capability).get("error"))
    assert "LaunchError" in found and "may change user" in found


def test_root_is_refused_before_anything_changes() -> None:
    def drop() -> object:
        drop_privileges("root", 0, 0)
        return os.getresuid()

    found = in_child(drop)
    assert "LaunchError" in str(found["error"]) and "root" in str(found["error"])
    with pytest.raises(ValueError):
        LaunchUser(name="root", uid=0, gid=0, home="/root")


def test_the_environment_is_the_administrators_with_the_account_fixed(tmp_path: Path) -> None:
    env = user_environment(spec(tmp_path), "/opt/farcall/venv/bin/python")
    assert env == {
        "HOME": str(tmp_path), "USER": "ada", "LOGNAME": "ada", "SHELL": "/bin/bash",
        "SCRATCH": "/scratch/ada", "FARCALL_HOME": str(tmp_path / ".farcall"),
        "PATH": "/opt/farcall/venv/bin:/opt/site/bin", EVENTS_FD_VARIABLE: "7",
    }
    env = user_environment(spec(tmp_path, environment={}, events_fd=None), "/v/bin/python")
    assert env["PATH"] == "/v/bin:/usr/local/bin:/usr/bin:/bin" and EVENTS_FD_VARIABLE not in env


def test_the_files_are_the_users_alone_and_make_an_ordinary_endpoint(tmp_path: Path) -> None:
    os.umask(0o022)
    (tmp_path / ".farcall").mkdir(mode=0o755)
    directory = write_files(spec(tmp_path))
    assert directory == tmp_path / ".farcall" / "endpoints" / "site.1234abcd"
    for path in (tmp_path / ".farcall", directory.parent, directory):
        assert stat.S_IMODE(path.stat().st_mode) == 0o700, path
    for name in ("config.yaml", "endpoint.json"):
        assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name
    assert (directory / "config.yaml").read_text() == "heartbeat_period: 2\n"
    registration = load_registration(directory)
    assert registration is not None
    assert (registration.endpoint_id, registration.credential, registration.broker_url) == (
        "1234abcd-0000-0000-0000-000000000000", "fce_secret", "http://127.0.0.1:9")
    # A second start (a new credential after the manager's was rotated) replaces it.
    write_files(spec(tmp_path, credential="fce_new"))
    registration = load_registration(directory)
    assert registration is not None and registration.credential == "fce_new"


def test_a_bad_spec_fails_the_launch_saying_why(tmp_path: Path) -> None:
    r, w = os.pipe()
    os.write(w, json.dumps({"user": {"name": "root", "uid": 0, "gid": 0, "home": "/root"}}).encode())
    os.close(w)
    done = subprocess.run([sys.executable, "-m", "farcall.endpoint.multiuser.launch",
                           "--spec-fd", str(r)], pass_fds=(r,), capture_output=True, text=True,
                          timeout=60)
    os.close(r)
    assert done.returncode == 1
    assert "farcall launch: error:" in done.stderr and "uid" in done.stderr
