"""A process-pool worker: ``python -m farcall.endpoint.engines.process_worker FD`` (or
``--connect PATH``, in a container, where no descriptor can be passed: the engine listens on a
Unix socket in a directory mounted into the container).

``ProcessPoolEngine`` starts one per worker. It imports no more than running a
task needs (``farcall.endpoint.worker`` and the SDK's messages), so a
replacement for a dead worker is up quickly. It runs the tasks of one user only, and marks
itself non-dumpable (``lockdown.make_undumpable``), so processes of the same Unix account
cannot read its memory.
"""

from __future__ import annotations

import multiprocessing.connection
import queue
import signal
import socket
import sys
import threading

from farcall.endpoint.lockdown import make_undumpable
from farcall.endpoint.worker import run_batch

STOP = b""
"""What the engine sends instead of a chunk when this worker should exit."""
READY = b"ready"
"""What this worker sends once it can run tasks (never a results array): the engine starts a
task's walltime clock only on a ready worker, so start-up time does not count."""


def serve_pipe(fd: int) -> None:
    """Run chunks (JSON arrays of tasks) arriving on ``fd``, answering each with its results.

    A reader thread keeps draining the pipe while tasks run, so the agent's send
    of the next chunk never blocks against this worker's send of results (no
    deadlock with large payloads), and the worker exits when the agent goes away.
    """
    # Ctrl-C in the agent's terminal, or a service manager signalling the whole group,
    # must not kill running tasks: the agent decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Another user's task (an earlier worker, a process it left behind) cannot read this one.
    make_undumpable()
    conn = multiprocessing.connection.Connection(fd)
    inbox: queue.SimpleQueue[bytes] = queue.SimpleQueue()

    def read() -> None:
        try:
            while (chunk := conn.recv_bytes()) != STOP:
                inbox.put(chunk)
        except (EOFError, OSError):
            pass
        inbox.put(STOP)

    threading.Thread(target=read, name="farcall-worker-reader", daemon=True).start()
    conn.send_bytes(READY)
    while (chunk := inbox.get()) != STOP:
        conn.send_bytes(run_batch(chunk).encode())


def connect(path: str) -> int:
    """A descriptor connected to the engine's socket at ``path`` (for ``serve_pipe``)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    return sock.detach()


if __name__ == "__main__":
    if sys.argv[1] == "--connect":
        serve_pipe(connect(sys.argv[2]))
    else:
        serve_pipe(int(sys.argv[1]))
