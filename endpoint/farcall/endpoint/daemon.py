"""An endpoint's running agent as its directory sees it: pid file, status file, hooks, signals.

``farcall-endpoint`` starts, stops and inspects agents only through these: a
pid file that names the one agent running per endpoint, a ``status.json`` the
agent rewrites on every heartbeat, and the operator's setup/teardown commands.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from farcall.config import farcall_home
from farcall.endpoint.errors import EndpointError
from farcall.endpoint.lockdown import TOKEN_VARIABLE
from farcall.endpoint.registration import load_registrations

if TYPE_CHECKING:
    from farcall.endpoint.agent import Agent

log = logging.getLogger(__name__)

PID_FILE = "endpoint.pid"
LOG_FILE = "endpoint.log"
STATUS_FILE = "status.json"
JOURNAL_FILE = "running.journal"
"""Tasks started and not finished by the running agent (``journal.py``)."""


# ------------------------------------------------------------------ pid file


def running_pid(directory: Path) -> int | None:
    """The pid in ``endpoint.pid`` if that process is alive; a stale file counts as not running."""
    try:
        pid = int((directory / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil
    except ImportError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


@contextmanager
def pid_file(directory: Path) -> Iterator[None]:
    """Hold ``endpoint.pid`` for this process; refuses while another agent of the endpoint runs."""
    path = directory / PID_FILE
    pid = running_pid(directory)
    if pid is not None and pid != os.getpid():
        raise EndpointError(
            f"endpoint {directory.name} is already running (pid {pid}); "
            f"stop it with: farcall-endpoint stop {directory.name}"
        )
    directory.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)
    try:
        yield
    finally:
        try:
            if int(path.read_text().strip()) == os.getpid():
                path.unlink()
        except (OSError, ValueError):
            pass


# ------------------------------------------------------------------ status file


def read_status(directory: Path) -> dict[str, Any] | None:
    """What the running agent last wrote to ``status.json``; ``None`` if absent or unreadable."""
    try:
        found = json.loads((directory / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def write_status(directory: Path, snapshot: dict[str, Any]) -> None:
    """Replace ``status.json`` at once, stamped with this pid, so readers never see half a file."""
    path = directory / STATUS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**snapshot, "pid": os.getpid()}))
    os.replace(tmp, path)


def state(directory: Path) -> tuple[str, dict[str, Any] | None]:
    """``running`` (connected), ``connecting`` (running, no broker session) or ``stopped``."""
    pid = running_pid(directory)
    if pid is None:
        return "stopped", None
    status = read_status(directory)
    if status is None or status.get("pid") != pid:
        return "connecting", None
    return ("running" if status.get("connected") else "connecting"), status


# ------------------------------------------------------------------ running in the foreground


@contextmanager
def hooks(setup: str | None, teardown: str | None, directory: Path) -> Iterator[None]:
    """Run the operator's ``endpoint_setup`` before the body and ``endpoint_teardown`` after it.

    A failing setup stops the start (teardown does not run); a failing teardown is only logged.
    """
    _run_hook(setup, "endpoint_setup", directory, fatal=True)
    try:
        yield
    finally:
        _run_hook(teardown, "endpoint_teardown", directory, fatal=False)


def _run_hook(command: str | None, key: str, directory: Path, fatal: bool) -> None:
    if not command:
        return
    log.info("running %s: %s", key, command)
    done = subprocess.run(command, shell=True, cwd=directory, capture_output=True, text=True)
    for line in (done.stdout + done.stderr).splitlines():
        log.info("%s: %s", key, line)
    if done.returncode != 0:
        message = (f"{key} failed (exit code {done.returncode}): {command!r}; "
                   f"its output: {(done.stderr or done.stdout).strip()[-500:]!r}")
        if fatal:
            raise EndpointError(message + ". Fix the command in config.yaml and start again.")
        log.warning("%s", message)


def run_agent(agent: Agent, directory: Path | None = None) -> None:
    """Run ``agent`` until it stops; SIGTERM and Ctrl-C ask it to stop gracefully.

    With the endpoint's ``directory`` and an engine that runs tasks in the agent's own
    process, the agent keeps its crash journal there, so a task that kills this process
    is reported to the broker by the next start. (With worker processes a task can only
    kill its worker; journaling there would count an operator's kill -9 of the agent
    against innocent tasks.)
    """
    if directory is not None and agent.engine.runs_tasks_in_agent:
        agent.journal_path = directory / JOURNAL_FILE
    asyncio.run(_run_with_signals(agent))


async def _run_with_signals(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()


# ------------------------------------------------------------------ detached start, stop


@dataclass(frozen=True)
class Detached:
    """An agent started in the background: ``endpoint_id`` is ``None`` if it has not connected yet."""

    pid: int
    log: Path
    """Where its log goes (its stderr)."""
    endpoint_id: str | None


def log_files(directory: Path, log_dir: str | None = None, stdout: str | None = None,
              stderr: str | None = None) -> tuple[Path, Path]:
    """Where a daemon writes its output and its log (stderr), from Globus Compute's ``log_dir``,
    ``stdout`` and ``stderr`` keys: ``log_dir`` relative to the endpoint's ``directory``, the
    files relative to it; by default both ``endpoint.log`` in the endpoint's directory."""
    base = directory / Path(log_dir).expanduser() if log_dir else directory
    out = base / Path(stdout or LOG_FILE).expanduser()
    return out, (base / Path(stderr).expanduser() if stderr else out)


