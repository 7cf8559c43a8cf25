"""The judge of the Action Provider API's documents: the published globus-action-provider-tools.

That package (0.21.x) needs pydantic 1 and globus-sdk 3, which farcall's own environment
cannot hold, so it lives in a virtual environment of its own, made on first use with pip
(from PyPI or the configured index) and cached under ``~/.cache/farcall`` (``FARCALL_CACHE``
overrides), keyed by the package version and Python's, so a clean CI machine makes it once.
``Judge`` keeps one process of that environment running (``tests/ap_judge_worker.py``) and
asks it about each document; a document it rejects fails the test with its messages.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

PACKAGE = "globus-action-provider-tools"
VERSION = "0.21"
"""The series the issue names; pip takes its newest release."""
WORKER = Path(__file__).with_name("ap_judge_worker.py")
ANSWER_TIMEOUT = 60.0
"""Seconds to wait for the judge's verdict on one document (it takes milliseconds)."""
INSTALL_TIMEOUT = 600.0


def cache_dir() -> Path:
    return Path(os.environ.get("FARCALL_CACHE") or Path.home() / ".cache" / "farcall")


def judge_python() -> Path:
    """The Python of the judge's environment, made (once, under a lock) if it is not there."""
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    venv = cache_dir() / f"ap-judge-{PACKAGE}-{VERSION}-{py}"
    python = venv / "bin" / "python"
    ready = venv / ".ready"
    if ready.exists():
        return python
    venv.parent.mkdir(parents=True, exist_ok=True)
    with open(venv.parent / f"{venv.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another test process may be making it right now
        if ready.exists():
            return python
        shutil.rmtree(venv, ignore_errors=True)  # a half-made one, from an interrupted run
        try:
            _run([sys.executable, "-m", "venv", str(venv)])
            _run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                  f"{PACKAGE}=={VERSION}.*"])
        except BaseException:
            shutil.rmtree(venv, ignore_errors=True)
            raise
        ready.write_text(f"{PACKAGE}=={VERSION}.*\n")
    return python


def _run(command: list[str]) -> None:
    done = subprocess.run(command, capture_output=True, text=True, timeout=INSTALL_TIMEOUT)
    if done.returncode != 0:
        raise RuntimeError(f"making the judge's environment failed: {' '.join(command)}\n"
                           f"{done.stdout}\n{done.stderr}")


class Judge:
    """One running judge process; ``status``, ``request``, ``description``, ``log`` and
    ``body`` fail (AssertionError) on a document it rejects."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [str(judge_python()), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True, bufsize=1)

    def errors(self, kind: str, doc: Any, schema: Any = None) -> list[str]:
        """What the judge finds wrong with ``doc`` as a ``kind`` (empty when it passes)."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"kind": kind, "doc": doc, "schema": schema}) + "\n")
        self.proc.stdin.flush()
        readable, _, _ = select.select([self.proc.stdout], [], [], ANSWER_TIMEOUT)
        assert readable, f"the judge gave no verdict within {ANSWER_TIMEOUT:g} s"
        line = self.proc.stdout.readline()
        assert line, f"the judge process ended (exit code {self.proc.poll()})"
        errors: list[str] = json.loads(line)["errors"]
        return errors

    def check(self, kind: str, doc: Any, schema: Any = None) -> Any:
        errors = self.errors(kind, doc, schema)
        assert not errors, (
            f"{PACKAGE} {VERSION} rejects this {kind}:\n  " + "\n  ".join(errors)
            + f"\n{json.dumps(doc, indent=2)[:4000]}")
        return doc

    def status(self, doc: Any) -> Any:
        return self.check("ActionStatus", doc)

    def request(self, doc: Any) -> Any:
        return self.check("ActionRequest", doc)

    def description(self, doc: Any) -> Any:
        return self.check("ActionProviderDescription", doc)

    def log(self, doc: Any) -> Any:
        return self.check("ActionLogReturn", doc)

    def body(self, schema: Any, body: Any) -> Any:
        return self.check("Body", body, schema)

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
