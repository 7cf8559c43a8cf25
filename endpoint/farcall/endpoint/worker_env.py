"""What a worker process's environment holds: a small safe base, and what the operator lists.

Workers run the tasks of everyone the endpoint is shared with, so they never inherit the
agent's environment (a user token, cloud keys, whatever the operator's shell exported). A
worker starts from the agent's values of ``SAFE_NAMES`` and of names starting with one of
``SAFE_PREFIXES`` (locale, batch scheduler and MPI variables, which a job's workers need),
plus the names the engine section passes through (``worker_env_passthrough``) and the values
it sets (``worker_env``, which win). ``FARCALL_TOKEN`` never reaches a worker, whatever the
configuration says.

``ProcessPoolEngine`` starts its workers with ``worker_environment()``. Parsl starts its
workers itself (a provider's job script, a launcher), so ``ParslEngine`` puts
``python3 -m farcall.endpoint.worker_env`` in front of the worker pool's command: run in the
job, after ``worker_init``, it replaces the environment the same way and execs the pool.
"""

from __future__ import annotations

import base64
import json
import os
import re
import sys
from collections.abc import Iterable, Mapping

from pydantic import Field, field_validator

from farcall.endpoint.engines.base import EngineOptions

SAFE_NAMES = frozenset({
    "PATH", "HOME", "USER", "LOGNAME", "SHELL", "LANG", "LANGUAGE", "TZ", "TMPDIR",
    # Where Python and its libraries are (a venv, conda, an HPC module).
    "PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "CONDA_PREFIX", "LD_LIBRARY_PATH",
    # What a worker trusts when it fetches and uploads big data at the broker.
    "SSL_CERT_FILE", "SSL_CERT_DIR", "FARCALL_CA_BUNDLE",
})
"""Variables every worker gets from the agent's environment (when set there)."""
SAFE_PREFIXES = ("LC_", "SLURM_", "PBS_", "LSB_", "COBALT_", "FLUX_", "PMI_", "PMIX_", "OMPI_",
                 "I_MPI_", "HYDRA_", "PARSL_")
"""Locale, batch job and MPI variables: a job's workers and ``srun``/``mpiexec`` need them."""
NEVER = frozenset({"FARCALL_TOKEN"})
"""Never given to a worker: the agent drops the user token after registration (``lockdown``)."""
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class WorkerEnvOptions(EngineOptions):
    """``engine:`` keys of engines whose workers are processes of their own."""

    worker_env: dict[str, str] = Field(
        default_factory=dict, description="variables set in every worker (name: value)")
    worker_env_passthrough: list[str] = Field(
        default_factory=list,
        description="variables every worker gets from the agent's environment, beyond the safe base")

    @field_validator("worker_env", "worker_env_passthrough")
    @classmethod
    def _valid_names(cls, value: dict[str, str] | list[str]) -> dict[str, str] | list[str]:
        _check_names(value)
        return value


def _check_names(names: Iterable[str]) -> None:
    for name in names:
        if not NAME.match(name):
            raise ValueError(f"{name!r} is not a valid environment variable name (letters, "
                             "digits and '_', not starting with a digit)")
        if name in NEVER:
            raise ValueError(f"{name} never reaches a worker: a user token lets a task act as "
                             "its owner; the endpoint needs only its credential once registered")


def worker_environment(
    passthrough: Iterable[str] = (),
    values: Mapping[str, str] | None = None,
    source: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A worker's whole environment: the safe base and ``passthrough`` names from ``source``
    (default: this process's environment), then ``values``; never a name in ``NEVER``."""
    source = os.environ if source is None else source
    keep = SAFE_NAMES.union(passthrough)
    env = {name: value for name, value in source.items()
           if name in keep or name.startswith(SAFE_PREFIXES)}
    env.update(values or {})
    for name in NEVER:
        env.pop(name, None)
    return env


# ------------------------------------------------------------------ for Parsl's workers


def exec_prefix(passthrough: Iterable[str] = (), values: Mapping[str, str] | None = None,
                container: str | None = None) -> str:
    """The shell words that run a command under ``worker_environment`` (``main`` below), for a
    command line Parsl formats with ``str.format`` (no braces in it). ``values`` travel in it,
    so they are in the block's job script: pass secrets through by name instead. ``container``
    (``containers.Container.encode``) runs the command in that container."""
    words = ["python3", "-m", __name__]
    names = ",".join(passthrough)
    if names:
        words += ["--pass", names]
    if values:
        words += ["--set", base64.urlsafe_b64encode(json.dumps(dict(values)).encode()).decode()]
    if container:
        words += ["--container", container]
    return " ".join([*words, "--"])


def main(argv: list[str]) -> None:
    """``python3 -m farcall.endpoint.worker_env [--pass A,B] [--set B64JSON] [--container B64]
    -- COMMAND...``: exec ``COMMAND`` with the worker environment made from this process's
    one; with ``--container``, run it in that container (``containers.run_pool``) instead."""
    passthrough: list[str] = []
    values: dict[str, str] = {}
    container = ""
    args = list(argv)
    while args and args[0] != "--":
        flag, value = args[0], args[1] if len(args) > 1 else ""
        if flag == "--pass":
            passthrough = [n for n in value.split(",") if n]
        elif flag == "--set":
            values = json.loads(base64.urlsafe_b64decode(value.encode()))
        elif flag == "--container":
            container = value
        else:
            sys.exit(f"farcall.endpoint.worker_env: unknown argument {flag!r}")
        args = args[2:]
    command = args[1:]
    if not command:
        sys.exit("usage: python3 -m farcall.endpoint.worker_env [--pass A,B] [--set B64] "
                 "[--container B64] -- CMD")
    env = worker_environment(passthrough, values)
    if container:
        from farcall.endpoint.engines.containers import Container, run_pool

        spec, run_dir = Container.decode(container)
        sys.exit(run_pool(spec, run_dir, command, env))
    os.execvpe(command[0], command, env)


if __name__ == "__main__":
    main(sys.argv[1:])
