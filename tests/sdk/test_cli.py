"""The ``farcall`` user commands in-process, on the embedded broker: login saves a 0600 config,
whoami / endpoints / groups / tasks / result answer, and every failure is one line on stderr."""

from __future__ import annotations

import json
import os
import stat
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import farcall.commands
from farcall import Executor, config
from farcall.cli import main
from tests.helpers import fragile, wait_for_file
from tests.sdk.helpers import Stack, wait_batch


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("FARCALL_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("FARCALL_BROKER_URL", raising=False)
    monkeypatch.delenv("FARCALL_TOKEN", raising=False)
    monkeypatch.setattr(farcall.commands, "RETRY_SECONDS", 0.5)
    yield tmp_path / "home"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line(err: str) -> str:
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def logged_in(home: Path, stack: Stack, capsys: pytest.CaptureFixture[str]) -> Path:
    code, _, err = run(capsys, "login", "--broker", stack.broker.url, "--token", stack.token)
    assert code == 0, err
    return home


def test_login_saves_the_token_in_a_file_only_its_owner_reads(
    home: Path, stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    home.mkdir()
    (home / "config").write_text('token = "old"\nretry = 3\n\n[extra]\nkey = "kept"\n')
    os.chmod(home / "config", 0o644)
    modes: list[int] = []
    replace = os.replace

    def spy(src: Any, dst: Any) -> None:  # the new file's mode before it takes the old one's place
        modes.append(stat.S_IMODE(os.stat(src).st_mode))
        replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    old_umask = os.umask(0)  # a careless open() would now make the file world-readable
    try:
        code, out, err = run(capsys, "login", "--broker", stack.broker.url + "/",
                             "--token", stack.token)
    finally:
        os.umask(old_umask)
    assert code == 0, err
    assert "logged in to" in out and "sdk-tests" in out
    assert modes == [0o600]
    assert stat.S_IMODE((home / "config").stat().st_mode) == 0o600
    saved = tomllib.loads((home / "config").read_text())
    assert saved == {"broker_url": stack.broker.url, "token": stack.token, "retry": 3,
                     "extra": {"key": "kept"}}
    assert [p.name for p in home.iterdir()] == ["config"]  # no temporary file left


def test_login_takes_the_token_from_the_environment_or_a_prompt(
    home: Path, stack: Stack, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FARCALL_TOKEN", stack.token)
    assert run(capsys, "login", "--broker", stack.broker.url)[0] == 0
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    monkeypatch.delenv("FARCALL_TOKEN")
    (home / "config").unlink()
    asked: list[str] = []

    def prompt(text: str) -> str:
        asked.append(text)
        return stack.token

    monkeypatch.setattr("getpass.getpass", prompt)
    assert run(capsys, "login", "--broker", stack.broker.url)[0] == 0
    assert asked == [f"token for {stack.broker.url}: "]
    assert config.user_settings()["token"] == stack.token


def test_login_refuses_a_bad_token_and_saves_nothing(
    home: Path, stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(capsys, "login", "--broker", stack.broker.url, "--token", "fcu_wrong")
    assert code == 1 and "does not know this token" in one_line(err)
    assert not (home / "config").exists()
    code, _, err = run(capsys, "login", "--broker", "ftp://x", "--token", "t")
    assert code == 1 and "http://" in one_line(err)


def test_commands_without_settings_say_to_log_in(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for command in ("whoami", "endpoints", "tasks", "groups"):
        code, out, err = run(capsys, command)
        assert code == 1 and out == ""
        assert "farcall login --broker URL" in one_line(err), err


def test_a_revoked_token_and_an_unreachable_broker_are_one_line(
    logged_in: Path, stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    config.save_user_settings({"token": "fcu_revoked"})
    code, _, err = run(capsys, "whoami")
    assert code == 1 and "401" in one_line(err) and "farcall login" in err
    config.save_user_settings({"token": stack.token, "broker_url": "http://127.0.0.1:9"})
    code, _, err = run(capsys, "endpoints")
    assert code == 1 and one_line(err).startswith("farcall endpoints: cannot reach the broker")


def test_whoami_endpoints_groups_tasks(
    logged_in: Path, stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, _ = run(capsys, "whoami")
    assert code == 0 and "sdk-tests" in out and "identity id" in out
    me = json.loads(run(capsys, "whoami", "--json")[1])
    assert me["username"] == "sdk-tests" and me["broker_url"] == stack.broker.url

    code, out, _ = run(capsys, "endpoints")
    header, *rows = out.splitlines()
    assert header.split() == ["ENDPOINT", "ID", "NAME", "STATUS"]
    assert any(r.split()[0] == stack.endpoint_id and r.split()[2] == "online" for r in rows)

    with Executor(endpoint_id=stack.endpoint_id, client=stack.client()) as ex:
        futures = [ex.submit(pow, 2, n) for n in range(3)]
        assert [f.result(30) for f in futures] == [1, 2, 4]
    group = ex.task_group_id
    assert group is not None
    newest = [f.task_id for f in reversed(futures)]

    code, out, _ = run(capsys, "tasks", "--group", group)
    header, *rows = out.splitlines()
    assert header.split() == ["TASK", "ID", "STATE", "FUNCTION", "COMPLETED"]
    assert [r.split()[0] for r in rows] == newest
    assert all(r.split()[1:3] == ["success", "pow"] for r in rows)
    listed = json.loads(run(capsys, "tasks", "--limit", "2", "--json")[1])
    assert [t["task_id"] for t in listed] == newest[:2]
    groups = json.loads(run(capsys, "groups", "--json")[1])
    assert groups[0]["task_group_id"] == group and groups[0]["task_count"] == 3
    assert group in run(capsys, "groups")[1]

    code, _, err = run(capsys, "tasks", "--group", "no-such-group")
    assert code == 1 and "not found" in one_line(err)
    with pytest.raises(SystemExit):
        main(["tasks", "--limit", "0"])
    assert "from 1 to 1000" in capsys.readouterr().err


def test_result_prints_a_value_a_traceback_or_a_state(
    logged_in: Path, stack: Stack, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    client = stack.client()
    ok, bad = (client.run(x, endpoint_id=stack.endpoint_id,
                          function_id=client.register_function(fragile)) for x in (4, 0))
    wait_batch(client, [ok, bad])
    assert run(capsys, "result", ok) == (0, "0.25\n", "")

    code, out, err = run(capsys, "result", bad)
    assert code == 1 and out == ""
    assert "Traceback" in err and "ZeroDivisionError" in err and "fragile" in err

    gate = tmp_path / "gate"
    waiting = client.run(str(gate), endpoint_id=stack.endpoint_id,
                         function_id=client.register_function(wait_for_file))
    code, out, err = run(capsys, "result", waiting)
    assert code == 2 and out == "" and "has not finished" in one_line(err)
    gate.touch()
    wait_batch(client, [waiting])
    assert run(capsys, "result", waiting)[0] == 0

    code, _, err = run(capsys, "result", "0" * 36)
    assert code == 1 and "not found" in one_line(err)
    client.close()
