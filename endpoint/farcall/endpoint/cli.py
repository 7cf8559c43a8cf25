"""``farcall-endpoint``: the operator's command line.

``configure NAME`` writes a commented config; ``start NAME`` registers (first
time, or with ``--register-again``) and runs the agent in the foreground, or as
a daemon with ``--detach``; ``stop NAME`` stops it gracefully; ``restart``,
``list``, ``status NAME`` and ``delete NAME`` do what their names say;
``rotate-credential NAME`` replaces the endpoint's credential (the old one is refused at once).
``configure NAME --multi-user`` writes a multi-user endpoint's files, and ``render-user-config
NAME`` renders its user endpoint template offline, so the administrator can try it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import pwd
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from farcall.endpoint import daemon, lockdown
from farcall.endpoint.agent import Agent
from farcall.endpoint.check import check_config, check_endpoint
from farcall.endpoint.config import (
    PROVIDER_TEMPLATES,
    configure,
    endpoint_dir,
    farcall_home,
    load_config,
)
from farcall.endpoint.engines import ENGINES, build_engine
from farcall.endpoint.engines.addresses import resolving_here
from farcall.endpoint.errors import EndpointError, EndpointRejected
from farcall.endpoint.multiuser.events import EventWriter
from farcall.endpoint.multiuser.state import read_user_endpoints
from farcall.endpoint.registration import (
    CREDENTIALS_FILE,
    confirm,
    ensure_registered,
    load_registration,
    load_registrations,
    refused,
    save_registrations,
    stored_credential,
)
from farcall.errors import FarcallError
from farcall.protocol.channel import Welcome

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        if getattr(args, "name", None) and args.command in BY_NAME_OR_ID:
            args.name = endpoint_name(args.name)
        return int(args.func(args))
    except FarcallError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


BY_NAME_OR_ID = ("render-user-config", "check", "start", "stop", "restart", "status",
                 "rotate-credential", "delete")
"""Verbs that, as Globus Compute's do, take the endpoint's name or its id."""


def endpoint_name(name_or_id: str) -> str:
    """The local endpoint a verb means: a configured name, else the endpoint whose registration
    has this id (an operator may type the id ``list`` shows, as with Globus Compute)."""
    root = farcall_home() / "endpoints"
    if (root / name_or_id).is_dir() or not root.is_dir():
        return name_or_id
    for directory in sorted(root.iterdir()):
        try:
            stored = load_registrations(directory)
        except EndpointError:
            continue
        if stored is not None and any(r.endpoint_id == name_or_id for r in stored.registrations):
            return directory.name
    return name_or_id


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="farcall-endpoint", description="Run a farcall endpoint on this computer."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("version", help="print farcall's version")
    p.set_defaults(func=cmd_version)

    p = sub.add_parser("configure", help="write $FARCALL_HOME/endpoints/NAME/config.yaml")
    p.add_argument("name")
    p.add_argument("--engine", choices=list(ENGINES), help="default: ProcessPoolEngine")
    p.add_argument("--provider", choices=list(PROVIDER_TEMPLATES),
                   help="for ParslEngine/MPIEngine: the scheduler to get workers from")
    p.add_argument("--broker-url", help="default: $FARCALL_BROKER_URL at start")
    p.add_argument("--max-workers", type=int, help="workers (per node for ParslEngine)")
    p.add_argument("--force", action="store_true", help="overwrite an existing config")
    p.add_argument("--multi-user", action="store_true",
                   help="a multi-user endpoint: a manager (run as root) that runs each user's tasks "
                        "as their own Unix account; also writes identity_mapping.json, "
                        "user_config_template.yaml.j2, user_config_schema.json and "
                        "user_environment.yaml (docs/multi-user.md)")
    p.add_argument("--display-name", help="the name users see (default: NAME)")
    p.add_argument("--from", dest="source", metavar="GC_ENDPOINT_DIR", type=Path,
                   help="copy a Globus Compute endpoint's configuration (such as "
                        "~/.globus_compute/NAME: config.yaml and its user config template, schema, "
                        "environment and identity mapping), checked first; never its registration")
    p.set_defaults(func=cmd_configure)

    p = sub.add_parser("render-user-config", help=(
        "render a multi-user endpoint's user endpoint config for some values, offline, and print "
        "it (exit 1 with the reason if the values or the template are refused)"))
    p.add_argument("name", nargs="?", help="the endpoint's name or id (or -e/--endpoint)")
    p.add_argument("-e", "--endpoint", dest="endpoint", help=argparse.SUPPRESS)
    p.add_argument("--user-config", default=None, metavar="JSON",
                   help="the values a user would send as user_endpoint_config (default: {})")
    p.add_argument("-o", "--user-options", metavar="FILE",
                   help="read the values from a JSON file instead ('-': standard input), as "
                        "Globus Compute's render-user-config does")
    p.add_argument("--user", metavar="LOCAL_NAME",
                   help="the local account to render for (default: the account running this)")
    p.set_defaults(func=cmd_render_user_config)

    p = sub.add_parser("check", help=(
        "check config.yaml: every problem at once (exit 1), else build the engine, provider "
        "and executor without starting them and say what was built"))
    p.add_argument("name")
    p.set_defaults(func=cmd_check)

    p = sub.add_parser("start", help="register (first time) and run, in the foreground or --detach")
    p.add_argument("name")
    p.add_argument("--detach", action="store_true",
                   help="run as a daemon; log to endpoint.log in the endpoint's directory (or "
                        "where config.yaml's log_dir, stdout and stderr say)")
    p.add_argument("--register-again", action="store_true",
                   help="register a new endpoint with the configured broker (needs your token), "
                        "for a broker this endpoint is not registered with; endpoint.json keeps "
                        "the other registrations, so setting broker_url back reconnects as the "
                        "endpoint registered there")
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

    p = sub.add_parser("rotate-credential", help=(
        "give the endpoint a new credential (needs your token): the old one is refused at once "
        "and a running agent reconnects with the new one"))
    p.add_argument("name")
    p.set_defaults(func=cmd_rotate_credential)

    p = sub.add_parser("delete", help="stop, deregister from the broker and remove the files")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.add_argument("--local-only", "--force", dest="local_only", action="store_true",
                   help="remove the local files even when the broker cannot be told "
                        "(--force: Globus Compute's name)")
    p.set_defaults(func=cmd_delete)
    return parser


# ------------------------------------------------------------------ configure


def cmd_configure(args: argparse.Namespace) -> int:
    if args.max_workers is not None and args.max_workers < 1:
        print("error: --max-workers must be at least 1", file=sys.stderr)
        return 2
    if args.source is not None:
        return _configure_from(args)
    path = configure(args.name, args.engine or "ProcessPoolEngine", args.broker_url,
                     args.max_workers, args.force, args.provider, multi_user=args.multi_user,
                     display_name=args.display_name)
    print(f"wrote {path}")
    if args.multi_user:
        print(f"and, beside it, the files that configure its user endpoints; edit them, try the "
              f"template with: farcall-endpoint render-user-config {args.name} --user-config "
              f"'{{...}}' --user SOMEONE")
        print(f"then run as root: farcall-endpoint start {args.name}")
        return 0
    print(f"edit it if needed, then run: farcall-endpoint start {args.name}")
    return 0


def cmd_version(args: argparse.Namespace) -> int:
    from farcall.version import __version__

    print(f"farcall-endpoint {__version__}")
    return 0


def _configure_from(args: argparse.Namespace) -> int:
    given = [flag for flag, value in (("--engine", args.engine), ("--provider", args.provider),
                                      ("--max-workers", args.max_workers),
                                      ("--multi-user", args.multi_user)) if value]
    if given:
        print(f"error: {', '.join(given)} cannot go with --from: the copied config.yaml says what "
              "runs the tasks; edit it after the copy", file=sys.stderr)
        return 2
    from farcall.endpoint.migrate import GLOBUS_REGISTRATION, configure_from

    done = configure_from(args.name, args.source, display_name=args.display_name,
                          broker_url=args.broker_url, force=args.force)
    for file_name, origin in done.copied.items():
        print(f"copied {origin} -> {done.directory / file_name}")
    for key, value in done.built.items():
        print(f"  {key}: {value}")
    for warning in done.warnings:
        print(f"WARNING {warning}")
    registration = [n for n in done.left if n in GLOBUS_REGISTRATION]
    others = [n for n in done.left if n not in GLOBUS_REGISTRATION]
    if registration:
        print(f"not copied: {', '.join(registration)} (Globus Compute's registration: never)")
    if others:
        print(f"not copied: {', '.join(others)}")
    print(f"endpoint {args.name} registers anew with farcall's broker at its first start, with a "
          "new endpoint id: give your users that id (farcall-endpoint status "
          f"{args.name} shows it). Run: farcall-endpoint start {args.name}")
    return 0


def cmd_render_user_config(args: argparse.Namespace) -> int:
    from farcall.endpoint.multiuser.identity import local_user
    from farcall.endpoint.multiuser.templates import UserConfigError, render_user_config

    if args.endpoint and args.name and endpoint_name(args.endpoint) != args.name:
        raise UserConfigError("give the endpoint once: as NAME or as -e/--endpoint")
    if not args.name and not args.endpoint:
        raise UserConfigError("which endpoint? give its name: farcall-endpoint render-user-config "
                              "NAME --user-config '{...}'")
    args.name = args.name or endpoint_name(args.endpoint)
    if args.user_options is not None and args.user_config is not None:
        raise UserConfigError("give the values once: --user-config JSON or -o/--user-options FILE")
    if args.user_options is not None:
        try:
            args.user_config = (sys.stdin.read() if args.user_options == "-"
                                else open(args.user_options).read())
        except OSError as e:
            raise UserConfigError(f"-o/--user-options: cannot read {args.user_options}: "
                                  f"{e.strerror}") from None
    if args.user_config is None:
        args.user_config = "{}"
    config = load_config(args.name)
    if not config.multi_user:
        raise EndpointError(f"endpoint {args.name!r} is not a multi-user endpoint: its config.yaml "
                            "has an engine section, so it runs tasks itself (a manager's has none; "
                            "see docs/multi-user.md)")
    try:
        values = json.loads(args.user_config)
    except ValueError as e:
        raise UserConfigError(f"--user-config is not valid JSON: {e}") from None
    user = local_user(args.user or pwd.getpwuid(os.getuid()).pw_name)
    text, _ = render_user_config(endpoint_dir(args.name), values, user, config)
    print(f"rendered for local user {user.name} (uid {user.uid}); the config is valid",
          file=sys.stderr)
    sys.stdout.write(text)
    return 0


# ------------------------------------------------------------------ start


def cmd_check(args: argparse.Namespace) -> int:
    for line in check_endpoint(args.name).lines():
        print(line)
    return 0


def cmd_start(args: argparse.Namespace) -> int:
    name = args.name
    config = load_config(name)
    if config.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    directory = endpoint_dir(name)
    broker_url = config.resolved_broker_url()
    with resolving_here():  # the engine starts here: its address must resolve here
        checked = check_config(name, config, directory)
    for warning in checked.warnings:
        log.warning("endpoint %s: %s", name, warning)
    if config.multi_user:
        from farcall.endpoint.multiuser import manager

        return manager.start(name, directory, config, broker_url, detach=args.detach,
                             wait=args.wait, register_again=args.register_again)
    engine_spec = config.engine_spec(directory)
    if args.detach:
        started = daemon.start_detached(
            name, directory, args.wait, register_again=args.register_again,
            logs=daemon.log_files(directory, config.log_dir, config.stdout, config.stderr))
        if started.endpoint_id is None:
            print(f"endpoint {name} runs as pid {started.pid} but is not connected to the broker "
                  f"yet; see {started.log}")
        else:
            print(f"started endpoint {name} ({started.endpoint_id}) as pid {started.pid}; "
                  f"log: {started.log}")
        return 0
    lockdown.make_undumpable()  # tasks (same Unix account) cannot read its memory or environ
    with daemon.pid_file(directory), daemon.hooks(config.endpoint_setup, config.endpoint_teardown,
                                                  directory):
        lockdown.warn_user_token(registered=not args.register_again
                                 and load_registrations(directory) is not None)
        registration = ensure_registered(directory, broker_url, config.display_name or name,
                                         register_again=args.register_again)
        lockdown.drop_user_token()  # from here on, the endpoint's credential is all it holds

        def on_welcome(welcome: Welcome) -> None:
            nonlocal registration
            registration = confirm(directory, registration, welcome.broker_id)

        engine = build_engine(engine_spec)
        agent = Agent(
            broker_url,
            registration.endpoint_id,
            registration.credential,
            engine,
            heartbeat_period=config.heartbeat_period,
            stop_timeout=config.stop_timeout,
            data_retry_seconds=config.data_retry_seconds,
            display_name=config.display_name or name,
            allowed_functions=config.allowed_functions,
            on_status=lambda snapshot: daemon.write_status(directory, snapshot),
            on_welcome=on_welcome,
            reload_credential=lambda: stored_credential(directory, registration.endpoint_id),
            idle_shutdown_seconds=config.idle_shutdown_seconds,
            on_task_states=EventWriter.from_environment(),
            heartbeat_threshold=config.heartbeat_threshold,
            idle_heartbeats_soft=config.idle_heartbeats_soft,
            idle_heartbeats_hard=config.idle_heartbeats_hard,
        )
        log.info("starting endpoint %s (%s) with %s", name, registration.endpoint_id, engine.name)
        if engine.shared_caveat:
            log.warning("endpoint %s: %s keeps no worker to one user: %s. Share this endpoint "
                        "only with users who trust each other and you, or use ProcessPoolEngine "
                        "(a worker per user) or a multi-user endpoint (tasks run as each user's "
                        "own account)", name, engine.name, engine.shared_caveat)
        try:
            daemon.run_agent(agent, directory)
        except EndpointRejected as e:
            raise refused(directory, registration, e) from None
    return 0


# ------------------------------------------------------------------ stop / restart


def cmd_stop(args: argparse.Namespace) -> int:
    _stop(args.name, args.timeout)
    return 0


def _stop(name: str, timeout: float | None) -> None:
    directory = endpoint_dir(name)
    pid = daemon.running_pid(directory)
    if pid is None:
        print(f"endpoint {name} is not running")
        return
    if timeout is None:
        try:
            timeout = load_config(name).stop_timeout + 30
        except EndpointError:
            timeout = 60.0
    daemon.stop(name, pid, timeout)
    print(f"stopped endpoint {name}")


def cmd_restart(args: argparse.Namespace) -> int:
    load_config(args.name)  # a broken config fails before the running endpoint is stopped
    _stop(args.name, args.timeout)
    return cmd_start(argparse.Namespace(name=args.name, detach=True, wait=args.wait,
                                        register_again=False))


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
        state, status = daemon.state(directory)
        heartbeat = (status or {}).get("heartbeat") or {}
        workers = str(heartbeat.get("workers", "-")) if state != "stopped" else "-"
        rows.append((directory.name, endpoint_id, state, workers))
        for ep in read_user_endpoints(directory) or []:
            rows.append((f"  {directory.name} > {ep.get('local_user') or ep.get('username')}",
                         str(ep.get("endpoint_id")), str(ep.get("state")),
                         f"idle {ep.get('idle_seconds', 0):.0f} s"))
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
    state, status = daemon.state(directory)
    out: dict[str, Any] = {
        "name": args.name,
        "endpoint_id": registration.endpoint_id if registration else None,
        "broker_id": registration.broker_id or None if registration else None,
        "state": state,
        "pid": daemon.running_pid(directory),
    }
    if status and state != "stopped":
        out.update({k: status.get(k) for k in ("broker_url", "connected", "connections", "updated_at")})
        out["heartbeat"] = status.get("heartbeat")
    user_endpoints = read_user_endpoints(directory)
    if user_endpoints is not None:
        out["user_endpoints"] = user_endpoints
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
    if user_endpoints is not None:
        _print_user_endpoints(user_endpoints)
    return 0


def _print_user_endpoints(user_endpoints: list[dict[str, Any]]) -> None:
    """A multi-user endpoint's user endpoints, one line each."""
    print(f"user endpoints: {len(user_endpoints)}")
    if not user_endpoints:
        return
    rows = [("LOCAL USER", "UID", "CONFIG", "STATE", "IDLE", "ENDPOINT ID")]
    for ep in user_endpoints:
        rows.append((str(ep.get("local_user") or "-"), str(ep.get("uid") or "-"),
                     str(ep.get("config_hash") or "-")[:12], str(ep.get("state")),
                     f"{ep.get('idle_seconds', 0):.0f} s", str(ep.get("endpoint_id"))))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(f"{c:<{w}}" for c, w in zip(r, widths, strict=True)).rstrip())
    for ep in user_endpoints:
        if ep.get("reason"):
            print(f"  {ep.get('endpoint_id')}: {ep['reason']}")


