"""A Redis and a RabbitMQ node of a test's own on loopback, to stop, kill and restart without
touching the machine's shared ones.

Each lives in a temporary directory (data, logs, the Erlang cookie) that ``close()``
removes (or, failing that, the garbage collector at exit), and listens on 127.0.0.1 only,
on free ports kept across restarts, so a client that reconnects to the same URL finds it
again.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
import weakref
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self

from harness.procs import ManagedProcess, free_port, wait_until

log = logging.getLogger(__name__)


def _command(name: str, *preferred: str) -> str:
    """The path of a server command: one of ``preferred`` if it exists, else from PATH."""
    for path in preferred:
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(
            f"{name} is not installed; install it (scripts/ensure_services.sh does) and retry"
        )
    return found


def _exchange(port: int, request: bytes, timeout: float = 2.0) -> bytes:
    """Send ``request`` to 127.0.0.1:port and return the first bytes of the answer (``b""`` when
    nothing answers). Raw sockets keep polling quiet and quick: clients log and retry."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            s.sendall(request)
            return s.recv(64)
    except OSError:
        return b""


class _PrivateServer:
    """What both private servers share: a temporary directory removed with the server, and
    use as a context manager (started on entry, killed and removed on exit)."""

    def __init__(self, prefix: str) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix=prefix))
        weakref.finalize(self, shutil.rmtree, self.dir, ignore_errors=True)

    def start(self, timeout: float = 60.0) -> Self:
        raise NotImplementedError

    def stop(self, hard: bool = False) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Kill the server and remove its directory (its data is not wanted any more)."""
        self.stop(hard=True)
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()


class PrivateRedis(_PrivateServer):
    """A ``redis-server`` of this test's own on a free loopback port.

    With ``appendonly`` (the default) every write goes to an append-only file in
    its directory, so data survives ``stop``/``restart`` (a SIGKILL included, up to
    the last fsync: ``appendfsync always`` makes that every write). Start and
    restart take about 0.05 s here.
    """

    def __init__(self, appendonly: bool = True) -> None:
        self.appendonly = appendonly
        super().__init__("farcall-redis-")
        self.port = free_port()
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def answers(self) -> bool:
        """Whether it answers PING now (not while it is still loading its data)."""
        return _exchange(self.port, b"PING\r\n").startswith(b"+PONG")

    def start(self, timeout: float = 15.0) -> Self:
        """Start on ``self.port`` and wait until it answers (``TimeoutError`` with its log if not)."""
        args = [
            _command("redis-server"), "--port", str(self.port), "--bind", "127.0.0.1",
            "--dir", str(self.dir), "--save", "", "--daemonize", "no",
            "--appendonly", "yes" if self.appendonly else "no", "--appendfsync", "always",
        ]
        self.proc = ManagedProcess(f"redis-{self.port}", args, dict(os.environ),
                                   self.dir / "redis.log", cwd=self.dir).start()
        self._wait(timeout)
        return self

    def _wait(self, timeout: float) -> None:
        assert self.proc is not None
        _wait_answering(self.proc, self.answers, timeout, "redis-server",
                        f"the private Redis on port {self.port}")

    def stop(self, hard: bool = False) -> None:
        """Stop it: ``hard`` is SIGKILL (a crash), otherwise ``SHUTDOWN NOSAVE`` (a clean stop)."""
        proc = self.proc
        if proc is None or not proc.alive():
            return
        if hard:
            proc.stop(sig=signal.SIGKILL)
            return
        _exchange(self.port, b"SHUTDOWN NOSAVE\r\n")
        wait_until(lambda: not proc.alive(), 15, f"the private Redis on port {self.port} to exit")
        proc.stop()

    def restart(self, hard: bool = False, timeout: float = 15.0) -> None:
        """Stop, then start again on the same port with the same data directory."""
        self.stop(hard)
        self.start(timeout)



_CLI_DIST_PORTS = range(35672, 35683)
"""Where ``rabbitmqctl`` itself listens for Erlang distribution (its default range): a node's own
AMQP or distribution port there makes ``start_app`` fail with ``eaddrinuse``."""

_LOOPBACK_DIST = "-kernel inet_dist_use_interface {127,0,0,1}"


def _free_node_port() -> int:
    """A free loopback port outside the CLI's range, low enough that ``+ 10000`` stays a port."""
    for _ in range(200):
        port = random.randrange(20000, 50000)
        if port in _CLI_DIST_PORTS:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("found no free loopback port for a private RabbitMQ node")


