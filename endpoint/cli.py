"""``farcall-endpoint``: the operator's command line.

``configure NAME`` writes a commented config; ``start NAME`` registers (first
time) and runs the agent in the foreground, logging to stderr; ``stop NAME``
stops a running one gracefully; ``list`` shows every configured endpoint.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from farcall.endpoint.agent import Agent
from farcall.endpoint.config import (
    configure,
    endpoint_dir,
    farcall_home,
    load_config,
)
from farcall.endpoint.engines import ENGINES, build_engine
from farcall.endpoint.errors import EndpointError
from farcall.endpoint.registration import ensure_registered, load_registration
from farcall.errors import FarcallError

log = logging.getLogger(__name__)

PID_FILE = "endpoint.pid"


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return int(args.func(args))
    except FarcallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="farcall-endpoint", description="Run a farcall endpoint on this computer."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("configure", help="write $FARCALL_HOME/endpoints/NAME/config.yaml")
    p.add_argument("name")
    p.add_argument("--engine", default="ProcessPoolEngine", choices=list(ENGINES))
    p.add_argument("--broker-url", help="default: $FARCALL_BROKER_URL at start")
    p.add_argument("--max-workers", type=int, help="default: the number of CPUs")
    p.add_argument("--force", action="store_true", help="overwrite an existing config")
    p.set_defaults(func=cmd_configure)

    p = sub.add_parser("start", help="register (first time) and run in the foreground")
    p.add_argument("name")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="stop a running endpoint gracefully")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, help="seconds to wait (default: stop_timeout + 30)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("list", help="configured endpoints: name, id, state")
    p.set_defaults(func=cmd_list)
    return parser


def cmd_configure(args: argparse.Namespace) -> int:
    if args.max_workers is not None and args.max_workers < 1:
        print("error: --max-workers must be at least 1", file=sys.stderr)
        return 2
    path = configure(args.name, args.engine, args.broker_url, args.max_workers, args.force)
    print(f"wrote {path}")
    print(f"edit it if needed, then run: farcall-endpoint start {args.name}")
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    name = args.name
    config = load_config(name)
    directory = endpoint_dir(name)
    broker_url = config.resolved_broker_url()
    engine = build_engine(config.engine)
    pid_path = directory / PID_FILE
    _claim_pid_file(pid_path)
    try:
        registration = ensure_registered(directory, broker_url, config.display_name or name)
        agent = Agent(
            broker_url,
            registration.endpoint_id,
            registration.credential,
            engine,
            heartbeat_period=config.heartbeat_period,
            stop_timeout=config.stop_timeout,
            display_name=config.display_name or name,
        )
        log.info("starting endpoint %s (%s) with %s", name, registration.endpoint_id, engine.name)
        asyncio.run(_run_with_signals(agent))
    finally:
        _release_pid_file(pid_path)
    return 0


async def _run_with_signals(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()


def cmd_stop(args: argparse.Namespace) -> int:
    directory = endpoint_dir(args.name)
    pid = running_pid(directory)
    if pid is None:
        print(f"endpoint {args.name} is not running")
        return 0
    timeout = args.timeout
    if timeout is None:
        try:
            timeout = load_config(args.name).stop_timeout + 30
        except EndpointError:
            timeout = 60.0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            print(
                f"error: endpoint {args.name} (pid {pid}) did not stop within {timeout:.0f} s; "
                f"to force it: kill -9 {pid}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.05)
    print(f"stopped endpoint {args.name}")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    root = farcall_home() / "endpoints"
    rows = [("NAME", "ENDPOINT ID", "STATE")]
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if not (directory / "config.yaml").is_file():
            continue
        try:
            registration = load_registration(directory)
        except EndpointError:
            registration = None
        endpoint_id = registration.endpoint_id if registration else "-"
        state = "running" if running_pid(directory) else "stopped"
        rows.append((directory.name, endpoint_id, state))
    if len(rows) == 1:
        print(f"no endpoints in {root}; create one with: farcall-endpoint configure NAME")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}")
    return 0


# ------------------------------------------------------------------ pid files


def running_pid(directory: Path) -> int | None:
    """The pid in ``endpoint.pid`` if that process is alive; a stale file counts as not running."""
    try:
        pid = int((directory / PID_FILE).read_text().strip())
    except (OSError, ValueError):
        return None
    return pid if _alive(pid) else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        import psutil
    except ImportError:
        return True
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _claim_pid_file(path: Path) -> None:
    pid = running_pid(path.parent)
    if pid is not None and pid != os.getpid():
        raise EndpointError(
            f"endpoint {path.parent.name} is already running (pid {pid}); "
            f"stop it with: farcall-endpoint stop {path.parent.name}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}")
    tmp.write_text(f"{os.getpid()}\n")
    os.replace(tmp, path)


def _release_pid_file(path: Path) -> None:
    try:
        if int(path.read_text().strip()) == os.getpid():
            path.unlink()
    except (OSError, ValueError):
        pass


if __name__ == "__main__":
    sys.exit(main())
