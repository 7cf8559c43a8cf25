"""Programs written for ``globus_compute_sdk`` run on farcall with their import lines changed.

Each program in ``gc_programs/`` is written as Globus Compute's tutorials write them, importing
from ``globus_compute_sdk``. The test copies it, rewrites the module name on its import lines
only (and checks that nothing else changed and nothing else names Globus Compute), and runs it
as a subprocess against a broker on Redis and RabbitMQ and real endpoint processes: a process
pool, an MPIEngine with mpiexec (MPICH), and a multi-user endpoint whose manager the test plays
on the channel (as test_multi_user_broker.py does) while the user endpoint it is asked to start
is a real agent. Programs get their endpoint ids and a writable directory from the environment,
and the broker and token as any farcall program does (``FARCALL_BROKER_URL``, ``FARCALL_TOKEN``).
"""

from __future__ import annotations

import difflib
import re
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from farcall import Client
from farcall.endpoint.registration import Registration, save_registration
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint
from tests.integration.test_multi_user_broker import manager_hello, next_start, session
from tests.schedulers import ensure_mpich

pytestmark = pytest.mark.integration

PROGRAMS = Path(__file__).parent / "gc_programs"
IMPORT = re.compile(r"^(\s*(?:from|import)\s+)globus_compute_sdk(?=[.\s])", re.MULTILINE)
"""The one change a program gets: ``globus_compute_sdk`` becomes ``farcall`` on its import lines
(``globus_compute_sdk.errors`` becomes ``farcall.errors``)."""
FAST_MPI = {"strategy_period": 0.5, "heartbeat_period": 1, "heartbeat_threshold": 5, "prefetch": 2}


def converted(name: str) -> str:
    """The program with its import lines changed, checked to differ in nothing else."""
    source = (PROGRAMS / name).read_text()
    changed = IMPORT.sub(r"\1farcall", source)
    diff = [line for line in difflib.ndiff(source.splitlines(), changed.splitlines())
            if line[:2] in ("- ", "+ ")]
    assert diff, f"{name} imports nothing from globus_compute_sdk"
    assert all(re.match(r"[-+] \s*(from|import) ", line) for line in diff), diff
    assert "globus_compute_sdk" not in changed, f"{name} names globus_compute_sdk elsewhere"
    return changed


def run_program(name: str, env: dict[str, str], where: Path, timeout: float = 90,
                ) -> subprocess.CompletedProcess[str]:
    """Run the converted program to its end; it must exit 0."""
    path = where / name
    path.write_text(converted(name))
    done = subprocess.run([sys.executable, str(path)], env=env, cwd=where, capture_output=True,
                          text=True, timeout=timeout)
    assert done.returncode == 0, f"{name} failed:\n{done.stdout}\n{done.stderr}"
    return done


@pytest.fixture(scope="module")
def user(broker: Broker) -> Iterator[tuple[str, Client]]:
    """The researcher the programs run as: a token and a client of theirs."""
    token = broker.create_user(f"researcher-{uuid.uuid4().hex[:6]}")
    client = Client(broker_url=broker.url, token=token)
    yield token, client
    client.close()


@pytest.fixture(scope="module")
def program_env(broker: Broker, user: tuple[str, Client],
                make_module_endpoint: Callable[..., Endpoint]) -> dict[str, str]:
    """What every program is run with: the broker, the user's token, a process-pool endpoint."""
    token, client = user
    endpoint_id = make_module_endpoint("gc", workers=2, user_token=token).start(client)
    return {k: v for k, v in broker.env.items() if not k.startswith("FARCALL_")} | {
        "FARCALL_BROKER_URL": broker.url, "FARCALL_TOKEN": token, "ENDPOINT_ID": endpoint_id}


def lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return done.stdout.splitlines()


def warnings_in(done: subprocess.CompletedProcess[str]) -> list[str]:
    return re.findall(r"CompatibilityWarning: (\S+)", done.stderr)


def test_a_parameter_sweep(program_env: dict[str, str], tmp_path: Path) -> None:
    done = run_program("sweep.py", program_env, tmp_path)
    grid = [(t, p) for t in (250.0, 275.0, 300.0) for p in (90.0, 100.0)]
    assert lines(done) == ["submitted 6 tasks from density-sweep"] + [
        f"T={t:.0f} P={p:.0f} -> {round(p / (0.287 * t), 4)}" for t, p in grid]
    assert sorted(warnings_in(done)) == ["Executor(amqp_port=...)", "Executor(api_burst_limit=...)",
                                         "Executor(api_burst_window_s=...)"], done.stderr


def test_results_as_they_complete(program_env: dict[str, str], tmp_path: Path) -> None:
    done = run_program("as_completed.py", program_env, tmp_path)
    assert lines(done) == ["task group: set",
                           "received 20 sequences; the longest starts at 18 (21 steps)"]


def test_a_batch_through_the_client(program_env: dict[str, str], tmp_path: Path) -> None:
    done = run_program("batch.py", program_env, tmp_path)
    assert lines(done) == [
        "answer keys: ['endpoint_id', 'request_id', 'task_group_id', 'tasks']",
        "submitted 10 tasks", "statuses: ['success']",
        f"results: {[i * i * 3 for i in range(10)]}"]
    assert warnings_in(done) == ["Client.create_batch(create_websocket_queue=...)"]


