"""The measurement plan, the same for every system: start, latency, throughput per batch size, extras.

Each finding is printed as soon as it is known, so a run cut short still shows
what it measured.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from bench.context import RunContext
from bench.procs import CpuMeter, non_loopback_listeners
from bench.stats import median, percentile, rate
from bench.system import RunTimedOut, RunTimes, System, WrongResults

log = logging.getLogger(__name__)

Say = Callable[[str], None]
LATENCY_LIMIT_S = 60.0
"""A latency phase stops early (with fewer samples) past this, so one slow system cannot eat the budget."""


def latency(system: System, n: int, warmup: int) -> dict[str, Any]:
    """Sequential round trips after ``warmup`` unmeasured ones: p50, p99, mean in milliseconds."""
    for i in range(warmup):
        system.call(i)
    samples: list[float] = []
    deadline = time.perf_counter() + LATENCY_LIMIT_S
    for i in range(n):
        t = time.perf_counter()
        answer = system.call(i)
        samples.append(time.perf_counter() - t)
        if answer != i:
            raise WrongResults(f"round trip {i} answered {answer!r}")
        if time.perf_counter() > deadline:
            break
    ms = [s * 1e3 for s in samples]
    return {
        "latency_p50_ms": median(ms),
        "latency_p99_ms": percentile(ms, 99),
        "latency_mean_ms": sum(ms) / len(ms),
        "latency_round_trips": len(ms),
    }


def _rates(times: RunTimes) -> dict[str, Any]:
    return {
        "tasks": times.tasks,
        "submit_s": times.submitted_s,
        "complete_s": times.completed_s,
        "submit_tps": rate(times.tasks, times.submitted_s),
        "complete_tps": rate(times.done, times.completed_s),
    }


def throughput(system: System, n: int, batch: int, timeout: float, meter: CpuMeter) -> dict[str, Any]:
    """One timed run of ``n`` tasks at ``batch``, with the CPU each process group used meanwhile."""
    meter.start()
    try:
        found = _rates(system.run(n, batch, timeout))
    except RunTimedOut as e:
        found = {**_rates(e.times), "timed_out": True, "done": e.times.done}
    used = meter.stop()
    found["cpu_s"] = used
    found["cpu_s_by_process"] = dict(meter.details)
    found["cpu_s_per_1000"] = {k: v * 1000 / n for k, v in used.items()}
    return found


def measure_system(system: System, ctx: RunContext, say: Say, found: dict[str, Any]) -> None:
    """Measure one system into ``found`` as it goes (so a failure keeps what came before); the caller
    stops the system."""
    sizes = ctx.sizes
    tag = f"[{system.name:<13}]"
    found["batch_meaning"] = system.batch_meaning
    t = time.perf_counter()
    system.start()
    found["start_s"] = time.perf_counter() - t
    found["versions"] = system.versions()
    say(f"{tag} started in {found['start_s']:.1f} s")
    exposed = non_loopback_listeners(system.processes())
    found["non_loopback_listeners"] = exposed
    if exposed:
        say(f"{tag} WARNING listening beyond loopback: {', '.join(exposed)}")

    found.update(latency(system, sizes.latency_round_trips, sizes.latency_warmup))
    say(f"{tag} latency     p50 {found['latency_p50_ms']:8.2f} ms   p99 {found['latency_p99_ms']:8.2f} ms"
        f"   ({found['latency_round_trips']} sequential round trips)")

    meter = CpuMeter(system.cpu_groups())
    runs: dict[str, dict[str, Any]] = {}
    for batch in system.batch_sizes:
        if ctx.over_budget():
            say(f"{tag} throughput  batch {batch:>5}: skipped, the run is past its time budget")
            runs[str(batch)] = {"skipped": "time budget"}
            continue
        run = throughput(system, sizes.throughput_tasks, batch, ctx.run_timeout(), meter)
        runs[str(batch)] = run
        late = f"  TIMED OUT with {run['done']} results" if run.get("timed_out") else ""
        say(f"{tag} throughput  batch {batch:>5}: submit {run['submit_tps']:>9,.0f}/s   complete "
            f"{run['complete_tps']:>7,.0f}/s   ({run['tasks']:,} tasks in {run['complete_s']:.1f} s){late}")
        if run.get("timed_out"):
            for rest in system.batch_sizes[system.batch_sizes.index(batch) + 1:]:
                runs[str(rest)] = {"skipped": "an earlier batch size timed out"}
            break
        time.sleep(0.25)
    found["throughput"] = runs
    _summarize_throughput(found, runs)
    if "throughput_tps" in found:
        say(f"{tag} best        {found['throughput_tps']:,.0f} tasks/s at batch {found['best_batch']}")
        cpu = ", ".join(f"{k} {v:.3f}" for k, v in found["cpu_s_per_1000"].items())
        say(f"{tag} cpu s/1000  {cpu}")

    system.extras(lambda line: say(f"{tag} {line}"), found)


def _summarize_throughput(found: dict[str, Any], runs: dict[str, dict[str, Any]]) -> None:
    complete = {b: r for b, r in runs.items() if "complete_tps" in r and not r.get("timed_out")}
    if not complete:
        return
    best = max(complete, key=lambda b: complete[b]["complete_tps"])
    found["throughput_tps"] = complete[best]["complete_tps"]
    found["best_batch"] = int(best)
    tasks = sum(r["tasks"] for r in runs.values() if "cpu_s" in r)
    totals: dict[str, float] = {}
    for r in runs.values():
        for k, v in r.get("cpu_s", {}).items():
            totals[k] = totals.get(k, 0.0) + v
    found["cpu_s_per_1000"] = {k: v * 1000 / tasks for k, v in totals.items()}
    by_process: dict[str, float] = {}
    for r in runs.values():
        for k, v in r.get("cpu_s_by_process", {}).items():
            by_process[k] = by_process.get(k, 0.0) + v
    found["cpu_s_per_1000_by_process"] = {k: v * 1000 / tasks for k, v in by_process.items() if v > 0}
    if "broker" in totals:
        found["broker_cpu_s_per_1000"] = found["cpu_s_per_1000"]["broker"]