# ------------------------------------------------------------------ rotate-credential


def cmd_rotate_credential(args: argparse.Namespace) -> int:
    from farcall.client import Client

    directory = endpoint_dir(args.name)
    config = load_config(args.name)
    stored = load_registrations(directory)
    broker_url = config.resolved_broker_url()
    registration = stored.for_url(broker_url) or stored.in_use() if stored is not None else None
    if stored is None or registration is None:
        raise EndpointError(f"endpoint {args.name} is not registered yet; start it first "
                            f"(farcall-endpoint start {args.name})")
    with Client(broker_url=registration.broker_url) as client:
        credential = client.rotate_endpoint_credential(registration.endpoint_id)
    stored.put(replace(registration, credential=credential))
    save_registrations(directory, stored)
    state, _ = daemon.state(directory)
    print(f"endpoint {args.name} ({registration.endpoint_id}) has a new credential in "
          f"{directory / CREDENTIALS_FILE}; the old one is refused from now on"
          + ("; the running agent reconnects with the new one" if state != "stopped" else ""))
    return 0


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
    _stop(args.name, None)
    stored = load_registrations(directory)
    for registration in stored.registrations if stored is not None else []:
        try:
            _deregister(registration.broker_url, registration.endpoint_id)
            print(f"deleted endpoint {registration.endpoint_id} at {registration.broker_url}")
        except FarcallError as e:
            if not args.local_only:
                raise EndpointError(
                    f"the broker at {registration.broker_url} could not delete endpoint "
                    f"{registration.endpoint_id}: {e}. Fix that (FARCALL_TOKEN must be its "
                    "owner's token at that broker), or pass --local-only to remove only the "
                    "local files."
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


if __name__ == "__main__":
    sys.exit(main())
