"""A worker's environment: the safe base and what the operator lists, never the agent's secrets."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest

from farcall.endpoint.config import parse_config
from farcall.endpoint.engines.processes import ProcessPoolEngine
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.worker_env import SAFE_NAMES, exec_prefix, worker_environment
from tests.endpoint.helpers import Collector, make_task, value_of

AGENT_ENV = {
    "PATH": "/usr/bin", "HOME": "/home/lab", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
    "SLURM_JOB_ID": "42", "FARCALL_TOKEN": "user-token", "FARCALL_HOME": "/home/lab/.farcall",
    "AWS_SECRET_ACCESS_KEY": "cloud-key", "LAB_SCRATCH": "/scratch/lab",
}


def test_a_worker_gets_the_safe_base_and_what_is_listed_only() -> None:
    env = worker_environment(["LAB_SCRATCH"], {"OMP_NUM_THREADS": "3", "HOME": "/w"}, AGENT_ENV)
    assert env == {"PATH": "/usr/bin", "HOME": "/w", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
                   "SLURM_JOB_ID": "42", "LAB_SCRATCH": "/scratch/lab", "OMP_NUM_THREADS": "3"}
    assert worker_environment(["FARCALL_TOKEN"], {"FARCALL_TOKEN": "x"}, AGENT_ENV).get(
        "FARCALL_TOKEN") is None, "the user token never, whatever the caller asks"
    assert not {n for n in SAFE_NAMES if "TOKEN" in n or "SECRET" in n}


@pytest.mark.parametrize(("section", "error"), [
    ("worker_env: {FARCALL_TOKEN: abc}", r"engine.worker_env.*FARCALL_TOKEN never reaches"),
    ("worker_env_passthrough: [FARCALL_TOKEN]", r"worker_env_passthrough.*never reaches"),
    ("worker_env_passthrough: ['MY-VAR']", r"not a valid environment variable name"),
    ("worker_env: {1X: y}", r"not a valid environment variable name"),
])
def test_the_config_refuses_a_token_or_a_bad_name(section: str, error: str) -> None:
    with pytest.raises(EndpointConfigError, match=error):
        parse_config(f"engine:\n  type: ProcessPoolEngine\n  {section}\n")


def test_the_thread_engine_has_no_worker_environment_to_set() -> None:
    with pytest.raises(EndpointConfigError, match="engine.worker_env"):
        parse_config("engine:\n  type: ThreadPoolEngine\n  worker_env: {A: b}\n")


@pytest.fixture
def agent_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    for name, value in AGENT_ENV.items():
        if name not in ("PATH", "HOME"):
            monkeypatch.setenv(name, value)
    yield


def _environment() -> tuple[dict[str, str], bytes]:
    import os

    with open("/proc/self/environ", "rb") as f:
        return dict(os.environ), f.read()


def test_process_workers_start_with_the_worker_environment(agent_env: None) -> None:
    engine = ProcessPoolEngine(max_workers=1, worker_env={"OMP_NUM_THREADS": "3"},
                               worker_env_passthrough=["LAB_SCRATCH"])
    engine.start()
    try:
        got = Collector()
        task = make_task(_environment)
        engine.submit(task, got.on_done)
        env, raw = value_of(got.wait_results([task.task_id])[0])
    finally:
        engine.shutdown(wait=False)
    assert env["OMP_NUM_THREADS"] == "3" and env["LAB_SCRATCH"] == "/scratch/lab"
    assert env["SLURM_JOB_ID"] == "42" and env["PATH"] == os.environ["PATH"]
    for name in ("FARCALL_TOKEN", "AWS_SECRET_ACCESS_KEY", "FARCALL_HOME"):
        assert name not in env
    assert b"user-token" not in raw and b"cloud-key" not in raw


def test_the_parsl_prefix_execs_a_command_with_the_worker_environment() -> None:
    """What a Parsl block runs in front of the worker pool (``ParslEngine`` sets it)."""
    words = exec_prefix(["LAB_SCRATCH"], {"OMP_NUM_THREADS": "3"}).split()
    assert words[:3] == ["python3", "-m", "farcall.endpoint.worker_env"] and words[-1] == "--"
    assert "{" not in " ".join(words), "Parsl formats the launch command with str.format"
    show = "import json, os; print(json.dumps(dict(os.environ)))"
    done = subprocess.run([sys.executable, *words[1:], sys.executable, "-c", show],
                          env=AGENT_ENV | {"PATH": os.environ["PATH"]},
                          capture_output=True, text=True, check=True)
    assert json.loads(done.stdout) == {
        "PATH": os.environ["PATH"], "HOME": "/home/lab", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8",
        "SLURM_JOB_ID": "42", "LAB_SCRATCH": "/scratch/lab", "OMP_NUM_THREADS": "3"}


def test_a_parsl_engine_starts_its_workers_through_the_prefix() -> None:
    from farcall.endpoint.engines import build_engine
    from farcall.endpoint.engines.parsl import ParslEngine

    engine = build_engine({"type": "ParslEngine", "worker_env": {"A": "1"},
                           "worker_env_passthrough": ["LAB_SCRATCH"]})
    assert isinstance(engine, ParslEngine)
    assert engine.worker_env == {"A": "1"} and engine.worker_env_passthrough == ["LAB_SCRATCH"]
    assert "worker_env" not in engine.executor_options
