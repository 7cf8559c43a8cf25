"""The ``farcall`` console script against a real broker (Redis, RabbitMQ) and endpoint: login
saves a 0600 config, then whoami, endpoints, groups, tasks and result answer from it."""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from farcall import Client, Executor
from harness import BIN
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint

pytestmark = pytest.mark.integration


class Cli:
    """``farcall ARGS`` as a user runs it, with its own ``FARCALL_HOME``."""

    def __init__(self, broker: Broker, home: Path) -> None:
        self.home = home
        self.env = {k: v for k, v in broker.env.items() if not k.startswith("FARCALL_")}
        self.env["FARCALL_HOME"] = str(home)

    def __call__(self, *args: str, code: int = 0) -> subprocess.CompletedProcess[str]:
        done = subprocess.run([str(BIN / "farcall"), *args], env=self.env, capture_output=True,
                              text=True, timeout=60)
        assert done.returncode == code, (args, done.stdout, done.stderr)
        assert "Traceback (most recent call last)" not in done.stderr or args[0] == "result"
        return done


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_login_then_look_around(
    broker: Broker, token: str, endpoint: Endpoint, client: Client, tmp_path: Path
) -> None:
    cli = Cli(broker, tmp_path / "home")
    assert "farcall login --broker URL" in one_line(cli("whoami", code=1).stderr)
    assert "does not know this token" in one_line(
        cli("login", "--broker", broker.url, "--token", "fcu_nope", code=1).stderr)
    assert not (cli.home / "config").exists()

    done = cli("login", "--broker", broker.url, "--token", token)
    assert "logged in" in done.stdout
    assert stat.S_IMODE(os.stat(cli.home / "config").st_mode) == 0o600
    me = client.whoami()
    out = cli("whoami").stdout
    assert me["username"] in out and me["identity_id"] in out

    rows = [line.split() for line in cli("endpoints").stdout.splitlines()[1:]]
    assert [endpoint.endpoint_id, "ep", "online"] in rows
    listed = json.loads(cli("endpoints", "--json").stdout)
    assert endpoint.endpoint_id in [e["endpoint_id"] for e in listed]


def test_tasks_and_results(
    broker: Broker, token: str, endpoint: Endpoint, client: Client, tmp_path: Path
) -> None:
    cli = Cli(broker, tmp_path / "home")
    cli("login", "--broker", broker.url, "--token", token)
    gate = tmp_path / "gate"

    def halve(x: int) -> float:
        return x / 2 if x else 1 / x

    def wait_for(path: str) -> str:
        import os
        import time

        deadline = time.monotonic() + 60
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        return "released"

    with Executor(endpoint_id=endpoint.endpoint_id, client=client) as ex:
        ok, bad = ex.submit(halve, 5), ex.submit(halve, 0)
        assert ok.result(60) == 2.5 and isinstance(bad.exception(60), ZeroDivisionError)
        slow = ex.submit(wait_for, str(gate))
        wait_until(lambda: slow.task_id, 30, "the slow task to be sent")
        group = ex.task_group_id
        assert group is not None

        rows = [line.split() for line in cli("tasks", "--group", group).stdout.splitlines()]
        assert rows[0] == ["TASK", "ID", "STATE", "FUNCTION", "COMPLETED"]
        assert [r[0] for r in rows[1:]] == [slow.task_id, bad.task_id, ok.task_id]
        assert rows[1][1:4] in (["waiting-for-endpoint", "wait_for", "-"],
                                ["running", "wait_for", "-"])
        assert rows[2][1:3] == ["failed", "halve"] and rows[3][1:3] == ["success", "halve"]
        newest = json.loads(cli("tasks", "--limit", "2", "--json").stdout)
        assert [t["task_id"] for t in newest] == [slow.task_id, bad.task_id]
        groups = json.loads(cli("groups", "--json").stdout)
        assert (groups[0]["task_group_id"], groups[0]["task_count"]) == (group, 3)

        assert cli("result", str(ok.task_id)).stdout == "2.5\n"
        failed = cli("result", str(bad.task_id), code=1)
        assert failed.stdout == "" and "ZeroDivisionError" in failed.stderr
        assert "Traceback" in failed.stderr and "halve" in failed.stderr
        pending = cli("result", str(slow.task_id), code=2)
        assert "has not finished" in one_line(pending.stderr)
        gate.touch()
        assert slow.result(60) == "released"
    assert cli("result", str(slow.task_id)).stdout == "'released'\n"
    assert "not found" in one_line(cli("result", "no-such-task", code=1).stderr)
    assert "not found" in one_line(cli("tasks", "--group", "no-such-group", code=1).stderr)
