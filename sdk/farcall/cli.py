"""``farcall``: the SDK's command line. ``farcall demo`` shows the whole system on this machine;
``login``, ``whoami``, ``endpoints`` (and ``endpoints share|unshare|leave``), ``groups``, ``tasks``
and ``result`` are a user's view of a broker (:mod:`farcall.commands` does them; this module only parses).
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from farcall.version import __version__

MAX_LIMIT = 1000
"""Most groups or tasks the broker lists at once."""


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.command != "demo":
        return _user_command(args)
    if args.tasks < 1 or args.workers < 1:
        parser.error("--tasks and --workers must be at least 1")
    return demo_main(args.tasks, args.workers)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="farcall", description="farcall SDK command line")
    parser.add_argument("--version", action="version", version=f"farcall {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="run a parameter sweep on an embedded broker and a local endpoint"
    )
    demo.add_argument("--tasks", type=int, default=200, help="number of tasks in the sweep")
    demo.add_argument("--workers", type=int, default=2, help="endpoint worker processes")
    login = sub.add_parser("login", help="check your token with a broker and save both in "
                           "$FARCALL_HOME/config (mode 0600)")
    login.add_argument("--broker", metavar="URL",
                       help="the broker's URL (default: FARCALL_BROKER_URL, then the saved one)")
    login.add_argument("--token", help="your token (default: FARCALL_TOKEN, else asked for)")
    _listing(sub, "whoami", "your user name and identity id on the broker")
    endpoints = _listing(sub, "endpoints", "the endpoints you may use: id, name, online or "
                         "offline (or share, unshare, leave one)")
    actions = endpoints.add_subparsers(dest="endpoints_command", metavar="{share,unshare,leave}")
    for verb, what in (("share", "let a user submit tasks to your endpoint (prints what that "
                                 "lets them do)"),
                       ("unshare", "stop sharing your endpoint with a user (their tasks there "
                                   "are cancelled)")):
        action = actions.add_parser(verb, help=what)
        action.add_argument("endpoint_id", metavar="ENDPOINT_ID")
        action.add_argument("username", metavar="USER")
    leave = actions.add_parser("leave", help="remove an endpoint shared with you from your list "
                               "(your tasks there are cancelled)")
    leave.add_argument("endpoint_id", metavar="ENDPOINT_ID")
    groups = _listing(sub, "groups", "your task groups, the most recently submitted to first")
    groups.add_argument("--limit", type=_limit, default=20, help="at most this many (default 20)")
    tasks = _listing(sub, "tasks", "your tasks, newest first: state, function, completion time")
    tasks.add_argument("--group", metavar="ID", help="only the tasks of this task group")
    tasks.add_argument("--limit", type=_limit, default=20, help="at most this many (default 20)")
    result = sub.add_parser("result", help="print a task's result (exit 1: it failed, with the "
                            "remote traceback; exit 2: not finished)")
    result.add_argument("task_id", metavar="TASK_ID")
    return parser


def _listing(sub: Any, name: str, what: str) -> argparse.ArgumentParser:
    command: argparse.ArgumentParser = sub.add_parser(name, help=what)
    command.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return command


def _limit(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"give a whole number from 1 to {MAX_LIMIT}, not {text!r}")
    return value


def _user_command(args: argparse.Namespace) -> int:
    """Run a user command; any failure is one line on stderr and exit status 1, no traceback."""
    from farcall import commands

    out = sys.stdout
    run: dict[str, Callable[[], int]] = {
        "login": lambda: commands.login(args.broker, args.token, out),
        "whoami": lambda: commands.whoami(args.json, out),
        "endpoints": lambda: _endpoints_command(args, out),
        "groups": lambda: commands.groups(args.limit, args.json, out),
        "tasks": lambda: commands.tasks(args.group, args.limit, args.json, out),
        "result": lambda: commands.result(args.task_id, out),
    }
    warnings.showwarning = _warning_line
    try:
        return run[args.command]()
    except KeyboardInterrupt:
        print(f"farcall {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # noqa: BLE001 - a command line answers with a sentence, not a traceback
        print(f"farcall {args.command}: {describe(e, args.command)}", file=sys.stderr)
        return 1


def _endpoints_command(args: argparse.Namespace, out: Any) -> int:
    from farcall import commands

    verb = getattr(args, "endpoints_command", None)
    if verb in ("share", "unshare"):
        return commands.share_endpoint(args.endpoint_id, args.username, verb == "share", out)
    if verb == "leave":
        return commands.leave_endpoint(args.endpoint_id, out)
    return commands.endpoints(args.json, out)


def describe(error: BaseException, command: str = "") -> str:
    """One line saying what went wrong and, where we know, what to do."""
    from farcall.errors import AuthenticationError, BrokerError, ConfigurationError

    text = str(error)
    if isinstance(error, BrokerError) and error.status == 0:  # the broker did not answer
        text = text.removeprefix("broker answered 0: ")
    if isinstance(error, AuthenticationError) and command != "login":
        text += "; run 'farcall login' with a valid token"
    elif not isinstance(error, BrokerError | ConfigurationError | OSError):
        text = f"{type(error).__name__}: {text}"
    return " ".join(text.split())


def _warning_line(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
    print(f"farcall: warning: {message}", file=sys.stderr)


def estimate_pi(samples: int, seed: int) -> float:
    """One point of the sweep: a Monte Carlo estimate of pi (defined here, shipped by value)."""
    import random

    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples


def demo_main(n_tasks: int, workers: int) -> int:
    try:
        from farcall.broker.embedded import EmbeddedBroker
        from farcall.endpoint.embedded import EmbeddedEndpoint
    except ImportError as e:
        print(f"the demo runs a broker and an endpoint here and needs them installed ({e}): "
              "pip install 'farcall[all]'", file=sys.stderr)
        return 1
    from farcall import Client, Executor

    t0 = time.perf_counter()
    with EmbeddedBroker() as broker:
        token = broker.create_user("demo")
        with EmbeddedEndpoint(broker.url, token, name="laptop", max_workers=workers) as ep:
            ready = time.perf_counter()
            print(f"broker on {broker.url} (embedded store and queue), endpoint {ep.endpoint_id} "
                  f"with {workers} worker processes, up in {ready - t0:.2f} s")
            client = Client(broker_url=broker.url, token=token)
            sizes = [1_000 * 2**k for k in range(5)]
            params = [(sizes[i % len(sizes)], i) for i in range(n_tasks)]
            remote_error = "(none raised)"
            start = time.perf_counter()
            with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
                estimates = list(ex.map(estimate_pi, *zip(*params, strict=True)))
                try:
                    ex.submit(estimate_pi, 0, 1).result()
                except ZeroDivisionError as e:
                    remote_error = f"{type(e).__name__}: {e}"
            took = time.perf_counter() - start
            print(f"\n{'samples':>8}  {'tasks':>5}  {'mean estimate of pi':>20}")
            for size in sizes:
                values = [v for (s, _), v in zip(params, estimates, strict=True) if s == size]
                if values:
                    print(f"{size:>8}  {len(values):>5}  {sum(values) / len(values):>20.5f}")
            print(f"\n{n_tasks} tasks in {took:.2f} s ({n_tasks / took:.0f} tasks/s end to end)")
            print(f"a remote error comes back as itself: {remote_error}")
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
