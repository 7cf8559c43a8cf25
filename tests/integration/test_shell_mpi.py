"""ShellFunction and MPIFunction end to end: broker on real Redis and RabbitMQ, endpoint processes.

The shell tests share one process-pool endpoint (started once for the module). MPI runs a
2-rank C program compiled here with MPICH's mpicc (Debian ``mpich``, installed by
scripts/mpich/setup.sh when absent) on an MPIEngine endpoint with LocalProvider + mpiexec, and on
one with SlurmProvider + srun in the private single-node Slurm (scripts/slurm/setup.sh). Under
srun, MPICH finds its ranks through Slurm's PMI2 (``--mpi=pmi2``; without it every rank is
"rank 0 of 1"), given here per task in ``launcher_options``.
"""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from farcall import Client, Executor, MPIFunction, ShellFunction, ShellResult
from farcall.errors import MPIEnvironmentError, ShellCommandError, TaskPending
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint
from tests.schedulers import (
    SLURM_PARTITION,
    ensure_mpich,
    worker_init,
)

pytestmark = pytest.mark.integration

FAST = {"strategy_period": 0.5, "heartbeat_period": 1, "heartbeat_threshold": 5, "prefetch": 2}
RANKS = {"num_nodes": 1, "ranks_per_node": 2}
HELLO_C = r"""
#include <mpi.h>
#include <stdio.h>
int main(int argc, char **argv) {
    int rank, size;
    MPI_Init(&argc, &argv);
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    printf("rank %d of %d\n", rank, size);
    MPI_Finalize();
    return 0;
}
"""


@pytest.fixture(scope="module")
def module_client(broker: Broker, token: str) -> Iterator[Client]:
    c = Client(broker_url=broker.url, token=token)
    yield c
    c.close()


@pytest.fixture(scope="module")
def shell_ep(make_module_endpoint: Callable[..., Endpoint], module_client: Client) -> str:
    return make_module_endpoint("shell").start(module_client)