def test_a_remote_exception_is_caught_by_its_globus_compute_name(
        program_env: dict[str, str], tmp_path: Path) -> None:
    done = run_program("remote_exception.py", program_env, tmp_path)
    assert lines(done) == ["future: caught TaskExecutionFailed", "names the error: True",
                           "remote traceback: True", "get_result: caught TaskExecutionFailed: True"]


def test_shell_commands(program_env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "shell-output"
    done = run_program("shell_commands.py", program_env | {"OUTPUT_DIR": str(out)}, tmp_path)
    assert lines(done) == ["hello", "hola", "bonjour", "walltime returncode: 124",
                           "dict: True 3 as a dict subprocess.CalledProcessError",
                           "snippet: ['48', '49', '50']", "file lines: 50"]


def test_polling_with_the_client(program_env: dict[str, str], tmp_path: Path) -> None:
    done = run_program("polling.py", program_env, tmp_path)
    assert lines(done) == ["endpoint: online", "listed: True", "function: hello_world",
                           "task: success Hello, farcall? True", "result: Hello, farcall?",
                           "deleted"]


def test_registered_functions_and_reloaded_tasks(program_env: dict[str, str], tmp_path: Path) -> None:
    done = run_program("registered_functions.py", program_env, tmp_path)
    results = [f"result from task {i}" for i in range(1, 5)]
    assert lines(done) == [str(results), "submitted: 4", f"reloaded: {results}"]


def test_an_mpi_hello(program_env: dict[str, str], user: tuple[str, Client],
                      make_module_endpoint: Callable[..., Endpoint], tmp_path: Path) -> None:
    ensure_mpich()  # installs MPICH when it is missing; fails the test (no skip) when it cannot
    token, client = user
    ep = make_module_endpoint("gc-mpi", engine="MPIEngine", user_token=token, engine_spec={
        "type": "MPIEngine", "max_workers_per_block": 1, "mpi_launcher": "mpiexec", **FAST_MPI,
        "provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0, "max_blocks": 1,
                     "launcher": {"type": "SimpleLauncher"}}})
    env = program_env | {"MPI_ENDPOINT_ID": ep.start(client)}
    done = run_program("mpi_hello.py", env, tmp_path)
    assert lines(done) == ["returncode: 0", "launched with: mpiexec", "rank 0 of 2", "rank 1 of 2"]
    ep.stop()


def test_user_endpoint_config_on_a_multi_user_endpoint(
        broker: Broker, program_env: dict[str, str], user: tuple[str, Client],
        make_module_endpoint: Callable[..., Endpoint], tmp_path: Path) -> None:
    """The site's manager is played on its channel; the user endpoint it is asked to start is a
    real agent, started here with the id and credential the broker sent the manager."""
    _, researcher = user
    with Client(broker_url=broker.url, token=broker.create_user(f"site-{uuid.uuid4().hex[:6]}")
                ) as site:
        registered = site.register_endpoint(f"site-{uuid.uuid4().hex[:6]}")
        mep_id, credential = registered["endpoint_id"], registered["credential"]
        with session(broker, mep_id, credential, manager_hello()) as manager_ws:
            site.share_endpoint(mep_id, researcher.whoami()["username"])
            path = tmp_path / "user_endpoint_config.py"
            path.write_text(converted("user_endpoint_config.py"))
            program = subprocess.Popen([sys.executable, str(path)], cwd=tmp_path, text=True,
                                       env=program_env | {"MULTI_USER_ENDPOINT_ID": mep_id},
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            try:
                start = next_start(manager_ws, timeout=60)
                assert start.user_endpoint_config == {"account": "abc123", "nodes": 2}
                assert start.username == researcher.whoami()["username"]
                child = make_module_endpoint("gc-user-endpoint")
                save_registration(child.dir, Registration(
                    start.endpoint_id, start.credential, child.name, broker.url,
                    str(researcher.request("GET", "/health")["broker_id"])))
                child.spawn()
                out, err = program.communicate(timeout=60)
            finally:
                program.kill()
        site.delete_endpoint(mep_id)
    assert program.returncode == 0, f"{out}\n{err}"
    assert out.splitlines() == ["hello, researcher", "ran on a user endpoint of the site: True",
                                "config kept: {'account': 'abc123', 'nodes': 2}"]


def test_stop_endpoint(program_env: dict[str, str], user: tuple[str, Client],
                       make_module_endpoint: Callable[..., Endpoint], tmp_path: Path) -> None:
    token, client = user
    ep = make_module_endpoint("gc-stopped", user_token=token)
    endpoint_id = ep.start(client)
    done = run_program("stop_endpoint.py", program_env | {"ENDPOINT_ID": endpoint_id}, tmp_path)
    assert lines(done) == ["before: online", "stopping: True"]
    proc = ep.proc
    assert proc is not None
    wait_until(lambda: not proc.alive(), 30, f"the stopped endpoint to exit\n{proc.output(3000)}")
    assert proc.popen is not None and proc.popen.returncode == 0, proc.output(3000)
    assert "asked it to stop (Client.stop_endpoint)" in proc.output(3000)
    wait_until(lambda: client.get_endpoint_status(endpoint_id)["status"] == "offline", 30,
               "the stopped endpoint to be offline")
    assert client.stop_endpoint(endpoint_id) == {"endpoint_id": endpoint_id, "stopping": False}
