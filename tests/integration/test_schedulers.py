"""The scheduler infrastructure works end to end with raw Parsl (no farcall involved).

A HighThroughputExecutor provisions its one block through (a) a real single-node Slurm set up by
scripts/slurm/setup.sh, (b) PBSProProvider on the stand-in qsub/qstat/qdel and (c) LSFProvider on
the stand-in bsub/bjobs/bkill; a task reports the scheduler's job id from inside the job, and the
job is gone after the DFK cleans up.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import parsl
import pytest
from parsl.app.app import python_app
from parsl.config import Config
from parsl.executors import HighThroughputExecutor
from parsl.jobs.states import JobState
from parsl.launchers import SingleNodeLauncher, SrunLauncher
from parsl.providers import LSFProvider, PBSProProvider, SlurmProvider

from harness.procs import wait_until
from tests.schedulers import (
    SLURM_PARTITION,
    fake_cancel_all,
    fake_commands,
    fake_jobs,
    fake_scheduler_env,
    process_group_alive,
    slurm_jobs,
    worker_init,
)

pytestmark = pytest.mark.integration

FIRST_TASK_TIMEOUT = 60  # seconds from parsl.load to the first result
GONE_TIMEOUT = 30  # seconds from dfk.cleanup to the job leaving the scheduler


def _executor(provider: Any, tmp_path: Path) -> HighThroughputExecutor:
    return HighThroughputExecutor(
        label="htex",
        address="127.0.0.1",
        max_workers_per_node=1,
        worker_logdir_root=str(tmp_path / "workers"),
        heartbeat_period=1,
        heartbeat_threshold=5,
        provider=provider,
    )


def _config(provider: Any, tmp_path: Path) -> Config:
    return Config(
        executors=[_executor(provider, tmp_path)],
        run_dir=str(tmp_path / "runinfo"),
        strategy_period=0.2,
        initialize_logging=False,
    )


_JOB_ENV_SOURCE = """
def job_env(names):
    import os
    return {name: os.environ.get(name) for name in names}
"""


def _job_env_app() -> Callable[..., Any]:
    # Compiled into a fresh namespace so dill ships the function by value: a function of this module
    # (even a nested one) carries its module's globals by reference, and with pytest's importlib
    # import mode the worker cannot import this module.
    namespace: dict[str, Any] = {}
    exec(compile(_JOB_ENV_SOURCE, "<job_env>", "exec"), namespace)
    return python_app(namespace["job_env"], executors=["htex"])


def _run_in_job(config: Config, names: list[str], while_running: Callable[[dict, Any], None]) -> dict:
    """Load ``config``, run one task reporting ``names`` from its environment, call
    ``while_running(result, provider)`` while the block still runs, then clean the DFK up."""
    parsl.clear()
    dfk = parsl.load(config)
    executor = dfk.executors["htex"]
    assert isinstance(executor, HighThroughputExecutor)
    try:
        start = time.monotonic()
        result = _job_env_app()(names).result(timeout=FIRST_TASK_TIMEOUT)
        print(f"first task after {time.monotonic() - start:.2f} s: {result}")
        while_running(result, executor.provider)
        job_ids = set(executor.blocks_to_job_id.values())
    finally:
        dfk.cleanup()
        parsl.clear()
    return {"result": result, "job_ids": job_ids, "provider": executor.provider}


def _provider_state(provider: Any, job_id: str) -> JobState:
    """The job's state as the provider itself reads it from the scheduler (squeue/qstat/bjobs)."""
    return provider.status([job_id])[0].state


# ----------------------------------------------------------------------------- Slurm
def test_slurm_block_runs_task_inside_a_slurm_job(slurm: dict[str, str], tmp_path: Path) -> None:
    provider = SlurmProvider(
        partition=SLURM_PARTITION,
        nodes_per_block=1,
        init_blocks=1,
        min_blocks=0,
        max_blocks=1,
        walltime="00:10:00",
        exclusive=False,
        launcher=SrunLauncher(),
        worker_init=worker_init(),
        cmd_timeout=30,
    )
    seen: dict[str, Any] = {}

    def while_running(result: dict, provider: Any) -> None:
        seen.update(slurm_jobs())
        seen["provider_state"] = _provider_state(provider, result["SLURM_JOB_ID"])

    out = _run_in_job(_config(provider, tmp_path), ["SLURM_JOB_ID", "SLURM_CONF"], while_running)
    job_id = out["result"]["SLURM_JOB_ID"]
    assert job_id, f"the task did not run inside a Slurm job: {out['result']}"
    assert seen.get(job_id) == "R", f"job {job_id} not running in squeue while the task ran: {seen}"
    assert out["job_ids"] == {job_id}, f"Parsl's block job ids {out['job_ids']} != task's {job_id}"
    assert seen["provider_state"] == JobState.RUNNING, seen
    assert out["result"]["SLURM_CONF"] == slurm["SLURM_CONF"]
    wait_until(lambda: job_id not in slurm_jobs(), GONE_TIMEOUT, f"Slurm job {job_id} to leave squeue")


