#!/usr/bin/env python3
"""Stand-in PBS Pro (qsub, qstat, qdel) and LSF (bsub, bjobs, bkill) commands for tests.

Each command is a symlink to this file (tests/schedulers.py makes them); it dispatches on the
name it was called by. A submitted
job script runs on this machine, in the background, in a new session (its own process group),
supervised by a small detached runner process that records its state. Job state lives in
``$FARCALL_FAKE_SCHED_DIR`` (default ``/tmp/farcall-fake-sched``): ``jobs/<seq>/job.json`` plus
the script, its output and the runner's log; ``commands.log`` records every command line run.

The output formats are the ones Parsl's PBSProProvider, TorqueProvider and LSFProvider parse:

* ``qsub [opts] SCRIPT``           -> ``<seq>.<host>``
* ``qstat -x -f -F json ID...``    -> ``{"Jobs": {"<seq>.<host>": {"job_state": "R", ...}}}``
* ``qstat [ID...]``                -> the Torque/PBS table (state in the 5th column)
* ``qdel ID...``                   -> kills the job's process group
* ``bsub [opts] SCRIPT`` / ``bsub < SCRIPT`` -> ``Job <seq> is submitted to default queue <normal>.``
* ``bjobs -noheader -o 'jobid stat' ID...``  -> ``<seq> RUN``
* ``bkill ID...``                  -> ``Job <seq> is being terminated``

The job environment gets PBS_JOBID / PBS_JOBNAME / PBS_O_WORKDIR / PBS_NODEFILE or LSB_JOBID /
LSB_JOBNAME / LSB_HOSTS / LSB_DJOB_HOSTFILE. ``#PBS -o/-e`` and ``#BSUB -o/-e`` (and the same
options on the command line) name the job's stdout/stderr files; walltime (``-l walltime=`` or
``-W``) is enforced. Only the Python standard library is used.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pwd
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HOST = socket.gethostname().split(".")[0]
STATE_DIR = Path(os.environ.get("FARCALL_FAKE_SCHED_DIR", "/tmp/farcall-fake-sched"))
JOBS = STATE_DIR / "jobs"
KILL_GRACE = float(os.environ.get("FARCALL_FAKE_SCHED_KILL_GRACE", "3"))

# Internal states (PBS letters); LSF names are derived from them.
QUEUED, RUNNING, EXITING, FINISHED = "Q", "R", "E", "F"


# ----------------------------------------------------------------------------- job records
def _job_dir(seq: str) -> Path:
    return JOBS / seq


def _read(seq: str) -> dict[str, Any] | None:
    try:
        return json.loads((_job_dir(seq) / "job.json").read_text())
    except (OSError, ValueError):
        return None


def _write(job: dict[str, Any]) -> None:
    d = _job_dir(job["seq"])
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".job.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        json.dump(job, f, indent=1)
    os.replace(tmp, d / "job.json")


@contextlib.contextmanager
def _locked():
    STATE_DIR.mkdir(parents=True, exist_ok=True)
    with open(STATE_DIR / "lock", "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _update(seq: str, **changes: Any) -> dict[str, Any] | None:
    with _locked():
        job = _read(seq)
        if job is None:
            return None
        job.update(changes)
        _write(job)
        return job


def _next_seq() -> str:
    counter = STATE_DIR / "next_id"
    value = int(counter.read_text() or "1") if counter.exists() else 1
    counter.write_text(str(value + 1))
    return str(value)


def _user() -> str:
    try:
        return pwd.getpwuid(os.getuid()).pw_name
    except KeyError:
        return os.environ.get("USER") or str(os.getuid())


def _seq_of(job_id: str) -> str:
    """``12.host`` / ``12`` / ``12[]`` -> ``12`` (PBS ids carry the server name)."""
    return job_id.strip().split(".")[0].rstrip("[]")


def all_jobs() -> list[dict[str, Any]]:
    if not JOBS.is_dir():
        return []
    jobs = [_read(p.name) for p in JOBS.iterdir() if p.name.isdigit()]
    return sorted((j for j in jobs if j), key=lambda j: int(j["seq"]))


# ----------------------------------------------------------------------------- parsing
def _walltime_seconds(text: str) -> float | None:
    """``HH:MM:SS`` / ``MM:SS`` / ``SS`` (PBS) -> seconds."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        return None
    seconds = 0.0
    for p in parts:
        seconds = seconds * 60 + p
    return seconds


