"""``farcall-endpoint``: the operator's command line.

``configure NAME`` writes a commented config; ``start NAME`` registers (first
time) and runs the agent in the foreground, or as a daemon with ``--detach``;
``stop NAME`` stops it gracefully; ``restart``, ``list``, ``status NAME`` and
``delete NAME`` do what their names say.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from farcall.endpoint.agent import Agent
from farcall.endpoint.config import (
    PROVIDER_TEMPLATES,
    EndpointConfig,
    configure,
    endpoint_dir,
    farcall_home,
    load_config,
)
from farcall.endpoint.engines import ENGINES, build_engine, engine_class
from farcall.endpoint.errors import EndpointError
from farcall.endpoint.registration import ensure_registered, load_registration
from farcall.errors import FarcallError

log = logging.getLogger(__name__)

PID_FILE = "endpoint.pid"
LOG_FILE = "endpoint.log"
STATUS_FILE = "status.json"
RUNINFO_DIR = "runinfo"


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
    p.add_argument("--provider", choices=list(PROVIDER_TEMPLATES),
                   help="for ParslEngine/MPIEngine: the scheduler to get workers from")
    p.add_argument("--broker-url", help="default: $FARCALL_BROKER_URL at start")
    p.add_argument("--max-workers", type=int, help="workers (per node for ParslEngine)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config")
    p.set_defaults(func=cmd_configure)

    p = sub.add_parser("start", help="register (first time) and run, in the foreground or --detach")
    p.add_argument("name")
    p.add_argument("--detach", action="store_true",
                   help="run as a daemon; log to endpoint.log in the endpoint's directory")
    p.add_argument("--wait", type=float, default=60.0,
                   help="with --detach: seconds to wait for the connection to the broker")
    p.set_defaults(func=cmd_start)

    p = sub.add_parser("stop", help="stop a running endpoint gracefully")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, help="seconds to wait (default: stop_timeout + 30)")
    p.set_defaults(func=cmd_stop)

    p = sub.add_parser("restart", help="stop, then start as a daemon")
    p.add_argument("name")
    p.add_argument("--timeout", type=float, help="seconds to wait for the stop")
    p.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the connection")
    p.set_defaults(func=cmd_restart)

    p = sub.add_parser("list", help="configured endpoints: name, id, state, workers")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("status", help="state, connection and the last heartbeat of an endpoint")
    p.add_argument("name")
    p.add_argument("--json", action="store_true", help="print the status as JSON")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("delete", help="stop, deregister from the broker and remove the files")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--local-only", action="store_true",
                   help="remove the local files even when the broker cannot be told")
    p.set_defaults(func=cmd_delete)
    return parser


# ------------------------------------------------------------------ configure


def cmd_configure(args: argparse.Namespace) -> int:
    if args.max_workers is not None and args.max_workers < 1:
        print("error: --max-workers must be at least 1", file=sys.stderr)
        return 2
    path = configure(args.name, args.engine, args.broker_url, args.max_workers, args.force,
                     args.provider)
    print(f"wrote {path}")
    print(f"edit it if needed, then run: farcall-endpoint start {args.name}")
    return 0


# ------------------------------------------------------------------ start


def cmd_start(args: argparse.Namespace) -> int:
    name = args.name
    config = load_config(name)
    directory = endpoint_dir(name)
    broker_url = config.resolved_broker_url()
    engine_spec = _engine_spec(config, directory)
    build_engine(engine_spec)  # a bad engine section fails here, before anything starts
    if args.detach:
        return _start_detached(name, directory, args.wait)
    pid_path = directory / PID_FILE
    _claim_pid_file(pid_path)
    try:
        _run_hook(config.endpoint_setup, "endpoint_setup", directory, fatal=True)
        try:
            registration = ensure_registered(directory, broker_url, config.display_name or name)
            engine = build_engine(engine_spec)
            agent = Agent(
                broker_url,
                registration.endpoint_id,
                registration.credential,
                engine,
                heartbeat_period=config.heartbeat_period,
                stop_timeout=config.stop_timeout,
                display_name=config.display_name or name,
                allowed_functions=config.allowed_functions,
                on_status=lambda snapshot: _write_status(directory, snapshot),
            )
            log.info("starting endpoint %s (%s) with %s", name, registration.endpoint_id,
                     engine.name)
            asyncio.run(_run_with_signals(agent))
        finally:
            _run_hook(config.endpoint_teardown, "endpoint_teardown", directory, fatal=False)
    finally:
        _release_pid_file(pid_path)
    return 0


def _engine_spec(config: EndpointConfig, directory: Path) -> dict[str, Any]:
    """The engine section, with Parsl's run directories inside the endpoint's directory."""
    spec = dict(config.engine)
    cls = engine_class(str(spec.get("type", "ProcessPoolEngine")))
    if "run_dir" in cls.Options.model_fields and not spec.get("run_dir"):
        spec["run_dir"] = str(directory / RUNINFO_DIR)
    return spec


async def _run_with_signals(agent: Agent) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_stop)
    await agent.run()


def _run_hook(command: str | None, key: str, directory: Path, fatal: bool) -> None:
    if not command:
        return
    log.info("running %s: %s", key, command)
    done = subprocess.run(command, shell=True, cwd=directory, capture_output=True, text=True)
    for line in (done.stdout + done.stderr).splitlines():
        log.info("%s: %s", key, line)
    if done.returncode != 0:
        message = (f"{key} failed (exit code {done.returncode}): {command!r}; "
                   f"its output: {(done.stderr or done.stdout).strip()[-500:]!r}")
        if fatal:
            raise EndpointError(message + ". Fix the command in config.yaml and start again.")
        log.warning("%s", message)


def _start_detached(name: str, directory: Path, wait: float) -> int:
    pid = running_pid(directory)
    if pid is not None:
        raise EndpointError(f"endpoint {name} is already running (pid {pid}); "
                            f"stop it with: farcall-endpoint stop {name}")
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / LOG_FILE
    status_path = directory / STATUS_FILE
    status_path.unlink(missing_ok=True)
    # The daemon runs in the endpoint's directory: a relative FARCALL_HOME must not move with it.
    env = {**os.environ, "FARCALL_HOME": str(farcall_home().absolute())}
    with open(log_path, "ab") as out:
        child = subprocess.Popen(
            [sys.executable, "-m", "farcall.endpoint", "start", name],
            stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True, cwd=directory, env=env,
        )
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if child.poll() is not None:
            tail = log_path.read_text(errors="replace").splitlines()[-15:]
            print(f"error: endpoint {name} exited at start (exit code {child.returncode}); "
                  f"the end of {log_path}:\n" + "\n".join(tail), file=sys.stderr)
            return 1
        status = read_status(directory)
        if status and status.get("pid") == child.pid and status.get("connected"):
            print(f"started endpoint {name} ({status['endpoint_id']}) as pid {child.pid}; "
                  f"log: {log_path}")
            return 0
        time.sleep(0.1)
    print(f"endpoint {name} runs as pid {child.pid} but is not connected to the broker yet; "
          f"see {log_path}")
    return 0


# ------------------------------------------------------------------ stop / restart


def cmd_stop(args: argparse.Namespace) -> int:
    return _stop(args.name, args.timeout)


def _stop(name: str, timeout: float | None) -> int:
    directory = endpoint_dir(name)
    pid = running_pid(directory)
    if pid is None:
        print(f"endpoint {name} is not running")
        return 0
    if timeout is None:
        try:
            timeout = load_config(name).stop_timeout + 30
        except EndpointError:
            timeout = 60.0
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while _alive(pid):
        if time.monotonic() > deadline:
            print(
                f"error: endpoint {name} (pid {pid}) did not stop within {timeout:.0f} s; "
                f"to force it: kill -9 {pid}",
                file=sys.stderr,
            )
            return 1
        time.sleep(0.05)
    print(f"stopped endpoint {name}")
    return 0


def cmd_restart(args: argparse.Namespace) -> int:
    load_config(args.name)  # a broken config fails before the running endpoint is stopped
    code = _stop(args.name, args.timeout)
    if code:
        return code
    return cmd_start(argparse.Namespace(name=args.name, detach=True, wait=args.wait))


# ------------------------------------------------------------------ list / status


def cmd_list(args: argparse.Namespace) -> int:
    root = farcall_home() / "endpoints"
    rows = [("NAME", "ENDPOINT ID", "STATE", "WORKERS")]
    for directory in sorted(root.iterdir()) if root.is_dir() else []:
        if not (directory / "config.yaml").is_file():
            continue
        try:
            registration = load_registration(directory)
        except EndpointError:
            registration = None
        endpoint_id = registration.endpoint_id if registration else "-"
        state, status = _state(directory)
        heartbeat = (status or {}).get("heartbeat") or {}
        workers = str(heartbeat.get("workers", "-")) if state != "stopped" else "-"
        rows.append((directory.name, endpoint_id, state, workers))
    if len(rows) == 1:
        print(f"no endpoints in {root}; create one with: farcall-endpoint configure NAME")
        return 0
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for r in rows:
        print(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]:<{widths[2]}}  {r[3]}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    directory = endpoint_dir(args.name)
    if not (directory / "config.yaml").is_file():
        raise EndpointError(f"endpoint {args.name!r} is not configured; "
                            f"run: farcall-endpoint configure {args.name}")
    registration = load_registration(directory)
    state, status = _state(directory)
    out: dict[str, Any] = {
        "name": args.name,
        "endpoint_id": registration.endpoint_id if registration else None,
        "state": state,
        "pid": running_pid(directory),
    }
    if status and state != "stopped":
        out.update({k: status.get(k) for k in ("broker_url", "connected", "connections", "updated_at")})
        out["heartbeat"] = status.get("heartbeat")
    if args.json:
        print(json.dumps(out, indent=2))
        return 0
    print(f"endpoint   {args.name} ({out['endpoint_id'] or 'not registered yet'})")
    print(f"state      {state}" + (f" (pid {out['pid']})" if out["pid"] else ""))
    if state == "stopped":
        return 0
    print(f"broker     {out.get('broker_url')}")
    heartbeat = out.get("heartbeat") or {}
    if heartbeat:
        age = time.time() - float(out.get("updated_at") or 0)
        print(f"heartbeat  {age:.0f} s ago; engine {heartbeat.get('engine')}")
        print(f"workers    {heartbeat.get('workers')} ({heartbeat.get('idle_workers')} idle)")
        print(f"tasks      {heartbeat.get('running_tasks')} running, "
              f"{heartbeat.get('pending_tasks')} pending")
        details = heartbeat.get("details") or {}
        for key in ("provider", "executor", "blocks_requested", "blocks_running", "managers",
                    "min_blocks", "max_blocks", "worker_python"):
            if key in details:
                print(f"{key:<10} {details[key]}")
    return 0


def _state(directory: Path) -> tuple[str, dict[str, Any] | None]:
    """``running`` (connected), ``connecting`` (running, no broker session) or ``stopped``."""
    pid = running_pid(directory)
    if pid is None:
        return "stopped", None
    status = read_status(directory)
    if status is None or status.get("pid") != pid:
        return "connecting", None
    return ("running" if status.get("connected") else "connecting"), status


def read_status(directory: Path) -> dict[str, Any] | None:
    try:
        found = json.loads((directory / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return found if isinstance(found, dict) else None


def _write_status(directory: Path, snapshot: dict[str, Any]) -> None:
    path = directory / STATUS_FILE
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({**snapshot, "pid": os.getpid()}))
    os.replace(tmp, path)


# ------------------------------------------------------------------ delete


def cmd_delete(args: argparse.Namespace) -> int:
    directory = endpoint_dir(args.name)
    if not directory.exists():
        raise EndpointError(f"endpoint {args.name!r} does not exist in {directory.parent}")
    if not args.yes:
        if not sys.stdin.isatty():
            raise EndpointError(f"deleting endpoint {args.name} cannot be undone; pass --yes")
        answer = input(f"delete endpoint {args.name} and its files in {directory}? [y/N] ")
        if answer.strip().lower() not in ("y", "yes"):
            print("not deleted")
            return 1
    if _stop(args.name, None):
        return 1
    registration = load_registration(directory)
    if registration is not None:
        try:
            _deregister(registration.broker_url, registration.endpoint_id)
            print(f"deleted endpoint {registration.endpoint_id} at {registration.broker_url}")
        except FarcallError as e:
            if not args.local_only:
                raise EndpointError(
                    f"the broker could not delete endpoint {registration.endpoint_id}: {e}. "
                    "Fix that (FARCALL_TOKEN must be its owner's token), or pass --local-only "
                    "to remove only the local files."
                ) from None
            print(f"warning: not deleted at the broker: {e}", file=sys.stderr)
    shutil.rmtree(directory)
    print(f"removed {directory}")
    return 0


def _deregister(broker_url: str, endpoint_id: str) -> None:
    from farcall.client import Client
    from farcall.errors import NotFound

    with Client(broker_url=broker_url, retry_seconds=5) as client:
        try:
            client.delete_endpoint(endpoint_id)
        except NotFound:
            pass  # already gone


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
