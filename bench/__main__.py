"""``python -m bench``: farcall and its peers on the same no-op task, on loopback, 2 workers each.

Prints each finding as it is measured and a summary at the end; ``--json`` and
``--plot`` write the same numbers for machines and people. Whatever happens
(an error, Ctrl-C, SIGTERM), every process it started is stopped and the run's
Redis keys and RabbitMQ queues are removed before it exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

from bench import data, report
from bench.celery_runner import CelerySystem
from bench.context import RunContext, make_importable_everywhere
from bench.dask_runner import DaskSystem
from bench.farcall_runner import FarcallParslSystem, FarcallProcessSystem
from bench.machine import machine_info
from bench.measure import measure_system
from bench.parsl_runner import ParslSystem
from bench.processpool_runner import ProcessPoolSystem
from bench.procs import processes_mentioning
from bench.system import System
from harness.procs import end_processes, process_tree, stop_all
from harness.services import answers, drop_rabbitmq_prefix, drop_redis_prefix, rabbitmq_queues, redis_keys

SYSTEMS: dict[str, type[System]] = {
    "farcall": FarcallProcessSystem,
    "farcall-parsl": FarcallParslSystem,
    "celery": CelerySystem,
    "parsl": ParslSystem,
    "dask": DaskSystem,
}


_T0 = time.monotonic()


def say(line: str) -> None:
    """Print at once, stamped with the seconds since the run began (so slow phases stand out)."""
    print(f"{time.monotonic() - _T0:6.1f}s {line}" if line else "", flush=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true",
                   help="fewer round trips and tasks (5,000 per run, 20,000 queued): under 4 minutes")
    p.add_argument("--json", type=Path, metavar="PATH", help="write every number as JSON here")
    p.add_argument("--plot", type=Path, metavar="PATH", help="write a PNG of throughput and latency here")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help=f"comma-separated, from {','.join(SYSTEMS)} (ProcessPoolExecutor always runs)")
    p.add_argument("--data", action="store_true",
                   help="instead: a numpy array of 1 MB, 10 MB, 100 MB and 1 GB to a worker and back, "
                        "farcall against Dask (bench/data.py; --systems picks from "
                        "farcall,farcall-files,dask)")
    p.add_argument("--keep-logs", action="store_true", help="keep the scratch directory with every log")
    p.add_argument("-v", "--verbose", action="store_true", help="log what the benchmark does")
    return p


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def run_system(cls: type[System], ctx: RunContext, found: dict[str, Any]) -> None:
    """Measure one system into ``found``; an error is recorded and the run goes on with the next."""
    system = cls(ctx)
    try:
        measure_system(system, ctx, say, found)
    except Exception as e:  # noqa: BLE001 - one failing system must not lose the others' numbers
        found["error"] = f"{type(e).__name__}: {e}"
        say(f"[{system.name:<13}] FAILED: {type(e).__name__}: {e}")
        (ctx.workdir / f"{system.name}-error.txt").write_text(traceback.format_exc())
    finally:
        t = time.perf_counter()
        try:
            system.stop()
        except Exception as e:  # noqa: BLE001 - report it and keep cleaning up
            found.setdefault("error", f"stop failed: {type(e).__name__}: {e}")
            say(f"[{system.name:<13}] stopping FAILED: {e!r}")
        found["stop_s"] = time.perf_counter() - t
        if system.leftovers:
            found["leftover_pids_killed"] = list(system.leftovers)
            say(f"[{system.name:<13}] WARNING processes outlived the graceful stop and were killed: "
                f"{system.leftovers}")


MP_HELPERS = re.compile(r"multiprocessing\.(forkserver|resource_tracker)")
"""This process's own multiprocessing helpers (ProcessPoolExecutor, Dask), not leaks of a system."""


def describe(p: psutil.Process) -> str:
    try:
        return f"{p.pid} {' '.join(p.cmdline())[:160]}"
    except psutil.Error:
        return str(p.pid)


