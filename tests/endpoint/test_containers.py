"""Workers in containers: the command each runtime gets, the config's checks, and the engines'
side of it with a stand-in runtime (real podman: tests/integration/test_containers.py)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from farcall.endpoint.config import parse_config
from farcall.endpoint.engines.containers import (
    LAUNCH_CMD,
    RUNDIR,
    Container,
    ContainerOptions,
    outermost,
    python_mounts,
    worker_mounts,
)
from farcall.endpoint.engines.processes import ProcessPoolEngine
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.worker_env import exec_prefix
from harness import REPO
from harness.procs import wait_until
from tests.containers import containers_conf
from tests.endpoint.helpers import Collector, make_task, value_of

WORKER_ENV = {"PATH": "/venv/bin:/usr/bin", "HOME": "/root", "OMP_NUM_THREADS": "2"}
AGENT_ENV = {**WORKER_ENV, "CONTAINERS_CONF": "/etc/site/containers.conf",
             "DOCKER_HOST": "unix:///run/docker.sock", "AWS_SECRET_ACCESS_KEY": "cloud-key"}
ARGV = ["/venv/bin/python", "-m", "farcall.endpoint.engines.process_worker", "--connect", "/r/w.sock"]


@pytest.mark.parametrize("kind", ["podman", "docker"])
def test_podman_and_docker_run_the_worker_named_on_the_host_network(kind: str) -> None:
    c = Container(kind, "localhost/worker:1", "--pull never --memory 2g")
    cmd, env = c.command(ARGV, env=WORKER_ENV, name="farcall-worker-1", run_dir="/r",
                         mounts=["/venv", "/opt/py"], source=AGENT_ENV)
    assert cmd == [kind, "run", "--rm", "--init", "--network", "host", "--name", "farcall-worker-1",
                   "-v", "/venv:/venv:ro", "-v", "/opt/py:/opt/py:ro", "-v", "/r:/r",
                   "-e", "HOME", "-e", "OMP_NUM_THREADS", "-e", "PATH",
                   "--pull", "never", "--memory", "2g", "localhost/worker:1", *ARGV]
    # The client gets its own settings; values reach the container through -e NAME only.
    assert env == {**WORKER_ENV, "CONTAINERS_CONF": "/etc/site/containers.conf",
                   "DOCKER_HOST": "unix:///run/docker.sock"}
    assert "cloud-key" not in repr((cmd, env)) and "2" not in cmd[cmd.index("-e"):cmd.index("--pull")]


@pytest.mark.parametrize(("kind", "prefix"), [("apptainer", "APPTAINERENV_"),
                                              ("singularity", "SINGULARITYENV_")])
def test_apptainer_and_singularity_exec_with_a_clean_environment(kind: str, prefix: str) -> None:
    c = Container(kind, "/images/worker.sif", "--nv")
    cmd, env = c.command(ARGV, env=WORKER_ENV, name="unused", run_dir="/r", mounts=["/venv"],
                         source=AGENT_ENV)
    assert cmd == [kind, "exec", "--cleanenv", "--bind", "/venv:/venv:ro", "--bind", "/r:/r",
                   "--nv", "/images/worker.sif", *ARGV]
    assert {k: v for k, v in env.items() if k.startswith(prefix)} == {
        prefix + k: v for k, v in WORKER_ENV.items()}
    assert "AWS_SECRET_ACCESS_KEY" not in env and not c.named and c.remove_commands(["x"]) == []


def test_custom_fills_the_launch_command_and_run_directory_in() -> None:
    c = Container("custom", None,
                  f"shifter --image=lab/worker:2 -V {RUNDIR}:{RUNDIR} -- {LAUNCH_CMD}")
    cmd, env = c.command([*ARGV[:-1], "/run dir/w.sock"], env=WORKER_ENV, name="n",
                         run_dir="/run dir", mounts=["/venv"], source=AGENT_ENV)
    assert cmd == ["shifter", "--image=lab/worker:2", "-V", "/run dir:/run dir", "--",
                   *ARGV[:-1], "/run dir/w.sock"]
    assert c.program == "shifter" and env["OMP_NUM_THREADS"] == "2"


def test_podman_removes_at_once_and_docker_kills_then_removes() -> None:
    assert Container("podman", "i").remove_commands(["a", "b"]) == [
        ["podman", "rm", "-f", "-t", "0", "a", "b"]]
    assert Container("docker", "i").remove_commands(["a"]) == [
        ["docker", "kill", "a"], ["docker", "rm", "-f", "a"]]
    assert Container("podman", "i").remove_commands([]) == []


@pytest.mark.parametrize(("section", "error"), [
    ("container_uri: img", r"engine.container_type: container_uri and container_cmd_options need a "
                           r"container_type \(podman, podman-hpc, docker, apptainer, singularity, custom\)"),
    ("container_type: lxc\n  container_uri: img", r"'lxc' is not a container type; valid choices: "
                                                  r"podman, podman-hpc, docker"),
    ("container_type: podman", r"engine.container_uri: container_type podman needs the image"),
    ("container_type: custom\n  container_cmd_options: podman run img",
     r"container_cmd_options: container_type custom needs the whole command here, with "
     r"\{EXECUTOR_LAUNCH_CMD\}"),
    ("container_type: docker\n  container_uri: img\n  container_cmd_options: \"-v '/a\"",
     r"container_cmd_options: not valid shell words"),
])
@pytest.mark.parametrize("engine", ["ProcessPoolEngine", "ParslEngine"])
def test_the_config_says_what_is_missing_or_wrong(engine: str, section: str, error: str) -> None:
    with pytest.raises(EndpointConfigError, match=error):
        parse_config(f"engine:\n  type: {engine}\n  {section}\n")


def test_a_valid_container_section_parses_for_both_engines() -> None:
    for engine in ("ProcessPoolEngine", "ParslEngine"):
        config = parse_config(f"engine:\n  type: {engine}\n  container_type: custom\n"
                              f"  container_cmd_options: 'x {LAUNCH_CMD}'\n")
        assert config.engine["container_type"] == "custom"
    with pytest.raises(EndpointConfigError, match="engine.container_type: unknown key"):
        parse_config("engine:\n  type: ThreadPoolEngine\n  container_type: podman\n")


def test_the_python_environment_is_mounted_whole_and_once() -> None:
    mounts = python_mounts()
    import farcall.endpoint

    needed = [sys.prefix, sys.base_prefix, *farcall.__path__, *farcall.endpoint.__path__]
    for path in needed:
        assert any(Path(os.path.realpath(path)).is_relative_to(m) for m in mounts), (path, mounts)
    assert "/" not in mounts and "/usr" not in mounts
    assert outermost(["/a/b", "/a", "/c", "/a", "/c/d"]) == ["/a", "/c"]
    assert worker_mounts({"PYTHONPATH": f"{sys.prefix}:/nonexistent"}) == list(mounts)


def test_a_runtime_missing_from_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(EndpointConfigError, match="needs the command 'podman' on the endpoint's PATH"):
        Container("podman", "img").check_runtime(path=str(tmp_path))


# --------------------------------------------- the engines, with a stand-in runtime

FAKE_RUNTIME = textwrap.dedent('''\
    #!{python}
    """A stand-in for podman/docker: records each call, runs `run`'s command without isolation,
    with only the -e names' values, as podman would."""
    import json, os, sys, time
    log = os.environ.get("FAKE_RUNTIME_LOG") or {log!r}
    args = sys.argv[1:]
    with open(log, "a") as f:
        f.write(json.dumps({{"args": args, "env": dict(os.environ)}}) + "\\n")
    if args[0] != "run":
        sys.exit(0)
    rest, names, i = args[1:], [], 0
    while rest[i].startswith("-"):
        if rest[i] in ("-v", "-e", "--name", "--network"):
            if rest[i] == "-e":
                names.append(rest[i + 1])
            i += 2
        else:
            i += 1
    image, command = rest[i], rest[i + 1:]
    if image == "hang":  # an image whose worker never starts
        time.sleep(600)
    os.execve(command[0], command, {{n: os.environ[n] for n in names if n in os.environ}})
