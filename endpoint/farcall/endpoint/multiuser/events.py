"""The pipe from a user endpoint to its manager: what happened to which task, one line each.

The manager gives every user endpoint the write end of a pipe (its fd number in
``EVENTS_FD_VARIABLE``); the user endpoint's agent writes ``STATE TASK_ID`` lines to it, one
``write`` per batch (``EventWriter``), and ``connected -`` at each session's welcome. The manager
reads them (``parse_events``) to know when a user endpoint is up and when it last worked, and,
with ``audit_log_path`` set, appends each task state to the audit log prefixed with the local
user and uid *it* knows (``AuditLog``), so the user endpoint cannot lie about who ran a task.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import threading
import time
from pathlib import Path

log = logging.getLogger(__name__)

EVENTS_FD_VARIABLE = "FARCALL_EVENTS_FD"
"""The environment variable that gives a user endpoint's agent the fd of its events pipe."""
TASK_STATES = frozenset({"received", "running", "success", "failed", "cancelled"})
CONNECTED = "connected"
_TASK_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")
MAX_LINE = 128


class EventWriter:
    """The user endpoint's side: ``Agent.on_task_states``. Never blocks the agent: the fd is
    non-blocking and a batch the pipe has no room for is dropped (and logged)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        os.set_inheritable(fd, False)  # workers and tasks never get it
        os.set_blocking(fd, False)
        self.dropped = 0

    def __call__(self, states: list[tuple[str, str]]) -> None:
        data = "".join(f"{state} {task_id or '-'}\n" for task_id, state in states).encode()
        try:
            os.write(self.fd, data)
        except BlockingIOError:
            self.dropped += len(states)
            log.warning("the manager's events pipe is full: %d task state(s) not reported",
                        len(states))
        except OSError as e:
            if e.errno != errno.EPIPE:
                raise
            log.warning("the manager's events pipe is closed: task states are not reported")

    @classmethod
    def from_environment(cls) -> EventWriter | None:
        """The writer for the fd ``EVENTS_FD_VARIABLE`` names (removed from the environment,
        so nothing the agent starts sees it); ``None`` when it is not set or not an open fd."""
        raw = os.environ.pop(EVENTS_FD_VARIABLE, None)
        if not raw:
            return None
        try:
            fd = int(raw)
            os.fstat(fd)
        except (ValueError, OSError):
            log.warning("%s=%r is not an open file descriptor: task states are not reported",
                        EVENTS_FD_VARIABLE, raw)
            return None
        return cls(fd)


def parse_events(buffer: bytearray) -> list[tuple[str, str]]:
    """Take the complete lines out of ``buffer`` as ``(state, task_id)``; lines that are not a
    known state and a plain task id are dropped (a user endpoint writes nothing else)."""
    found: list[tuple[str, str]] = []
    end = buffer.rfind(b"\n")
    if end < 0:
        if len(buffer) > MAX_LINE:
            buffer.clear()  # no line is that long: garbage
        return found
    lines = bytes(buffer[: end + 1]).decode("ascii", "replace").splitlines()
    del buffer[: end + 1]
    for line in lines:
        state, _, task_id = line.partition(" ")
        if state == CONNECTED or (state in TASK_STATES and _TASK_ID.match(task_id)):
            found.append((state, task_id))
    return found


class AuditLog:
    """The manager's audit log: one line per task state, appended (the file is opened once,
    mode 0600, and written a batch at a time)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._file = os.fdopen(fd, "a", encoding="utf-8")
        self._lock = threading.Lock()

    def write(self, endpoint_id: str, user: str, uid: int, events: list[tuple[str, str]]) -> None:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        lines = "".join(
            f"{stamp} endpoint={endpoint_id} user={user} uid={uid} task={task_id} state={state}\n"
            for state, task_id in events if state != CONNECTED)
        if not lines:
            return
        with self._lock:
            self._file.write(lines)
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()
