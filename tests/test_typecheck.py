"""The type checker guards the seams: a wrong call across broker<->store or agent<->engine fails lint.

With the old layout every ``farcall.broker.*`` and ``farcall.endpoint.*`` import
was ``Any`` to mypy, so such a call passed. These run mypy exactly as
``./run lint`` does (the project's configuration, from the repository root) on
small files that make those calls.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

from harness import REPO

HEADER = """\
from farcall.broker.sessions import LiveSession
from farcall.broker.store.base import Store
from farcall.endpoint.engines.base import Engine
from farcall.endpoint.outbox import Outbox
from farcall.protocol.channel import ResultMessage, TaskMessage


def on_done(result: ResultMessage) -> None: ...
"""

RIGHT = HEADER + """

async def broker_side(store: Store) -> None:
    await store.functions.delete("f1")


def agent_side(engine: Engine, task: TaskMessage) -> None:
    engine.submit(task, on_done)


async def submission_side(session: LiveSession) -> None:
    await session.send_direct([("t1", "f1", "{}")], {"f1": "body"})


def outbox_side(outbox: Outbox) -> None:
    outbox.acked(["t1"])
"""

WRONG = HEADER + """

async def broker_side(store: Store) -> None:
    await store.functions.delete("f1", "f2")


def agent_side(engine: Engine, task: TaskMessage) -> None:
    engine.submit(task)


async def submission_side(session: LiveSession) -> None:
    await session.send_direct([("t1", "f1", "{}")])


def outbox_side(outbox: Outbox) -> None:
    outbox.acked("t1", "t2")
"""


def _mypy(tmp_path: Path, source: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "seams.py"
    path.write_text(source)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(REPO / "pyproject.toml"), str(path)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )


def test_right_calls_across_the_seams_pass(tmp_path: Path) -> None:
    done = _mypy(tmp_path, RIGHT)
    assert done.returncode == 0, done.stdout + done.stderr


def test_wrong_calls_across_the_seams_fail(tmp_path: Path) -> None:
    done = _mypy(tmp_path, WRONG)
    assert done.returncode == 1, done.stdout + done.stderr
    assert 'Too many arguments for "delete" of "FunctionStore"' in done.stdout, done.stdout
    assert 'Missing positional argument "on_done" in call to "submit" of "Engine"' in done.stdout, (
        done.stdout
    )
    assert 'Missing positional argument "functions" in call to "send_direct" of "LiveSession"' in (
        done.stdout), done.stdout
    assert 'Too many arguments for "acked" of "Outbox"' in done.stdout, done.stdout


def test_only_named_third_party_modules_may_go_unchecked() -> None:
    """No blanket ignore_missing_imports: an unresolved first-party import is an error."""
    config = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["mypy"]
    assert "ignore_missing_imports" not in config
    for override in config.get("overrides", []):
        modules = override["module"] if isinstance(override["module"], list) else [override["module"]]
        assert not [m for m in modules if m.split(".")[0] in ("farcall", "tests", "harness", "bench")]
