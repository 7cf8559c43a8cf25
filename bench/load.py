"""``python -m bench.load``: a bounded load on farcall, every result checked, broker memory sampled.

Starts a broker on the local Redis and RabbitMQ (keys and queues under the
run's own prefix) and ``--endpoints`` endpoint processes, runs ``--clients``
submitting threads for ``--seconds`` (:func:`harness.load.run_load`), prints
the figures, and exits non-zero if anything failed, was lost, or the broker's
memory grew past its bound. Everything it started and stored is removed at the
end, also after an error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

from bench.context import RunContext
from bench.farcall_deploy import Broker, Endpoint
from harness.load import DEFAULT_SECONDS, load_seconds, run_load
from harness.procs import process_tree, stop_all
from harness.services import answers, drop_rabbitmq_prefix, drop_redis_prefix

_T0 = time.monotonic()


def say(line: str) -> None:
    print(f"{time.monotonic() - _T0:6.1f}s {line}", flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.load", description=__doc__.splitlines()[0])
    p.add_argument("--clients", type=int, default=20, help="submitting threads, each its own Executor")
    p.add_argument("--endpoints", type=int, default=5, help="endpoint processes")
    p.add_argument("--seconds", type=float, default=None,
                   help=f"how long the clients submit (default: FARCALL_LOAD_SECONDS, else "
                        f"{DEFAULT_SECONDS:.0f})")
    p.add_argument("--wave", type=int, default=50, help="tasks per client per wave")
    p.add_argument("--engine", default="ThreadPoolEngine", choices=["ThreadPoolEngine", "ProcessPoolEngine"],
                   help="each endpoint's engine, with 2 workers")
    p.add_argument("--json", type=Path, metavar="PATH", help="write the report as JSON here")
    p.add_argument("--keep-logs", action="store_true", help="keep the scratch directory with every log")
    p.add_argument("-v", "--verbose", action="store_true")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (answers(6379) and answers(5672)):
        print("Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) must be running; "
              "start them with scripts/ensure_services.sh", file=sys.stderr)
        return 2
    seconds = args.seconds if args.seconds is not None else load_seconds()
    ctx = RunContext(quick=False, workdir=Path(tempfile.mkdtemp(prefix="fcload-")))
    say(f"farcall load run {ctx.run_id}: logs in {ctx.workdir}")
    ok = False
    try:
        broker = Broker(ctx, "load")
        broker.start()
        token = broker.create_user(f"load-{uuid.uuid4().hex[:6]}")
        endpoints = [Endpoint(ctx, broker, token, f"load-{i}", args.engine) for i in range(args.endpoints)]
        for ep in endpoints:
            ep.prepare()
            ep.spawn()
        from farcall import Client

        with Client(broker_url=broker.url, token=token) as client:
            ids = [ep.wait_online(client) for ep in endpoints]
        say(f"broker {broker.url}, {len(ids)} endpoints online ({args.engine}, 2 workers each)")

        def broker_rss() -> int:
            return sum(p.memory_info().rss for p in process_tree(broker.proc.pid))

        report = run_load(broker.url, token, ids, broker_rss, seconds=seconds, clients=args.clients,
                          wave=args.wave, say=say)
        if args.json:
            args.json.write_text(json.dumps(asdict(report), indent=2))
            say(f"wrote {args.json}")
        try:
            report.assert_ok()
            ok = True
            say("load: OK")
        except AssertionError as e:
            say(f"load: FAILED: {str(e).splitlines()[0]}")
    except KeyboardInterrupt:
        say("interrupted: stopping everything")
    finally:
        stop_all()
        drop_redis_prefix(ctx.redis_prefix)
        drop_rabbitmq_prefix(ctx.queue_prefix)
        if ok and not args.keep_logs:
            shutil.rmtree(ctx.workdir, ignore_errors=True)
        else:
            say(f"logs kept in {ctx.workdir}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
