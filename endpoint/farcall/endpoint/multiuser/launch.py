"""Start one user endpoint as its user: ``python -m farcall.endpoint.multiuser.launch --spec-fd N``.

The manager runs this as root (or as its own ordinary account, for its owner), with only the
fds it passes (the spec's pipe, the events pipe) and a minimal environment. In this order, and
aborting at the first thing that fails:

1. read the ``LaunchSpec`` (JSON, the credential in it) from the pipe ``--spec-fd``: the
   credential is never on a command line nor in a file anyone else can read;
2. become the user for good (``become``): from root, ``setresgid``, ``initgroups``,
   ``setresuid`` (groups before the uid, which would forbid changing them after); when the user
   is already this process's own ordinary account, nothing changes. Then prove root cannot be
   (re)gained (``setuid(0)`` and ``setresuid(0, 0, 0)`` must fail with ``PermissionError``);
3. ask for SIGTERM when the manager dies (so no user endpoint outlives it), umask 0077,
   an environment of the administrator's ``user_environment.yaml`` and HOME, USER, LOGNAME,
   SHELL, PATH only, the user's home as working directory;
4. as the user, write ``~/.farcall/endpoints/<manager>.<id>/`` (every level 0700): the rendered
   ``config.yaml`` and ``endpoint.json`` (the registration, ``registration.py``), and send
   this process's output to ``endpoint.log`` there;
5. exec the ordinary agent, ``python -m farcall.endpoint start <manager>.<id>``.

Errors go to stderr, which the manager keeps in its own directory, and the exit code is 1.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from farcall.endpoint.config import CONFIG_FILE
from farcall.endpoint.multiuser.events import EVENTS_FD_VARIABLE
from farcall.endpoint.multiuser.privileges import USER_CHANGE, effective_capabilities
from farcall.endpoint.registration import Registration, save_registration

DEFAULT_PATH = "/usr/local/bin:/usr/bin:/bin"
LOG_FILE = "endpoint.log"
PR_SET_PDEATHSIG = 1
FIXED_VARIABLES = ("HOME", "USER", "LOGNAME", "SHELL", "FARCALL_HOME")
"""Set from the local account whatever ``user_environment.yaml`` says."""


class LaunchUser(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    uid: int = Field(gt=0)
    gid: int = Field(ge=0)
    home: str = Field(min_length=1)
    shell: str = ""


class LaunchSpec(BaseModel):
    """What the manager tells the launch about one user endpoint (on a pipe, never argv)."""

    model_config = ConfigDict(extra="forbid")

    user: LaunchUser
    directory_name: str
    """The user endpoint's directory under ``~/.farcall/endpoints``: ``<manager>.<id[:8]>``."""
    endpoint_id: str
    credential: str
    broker_url: str
    config: str
    """The user endpoint's ``config.yaml``, rendered by the manager."""
    environment: dict[str, str] = Field(default_factory=dict)
    events_fd: int | None = None
    manager_pid: int = 0
    """The manager's pid: if it is already gone when the launch asks to die with it, give up."""


class LaunchError(Exception):
    """The user endpoint cannot be started safely; the message says why."""


def drop_privileges(name: str, uid: int, gid: int) -> None:
    """Become ``uid``/``gid`` with ``name``'s groups, for good; ``LaunchError`` if root could be
    regained or the ids are not exactly the ones asked for."""
    if uid == 0:
        raise LaunchError("refusing to run a user endpoint as root (uid 0)")
    os.setresgid(gid, gid, gid)
    os.initgroups(name, gid)
    os.setresuid(uid, uid, uid)
    _prove_no_root(uid, "after dropping to")
    if os.getresuid() != (uid, uid, uid) or os.getresgid() != (gid, gid, gid):
        raise LaunchError(f"after the privilege drop the ids are uid {os.getresuid()} gid "
                          f"{os.getresgid()}, not {uid}/{gid}: the user endpoint is not started")


def stay_as_self(uid: int) -> None:
    """The user endpoint of a manager run by an ordinary account runs as that account: check that
    this process is it, with no way to another (no ``CAP_SETUID``/``CAP_SETGID``, a saved uid
    that is its own, ``setuid(0)`` refused); ``LaunchError`` otherwise."""
    if uid == 0 or os.getresuid() != (uid, uid, uid):
        raise LaunchError(f"asked to run a user endpoint as this process's own account (uid "
                          f"{uid}), but its ids are {os.getresuid()}: not started")
    if effective_capabilities() & USER_CHANGE:
        raise LaunchError(f"this process (uid {uid}) may change user (CAP_SETUID/CAP_SETGID), and "
                          "a manager that may never starts a user endpoint as its own account: "
                          "not started")
    _prove_no_root(uid, "as")


