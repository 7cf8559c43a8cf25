"""Command lines and MPI programs as farcall functions: ``ShellFunction``, ``MPIFunction``.

A ``ShellFunction`` is a callable object, so it goes wherever a function goes
(``Executor.submit``, ``Client.register_function``). dill pickles it by reference
to this module plus its few fields, so the worker needs nothing but farcall.
Calling it (on the worker) fills the ``{placeholders}`` of its command line from
the keyword arguments, runs the line with bash in a process group of its own,
and returns a ``ShellResult``: a non-zero exit is data, not an exception.

Walltime, as Globus Compute's ShellFunction reports it (``returncode`` 124, as
timeout(1), and ``exception_name`` ``"subprocess.TimeoutExpired"``), but unlike
it the command is stopped, not abandoned: its whole process group gets SIGTERM,
then SIGKILL ``KILL_GRACE`` seconds later if any of it is still alive, and
``stderr`` ends with a line saying so. The group is stopped the same way when the
call is interrupted, or its process dies (a cancelled task's worker is killed).
"""

from __future__ import annotations

import os
import signal
import string
import tempfile
import time
from dataclasses import asdict, dataclass
from typing import IO, Any

from farcall.errors import MPIEnvironmentError, ShellCommandError

TIMEOUT_RETURNCODE = 124
"""``returncode`` of a command stopped at its walltime (as timeout(1) and Globus Compute)."""
KILL_GRACE = 5.0
"""Seconds between SIGTERM and SIGKILL to a command's process group past its walltime."""
SHELL = "/bin/bash" if os.path.exists("/bin/bash") else "/bin/sh"
MPI_PREFIX_VAR = "PARSL_MPI_PREFIX"
"""Where Parsl's MPIExecutor puts each task's launcher prefix (``mpiexec -n 4 -ppn 2 ...``)."""


@dataclass
class ShellResult:
    """What a command did: the command line run, the last ``snippet_lines`` lines of its
    stdout and stderr, and its exit status (negative: killed by that signal; 124: stopped
    at its walltime). ``exception_name`` is Globus Compute's: None on success,
    ``"subprocess.CalledProcessError"`` on a non-zero exit, ``"subprocess.TimeoutExpired"``
    past the walltime."""

    cmd: str
    stdout: str
    stderr: str
    returncode: int
    exception_name: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """The fields as a JSON-compatible dict (what ``return_dict=True`` returns)."""
        return asdict(self)

    def __str__(self) -> str:
        """The exit status and the end of the output, to print: the last ``SHOWN_LINES`` lines of
        stdout, and of stderr when the command failed (the fields hold all the snippet)."""
        text = f"exit code: {self.returncode}\n  stdout:\n{_last_lines(self.stdout)}"
        if self.returncode:
            text += f"\n  stderr:\n{_last_lines(self.stderr)}"
            if self.exception_name:
                text += f"\n  exception: {self.exception_name}"
        return text


SHOWN_LINES = 10
"""Lines of each stream ``str(ShellResult)`` shows."""


def _last_lines(text: str) -> str:
    lines = text.strip("\n").splitlines()
    shown = "\n".join(f"    {line}" for line in lines[-SHOWN_LINES:])
    return shown if len(lines) <= SHOWN_LINES else (
        f"    [{len(lines) - SHOWN_LINES} earlier lines: see .stdout / .stderr]\n{shown}")