@pytest.fixture(scope="module")
def mpi_hello(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The 2-rank test program, built with mpicc (MPICH installed first if it is missing)."""
    mpicc = ensure_mpich()["mpicc"]
    where = tmp_path_factory.mktemp("mpi")
    (where / "hello.c").write_text(HELLO_C)
    subprocess.run([mpicc, "-o", str(where / "hello"), str(where / "hello.c")], check=True, timeout=60)
    return where / "hello"


def _process_gone(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return True
    return state in ("Z", "X")


def test_shell_function_through_the_executor(shell_ep: str, client: Client, tmp_path: Path) -> None:
    data = tmp_path / "lines.txt"
    data.write_text("one\ntwo\nthree\n")
    with Executor(endpoint_id=shell_ep, client=client) as ex:
        result = ex.submit(ShellFunction("wc -l {path}"), path=str(data)).result(timeout=60)
    assert isinstance(result, ShellResult)
    assert (result.cmd, result.stdout, result.stderr, result.returncode) == (
        f"wc -l {data}", f"3 {data}\n", "", 0)


def test_shell_function_through_register_and_run(shell_ep: str, client: Client) -> None:
    function_id = client.register_function(ShellFunction("echo {greeting}, {who}", name="greet"))
    assert client.get_function(function_id)["function_name"] == "greet"
    task_id = client.run(endpoint_id=shell_ep, function_id=function_id, greeting="hello", who="world")

    def result() -> ShellResult | None:
        try:
            return client.get_result(task_id)
        except TaskPending:
            return None

    got = wait_until(result, 60, f"task {task_id}'s result")
    assert got.stdout == "hello, world\n" and got.returncode == 0


def test_non_zero_exit_is_in_the_result_and_a_missing_placeholder_is_an_error(
    shell_ep: str, client: Client
) -> None:
    with Executor(endpoint_id=shell_ep, client=client) as ex:
        failed = ex.submit(ShellFunction("echo partial; ls /no/such/dir; exit 3")).result(timeout=60)
        with pytest.raises(ShellCommandError, match=r"placeholder\(s\) \{path\}.*path=\.\.\."):
            ex.submit(ShellFunction("wc -l {path}")).result(timeout=60)
        with pytest.raises(MPIEnvironmentError, match="MPIEngine.*resource_specification"):
            ex.submit(MPIFunction("hostname")).result(timeout=60)
    assert failed.returncode == 3 and failed.stdout == "partial\n"
    assert "No such file or directory" in failed.stderr
    assert failed.exception_name == "subprocess.CalledProcessError"


def test_walltime_kills_the_command_and_its_children(shell_ep: str, client: Client) -> None:
    fn = ShellFunction("sleep 60 & echo child $!; sleep 60", walltime=1)
    with Executor(endpoint_id=shell_ep, client=client) as ex:
        result = ex.submit(fn).result(timeout=60)
    assert result.returncode == 124 and result.exception_name == "subprocess.TimeoutExpired"
    assert "ran past its walltime of 1 s" in result.stderr and "killed (SIGTERM)" in result.stderr
    child = int(result.stdout.split()[1])
    assert _process_gone(child), f"the command's background child {child} survived the walltime"


def test_cancelling_a_running_command_stops_it(shell_ep: str, client: Client, tmp_path: Path) -> None:
    """The process pool cancels a running task by killing its worker; the command goes too."""
    pidfile = tmp_path / "pids"
    function_id = client.register_function(ShellFunction("sleep 60 & echo $$ $! > {pids}; sleep 60"))
    task_id = client.run(endpoint_id=shell_ep, function_id=function_id, pids=str(pidfile))
    pids = wait_until(lambda: pidfile.exists() and pidfile.read_text().split(), 30, "the command to start")
    client.cancel(task_id)
    wait_until(lambda: all(_process_gone(int(pid)) for pid in pids), 15,
               f"the cancelled command's processes {pids} to be gone")
    assert client.get_task(task_id)["state"] == "cancelled"


def _hello_ranks(result: Any) -> None:
    assert isinstance(result, ShellResult) and result.returncode == 0, result
    assert sorted(result.stdout.splitlines()) == ["rank 0 of 2", "rank 1 of 2"], result


def test_mpi_function_with_mpiexec_on_a_local_provider(
    make_endpoint: Callable[..., Endpoint], client: Client, mpi_hello: Path
) -> None:
    ep = make_endpoint("mpi-local", engine="MPIEngine", engine_spec={
        "type": "MPIEngine", "max_workers_per_block": 1, "mpi_launcher": "mpiexec", **FAST,
        "provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0, "max_blocks": 1,
                     "launcher": {"type": "SimpleLauncher"}},
    })
    eid = ep.start(client)
    with Executor(endpoint_id=eid, client=client, resource_specification=RANKS) as ex:
        result = ex.submit(MPIFunction(str(mpi_hello))).result(timeout=90)
    _hello_ranks(result)
    assert result.cmd.startswith("mpiexec -n 2 -ppn 2 -hosts localhost "), result.cmd
    with Executor(endpoint_id=eid, client=client,
                  resource_specification={"num_nodes": 2, "ranks_per_node": 1}) as ex:
        with pytest.raises(ValueError, match="num_nodes=2.*1 node.*LocalProvider"):
            ex.submit(MPIFunction(str(mpi_hello))).result(timeout=60)  # fails at once, no hang
    ep.stop()


def test_mpi_function_with_srun_on_a_slurm_provider(
    make_endpoint: Callable[..., Endpoint], client: Client, mpi_hello: Path, slurm: dict[str, str]
) -> None:
    ep = make_endpoint("mpi-slurm", engine="MPIEngine", extra_env=slurm, engine_spec={
        "type": "MPIEngine", "max_workers_per_block": 1, "mpi_launcher": "srun", **FAST,
        "provider": {"type": "SlurmProvider", "partition": SLURM_PARTITION, "nodes_per_block": 1,
                     "init_blocks": 0, "min_blocks": 0, "max_blocks": 1, "walltime": "00:10:00",
                     "exclusive": True, "cmd_timeout": 30, "worker_init": worker_init(),
                     "launcher": {"type": "SimpleLauncher"}},
    })
    eid = ep.start(client)
    spec = {**RANKS, "launcher_options": "--mpi=pmi2"}
    with Executor(endpoint_id=eid, client=client, resource_specification=spec) as ex:
        result = ex.submit(MPIFunction(str(mpi_hello))).result(timeout=90)
    _hello_ranks(result)
    assert result.cmd.startswith("srun --ntasks 2 --ntasks-per-node 2 "), result.cmd
    assert "--mpi=pmi2" in result.cmd
    ep.stop()