def become(user: LaunchUser) -> None:
    """Drop to ``user`` from root, or stay when ``user`` is this process's own ordinary account
    (a manager that cannot change user starts its owner's endpoints so); never ``setresuid`` or
    ``initgroups`` for the account it already is."""
    if os.geteuid() != 0 and user.uid == os.getuid():
        stay_as_self(user.uid)
    else:
        drop_privileges(user.name, user.uid, user.gid)


def _prove_no_root(uid: int, how: str) -> None:
    for attempt, call in (("setuid(0)", lambda: os.setuid(0)),
                          ("setresuid(0, 0, 0)", lambda: os.setresuid(0, 0, 0))):
        try:
            call()
        except PermissionError:
            continue
        raise LaunchError(f"{attempt} succeeded {how} uid {uid}: the privilege drop did not hold, "
                          "so the user endpoint is not started")


def die_with_parent(manager_pid: int) -> None:
    """SIGTERM this process when the manager ends (Linux; set after the privilege drop, which
    clears it, and kept across exec)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if manager_pid and os.getppid() != manager_pid:
        raise LaunchError("the manager exited while this user endpoint was starting")


def user_environment(spec: LaunchSpec, python: str) -> dict[str, str]:
    """The user endpoint's whole environment: the administrator's variables, then the account's
    HOME/USER/LOGNAME/SHELL, ``FARCALL_HOME``, and PATH with this Python's bin first."""
    user = spec.user
    env = dict(spec.environment)
    env.update(HOME=user.home, USER=user.name, LOGNAME=user.name, SHELL=user.shell or "/bin/sh",
               FARCALL_HOME=str(Path(user.home) / ".farcall"))
    env["PATH"] = f"{Path(python).parent}{os.pathsep}{env.get('PATH') or DEFAULT_PATH}"
    if spec.events_fd is not None:
        env[EVENTS_FD_VARIABLE] = str(spec.events_fd)
    return env


def private_dir(path: Path) -> Path:
    """``path`` as a directory readable by its owner only (made, or its mode set)."""
    path.mkdir(mode=0o700, exist_ok=True)
    if path.is_symlink() or not path.is_dir():
        raise LaunchError(f"{path} is not a directory")
    os.chmod(path, 0o700)
    return path


def write_files(spec: LaunchSpec) -> Path:
    """The user endpoint's directory with its ``config.yaml`` and ``endpoint.json`` (as the user)."""
    home = private_dir(Path(spec.user.home) / ".farcall")
    directory = private_dir(private_dir(home / "endpoints") / spec.directory_name)
    config = directory / CONFIG_FILE
    tmp = config.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(spec.config)
    os.replace(tmp, config)
    save_registration(directory, Registration(spec.endpoint_id, spec.credential,
                                              spec.directory_name, spec.broker_url))
    return directory


def read_spec(fd: int) -> LaunchSpec:
    with os.fdopen(fd, "rb") as f:
        return LaunchSpec.model_validate_json(f.read())


def launch(spec: LaunchSpec, python: str = sys.executable) -> None:
    """Steps 2 to 5 of this module's docstring; returns only by raising."""
    user = spec.user
    become(user)
    die_with_parent(spec.manager_pid)
    os.umask(0o077)
    env = user_environment(spec, python)
    try:
        os.chdir(user.home)
    except OSError as e:
        raise LaunchError(f"cannot work in {user.name}'s home directory {user.home}: {e}") from None
    directory = write_files(spec)
    out = os.open(directory / LOG_FILE, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(out, 1)
    os.dup2(out, 2)
    os.close(out)
    if spec.events_fd is not None:
        os.set_inheritable(spec.events_fd, True)
    os.execve(python, [python, "-m", "farcall.endpoint", "start", spec.directory_name], env)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m farcall.endpoint.multiuser.launch",
        description="Start a user endpoint as its user (run by a multi-user endpoint's manager).")
    parser.add_argument("--spec-fd", type=int, required=True,
                        help="the pipe the manager writes the launch spec to")
    args = parser.parse_args(argv)
    try:
        spec = read_spec(args.spec_fd)
        launch(spec)
    except (LaunchError, OSError, ValueError) as e:
        print(f"farcall launch: error: {e}", file=sys.stderr)
        return 1
    return 1  # not reached: launch execs


if __name__ == "__main__":
    sys.exit(main())