def _lsf_walltime_seconds(text: str) -> float | None:
    """LSF ``-W [HH:]MM`` -> seconds."""
    try:
        parts = [float(p) for p in text.split(":")]
    except ValueError:
        return None
    return (parts[0] * 60 + parts[1]) * 60 if len(parts) == 2 else parts[0] * 60


def _parse_options(args: list[str], with_value: set[str], spec: dict[str, Any], flavour: str) -> list[str]:
    """Apply ``-X value`` options to ``spec``; returns the remaining positional arguments."""
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--":
            rest.extend(args[i + 1 :])
            break
        if a.startswith("-") and len(a) > 1:
            name = a
            if name in with_value and i + 1 < len(args):
                _apply(name, args[i + 1], spec, flavour)
                i += 2
                continue
            i += 1  # a flag we do not need (-V, -I, -K, ...)
            continue
        rest.append(a)
        i += 1
    return rest


def _apply(name: str, value: str, spec: dict[str, Any], flavour: str) -> None:
    if name == "-o":
        spec["stdout"] = value
    elif name == "-e":
        spec["stderr"] = value
    elif name in ("-N", "-J"):
        spec["name"] = value
    elif name == "-q":
        spec["queue"] = value
    elif name in ("-A", "-P"):
        spec["account"] = value
    elif name == "-v" and flavour == "pbs":
        for item in value.split(","):
            key, _, val = item.partition("=")
            if key:
                spec["env"][key] = val if _ else os.environ.get(key, "")
    elif name == "-l" and flavour == "pbs":
        for item in value.split(","):
            key, _, val = item.partition("=")
            if key == "walltime":
                spec["walltime"] = _walltime_seconds(val)
    elif name == "-W" and flavour == "lsf":
        spec["walltime"] = _lsf_walltime_seconds(value)


def _directives(script: str, prefix: str, with_value: set[str], spec: dict[str, Any], flavour: str) -> None:
    """Read ``#PBS``/``#BSUB`` lines at the top of the script (before the first command)."""
    for line in script.splitlines():
        s = line.strip()
        if not s:
            continue
        if s.startswith(prefix + " ") or s.startswith(prefix + "\t"):
            try:
                words = shlex.split(s[len(prefix) :])
            except ValueError:
                continue
            _parse_options(words, with_value, spec, flavour)
        elif not s.startswith("#"):
            break


# ----------------------------------------------------------------------------- submit
def submit(flavour: str, args: list[str]) -> int:
    with_value = (
        {"-o", "-e", "-N", "-q", "-A", "-l", "-v", "-W", "-S", "-j", "-m", "-M", "-J", "-P", "-a", "-r"}
        if flavour == "pbs"
        else {"-o", "-e", "-J", "-q", "-P", "-W", "-n", "-R", "-nnodes", "-G", "-cwd", "-outdir", "-M"}
    )
    spec: dict[str, Any] = {"env": {}, "walltime": None}
    # Command-line options win over directives: collect directives first, then options.
    cli: dict[str, Any] = {"env": {}, "walltime": None}
    rest = _parse_options(args, with_value, cli, flavour)
    if rest:
        script_path = os.path.abspath(rest[0])
        try:
            script = Path(script_path).read_text()
        except OSError as e:
            print(f"{'qsub' if flavour == 'pbs' else 'bsub'}: cannot read {rest[0]}: {e}", file=sys.stderr)
            return 2
    else:
        script, script_path = sys.stdin.read(), "<stdin>"
        if not script.strip():
            print("usage: qsub SCRIPT | bsub SCRIPT | bsub < SCRIPT", file=sys.stderr)
            return 2
    _directives(script, "#PBS" if flavour == "pbs" else "#BSUB", with_value, spec, flavour)
    spec["env"].update(cli.pop("env"))
    spec.update({k: v for k, v in cli.items() if v is not None})

    with _locked():
        JOBS.mkdir(parents=True, exist_ok=True)
        seq = _next_seq()
        d = _job_dir(seq)
        d.mkdir()
        (d / "script").write_text(script)
        (d / "script").chmod(0o755)
        job_id = f"{seq}.{HOST}" if flavour == "pbs" else seq
        name = spec.get("name") or (Path(script_path).name if script_path != "<stdin>" else "STDIN")
        job = {
            "seq": seq,
            "id": job_id,
            "flavour": flavour,
            "name": name,
            "queue": spec.get("queue") or ("workq" if flavour == "pbs" else "normal"),
            "user": _user(),
            "script_path": script_path,
            "cwd": os.getcwd(),
            "stdout": spec.get("stdout") or str(d / "stdout"),
            "stderr": spec.get("stderr") or str(d / "stderr"),
            "walltime": spec.get("walltime"),
            "env": spec["env"],
            "state": QUEUED,
            "submitted": time.time(),
            "started": None,
            "ended": None,
            "exit_code": None,
            "pid": None,
            "pgid": None,
            "runner_pid": None,
            "cancelled": False,
        }
        _write(job)
    # The runner inherits the submitter's environment (like qsub -V / bsub's default).
    with open(d / "runner.log", "ab") as log:
        runner = subprocess.Popen(
            [sys.executable, os.path.realpath(__file__), "_run", seq],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            start_new_session=True,
            close_fds=True,
        )
    _update(seq, runner_pid=runner.pid)
    if flavour == "pbs":
        print(job_id)
    else:
        print(f"Job <{job_id}> is submitted to default queue <{job['queue']}>.")
    return 0