class ShellFunction:
    """Run ``cmd`` with bash; ``{name}`` placeholders are filled from the call's keyword arguments.

    ``stdout`` / ``stderr``: files (on the endpoint; made with their directories if missing)
    the command's output is appended to, and its snippet read from (None: a temporary file).
    ``walltime``: seconds before the command's process group is stopped (None: no limit).
    ``snippet_lines``: how many of the last lines of stdout and stderr the result keeps.
    ``name``: the function's name when registered (default: the class name).
    ``return_dict``: return ``ShellResult.as_dict()`` instead (plain JSON, for flows).
    The arguments and their order are Globus Compute's.

    Values are put into the line as they are, not quoted: quote untrusted ones yourself
    (``shlex.quote``). Literal braces (``awk '{print $1}'``, ``${HOME}``) are written
    doubled: ``{{`` and ``}}``.
    """

    def __init__(self, cmd: str, stdout: str | None = None, stderr: str | None = None,
                 walltime: float | None = None, snippet_lines: int = 1000,
                 name: str | None = None, return_dict: bool = False) -> None:
        if not isinstance(cmd, str) or not cmd.strip():
            raise ShellCommandError(f"cmd must be a non-empty command line, got {cmd!r}")
        for what, path in (("stdout", stdout), ("stderr", stderr)):
            if path is not None and (not isinstance(path, str | os.PathLike) or not str(path)):
                raise ShellCommandError(
                    f"{what} must be the path of a file on the endpoint to append the command's "
                    f"{what} to, or None for none kept; got {path!r}")
        if walltime is not None and (isinstance(walltime, bool) or not isinstance(walltime, (int, float))
                                     or not walltime > 0):
            raise ShellCommandError(
                f"walltime must be a number of seconds above 0, or None; got {walltime!r}")
        if isinstance(snippet_lines, bool) or not isinstance(snippet_lines, int) or snippet_lines < 0:
            raise ShellCommandError(f"snippet_lines must be an int >= 0, got {snippet_lines!r}")
        self.cmd = cmd
        self.placeholders = _placeholders(cmd)
        self.walltime = None if walltime is None else float(walltime)
        self.snippet_lines = snippet_lines
        self.return_dict = return_dict
        self.stdout = None if stdout is None else os.fspath(stdout)
        self.stderr = None if stderr is None else os.fspath(stderr)
        self.__name__ = name or type(self).__name__

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Instances pickled before ``stdout``/``stderr`` existed load with neither."""
        self.__dict__.update({"stdout": None, "stderr": None, **state})

    def __repr__(self) -> str:
        files = "".join(f", {k}={v!r}" for k, v in (("stdout", self.stdout), ("stderr", self.stderr))
                        if v is not None)
        return (f"{type(self).__name__}({self.cmd!r}{files}, walltime={self.walltime!r}, "
                f"name={self.__name__!r})")

    def __call__(self, *args: Any, **kwargs: Any) -> ShellResult | dict[str, Any]:
        """Run the command with its placeholders filled from ``kwargs`` (on the worker)."""
        result = run_command(self.command_line(*args, **kwargs), self.walltime, self.snippet_lines,
                             stdout=self.stdout, stderr=self.stderr)
        return result.as_dict() if self.return_dict else result

    def command_line(self, *args: Any, **kwargs: Any) -> str:
        """``cmd`` with its placeholders filled; errors name every placeholder left without a value."""
        if args:
            raise ShellCommandError(
                f"{self.__name__} takes keyword arguments only (one per placeholder of {self.cmd!r}), "
                f"got {len(args)} positional: pass them as name=value")
        missing = [p for p in self.placeholders if p not in kwargs]
        if missing:
            raise ShellCommandError(
                f"{self.__name__}: no keyword argument for placeholder(s) "
                f"{', '.join('{' + p + '}' for p in missing)} of {self.cmd!r}; pass "
                f"{', '.join(p + '=...' for p in missing)} (write literal braces as {{{{ and }}}})")
        try:
            return self.cmd.format(**kwargs)
        except (LookupError, AttributeError, ValueError) as e:
            raise ShellCommandError(
                f"{self.__name__}: cannot fill {self.cmd!r}: {type(e).__name__}: {e}") from None


class MPIFunction(ShellFunction):
    """A ``ShellFunction`` whose command runs under the MPI launcher of an ``MPIEngine`` endpoint.

    The line is prefixed with ``$PARSL_MPI_PREFIX``, which Parsl's MPIExecutor builds for
    each task from its ``resource_specification`` (``num_nodes``, ``ranks_per_node``,
    ``num_ranks``, ``launcher_options``) and the endpoint's ``mpi_launcher``:
    ``mpiexec -n 4 -ppn 2 -hosts a,b`` or ``srun --ntasks 4 ...``. ``ShellResult.cmd``
    shows the whole line.
    """

    def command_line(self, *args: Any, **kwargs: Any) -> str:
        prefix = os.environ.get(MPI_PREFIX_VAR, "").strip()
        if not prefix:
            raise MPIEnvironmentError(
                f"{self.__name__}: ${MPI_PREFIX_VAR} is not set here, so there is no MPI launcher "
                "to run under. Run MPIFunction on an endpoint with engine type MPIEngine, and give "
                "the task a resource_specification, e.g. Executor(endpoint_id=..., "
                "resource_specification={'num_nodes': 1, 'ranks_per_node': 2})")
        return f"{prefix} {super().command_line(*args, **kwargs)}"


def _placeholders(cmd: str) -> list[str]:
    """The names of ``cmd``'s ``{placeholders}`` (``{x.y}``/``{x[0]}`` count as ``x``), in order."""
    names: list[str] = []
    try:
        fields = list(string.Formatter().parse(cmd))
    except ValueError as e:
        raise ShellCommandError(
            f"cmd {cmd!r} is not a valid template ({e}); write literal braces as {{{{ and }}}}") from None
    for _, field, _, _ in fields:
        if field is None:
            continue
        name = field.split(".", 1)[0].split("[", 1)[0]
        if not name or name.isdigit():
            raise ShellCommandError(
                f"cmd {cmd!r} has a positional placeholder {{{field}}}: name it ({{path}}) and pass "
                "it as a keyword argument, or write literal braces as {{ and }}")
        if name not in names:
            names.append(name)
    return names