class PrivateRabbit(_PrivateServer):
    """A RabbitMQ node of this test's own: loopback only, its own data, logs and cookie.

    Everything a node would otherwise take from the machine (``/etc/rabbitmq``'s config
    and env file, the enabled plugins, ``~/.erlang.cookie``) points into its directory;
    the AMQP listener, the distribution port and ``rabbitmqctl``'s own distribution listen
    on 127.0.0.1 only. It shares the machine's epmd on 4369 (or starts one on loopback).
    ``guest`` may log in, over loopback only, which is what ``url`` uses.

    Timings measured here (2 cores, RabbitMQ 3.10): ``start`` 6–8 s on a fresh directory;
    ``restart`` (``stop_app`` + ``start_app``) 2.5–3.5 s, of which each ``rabbitmqctl`` call
    spends about 0.6 s starting its own Erlang VM; ``stop_app`` about 0.8 s; ``close`` about
    1.3 s. A full ``stop`` (4 s) and ``start`` again on the same data (about 16 s) is slower:
    prefer ``restart`` for "RabbitMQ restarted".
    """

    def __init__(self, name: str | None = None) -> None:
        self.node = f"{name or 'farcall' + uuid.uuid4().hex[:8]}@localhost"
        self.port = _free_node_port()
        self.dist_port = _free_node_port()
        while self.dist_port == self.port:
            self.dist_port = _free_node_port()
        super().__init__("farcall-rabbit-")
        for sub in ("mnesia", "log", "home"):
            (self.dir / sub).mkdir()
        (self.dir / "rabbitmq.conf").write_text(
            f"listeners.tcp.local = 127.0.0.1:{self.port}\nloopback_users.guest = true\n"
        )
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq-env.conf").write_text("")
        self.proc: ManagedProcess | None = None

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    def env(self) -> dict[str, str]:
        """The environment the node and ``rabbitmqctl`` for it run with."""
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("RABBITMQ_", "ERL_")) and k != "HOME"}
        d = self.dir
        env.update(
            HOME=str(d / "home"),
            RABBITMQ_NODENAME=self.node,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(self.port),
            RABBITMQ_DIST_PORT=str(self.dist_port),
            ERL_EPMD_ADDRESS="127.0.0.1",
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS=_LOOPBACK_DIST,
            RABBITMQ_CTL_ERL_ARGS=_LOOPBACK_DIST,
            RABBITMQ_CONFIG_FILE=str(d / "rabbitmq.conf"),
            RABBITMQ_ADVANCED_CONFIG_FILE=str(d / "advanced.config"),
            RABBITMQ_CONF_ENV_FILE=str(d / "rabbitmq-env.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(d / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(d / "mnesia"),
            RABBITMQ_LOG_BASE=str(d / "log"),
            RABBITMQ_PID_FILE=str(d / "rabbitmq.pid"),
        )
        return env

    def answers(self) -> bool:
        """Whether AMQP answers now: the node greets a client with ``Connection.Start`` (a method
        frame), which it does only once its listeners are up, the last step of its boot."""
        return _exchange(self.port, b"AMQP\x00\x00\x09\x01")[:1] == b"\x01"

    def start(self, timeout: float = 60.0) -> Self:
        """Start the node and wait until AMQP answers (``TimeoutError`` with its log if not)."""
        server = _command("rabbitmq-server", "/usr/lib/rabbitmq/bin/rabbitmq-server")
        started = time.monotonic()
        self.proc = ManagedProcess(f"rabbitmq-{self.node}", [server], self.env(),
                                   self.dir / "server.log", cwd=self.dir).start()
        self._wait(timeout)
        log.info("private RabbitMQ %s answered after %.1f s", self.node, time.monotonic() - started)
        return self

    def _wait(self, timeout: float) -> None:
        assert self.proc is not None
        _wait_answering(self.proc, self.answers, timeout, f"RabbitMQ node {self.node}",
                        f"the private RabbitMQ {self.node} on port {self.port}")

    def ctl(self, *args: str, timeout: float = 60.0) -> str:
        """Run ``rabbitmqctl -n <node> args``; its output (``RuntimeError`` with stderr on failure)."""
        ctl = _command("rabbitmqctl", "/usr/lib/rabbitmq/bin/rabbitmqctl")
        done = subprocess.run([ctl, "-q", "-n", self.node, *args], env=self.env(), cwd=self.dir,
                              capture_output=True, text=True, timeout=timeout)
        if done.returncode != 0:
            raise RuntimeError(f"rabbitmqctl {' '.join(args)} on {self.node} failed "
                               f"({done.returncode}): {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout

    def stop_app(self) -> None:
        """Stop RabbitMQ inside the running node: clients get ``320 CONNECTION_FORCED``, the port
        closes, durable queues and persistent messages stay on disk."""
        self.ctl("stop_app")

    def start_app(self, timeout: float = 60.0) -> None:
        """Start RabbitMQ again after ``stop_app`` and wait until AMQP answers."""
        self.ctl("start_app", timeout=timeout)
        self._wait(timeout)

    def restart(self, timeout: float = 60.0) -> None:
        """``stop_app`` then ``start_app``: what a RabbitMQ restart looks like to its clients."""
        self.stop_app()
        self.start_app(timeout)

    def queues(self) -> dict[str, int]:
        """Every queue on the node with its count of ready messages."""
        found = {}
        for line in self.ctl("list_queues", "name", "messages_ready").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                found[parts[0]] = int(parts[1])
        return found

    def stop(self, hard: bool = False) -> None:
        """Halt the node (``rabbitmqctl stop``: queues and messages are kept on disk for a later
        ``start``), or with ``hard`` kill it at once; then end whatever of its tree is left."""
        if self.proc is None or not self.proc.alive():
            return
        if not hard:
            try:
                self.ctl("stop", timeout=30)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log.warning("rabbitmqctl stop on %s failed (%s); killing the node", self.node, e)
        self.proc.stop(timeout=10, sig=signal.SIGKILL if hard else signal.SIGTERM)



def _wait_answering(proc: ManagedProcess, answers: Callable[[], bool], timeout: float,
                    name: str, what: str) -> None:
    """Wait until ``answers()``; fail at once, with its output, if the server process exits."""

    def up() -> bool:
        if not proc.alive():
            raise RuntimeError(f"{name} exited: {proc.output(tail=3000)}")
        return answers()

    wait_until(up, timeout, f"{what} to answer", interval=0.1)