def _open_out(path: str, cwd: str):
    p = Path(path if os.path.isabs(path) else os.path.join(cwd, path))
    p.parent.mkdir(parents=True, exist_ok=True)
    return open(p, "ab")


def run(seq: str) -> int:
    """The detached runner: start the job script in its own session, wait, record the outcome."""
    job = _read(seq)
    if job is None:
        return 1
    if job["cancelled"]:
        _update(seq, state=FINISHED, ended=time.time(), exit_code=271)
        return 0
    d = _job_dir(seq)
    env = dict(os.environ)
    env.update(job["env"])
    jid, name, cwd = job["id"], job["name"], job["cwd"]
    nodefile = d / "nodefile"
    nodefile.write_text(HOST + "\n")
    if job["flavour"] == "pbs":
        env.update(
            PBS_JOBID=jid,
            PBS_JOBNAME=name,
            PBS_O_WORKDIR=cwd,
            PBS_NODEFILE=str(nodefile),
            PBS_QUEUE=job["queue"],
            PBS_ENVIRONMENT="PBS_BATCH",
        )
    else:
        env.update(
            LSB_JOBID=jid,
            LSB_JOBNAME=name,
            LSB_HOSTS=HOST,
            LSB_MCPU_HOSTS=f"{HOST} 1",
            LSB_DJOB_HOSTFILE=str(nodefile),
            LSB_QUEUE=job["queue"],
        )
    with _open_out(job["stdout"], cwd) as out, _open_out(job["stderr"], cwd) as err:
        proc = subprocess.Popen(
            ["/bin/bash", str(d / "script")],
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=err,
            start_new_session=True,
            close_fds=True,
        )
    _update(seq, state=RUNNING, started=time.time(), pid=proc.pid, pgid=proc.pid)
    # A qdel/bkill that raced with the start found no pgid yet: honour it now.
    if (_read(seq) or {}).get("cancelled"):
        _signal_group(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + job["walltime"] if job["walltime"] else None
    killed_at: float | None = None
    while True:
        try:
            code = proc.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        now = time.monotonic()
        current = _read(seq) or {}
        if killed_at is None and (current.get("cancelled") or (deadline and now > deadline)):
            if not current.get("cancelled"):
                print(f"walltime exceeded: killing job {jid}", file=sys.stderr, flush=True)
            _signal_group(proc.pid, signal.SIGTERM)
            killed_at = now
        elif killed_at is not None and now - killed_at > KILL_GRACE:
            _signal_group(proc.pid, signal.SIGKILL)
    # Leftovers of the job (background children) go with it, as on a real scheduler.
    if _group_alive(proc.pid):
        _signal_group(proc.pid, signal.SIGTERM)
        end = time.monotonic() + KILL_GRACE
        while _group_alive(proc.pid) and time.monotonic() < end:
            time.sleep(0.1)
        _signal_group(proc.pid, signal.SIGKILL)
    _update(seq, state=FINISHED, ended=time.time(), exit_code=code if code >= 0 else 128 - code)
    return 0


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def _group_alive(pgid: int) -> bool:
    """A live (non-zombie) process is in the group; killpg(pgid, 0) also counts unreaped zombies."""
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] not in ("Z", "X") and int(fields[2]) == pgid:
            return True
    return False