def run_command(cmd: str, walltime: float | None = None, snippet_lines: int = 1000, *,
                stdout: str | None = None, stderr: str | None = None) -> ShellResult:
    """Run ``cmd`` with bash in a new process group; its output goes to files (no pipe to fill
    up), of which the last ``snippet_lines`` lines are kept: temporary ones, or ``stdout`` and
    ``stderr`` opened to append (the snippet then ends with what the file held before).

    Past ``walltime`` seconds, or when this call is interrupted (the task's own walltime,
    Ctrl-C), the whole process group is stopped: SIGTERM, then SIGKILL after ``KILL_GRACE``
    seconds; so it is when this process dies first (``_Guard``: an engine kills the worker
    to cancel its task). A command that ends by itself may leave background processes running.
    """
    with _output(stdout) as out, _output(stderr) as err:
        child = _Command(cmd, out, err)
        guard = _Guard(child.pid)
        try:
            try:
                finished = child.wait(walltime)
            except BaseException:  # the task's own walltime (TaskTimeout), Ctrl-C: leave nothing
                child.stop()
                raise
            how = None if finished else child.stop()
        finally:
            guard.release()
        stdout, stderr = tail(out, snippet_lines), tail(err, snippet_lines)
    if how is not None:
        assert walltime is not None
        if stderr and not stderr.endswith("\n"):
            stderr += "\n"
        stderr += (f"farcall: the command ran past its walltime of {walltime:g} s: its process "
                   f"group was killed ({how})\n")
        return ShellResult(cmd, stdout, stderr, TIMEOUT_RETURNCODE, "subprocess.TimeoutExpired")
    code = child.returncode
    assert code is not None  # wait() returned True: the shell was reaped
    return ShellResult(cmd, stdout, stderr, code, "subprocess.CalledProcessError" if code else None)


def _output(path: str | None) -> IO[bytes]:
    """A file for one of the command's streams: ``path`` to append to (its directory made if
    missing), or a temporary file that goes when closed."""
    if path is None:
        return tempfile.TemporaryFile()
    directory = os.path.dirname(path)
    if directory:
        os.makedirs(directory, exist_ok=True)
    return open(path, "a+b")  # noqa: SIM115 - closed by run_command's with


_DEFAULT_SIGNALS = [s for s in signal.valid_signals() if s not in (signal.SIGKILL, signal.SIGSTOP)]


class _Command:
    """The shell running one command, leader of its own process group.

    Started with ``posix_spawn`` rather than ``subprocess.Popen`` because the child must get
    every signal's default action back: a worker process may ignore SIGTERM and SIGINT (the
    process pool's do, so that only the engine stops them), an ignored signal stays ignored
    across exec, and a shell cannot undo that. ``Popen`` could only do it with a
    ``preexec_fn``, which is unsafe in a process with threads.
    """

    def __init__(self, cmd: str, out: IO[bytes], err: IO[bytes]) -> None:
        self.pid = os.posix_spawn(
            SHELL, [SHELL, "-c", cmd], os.environ,
            file_actions=[(os.POSIX_SPAWN_OPEN, 0, os.devnull, os.O_RDONLY, 0),
                          (os.POSIX_SPAWN_DUP2, out.fileno(), 1),
                          (os.POSIX_SPAWN_DUP2, err.fileno(), 2)],
            setpgroup=0, setsigdef=_DEFAULT_SIGNALS, setsigmask=[])
        self.returncode: int | None = None

    def poll(self) -> bool:
        """Reap the shell if it has exited; whether it has."""
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # reaped elsewhere (SIGCHLD ignored): status unknown
                self.returncode = 0
                return True
            if pid:
                self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode is not None

    def wait(self, timeout: float | None) -> bool:
        """Wait up to ``timeout`` seconds (None: for ever) for the shell to exit; whether it did."""
        deadline = None if timeout is None else time.monotonic() + timeout
        pause = 0.001
        while not self.poll():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            time.sleep(pause if left is None else min(pause, left))
            pause = min(pause * 2, 0.05)
        return True

    def stop(self, grace: float | None = None) -> str:
        """SIGTERM to the process group, SIGKILL to what is left of it after ``grace`` seconds
        (default ``KILL_GRACE``); reaps the shell. Says which signals it took."""
        grace = KILL_GRACE if grace is None else grace
        _signal_group(self.pid, signal.SIGTERM)  # setpgroup=0: the shell leads its own group
        deadline = time.monotonic() + grace
        while not self.poll() or group_alive(self.pid):  # a reaped shell no longer counts
            if time.monotonic() >= deadline:
                break
            time.sleep(0.02)
        how = "SIGTERM"
        if group_alive(self.pid) or not self.poll():
            _signal_group(self.pid, signal.SIGKILL)
            how = f"SIGTERM, then SIGKILL after {grace:g} s"
        self.wait(None)
        return how


