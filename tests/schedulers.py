"""Batch schedulers for tests: a real single-node Slurm and stand-in PBS Pro / LSF commands.

    from tests.schedulers import ensure_slurm, fake_scheduler_env, slurm_jobs, fake_jobs, worker_init

* ``ensure_slurm()`` runs ``scripts/slurm/setup.sh`` once per process (it installs slurm-wlm and
  munge with apt-get when absent, and is a quick verify when Slurm already runs) and returns the
  environment additions (``SLURM_CONF``, ``PATH``). Raises ``SlurmUnavailable`` (an
  AssertionError, so tests fail rather than skip) when Slurm cannot be set up.
* ``ensure_mpich()`` runs ``scripts/mpich/setup.sh`` once per process (it installs Debian's ``mpich``
  with apt-get when ``mpiexec``/``mpicc`` are absent) and returns their paths. Raises
  ``MPICHUnavailable`` (an AssertionError: tests fail rather than skip) when it cannot.
* ``fake_scheduler_env(state_dir)`` returns ``PATH`` (the stand-in commands first) and
  ``FARCALL_FAKE_SCHED_DIR``; ``qsub``/``qstat``/``qdel`` and ``bsub``/``bjobs``/``bkill`` on that
  PATH run job scripts on this machine.
* Parsl's providers run the scheduler commands with the *process* environment, so apply these
  (``monkeypatch.setenv`` or ``patched_environ``) before ``parsl.load``, and pass
  ``worker_init()`` to the provider so the job finds ``process_worker_pool.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import threading
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

from harness import BIN, REPO

SLURM_SETUP = REPO / "scripts" / "slurm" / "setup.sh"
SLURM_TEARDOWN = REPO / "scripts" / "slurm" / "teardown.sh"
MPICH_SETUP = REPO / "scripts" / "mpich" / "setup.sh"
SLURM_DIR = Path(os.environ.get("FARCALL_SLURM_DIR", "/tmp/farcall-slurm"))
SLURM_PARTITION = os.environ.get("FARCALL_SLURM_PARTITION", "debug")
FAKE_SCHED = REPO / "scripts" / "fake_schedulers" / "fakesched.py"
FAKE_COMMANDS = ("qsub", "qstat", "qdel", "bsub", "bjobs", "bkill")
FAKE_SCHED_DIR = Path(os.environ.get("FARCALL_FAKE_SCHED_DIR", "/tmp/farcall-fake-sched"))

_slurm_lock = threading.Lock()
_slurm_env: dict[str, str] | None = None


class SlurmUnavailable(AssertionError):
    """Slurm could not be set up; an AssertionError so a test using it fails instead of skipping."""


def _path_with(*dirs: Path | str, base: str | None = None) -> str:
    base = os.environ.get("PATH", "") if base is None else base
    parts = [str(d) for d in dirs]
    parts += [p for p in base.split(os.pathsep) if p and p not in parts]
    return os.pathsep.join(parts)


def worker_init(extra: str = "") -> str:
    """Provider ``worker_init`` putting this interpreter's bin dir (process_worker_pool.py) on PATH."""
    line = f'export PATH="{BIN}:$PATH"'
    return f"{line}\n{extra}" if extra else line


def ensure_slurm(timeout: float = 240) -> dict[str, str]:
    """Start (installing if needed) the private Slurm once per process; return env additions."""
    global _slurm_env
    with _slurm_lock:
        if _slurm_env is None:
            try:
                proc = subprocess.run(
                    ["bash", str(SLURM_SETUP), str(SLURM_DIR)],
                    capture_output=True,
                    text=True,
                    timeout=timeout,
                    stdin=subprocess.DEVNULL,
                )
            except (OSError, subprocess.TimeoutExpired) as e:
                raise SlurmUnavailable(f"{SLURM_SETUP} did not finish: {e!r}") from e
            lines = proc.stdout.strip().splitlines()
            if proc.returncode != 0 or not lines or not lines[-1].startswith("export SLURM_CONF="):
                raise SlurmUnavailable(
                    f"{SLURM_SETUP} failed (exit {proc.returncode})\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
                )
            conf = lines[-1].split("=", 1)[1].strip()
            _slurm_env = {"SLURM_CONF": conf}
        # PATH is computed per call: callers may have changed os.environ since.
        return {**_slurm_env, "PATH": _path_with(BIN, "/usr/bin", "/usr/sbin")}


def slurm_env() -> dict[str, str]:
    """The whole environment for a child process that talks to the private Slurm."""
    return {**os.environ, **ensure_slurm()}