def cancel(job_ids: list[str]) -> tuple[list[dict[str, Any]], list[str]]:
    done, unknown = [], []
    for jid in job_ids:
        seq = _seq_of(jid)
        job = _update(seq, cancelled=True) if seq.isdigit() else None
        if job is None:
            unknown.append(jid)
            continue
        if job["state"] == RUNNING and job["pgid"]:
            _signal_group(job["pgid"], signal.SIGTERM)
        done.append(job)
    return done, unknown


# ----------------------------------------------------------------------------- PBS commands
def _pbs_state(job: dict[str, Any]) -> str:
    if job["state"] == RUNNING and job["cancelled"]:
        return EXITING
    return job["state"]


def _pbs_record(job: dict[str, Any]) -> dict[str, Any]:
    rec: dict[str, Any] = {
        "Job_Name": job["name"],
        "Job_Owner": f"{job['user']}@{HOST}",
        "job_state": _pbs_state(job),
        "queue": job["queue"],
        "server": HOST,
        "ctime": time.ctime(job["submitted"]),
        "Output_Path": f"{HOST}:{job['stdout']}",
        "Error_Path": f"{HOST}:{job['stderr']}",
        "exec_host": f"{HOST}/0" if job["started"] else None,
        "Variable_List": {"PBS_O_WORKDIR": job["cwd"]},
    }
    if job["started"]:
        rec["stime"] = time.ctime(job["started"])
    if job["state"] == FINISHED:
        rec["Exit_status"] = job["exit_code"]
        rec["mtime"] = time.ctime(job["ended"])
    return {k: v for k, v in rec.items() if v is not None}


def qsub(args: list[str]) -> int:
    return submit("pbs", args)


def qstat(args: list[str]) -> int:
    history = full = False
    fmt = None
    ids: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-F" and i + 1 < len(args):
            fmt = args[i + 1]
            i += 2
            continue
        if a.startswith("-"):
            history |= "x" in a or "H" in a
            full |= "f" in a
        else:
            ids.append(a)
        i += 1
    jobs: list[dict[str, Any]] = []
    rc = 0
    if ids:
        for jid in ids:
            job = _read(_seq_of(jid)) if _seq_of(jid).isdigit() else None
            if job is None or job["flavour"] != "pbs":
                print(f"qstat: Unknown Job Id {jid}", file=sys.stderr)
                rc = 153
            elif job["state"] == FINISHED and not history:
                print(
                    f"qstat: {jid} Job has finished, use -x or -H to obtain historical job information",
                    file=sys.stderr,
                )
                rc = 35
            else:
                jobs.append(job)
    else:
        jobs = [j for j in all_jobs() if j["flavour"] == "pbs" and (history or j["state"] != FINISHED)]
    if fmt == "json":
        out = {
            "timestamp": int(time.time()),
            "pbs_version": "fake-2024.1",
            "pbs_server": HOST,
            "Jobs": {j["id"]: _pbs_record(j) for j in jobs},
        }
        if not jobs:
            del out["Jobs"]
        print(json.dumps(out, indent=4))
    elif full:
        for j in jobs:
            print(f"Job Id: {j['id']}")
            for k, v in _pbs_record(j).items():
                print(f"    {k} = {v}")
            print()
    elif jobs:
        print(f"{'Job id':<17} {'Name':<16} {'User':<16} {'Time Use':<8} S {'Queue':<8}")
        print(f"{'-' * 17} {'-' * 16} {'-' * 16} {'-' * 8} - {'-' * 8}")
        for j in jobs:
            print(
                f"{j['id']:<17} {j['name'][:16]:<16} {j['user'][:16]:<16} {'0':<8} {_pbs_state(j)} "
                f"{j['queue']:<8}"
            )
    return rc


