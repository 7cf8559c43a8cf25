"""What the ``farcall`` user commands do: login, whoami, endpoints, groups, tasks, result.

:mod:`farcall.cli` parses the command line and turns a :class:`~farcall.errors.FarcallError`
into one line on stderr; each function here does one command, prints its answer on
``out`` and returns the exit status.
"""

from __future__ import annotations

import datetime
import getpass
import json
import os
import sys
from collections.abc import Sequence
from typing import Any, TextIO

from farcall import config
from farcall.client import Client
from farcall.errors import AuthenticationError, ConfigurationError
from farcall.protocol.common import TaskState

RETRY_SECONDS = 5.0
"""How long a command keeps trying a broker that does not answer (a notebook waits longer)."""
PENDING = 2
"""``farcall result``'s exit status for a task that has not finished."""


def client(broker_url: str | None = None, token: str | None = None) -> Client:
    """A client from these, or from the environment and the saved settings."""
    try:
        return Client(broker_url=broker_url, token=token, retry_seconds=RETRY_SECONDS)
    except ConfigurationError as e:
        if broker_url is not None:
            raise
        raise ConfigurationError(f"{e}; or run 'farcall login --broker URL'") from None


def login(broker: str | None, token: str | None, out: TextIO) -> int:
    """Check the token with the broker, then save both in ``$FARCALL_HOME/config``."""
    url = config.broker_url(broker)
    token = token or os.environ.get("FARCALL_TOKEN") or getpass.getpass(f"token for {url}: ")
    token = token.strip()
    if not token:
        raise ConfigurationError("no token given: pass --token, set FARCALL_TOKEN, or paste it "
                                 "at the prompt (your broker operator creates one with "
                                 "'farcall-broker users create NAME')")
    with client(url, token) as c:
        try:
            me = c.whoami()
        except AuthenticationError as e:
            raise AuthenticationError(e.status, (
                f"the broker at {url} does not know this token; check it, or ask the broker's "
                "operator for a new one"), e.error, e.body) from None
    path = config.save_user_settings({"broker_url": url, "token": token})
    print(f"logged in to {url} as {me['username']}; saved in {path}", file=out)
    return 0


def whoami(as_json: bool, out: TextIO) -> int:
    with client() as c:
        me = {**c.whoami(), "broker_url": c.broker_url}
    if as_json:
        _dump(me, out)
    else:
        print(table([("username", me["username"]), ("identity id", me["identity_id"]),
                     ("broker", me["broker_url"])]), file=out)
    return 0


def endpoints(as_json: bool, out: TextIO) -> int:
    with client() as c:
        found = c.get_endpoints()
    if as_json:
        _dump(found, out)
    elif not found:
        print("no endpoints yet: start one with 'farcall-endpoint start NAME'", file=out)
    else:
        rows = [(e["endpoint_id"], e["name"], e["status"]
                 + (f" (shared with you by {e.get('shared_by') or 'its owner'})"
                    if e.get("role") == "shared" else "")) for e in found]
        print(table(rows, ("ENDPOINT ID", "NAME", "STATUS")), file=out)
    return 0


def share_endpoint(endpoint_id: str, username: str, shared: bool, out: TextIO) -> int:
    """Share (or unshare) your endpoint with a user; sharing a single-user endpoint prints the
    broker's warning (a ``UserWarning``, on stderr)."""
    with client() as c:
        answer = (c.share_endpoint if shared else c.unshare_endpoint)(endpoint_id, username)
    whom = ", ".join(answer["shared_with"]) or "nobody"
    print(f"endpoint {endpoint_id} is shared with: {whom}", file=out)
    return 0


def leave_endpoint(endpoint_id: str, out: TextIO) -> int:
    with client() as c:
        c.leave_endpoint(endpoint_id)
    print(f"left endpoint {endpoint_id}: it is no longer in your list, and your tasks waiting "
          "or running there were cancelled", file=out)
    return 0


def groups(limit: int, as_json: bool, out: TextIO) -> int:
    with client() as c:
        found = c.list_task_groups(limit)
    if as_json:
        _dump(found, out)
    elif not found:
        print("no task groups yet", file=out)
    else:
        rows = [(g["task_group_id"], str(g["task_count"]), when(g["created_at"]),
                 when(g["last_active"])) for g in found]
        print(table(rows, ("TASK GROUP ID", "TASKS", "CREATED", "LAST SUBMITTED")), file=out)
    return 0


def tasks(group: str | None, limit: int, as_json: bool, out: TextIO) -> int:
    with client() as c:
        found = c.list_tasks(group, limit)
    if as_json:
        _dump(found, out)
    elif not found:
        print("no tasks yet", file=out)
    else:
        rows = [(t["task_id"], t["state"], t["function_name"] or t["function_id"],
                 when(t["completed_at"])) for t in found]
        print(table(rows, ("TASK ID", "STATE", "FUNCTION", "COMPLETED")), file=out)
    return 0


def result(task_id: str, out: TextIO, err: TextIO | None = None) -> int:
    """The result's repr (0); a failed task's remote traceback on ``err`` (1); an unfinished
    task's state (``PENDING``)."""
    err = err or sys.stderr
    with client() as c:
        record = c.get_task(task_id)  # the result is loaded once, here
        state = TaskState(record["state"])
        if state == TaskState.SUCCESS:
            if "exception" in record:  # a result that cannot be loaded here: as get_result raises
                raise record["exception"]
            print(repr(record["result"]), file=out)
            return 0
    if not state.terminal:
        print(f"task {task_id} has not finished: it is {state.value}; ask again later", file=err)
        return PENDING
    if state == TaskState.CANCELLED:
        print(f"task {task_id} was cancelled", file=err)
        return 1
    print(str(record.get("error") or f"task {task_id} failed (no traceback was sent)").rstrip(),
          file=err)
    return 1


def when(timestamp: float | None) -> str:
    """A broker timestamp in local time, to the second; ``-`` for none."""
    if timestamp is None:
        return "-"
    return datetime.datetime.fromtimestamp(timestamp).strftime("%Y-%m-%d %H:%M:%S")


def table(rows: Sequence[Sequence[str]], header: Sequence[str] | None = None) -> str:
    """Rows in left-aligned columns two spaces apart, under ``header`` when given."""
    lines = [tuple(header), *rows] if header else list(rows)
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(lines[0]))]
    return "\n".join("  ".join(str(cell).ljust(w) for cell, w in zip(line, widths, strict=True))
                     .rstrip() for line in lines)


def _dump(value: Any, out: TextIO) -> None:
    print(json.dumps(value, indent=2), file=out)
