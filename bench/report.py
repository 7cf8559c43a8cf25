"""Turning measurements into the summary table, the JSON document and the PNG plot."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from bench.context import BATCH_SIZES

Results = dict[str, dict[str, Any]]


def add_overheads(systems: Results, processpool: dict[str, Any]) -> None:
    """Per-task wall time at best throughput, minus ProcessPoolExecutor(2)'s, in microseconds."""
    floor = processpool.get("throughput_tps")
    for found in systems.values():
        tps = found.get("throughput_tps")
        if tps and floor:
            found["overhead_us_per_task"] = 1e6 / tps - 1e6 / floor


def _num(value: Any, digits: int = 0, thousands: bool = True) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}" if thousands else f"{value:.{digits}f}"
    return str(value)


def _tp(found: dict[str, Any], batch: int, key: str) -> Any:
    run = found.get("throughput", {}).get(str(batch), {})
    if "skipped" in run:
        return "skipped"
    if run.get("timed_out"):
        return f"{_num(run.get(key))} (timeout)"
    return run.get(key)


def _broker_cpu(found: dict[str, Any], batch: int) -> Any:
    return found.get("throughput", {}).get(str(batch), {}).get("cpu_s_per_1000", {}).get("broker")


Row = tuple[str, Callable[[dict[str, Any]], Any], int]


def _rows() -> list[Row]:
    rows: list[Row] = [
        ("latency p50 (ms)", lambda f: f.get("latency_p50_ms"), 2),
        ("latency p99 (ms)", lambda f: f.get("latency_p99_ms"), 2),
    ]
    for key, label in (("complete_tps", "complete"), ("submit_tps", "submit")):
        for b in BATCH_SIZES:
            rows.append((f"{label} tasks/s, batch {b}", partial(_tp, batch=b, key=key), 0))
    rows += [
        ("best tasks/s", lambda f: f.get("throughput_tps"), 0),
        ("  at batch", lambda f: f.get("best_batch"), 0),
        ("overhead vs ProcessPool (us/task)", lambda f: f.get("overhead_us_per_task"), 0),
        ("cold start, start->result (s)", lambda f: f.get("cold_start_s"), 2),
        ("scale 0->2 workers (s)", lambda f: f.get("scale_0_to_n_s"), 2),
        ("broker CPU s / 1000 tasks", lambda f: f.get("broker_cpu_s_per_1000"), 3),
        *[(f"  at batch {b}", partial(_broker_cpu, batch=b), 3) for b in BATCH_SIZES],
        ("broker RSS MB, queued tasks", lambda f: f.get("broker_rss_mb_queued"), 0),
        ("  tasks queued", lambda f: f.get("queued_tasks"), 0),
        ("  broker RSS MB before", lambda f: f.get("broker_rss_mb_before_queueing"), 0),
        ("error", lambda f: f.get("error"), 0),
    ]
    return rows


def _grid(header: list[str], body: list[list[str]], left: int = 1) -> str:
    """Aligned text columns: the first ``left`` flush left, the rest (numbers) flush right."""
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < left else cell.rjust(w) for i, (cell, w)
                       in enumerate(zip(row, widths, strict=True))) for row in [header, *body]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def summary_table(systems: Results, processpool: dict[str, Any]) -> str:
    """Metrics as rows, systems as columns; rows no system has are left out."""
    columns = {**systems, "processpool": processpool} if processpool else dict(systems)
    body = []
    for label, get, digits in _rows():
        values = [get(found) for found in columns.values()]
        if all(v is None for v in values):
            continue
        body.append([label, *[_num(v, digits) if label != "error" else str(v or "-")[:40] for v in values]])
    return _grid(["metric", *columns], body)


def cpu_table(systems: Results) -> str:
    """CPU seconds per 1,000 tasks by process group over each system's throughput runs."""
    body = []
    for name, found in systems.items():
        detail = found.get("cpu_s_per_1000_by_process", {})
        for group, value in found.get("cpu_s_per_1000", {}).items():
            body.append([name, group, _num(value, 3)])
            parts = {k.split(": ", 1)[1]: v for k, v in detail.items() if k.startswith(f"{group}: ")}
            if len(parts) > 1:
                for part, v in sorted(parts.items(), key=lambda kv: -kv[1]):
                    body.append(["", f"  {part}", _num(v, 3)])
    if not body:
        return ""
    return _grid(["system", "process (throughput runs)", "CPU s / 1000 tasks"], body, left=2)


def write_json(path: Path, document: dict[str, Any]) -> None:
    path.write_text(json.dumps(document, indent=2, sort_keys=False, default=str) + "\n")


def plot(path: Path, systems: Results, processpool: dict[str, Any]) -> None:
    """Completion rate by batch size per system, and latency p50/p99 per system (log scales)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = {**systems, "processpool": processpool} if processpool else dict(systems)
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    for name, found in columns.items():
        points = [(int(b), r["complete_tps"]) for b, r in found.get("throughput", {}).items()
                  if "complete_tps" in r and not r.get("timed_out")]
        if not points:
            continue
        batches, rates = zip(*sorted(points), strict=True)
        style = "--" if name == "processpool" else "-"
        left.plot(batches, rates, style, marker="o", label=name)
    left.set_xscale("log", base=2)
    left.set_yscale("log")
    left.set_xticks(list(BATCH_SIZES), [str(b) for b in BATCH_SIZES])
    left.set_xlabel("batch size")
    left.set_ylabel("completed no-op tasks / s")
    left.set_title("Throughput (2 workers)")
    left.grid(True, which="both", alpha=0.3)
    left.legend()

    names = [n for n, f in columns.items() if "latency_p50_ms" in f]
    width = 0.38
    xs = list(range(len(names)))
    p50 = [columns[n]["latency_p50_ms"] for n in names]
    p99 = [columns[n]["latency_p99_ms"] for n in names]
    right.bar([x - width / 2 for x in xs], p50, width, label="p50")
    right.bar([x + width / 2 for x in xs], p99, width, label="p99")
    right.set_xticks(xs, names, rotation=20)
    right.set_yscale("log")
    right.set_ylabel("round trip (ms)")
    right.set_title("Sequential round-trip latency")
    right.grid(True, axis="y", which="both", alpha=0.3)
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