def clean_up(ctx: RunContext) -> dict[str, Any]:
    """Stop every process this run started and remove its Redis keys, queues and exchanges."""
    done: dict[str, Any] = {}
    stop_all()
    leftover = [*processes_mentioning(f"{ctx.workdir}/"), *process_tree(os.getpid())[1:]]
    described = {p.pid: describe(p) for p in leftover}
    ended = end_processes(leftover)
    helpers = [described[pid] for pid in ended if MP_HELPERS.search(described[pid])]
    others = [described[pid] for pid in ended if not MP_HELPERS.search(described[pid])]
    if helpers:
        done["multiprocessing_helpers_ended"] = helpers
    if others:
        done["processes_killed_at_exit"] = others
    try:
        done["redis_keys_deleted"] = drop_redis_prefix(ctx.redis_prefix)
        done["rabbitmq_deleted"] = drop_rabbitmq_prefix(ctx.queue_prefix)
        done["redis_keys_left"] = redis_keys(ctx.redis_prefix)
        done["rabbitmq_queues_left"] = list(rabbitmq_queues(ctx.queue_prefix))
    except Exception as e:  # noqa: BLE001 - say what could not be removed
        done["error"] = f"{type(e).__name__}: {e}"
    return done


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    names = [n.strip() for n in args.systems.split(",") if n.strip()]
    known = list(data.SYSTEMS) if args.data else list(SYSTEMS)
    if args.data and args.systems == _parser().get_default("systems"):
        names = known
    unknown = [n for n in names if n not in known]
    if unknown:
        print(f"unknown system(s) {', '.join(unknown)}; choose from {', '.join(known)}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not (answers(6379) and answers(5672)):
        print("Redis (127.0.0.1:6379) and RabbitMQ (127.0.0.1:5672) must be running; "
              "start them with scripts/ensure_services.sh", file=sys.stderr)
        return 2
    make_importable_everywhere()
    signal.signal(signal.SIGTERM, _interrupt)
    signal.signal(signal.SIGINT, _interrupt)  # also when started with SIGINT ignored (a background job)
    ctx = RunContext(quick=args.quick, workdir=Path(tempfile.mkdtemp(prefix="fcbench-")))
    sizes = ctx.sizes
    document: dict[str, Any] = {
        "machine": machine_info(),
        "settings": {"quick": args.quick, "run_id": ctx.run_id, "workers": 2,
                     "latency_round_trips": sizes.latency_round_trips,
                     "throughput_tasks": sizes.throughput_tasks, "queued_tasks": sizes.queued_tasks,
                     "redis_prefix": ctx.redis_prefix, "queue_prefix": ctx.queue_prefix},
        "systems": {},
        "processpool": {},
    }
    plan = ("arrays of 1 MB to 1 GB to a worker and back" if args.data else
            f"{sizes.throughput_tasks:,} tasks per throughput run, {sizes.latency_round_trips} round trips")
    say(f"farcall benchmark {'(--quick) ' if args.quick else ''}run {ctx.run_id}: {plan}; "
        f"logs in {ctx.workdir}")
    interrupted = False
    try:
        if args.data:
            document["data"] = {}
            data.run(ctx, say, names, document["data"])
        else:
            run_system(ProcessPoolSystem, ctx, document["processpool"])
            for name in names:
                document["systems"][name] = {}
                run_system(SYSTEMS[name], ctx, document["systems"][name])
    except KeyboardInterrupt:
        interrupted = True
        say("interrupted: stopping everything and writing what was measured")
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the cleanup short
        document["cleanup"] = clean_up(ctx)
        document["wall_time_s"] = ctx.elapsed()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _finish(args, ctx, document, interrupted)
    failed = any("error" in found for found in [document["processpool"], *document["systems"].values(),
                                                *document.get("data", {}).values()])
    return 130 if interrupted else 1 if failed else 0


def _finish(args: argparse.Namespace, ctx: RunContext, document: dict[str, Any], interrupted: bool) -> None:
    systems, processpool = document["systems"], document["processpool"]
    if "data" in document:
        print("\n" + data.table(document["data"]) + "\n", flush=True)
    else:
        report.add_overheads(systems, processpool)
        print("\n" + report.summary_table(systems, processpool), flush=True)
        cpu = report.cpu_table(systems)
        if cpu:
            print("\n" + cpu, flush=True)
        print(flush=True)
    for name, found in {**systems, "processpool": processpool}.items():
        if found.get("batch_meaning"):
            print(f"batch size, {name}: {found['batch_meaning']}", flush=True)
    cleanup = document["cleanup"]
    say(f"cleanup: {cleanup.get('redis_keys_deleted', '?')} Redis keys and "
        f"{len(cleanup.get('rabbitmq_deleted', []))} RabbitMQ queues/exchanges removed; left: "
        f"{cleanup.get('redis_keys_left', '?')} keys, {cleanup.get('rabbitmq_queues_left', '?')} queues"
        + (f"; killed leftover processes {cleanup['processes_killed_at_exit']}"
           if cleanup.get("processes_killed_at_exit") else ""))
    say(f"wall time {document['wall_time_s']:.0f} s" + (" (interrupted)" if interrupted else ""))
    if args.json:
        report.write_json(args.json, document)
        say(f"wrote {args.json}")
    if args.plot and "data" not in document:
        try:
            report.plot(args.plot, systems, processpool)
            say(f"wrote {args.plot}")
        except Exception as e:  # noqa: BLE001 - the numbers are already out
            say(f"plot failed: {e!r}")
    failed = any("error" in f for f in [processpool, *systems.values(), *document.get("data", {}).values()])
    if args.keep_logs or failed or interrupted:
        say(f"logs kept in {ctx.workdir}")
    else:
        shutil.rmtree(ctx.workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