''')


@pytest.fixture
def fake_runtime(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``podman`` on PATH is the stand-in; its calls are logged to the returned file."""
    log = tmp_path / "calls.jsonl"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    script = bin_dir / "podman"
    script.write_text(FAKE_RUNTIME.format(python=sys.executable, log=str(log)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    monkeypatch.setenv("CONTAINERS_CONF", "/etc/test/containers.conf")
    log.touch()
    yield log


def _calls(log: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_process_workers_in_a_container_connect_run_and_are_removed(fake_runtime: Path) -> None:
    engine = ProcessPoolEngine(max_workers=2, container_type="podman", container_uri="img:1",
                               worker_env={"OMP_NUM_THREADS": "5"})
    engine.start()
    done = Collector()

    def where() -> tuple[str | None, str | None, int]:
        import os

        return os.environ.get("OMP_NUM_THREADS"), os.environ.get("CONTAINERS_CONF"), os.getpid()

    try:
        tasks = [make_task(where) for _ in range(6)]
        for task in tasks:
            engine.submit(task, done.on_done)
        values = [value_of(r) for r in done.wait_results([t.task_id for t in tasks])]
        assert {v[:2] for v in values} == {("5", None)}, "the worker env, not the client's settings"
        runs = [c for c in _calls(fake_runtime) if c["args"][0] == "run"]
        assert len(runs) == 2 and all(c["env"]["CONTAINERS_CONF"] == "/etc/test/containers.conf"
                                      for c in runs)
        names = [c["args"][c["args"].index("--name") + 1] for c in runs]
        victim = engine._workers[0]
        victim_name = victim.container
        assert victim_name in names
        victim.process.kill()  # a lost worker: its container is removed, another starts
        wait_until(lambda: any(c["args"][:2] == ["rm", "-f"] and victim_name in c["args"]
                               for c in _calls(fake_runtime)), 10, "the lost worker's container removed")
        wait_until(lambda: len([c for c in _calls(fake_runtime) if c["args"][0] == "run"]) == 3,
                   10, "a replacement worker")
    finally:
        engine.shutdown(wait=True, timeout=10)
    assert not list(Path(engine._run_dir).parent.glob(Path(engine._run_dir).name)), "run dir left"


def test_stopping_the_engine_removes_containers_whose_workers_never_connected(
    fake_runtime: Path, tmp_path: Path
) -> None:
    engine = ProcessPoolEngine(max_workers=1, container_type="podman", container_uri="hang")
    engine.start()
    wait_until(lambda: any(c["args"][0] == "run" for c in _calls(fake_runtime)), 10, "the run")
    name = engine._workers[0].container
    started = time.monotonic()
    engine.shutdown(wait=True, timeout=5)
    assert time.monotonic() - started < 30, "the stop must not wait on a worker that never connected"
    assert engine._workers[0].process.poll() is not None
    assert [c["args"] for c in _calls(fake_runtime)][-1] == ["rm", "-f", "-t", "0", name]

    custom = ProcessPoolEngine(max_workers=1, container_type="custom",
                               container_cmd_options=f"podman run hang {LAUNCH_CMD}")
    custom.start()
    wait_until(lambda: sum(c["args"][0] == "run" for c in _calls(fake_runtime)) == 2, 10, "run")
    custom.shutdown(wait=True, timeout=5)
    assert custom._workers[0].process.poll() is not None
    # custom: farcall cannot name the container; killing its command is all it can do.
    assert sum(c["args"][0] == "rm" for c in _calls(fake_runtime)) == 1


def test_a_parsl_pool_runs_in_the_container_and_is_removed_on_sigterm(fake_runtime: Path,
                                                                       tmp_path: Path) -> None:
    """The prefix Parsl's launch command gets runs the pool through the runtime, and removes its
    container when the provider stops the block with SIGTERM."""
    spec = Container("podman", "img:1").encode(str(tmp_path / "run"))
    prefix = exec_prefix(["LAB"], {"OMP_NUM_THREADS": "3"}, spec)
    assert "{" not in prefix and "}" not in prefix
    env = dict(os.environ, LAB="lab", SECRET="s")
    out = tmp_path / "env.json"
    probe = f"import json, os; json.dump(dict(os.environ), open({str(out)!r}, 'w'))"
    cmd = shlex.split(prefix) + [sys.executable, "-c", probe]
    subprocess.run([sys.executable, *cmd[1:]], env=env, check=True, timeout=60)
    seen = json.loads(out.read_text())
    assert seen["LAB"] == "lab" and seen["OMP_NUM_THREADS"] == "3" and "SECRET" not in seen
    run = next(c for c in _calls(fake_runtime) if c["args"][0] == "run")
    assert f"{tmp_path / 'run'}:{tmp_path / 'run'}" in run["args"]
    name = run["args"][run["args"].index("--name") + 1]
    assert [c["args"] for c in _calls(fake_runtime)][-1] == ["rm", "-f", "-t", "0", name]

    # A block whose container never ends (the stand-in runtime's "hang" image), stopped by its
    # provider: its container is removed.
    hanging = shlex.split(exec_prefix(["LAB"], {}, Container("podman", "hang").encode(
        str(tmp_path / "run"))))
    pool = subprocess.Popen([sys.executable, *hanging[1:], sys.executable, "-c", "pass"], env=env)
    wait_until(lambda: sum(c["args"][0] == "run" for c in _calls(fake_runtime)) == 2, 30, "2nd run")
    pool.send_signal(signal.SIGTERM)
    assert pool.wait(30) == 128 + signal.SIGTERM
    second = [c for c in _calls(fake_runtime) if c["args"][0] == "run"][1]
    name = second["args"][second["args"].index("--name") + 1]
    assert ["rm", "-f", "-t", "0", name] in [c["args"] for c in _calls(fake_runtime)]


# ------------------------------------------------------------------------- the docs


def _containers_section() -> str:
    text = (REPO / "docs" / "endpoints.md").read_text()
    return text.split("### Containers\n", 1)[1].split("\n## ", 1)[0].split("\n### ", 1)[0]


def test_the_documented_configs_are_valid_engine_sections() -> None:
    section = _containers_section()
    blocks = [textwrap.dedent(b) for b in re.findall(r"```yaml\n(.*?)```", section, flags=re.S)]
    assert len(blocks) == 2
    kinds = set()
    for block in blocks:
        engine = parse_config(block).engine
        options = ContainerOptions.model_validate(
            {k: v for k, v in engine.items() if k.startswith("container_")})
        container = options.container()
        assert container is not None
        kinds.add(container.type)
    assert kinds == {"podman", "custom"}
    for key in ContainerOptions.model_fields:
        if key.startswith("container_"):
            assert f"| `{key}` |" in section, f"docs/endpoints.md does not describe {key}"


def test_the_documented_podman_settings_are_the_tests_own() -> None:
    """The containers.conf the docs show has the settings the tests run podman with."""
    section = _containers_section()
    (toml,) = re.findall(r"```toml\n(.*?)```", section, flags=re.S)
    documented = tomllib.loads(toml)
    used = tomllib.loads(containers_conf(20000, 32768))
    assert documented["engine"] == {k: v for k, v in used["engine"].items() if k != "tmp_dir"}
    assert {u.split("=")[0] for u in documented["containers"]["default_ulimits"]} == {
        u.split("=")[0] for u in used["containers"]["default_ulimits"]}