def qdel(args: list[str]) -> int:
    ids = [a for a in args if not a.startswith("-")]
    if not ids:
        print("usage: qdel job_identifier...", file=sys.stderr)
        return 2
    _, unknown = cancel(ids)
    for jid in unknown:
        print(f"qdel: Unknown Job Id {jid}", file=sys.stderr)
    return 153 if unknown else 0


# ----------------------------------------------------------------------------- LSF commands
def _lsf_state(job: dict[str, Any]) -> str:
    if job["state"] == QUEUED:
        return "PEND"
    if job["state"] in (RUNNING, EXITING):
        return "RUN"
    return "DONE" if job["exit_code"] == 0 and not job["cancelled"] else "EXIT"


def bsub(args: list[str]) -> int:
    return submit("lsf", args)


_BJOBS_FIELDS = {
    "jobid": lambda j: j["id"],
    "stat": _lsf_state,
    "user": lambda j: j["user"],
    "queue": lambda j: j["queue"],
    "job_name": lambda j: j["name"],
    "exit_code": lambda j: "-" if j["exit_code"] is None else str(j["exit_code"]),
    "from_host": lambda j: HOST,
    "exec_host": lambda j: HOST if j["started"] else "-",
    "submit_time": lambda j: time.strftime("%b %d %H:%M", time.localtime(j["submitted"])),
}


def bjobs(args: list[str]) -> int:
    header = True
    fields = ["jobid", "user", "stat", "queue", "from_host", "exec_host", "job_name", "submit_time"]
    show_all = False
    ids: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "-noheader":
            header = False
        elif a == "-o" and i + 1 < len(args):
            fields = [f.split(":")[0].lower() for f in args[i + 1].split()]
            i += 1
        elif a in ("-a", "-d"):
            show_all = True
        elif not a.startswith("-"):
            ids.append(a)
        i += 1
    rc = 0
    if ids:
        jobs = []
        for jid in ids:
            job = _read(_seq_of(jid)) if _seq_of(jid).isdigit() else None
            if job is None or job["flavour"] != "lsf":
                print(f"Job <{jid}> is not found", file=sys.stderr)
                rc = 255
            else:
                jobs.append(job)
    else:
        jobs = [j for j in all_jobs() if j["flavour"] == "lsf" and (show_all or j["state"] != FINISHED)]
        if not jobs:
            print("No unfinished job found", file=sys.stderr)
            return 0
    if header:
        print(" ".join(f.upper() for f in fields))
    for j in jobs:
        print(" ".join(_BJOBS_FIELDS.get(f, lambda _j: "-")(j) for f in fields))
    return rc


def bkill(args: list[str]) -> int:
    ids = [a for a in args if not a.startswith("-")]
    if not ids:
        print("usage: bkill job_ID...", file=sys.stderr)
        return 255
    done, unknown = cancel(ids)
    for job in done:
        if job["state"] == FINISHED:
            print(f"Job <{job['id']}>: Job has already finished", file=sys.stderr)
        else:
            print(f"Job <{job['id']}> is being terminated")
    for jid in unknown:
        print(f"Job <{jid}>: No matching job found", file=sys.stderr)
    return 255 if unknown else 0


COMMANDS = {"qsub": qsub, "qstat": qstat, "qdel": qdel, "bsub": bsub, "bjobs": bjobs, "bkill": bkill}


def main(argv: list[str]) -> int:
    name = os.path.basename(argv[0])
    if name.endswith(".py") and len(argv) > 1:  # fakesched.py qsub ... / fakesched.py _run SEQ
        name, argv = argv[1], argv[1:]
    if name == "_run":
        return run(argv[1])
    if name not in COMMANDS:
        print(f"fakesched: unknown command {name!r}; one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    rc = COMMANDS[name](argv[1:])
    # Every command line and its exit status, for tests and for debugging a provider.
    with contextlib.suppress(OSError), open(STATE_DIR / "commands.log", "a") as log:
        log.write(f"{time.time():.3f} {rc} {shlex.join([name, *argv[1:]])}\n")
    return rc


if __name__ == "__main__":
    sys.exit(main(sys.argv))
