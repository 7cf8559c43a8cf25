"""ShellFunction and MPIFunction called directly, as a worker calls them."""

from __future__ import annotations

import pickle
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cloudpickle
import pytest

import farcall.shell
from farcall import MPIFunction, ShellFunction, ShellResult
from farcall.errors import MPIEnvironmentError, ShellCommandError
from farcall.serialize import (
    FUNCTION_CLOUDPICKLE,
    deserialize_function,
    payload_strategy,
    serialize_function,
)
from harness.procs import wait_until


def run(fn: Callable[..., Any], **kwargs: Any) -> ShellResult:
    """Call ``fn`` as a worker does; its result, checked to be a ShellResult."""
    result = fn(**kwargs)
    assert isinstance(result, ShellResult), result
    return result


def _alive(pid: int) -> bool:
    """``pid`` is a live process (a zombie waiting for its parent counts as gone)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def test_placeholders_are_filled_from_keyword_arguments(tmp_path: Path) -> None:
    data = tmp_path / "data.txt"
    data.write_text("a\nb\nc\n")
    result = run(ShellFunction("wc -l {path}"), path=str(data))
    assert result == ShellResult(f"wc -l {data}", f"3 {data}\n", "", 0, None)
    braces = run(ShellFunction("echo {{literal}} {x.real} {name}; echo err >&2"), x=5, name="n")
    assert (braces.stdout, braces.stderr) == ("{literal} 5 n\n", "err\n")


def test_a_missing_placeholder_names_itself() -> None:
    fn = ShellFunction("cp {src} {dst} && ls {dst}")
    with pytest.raises(ShellCommandError, match=r"placeholder\(s\) \{dst\} .* pass dst=\.\.\."):
        fn(src="a")
    with pytest.raises(ShellCommandError, match=r"\{src\}, \{dst\}"):
        fn()
    with pytest.raises(ShellCommandError, match="keyword arguments only"):
        fn("a", "b")


@pytest.mark.parametrize(("cmd", "message"), [
    ("echo {", "not a valid template"),
    ("echo {}", "positional placeholder"),
    ("awk '{print $1}' {0}", "positional placeholder"),
    ("  ", "non-empty command line"),
])
def test_bad_templates_fail_when_made(cmd: str, message: str) -> None:
    with pytest.raises(ShellCommandError, match=message):
        ShellFunction(cmd)


@pytest.mark.parametrize("kwargs", [{"walltime": 0}, {"walltime": "5"}, {"snippet_lines": -1},
                                    {"snippet_lines": 1.5}])
def test_bad_options_fail_when_made(kwargs: dict[str, object]) -> None:
    with pytest.raises(ShellCommandError):
        ShellFunction("true", **kwargs)  # type: ignore[arg-type]


def test_snippet_lines_keeps_the_last_lines_of_each_stream() -> None:
    fn = ShellFunction("seq 1 100000; seq 1 5 >&2; printf 'no newline'", snippet_lines=3)
    result = run(fn)
    assert result.stdout == "99999\n100000\nno newline"
    assert result.stderr == "3\n4\n5\n"
    assert run(ShellFunction("seq 1 5", snippet_lines=0)).stdout == ""
    assert run(ShellFunction("seq 1 5", snippet_lines=10)).stdout == "1\n2\n3\n4\n5\n"


@pytest.mark.parametrize("text", [b"", b"\n", b"a", b"a\n", b"\n\n\n", b"one\ntwo\nthree",
                                  b"one\ntwo\nthree\n", b"x" * 50 + b"\n" + b"y" * 30 + b"\r\nz\n"])
def test_tail_reads_blocks_from_the_end(text: bytes) -> None:
    import io

    for lines in (1, 2, 3, 5):
        for block in (1, 3, 7, 64):
            whole = text.split(b"\n")
            if text.endswith(b"\n"):
                whole = [w + b"\n" for w in whole[:-1]]
            else:
                whole = [w + b"\n" for w in whole[:-1]] + [whole[-1]]
            want = b"".join(whole[-lines:]).decode()
            assert farcall.shell.tail(io.BytesIO(text), lines, block) == want, (lines, block)


def test_large_output_on_both_streams_does_not_block() -> None:
    # 2 MB to each stream: far past a pipe's 64 KiB buffer
    result = run(ShellFunction("head -c 2000000 /dev/zero | tr '\\0' x; head -c 2000000 /dev/zero >&2",
                               walltime=30, snippet_lines=1))
    assert result.returncode == 0
    assert len(result.stdout) == 2_000_000 and len(result.stderr) == 2_000_000


def test_a_non_zero_exit_is_in_the_result() -> None:
    result = run(ShellFunction("echo out; echo oops >&2; exit 7"))
    assert (result.returncode, result.stdout, result.stderr) == (7, "out\n", "oops\n")
    assert result.exception_name == "subprocess.CalledProcessError"
    killed = run(ShellFunction("kill -9 $$"))
    assert killed.returncode == -9


def test_walltime_kills_the_whole_process_group() -> None:
    start = time.monotonic()
    result = run(ShellFunction("sleep 60 & echo child $!; sleep 60", walltime=0.5))
    assert time.monotonic() - start < 5
    assert result.returncode == farcall.shell.TIMEOUT_RETURNCODE == 124
    assert result.exception_name == "subprocess.TimeoutExpired"
    assert result.stderr == ("farcall: the command ran past its walltime of 0.5 s: its process "
                             "group was killed (SIGTERM)\n")
    child = int(result.stdout.split()[1])
    wait_until(lambda: not _alive(child), 5, f"background child {child} to be gone")


def test_walltime_kills_children_that_ignore_sigterm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(farcall.shell, "KILL_GRACE", 0.5)
    cmd = "bash -c 'trap \"\" TERM; echo stubborn $$; exec sleep 60' & sleep 60"
    result = run(ShellFunction(cmd, walltime=0.5))
    assert result.returncode == 124
    assert "killed (SIGTERM, then SIGKILL after 0.5 s)" in result.stderr
    stubborn = int(result.stdout.split()[1])
    wait_until(lambda: not _alive(stubborn), 5, f"child {stubborn} that ignores SIGTERM to be gone")


def test_the_command_gets_default_signal_actions_back() -> None:
    """A process-pool worker ignores SIGTERM and SIGINT; its commands must not inherit that."""
    import signal

    saved = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        ignored = run(ShellFunction("grep SigIgn /proc/self/status")).stdout.split()[1]
        result = run(ShellFunction("sleep 60 & sleep 60", walltime=0.5))
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)
    mask = int(ignored, 16)
    assert not mask & (1 << (signal.SIGTERM - 1)) and not mask & (1 << (signal.SIGINT - 1)), ignored
    assert result.stderr.endswith("killed (SIGTERM)\n"), result.stderr


def test_an_interrupted_call_leaves_no_process_behind(tmp_path: Path) -> None:
    """The task's own walltime raises inside the call (SIGALRM); the command goes with it."""
    import signal

    pidfile = tmp_path / "pid"

    def ring(signum: int, frame: object) -> None:
        raise TimeoutError("task walltime")

    previous = signal.signal(signal.SIGALRM, ring)
    signal.setitimer(signal.ITIMER_REAL, 0.5)
    try:
        with pytest.raises(TimeoutError, match="task walltime"):
            ShellFunction(f"sleep 60 & echo $! > {pidfile}; sleep 60")()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    child = int(pidfile.read_text())
    wait_until(lambda: not _alive(child), 5, f"child {child} to be gone")


