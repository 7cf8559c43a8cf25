"""The crash journal: which tasks this agent process started and has not finished, on disk.

A task running in the agent's own process (``ThreadPoolEngine``) can kill that
process (``os._exit``, a segfault, running out of memory). Nothing in memory
survives that, so every start is written to a small file before the task runs,
and every finish after it. The next agent reads the file at start: the ids
started and not finished are the suspects, reported once to the broker in
``Hello.crashed_task_ids`` so it can stop redelivering a task that keeps
killing its endpoint.

Why a shared memory map and not ``os.write``: the file only has to outlive the
process, not the machine, and a store into a ``MAP_SHARED`` mapping is in the
kernel's page cache at once, so it survives the process's death just as an
un-fsynced write does. But it is a memory copy that keeps the GIL, where every
``os.write`` gives the GIL up and the worker thread then queues behind the
agent's other threads to get it back: measured on no-op tasks through a
ThreadPoolEngine, os.write per start cost more than half the throughput.

What a caller may rely on:

- ``started`` and ``finished`` are O(1) memory copies (no system call), safe
  from any thread; ``finished`` takes a whole batch of ids at once.
- The file's blocks are written out when it is made, so a full disk never hits
  a write into the map (which would kill the process with SIGBUS): making the
  file fails instead, and that disables the journal with one warning.
- The file stays near ``max_bytes`` (or twice what the running tasks alone
  take, if more): when full, it is remade (a new file, then a rename) with only
  the tasks still running, so each task costs O(1) on average.
"""

from __future__ import annotations

import logging
import mmap
import os
import threading
from collections.abc import Iterable
from pathlib import Path

log = logging.getLogger(__name__)

MAX_BYTES = 1 << 20
"""Usual size of the journal file; it is remade with only the running tasks when full."""
_STARTED = b"+"
_FINISHED = b"-"


def read_crashed(path: Path) -> list[str]:
    """Ids the file says were started and not finished, oldest first; ``[]`` if there is none.

    The file's unused tail is zero bytes; a last line without its newline (cut
    short by the process's death) is ignored.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as e:
        log.warning("could not read the crash journal %s: %s; no crashed tasks reported", path, e)
        return []
    end = raw.find(b"\0")
    return _unfinished(raw if end < 0 else raw[:end])


def _unfinished(lines: bytes) -> list[str]:
    """The ids of ``+id`` lines with no ``-id`` line after them, in order."""
    running: dict[str, None] = {}
    for line in lines.split(b"\n")[:-1]:
        mark, task_id = line[:1], line[1:].decode(errors="replace")
        if mark == _STARTED:
            running[task_id] = None
        elif mark == _FINISHED:
            running.pop(task_id, None)
    return list(running)


class CrashJournal:
    """Records started and finished task ids in ``path``; thread-safe."""

    def __init__(self, path: Path, max_bytes: int = MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._crashed: list[str] = []
        self._map: mmap.mmap | None = None
        self._base = 0
        """Where this process's own lines begin (the crashed ids come first, until forgotten)."""
        self._pos = 0

    def open(self) -> list[str]:
        """Start journaling; returns the ids a previous process left started and not finished.

        The file keeps them until ``forget_crashed``, so they are reported even if
        this process dies before it reaches the broker.
        """
        self._crashed = read_crashed(self.path)
        if self._crashed:
            log.warning("crash journal: %d task(s) were running when the last agent process "
                        "died: %s", len(self._crashed), ", ".join(self._crashed[:10]))
        with self._lock:
            self._remake()
        return list(self._crashed)

    def forget_crashed(self) -> None:
        """The broker has the crashed ids: keep only what this process has started since."""
        with self._lock:
            self._crashed = []
            if self._map is not None:
                self._remake()

    def started(self, task_id: str) -> None:
        """Record that ``task_id`` is about to run (from an engine thread)."""
        line = b"+%b\n" % task_id.encode()
        with self._lock:
            self._append(line)

    def finished(self, task_ids: Iterable[str]) -> None:
        """Record that these tasks ended (their results are in the agent's hands)."""
        lines = b"".join([b"-%b\n" % t.encode() for t in task_ids])
        if lines:
            with self._lock:
                self._append(lines)

    def close(self) -> None:
        """A clean exit: no task crashed this process, so the file is emptied."""
        with self._lock:
            journal, self._map = self._map, None
            if journal is None:
                return
            journal.close()
            try:
                os.truncate(self.path, 0)
            except OSError as e:
                log.warning("could not empty the crash journal %s: %s", self.path, e)

    def _append(self, data: bytes) -> None:
        journal = self._map
        if journal is None:
            return
        end = self._pos + len(data)
        if end > len(journal):
            self._remake(data)
            return
        journal[self._pos:end] = data
        self._pos = end

    def _remake(self, new: bytes = b"") -> None:
        """Replace the file with the crashed and still running ids, and room to spare.

        O(size of the file), once per ``max_bytes`` written: O(1) per task on average.
        """
        own = self._map[self._base:self._pos] if self._map is not None else b""
        head = b"".join(b"+%b\n" % t.encode() for t in self._crashed)
        data = head + b"".join(b"+%b\n" % t.encode() for t in _unfinished(own + new))
        size = max(self.max_bytes, 2 * len(data))
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                _write_all(fd, data + bytes(size - len(data)))  # real blocks: no SIGBUS later
                journal = mmap.mmap(fd, size)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            self._disable(e)
            return
        if self._map is not None:
            self._map.close()
        self._map, self._base, self._pos = journal, len(head), len(data)

    def _disable(self, error: OSError) -> None:
        log.warning("crash journal %s disabled: %s. Tasks keep running, but one that kills the "
                    "agent will not be reported as such; free disk space and restart the "
                    "endpoint.", self.path, error)
        if self._map is not None:
            self._map.close()
        self._map = None


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