class _Guard:
    """A watchman that stops the command's process group if this process dies before the call
    returns: a process pool cancels a running task by killing its worker, Parsl's worker ends
    itself past a task's walltime, an agent may crash. The command leads a process group of
    its own, so none of that would reach it.

    The watchman is ``sh`` in a process group of its own, reading a pipe whose only writer is
    this process: a line from ``release`` lets it exit; end-of-file (the writer died) makes it
    stop the group as a walltime does.
    """

    SCRIPT = 'read -r _ || { kill -s TERM -- "-$1"; sleep "$2"; kill -s KILL -- "-$1"; } 2>/dev/null'
    """POSIX sh (dash refuses ``kill -TERM -- -PGID``); ``$1`` the group, ``$2`` the grace."""

    def __init__(self, pgid: int) -> None:
        read, self.write = os.pipe()  # not inheritable: no other child holds the writer
        try:
            self.pid = os.posix_spawn(
                "/bin/sh", ["/bin/sh", "-c", self.SCRIPT, "farcall-guard", str(pgid), f"{KILL_GRACE:g}"],
                os.environ,
                file_actions=[(os.POSIX_SPAWN_DUP2, read, 0),
                              (os.POSIX_SPAWN_OPEN, 1, os.devnull, os.O_WRONLY, 0),
                              (os.POSIX_SPAWN_OPEN, 2, os.devnull, os.O_WRONLY, 0)],
                setpgroup=0, setsigdef=_DEFAULT_SIGNALS, setsigmask=[])
        except BaseException:
            os.close(self.write)
            raise
        finally:
            os.close(read)

    def release(self, timeout: float = 2.0) -> None:
        """The call is over: let the watchman exit, and reap it."""
        try:
            os.write(self.write, b"done\n")
        except OSError:
            pass  # it is gone already (killed from outside): nothing to release
        finally:
            os.close(self.write)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if os.waitpid(self.pid, os.WNOHANG)[0]:
                    return
            except ChildProcessError:
                return
            time.sleep(0.001)


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def group_alive(pgid: int) -> bool:
    """Some live (not zombie) process is in process group ``pgid``.

    Reads /proc where there is one: orphaned members that exited may stay zombies for a
    while (a container whose init does not reap), and ``killpg(pgid, 0)`` counts those.
    """
    if not os.path.isdir("/proc/self"):
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in (b"Z", b"X"):
            return True
    return False


def tail(f: IO[bytes], lines: int, block: int = 65536) -> str:
    """The last ``lines`` lines of file ``f`` (read from its end, so a huge output costs little),
    decoded as UTF-8 with undecodable bytes replaced. Lines end at ``\\n`` only."""
    if lines <= 0:
        return ""
    f.seek(0, os.SEEK_END)
    pos = f.tell()
    data = b""
    # Read until the newline before the first kept line is in (or the file's start is).
    while pos > 0 and data.count(b"\n", 0, len(data) - data.endswith(b"\n")) < lines:
        step = min(block, pos)
        pos -= step
        f.seek(pos)
        data = f.read(step) + data
    ends = data.endswith(b"\n")
    kept = b"\n".join((data[:-1] if ends else data).split(b"\n")[-lines:])
    return (kept + b"\n" * ends).decode("utf-8", errors="replace")