def start_detached(name: str, directory: Path, wait: float, *,
                   register_again: bool = False,
                   logs: tuple[Path, Path] | None = None) -> Detached:
    """Start ``farcall-endpoint start NAME`` as a daemon (with ``--register-again`` if asked);
    return once it connects or ``wait`` ends. ``logs``: its stdout and stderr files (default:
    :func:`log_files`).

    Raises ``EndpointError`` if the endpoint already runs, or if the daemon exits
    at start (the message carries the end of its log).
    """
    pid = running_pid(directory)
    if pid is not None:
        raise EndpointError(f"endpoint {name} is already running (pid {pid}); "
                            f"stop it with: farcall-endpoint stop {name}")
    directory.mkdir(parents=True, exist_ok=True)
    out_path, log_path = logs or log_files(directory)
    for path in {out_path, log_path}:
        path.parent.mkdir(parents=True, exist_ok=True)
    (directory / STATUS_FILE).unlink(missing_ok=True)
    # The daemon runs in the endpoint's directory: a relative FARCALL_HOME must not move with it.
    env = {**os.environ, "FARCALL_HOME": str(farcall_home().absolute())}
    if not register_again and _registered(directory):
        env.pop(TOKEN_VARIABLE, None)  # it needs only its credential: the token stays here
    with open(out_path, "ab") as out, ExitStack() as files:
        err = (subprocess.STDOUT if log_path == out_path
               else files.enter_context(open(log_path, "ab")))
        child = subprocess.Popen(
            [sys.executable, "-m", "farcall.endpoint", "start", name,
             *(["--register-again"] if register_again else [])],
            stdin=subprocess.DEVNULL, stdout=out, stderr=err,
            start_new_session=True, cwd=directory, env=env,
        )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            raise EndpointError(f"endpoint {name} exited at start (exit code {child.returncode}); "
                                f"the end of {log_path}:\n" + "\n".join(tail))
        status = read_status(directory)
        if status and status.get("pid") == child.pid and status.get("connected"):
            return Detached(child.pid, log_path, str(status["endpoint_id"]))
        time.sleep(0.1)
    return Detached(child.pid, log_path, None)


def _registered(directory: Path) -> bool:
    try:
        return load_registrations(directory) is not None
    except EndpointError:  # a damaged file: the daemon says so, and may need the token
        return False


def stop(name: str, pid: int, timeout: float) -> None:
    """Ask the agent ``pid`` to stop (SIGTERM) and wait until it has exited.

    Raises ``EndpointError`` saying how to force it if it is still alive after ``timeout`` seconds.
    """
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            raise EndpointError(
                f"endpoint {name} (pid {pid}) did not stop within {timeout:.0f} s; "
                f"to force it: kill -9 {pid}"
            )
        time.sleep(0.05)