def _slurm_run(args: list[str], timeout: float = 30) -> str:
    proc = subprocess.run(args, capture_output=True, text=True, env=slurm_env(), timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout


def slurm_jobs(all_states: bool = False) -> dict[str, str]:
    """Job id -> squeue state code (``PD``, ``R``, ``CG``...). Only live jobs unless ``all_states``."""
    args = ["squeue", "--noheader", "--format=%i %t"]
    if all_states:
        args.append("--states=all")
    jobs = {}
    for line in _slurm_run(args).splitlines():
        parts = line.split()
        if len(parts) == 2:
            jobs[parts[0]] = parts[1]
    return jobs


def slurm_job_ids_seen() -> set[str]:
    """Ids of every job slurmctld still remembers (running or recently ended)."""
    return set(slurm_jobs(all_states=True))


def slurm_cancel(job_ids: Iterable[str] | None = None) -> None:
    """Cancel these jobs (default: every live job) of the private Slurm."""
    ids = list(slurm_jobs()) if job_ids is None else list(job_ids)
    if ids:
        _slurm_run(["scancel", *ids])


def fake_scheduler_env(state_dir: Path | str | None = None) -> dict[str, str]:
    """Env additions for the stand-in PBS Pro / LSF commands (``FARCALL_FAKE_SCHED_DIR``, ``PATH``).

    The commands are symlinks to ``fakesched.py`` (it dispatches on its name), made here in
    ``<state_dir>/bin`` so that a checkout that lost its symlinks still works.
    """
    state = Path(state_dir or FAKE_SCHED_DIR)
    bin_dir = state / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in FAKE_COMMANDS:
        link = bin_dir / name
        if not link.is_symlink():
            link.symlink_to(FAKE_SCHED)
    return {"FARCALL_FAKE_SCHED_DIR": str(state), "PATH": _path_with(bin_dir, BIN)}


def fake_jobs(state_dir: Path | str | None = None) -> list[dict[str, Any]]:
    """Job records of the stand-in schedulers, oldest first.

    Keys include ``id`` (``12.host`` for PBS, ``12`` for LSF), ``flavour`` (``pbs``/``lsf``),
    ``state`` (``Q``, ``R``, ``F``), ``cancelled``, ``exit_code``, ``pgid``, ``stdout``, ``stderr``.
    """
    jobs_dir = Path(state_dir or os.environ.get("FARCALL_FAKE_SCHED_DIR") or FAKE_SCHED_DIR) / "jobs"
    if not jobs_dir.is_dir():
        return []
    jobs = []
    for d in jobs_dir.iterdir():
        try:
            jobs.append(json.loads((d / "job.json").read_text()))
        except (OSError, ValueError):
            continue
    return sorted(jobs, key=lambda j: int(j["seq"]))


def fake_commands(state_dir: Path | str | None = None) -> list[tuple[int, list[str]]]:
    """Every stand-in command run so far, oldest first: ``(exit status, argv)``."""
    log = Path(state_dir or os.environ.get("FARCALL_FAKE_SCHED_DIR") or FAKE_SCHED_DIR) / "commands.log"
    try:
        lines = log.read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, rc, cmd = line.split(" ", 2)
        out.append((int(rc), shlex.split(cmd)))
    return out


def fake_live_jobs(state_dir: Path | str | None = None) -> list[dict[str, Any]]:
    """Stand-in jobs that are queued or running (not finished)."""
    return [j for j in fake_jobs(state_dir) if j["state"] != "F"]


def fake_cancel_all(state_dir: Path | str | None = None) -> None:
    """qdel/bkill every unfinished stand-in job (cleanup after a failed test)."""
    env = {**os.environ, **fake_scheduler_env(state_dir)}
    for job in fake_live_jobs(state_dir):
        cmd = "qdel" if job["flavour"] == "pbs" else "bkill"
        subprocess.run([cmd, job["id"]], env=env, capture_output=True, timeout=30)


def process_group_alive(pgid: int) -> bool:
    """A live (non-zombie) process is in process group ``pgid`` (e.g. a stand-in job's ``pgid``)."""
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
                return True
    return False


@contextlib.contextmanager
def patched_environ(changes: Mapping[str, str]) -> Iterator[None]:
    """Apply env changes to ``os.environ`` for the block (Parsl providers read the process env)."""
    saved = {k: os.environ.get(k) for k in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class MPICHUnavailable(AssertionError):
    """MPICH could not be installed; an AssertionError so a test using it fails instead of skipping."""


_mpich_lock = threading.Lock()
_mpich: dict[str, str] | None = None


def ensure_mpich(timeout: float = 300) -> dict[str, str]:
    """Install MPICH if needed (once per process); ``{"mpiexec": path, "mpicc": path}``."""
    global _mpich
    with _mpich_lock:
        if _mpich is None:
            try:
                proc = subprocess.run(["bash", str(MPICH_SETUP)], capture_output=True, text=True,
                                      timeout=timeout, stdin=subprocess.DEVNULL)
            except (OSError, subprocess.TimeoutExpired) as e:
                raise MPICHUnavailable(f"{MPICH_SETUP} did not finish: {e!r}") from e
            lines = proc.stdout.strip().splitlines()
            found = dict(w.split("=", 1) for w in (lines[-1] if lines else "").split() if "=" in w)
            if proc.returncode != 0 or set(found) != {"mpiexec", "mpicc"}:
                raise MPICHUnavailable(
                    f"{MPICH_SETUP} failed (exit {proc.returncode})\n"
                    f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
                )
            _mpich = found
        return dict(_mpich)
