"""What one benchmark run shares: its id and prefixes, its scratch directory, its sizes and deadlines."""

from __future__ import annotations

import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from harness import BIN, REPO

BATCH_SIZES = (1, 16, 128, 1024)


@dataclass(frozen=True)
class Sizes:
    """How much each measurement does; ``--quick`` shrinks everything to stay under 4 minutes."""

    latency_round_trips: int
    latency_warmup: int
    throughput_tasks: int
    queued_tasks: int
    cold_start_repeats: int
    run_timeout: float
    """Seconds one throughput run may take before it is abandoned (and larger batches skipped)."""
    budget: float
    """Seconds into the run after which no further throughput run starts."""
    deadline: float
    """Seconds into the run by which every throughput run ends, finished or not; with the stops and
    the cleanup after it, the whole run stays under 4 (``--quick``) or 15 minutes."""

    @classmethod
    def choose(cls, quick: bool) -> Sizes:
        if quick:
            return cls(100, 20, 5_000, 20_000, 1, 60.0, 195.0, 215.0)
        return cls(500, 50, 20_000, 100_000, 3, 200.0, 780.0, 820.0)


@dataclass
class RunContext:
    """One run: private Redis/RabbitMQ prefixes, a scratch directory, the time budget."""

    quick: bool
    workdir: Path
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:8])
    started: float = field(default_factory=time.monotonic)

    @property
    def sizes(self) -> Sizes:
        return Sizes.choose(self.quick)

    @property
    def redis_prefix(self) -> str:
        return f"fcbench-{self.run_id}:"

    @property
    def queue_prefix(self) -> str:
        return f"fcbench-{self.run_id}."

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def over_budget(self) -> bool:
        return self.elapsed() > self.sizes.budget

    def run_timeout(self) -> float:
        """Seconds the next throughput run may take: its own limit, cut short by the run's deadline."""
        return max(min(self.sizes.run_timeout, self.sizes.deadline - self.elapsed()), 5.0)

    def env(self, **extra: str) -> dict[str, str]:
        """This environment without FARCALL_* settings, with the venv's bin/ and the repo importable.

        The repo root on PYTHONPATH lets every worker import ``bench.noop``.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith("FARCALL_")}
        env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env


def make_importable_everywhere() -> None:
    """Put the venv's bin/ on PATH and the repo on PYTHONPATH of this process, for in-process peers.

    Parsl starts its interchange and worker pools from PATH, Dask and
    ProcessPoolExecutor spawn interpreters that must import ``bench.noop``.
    """
    path = os.environ.get("PATH", "")
    if str(BIN) not in path.split(os.pathsep):
        os.environ["PATH"] = f"{BIN}{os.pathsep}{path}"
    pythonpath = os.environ.get("PYTHONPATH", "")
    if str(REPO) not in pythonpath.split(os.pathsep):
        os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), pythonpath) if p)
    if str(REPO) not in sys.path:
        sys.path.insert(0, str(REPO))