def test_a_killed_caller_takes_the_command_with_it(tmp_path: Path) -> None:
    """An engine cancels a running task by killing its worker: the command must not outlive it."""
    import subprocess
    import sys

    pidfile = tmp_path / "pids"
    code = (f"from farcall import ShellFunction\n"
            f"ShellFunction('sleep 60 & echo $$ $! > {pidfile}; sleep 60')()\n")
    worker = subprocess.Popen([sys.executable, "-c", code])
    try:
        pids = wait_until(lambda: pidfile.exists() and pidfile.read_text().split(), 30, "the command")
        worker.kill()
    finally:
        worker.wait(10)
    wait_until(lambda: not any(_alive(int(pid)) for pid in pids), 10, f"the command's {pids} to be gone")


def test_return_dict_is_plain_json_data() -> None:
    assert ShellFunction("echo hi", return_dict=True)() == {
        "cmd": "echo hi", "stdout": "hi\n", "stderr": "", "returncode": 0, "exception_name": None}


def test_mpi_function_prefixes_the_launcher(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PARSL_MPI_PREFIX", "echo mpiexec -n 2")
    result = run(MPIFunction("./app --in {x}", name="app"), x="data")
    assert result.cmd == "echo mpiexec -n 2 ./app --in data"
    assert result.stdout == "mpiexec -n 2 ./app --in data\n"


def test_mpi_function_without_a_prefix_says_what_it_needs(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PARSL_MPI_PREFIX", raising=False)
    with pytest.raises(MPIEnvironmentError, match=r"\$PARSL_MPI_PREFIX is not set.*engine type "
                                                  r"MPIEngine.*resource_specification"):
        MPIFunction("hostname")()


def test_pickled_by_reference_and_run_after_a_round_trip() -> None:
    fn = MPIFunction("echo {word}", walltime=10, snippet_lines=5, name="echoer")
    payload = serialize_function(fn)
    assert payload_strategy(payload) == FUNCTION_CLOUDPICKLE
    raw = cloudpickle.dumps(fn)
    assert b"farcall.shell" in raw and b"MPIFunction" in raw and b"cloudpickle" not in raw
    back = deserialize_function(payload)
    assert type(back) is MPIFunction and back.__name__ == "echoer"
    assert (back.cmd, back.walltime, back.snippet_lines) == ("echo {word}", 10.0, 5)
    assert ShellFunction("echo {word}").__name__ == "ShellFunction"
    result = run(deserialize_function(serialize_function(ShellFunction("echo {word}"))), word="hi")
    assert pickle.loads(pickle.dumps(result)) == result  # results travel with plain pickle


def test_globus_computes_arguments_in_its_order(tmp_path: Path) -> None:
    out, err = tmp_path / "logs" / "out.txt", tmp_path / "logs" / "err.txt"
    fn = ShellFunction("echo {word}; echo oops >&2", str(out), str(err), 30, 5, "shout", True)
    assert (fn.stdout, fn.stderr, fn.walltime, fn.snippet_lines, fn.__name__, fn.return_dict) == (
        str(out), str(err), 30.0, 5, "shout", True)
    first, second = fn(word="one"), fn(word="two")
    assert isinstance(first, dict) and isinstance(second, dict)
    assert first["stdout"] == "one\n"
    assert (second["stdout"], second["stderr"]) == ("one\ntwo\n", "oops\noops\n")  # appended
    assert (out.read_text(), err.read_text()) == ("one\ntwo\n", "oops\noops\n")
    mpi = MPIFunction("hostname", stdout=str(out), snippet_lines=3)
    assert (mpi.stdout, mpi.stderr, mpi.snippet_lines) == (str(out), None, 3)


def test_a_bad_output_path_says_what_it_takes() -> None:
    with pytest.raises(ShellCommandError, match="stdout must be the path of a file on the endpoint"):
        ShellFunction("true", stdout=3)  # type: ignore[arg-type]


def test_a_shell_function_pickled_before_output_files_existed_still_loads() -> None:
    fn = ShellFunction("echo old")
    state = {k: v for k, v in vars(fn).items() if k not in ("stdout", "stderr")}
    old = ShellFunction.__new__(ShellFunction)
    old.__setstate__(state)
    assert run(old).stdout == "old\n" and old.stdout is None


def test_str_shows_the_exit_status_and_the_end_of_the_output() -> None:
    ok = ShellResult("seq 12", "".join(f"{i}\n" for i in range(1, 13)), "", 0)
    assert str(ok) == ("exit code: 0\n  stdout:\n    [2 earlier lines: see .stdout / .stderr]\n"
                       + "\n".join(f"    {i}" for i in range(3, 13)))
    failed = ShellResult("false", "", "bad\n", 1, "subprocess.CalledProcessError")
    assert str(failed) == ("exit code: 1\n  stdout:\n\n  stderr:\n    bad\n"
                           "  exception: subprocess.CalledProcessError")