# ----------------------------------------------------------------------------- PBS Pro / LSF stand-ins
@pytest.fixture
def fake_sched(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    state_dir = tmp_path / "sched"
    for key, value in fake_scheduler_env(state_dir).items():
        monkeypatch.setenv(key, value)
    yield state_dir
    fake_cancel_all(state_dir)  # only matters after a failure


def _assert_fake_job_ran_and_was_cancelled(
    state_dir: Path, job_id: str, out: dict, expected_commands: set[tuple[str, ...]]
) -> None:
    jobs = {j["id"]: j for j in fake_jobs(state_dir)}
    assert list(jobs) == [job_id], f"expected exactly job {job_id}, the stand-in has {list(jobs)}"
    assert out["job_ids"] == {job_id}, f"Parsl's block job ids {out['job_ids']} != task's {job_id}"
    job = wait_until(
        lambda: next((j for j in fake_jobs(state_dir) if j["state"] == "F"), None),
        GONE_TIMEOUT,
        f"stand-in job {job_id} to finish after cleanup",
    )
    assert job["cancelled"], f"job {job_id} finished without being cancelled: {job}"
    wait_until(
        lambda: not process_group_alive(job["pgid"]), GONE_TIMEOUT, f"job {job_id}'s processes to exit"
    )
    assert out["provider"].status([job_id])[0].terminal, out["provider"].status([job_id])
    # The provider drove the stand-in with its real command lines, and every one succeeded.
    commands = fake_commands(state_dir)
    assert [argv[0] for rc, argv in commands if rc == 0] == [argv[0] for _, argv in commands], commands
    used = {(argv[0], *(a for a in argv[1:] if a.startswith("-"))) for _, argv in commands}
    assert expected_commands <= used, f"expected {expected_commands} among {used}"


@pytest.mark.parametrize(
    ("provider_class", "provider_args", "job_id_var", "job_var", "expected_commands"),
    [
        pytest.param(PBSProProvider, {"cpus_per_node": 1}, "PBS_JOBID", "PBS_O_WORKDIR",
                     {("qsub",), ("qstat", "-x", "-f", "-F"), ("qdel",)}, id="pbspro"),
        pytest.param(LSFProvider, {}, "LSB_JOBID", "LSB_HOSTS",
                     {("bsub",), ("bjobs", "-noheader", "-o"), ("bkill",)}, id="lsf"),
    ],
)
def test_block_runs_task_inside_a_fake_scheduler_job(
    fake_sched: Path,
    tmp_path: Path,
    provider_class: type,
    provider_args: dict[str, Any],
    job_id_var: str,
    job_var: str,
    expected_commands: set[tuple[str, ...]],
) -> None:
    provider = provider_class(
        nodes_per_block=1,
        init_blocks=1,
        min_blocks=0,
        max_blocks=1,
        walltime="00:10:00",
        launcher=SingleNodeLauncher(),
        worker_init=worker_init(),
        cmd_timeout=30,
        **provider_args,
    )
    seen: list[Any] = []
    out = _run_in_job(
        _config(provider, tmp_path),
        [job_id_var, job_var],
        lambda result, provider: seen.extend(
            [fake_jobs(fake_sched), _provider_state(provider, result[job_id_var])]
        ),
    )
    job_id = out["result"][job_id_var]
    assert job_id, f"the task did not run inside a {provider_class.__name__} job: {out['result']}"
    jobs, provider_state = seen
    assert [(j["id"], j["state"]) for j in jobs] == [(job_id, "R")], jobs
    assert provider_state == JobState.RUNNING, f"the provider read {provider_state} from the stand-in"
    _assert_fake_job_ran_and_was_cancelled(fake_sched, job_id, out, expected_commands)
