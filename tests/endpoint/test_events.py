"""The events pipe between a user endpoint and its manager, and the manager's audit log."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from farcall.endpoint.multiuser.events import EVENTS_FD_VARIABLE, AuditLog, EventWriter, parse_events


def test_a_batch_is_one_write_and_reads_back_as_states() -> None:
    r, w = os.pipe()
    try:
        writer = EventWriter(w)
        writer([("", "connected")])
        writer([("t1", "received"), ("t2", "received"), ("t1", "running"), ("t1", "success")])
        buffer = bytearray(os.read(r, 65536))
        assert parse_events(buffer) == [("connected", "-"), ("received", "t1"), ("received", "t2"),
                                        ("running", "t1"), ("success", "t1")]
        assert buffer == b""
        assert not os.get_inheritable(w)  # tasks started by the agent never get it
    finally:
        os.close(r)
        os.close(w)


def test_partial_lines_wait_and_garbage_is_dropped() -> None:
    buffer = bytearray(b"success t1\nrunning t")
    assert parse_events(buffer) == [("success", "t1")]
    assert buffer == b"running t"
    buffer += b"2\nowned root\nsuccess bad\tid\nfailed " + b"x" * 200 + b"\n"
    assert parse_events(buffer) == [("running", "t2")]
    buffer = bytearray(b"y" * 500)
    assert parse_events(buffer) == [] and buffer == b""


def test_a_full_pipe_drops_the_batch_instead_of_blocking_the_agent() -> None:
    r, w = os.pipe()
    try:
        writer = EventWriter(w)
        big = [(f"task-{i:06d}", "received") for i in range(10000)]  # ~230 kB > the pipe
        writer(big)
        writer(big)
        assert writer.dropped >= len(big)
    finally:
        os.close(r)
        os.close(w)


def test_the_writer_comes_from_the_environment_once(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    try:
        monkeypatch.setenv(EVENTS_FD_VARIABLE, str(w))
        writer = EventWriter.from_environment()
        assert writer is not None and writer.fd == w
        assert EVENTS_FD_VARIABLE not in os.environ
        monkeypatch.setenv(EVENTS_FD_VARIABLE, "999999")
        assert EventWriter.from_environment() is None
    finally:
        os.close(r)
        os.close(w)


def test_the_audit_log_names_the_user_and_uid_the_manager_knows(tmp_path: Path) -> None:
    path = tmp_path / "audit" / "farcall.log"
    audit = AuditLog(path)
    audit.write("ue-1", "ada", 1234, [("connected", "-"), ("received", "t1"), ("success", "t1")])
    audit.write("ue-2", "bob", 1235, [("failed", "t2")])
    audit.close()
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    assert lines[0].endswith("endpoint=ue-1 user=ada uid=1234 task=t1 state=received")
    assert lines[2].endswith("endpoint=ue-2 user=bob uid=1235 task=t2 state=failed")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
