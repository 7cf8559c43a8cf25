"""Run tasks on workers that Parsl's HighThroughputExecutor provisions through a provider.

This is the engine that matters at scale: the provider (Local, Slurm, PBS Pro,
LSF, Kubernetes, ...) gets blocks of nodes, a launcher starts Parsl's worker
pools on them, and Parsl's scaling strategy adds blocks while tasks wait and
releases them after ``max_idletime`` seconds idle.

Tasks go to HTEX as farcall's own task JSON through ``submit_payload`` with a
custom task executor (``farcall.endpoint.worker.run_batch``), so Parsl never
pickles the user's function a second time: a JSON array of one task, or of a
chunk of short ones, in; an array of results out. The ``engine:`` section is
checked in ``parsl_config``.

Parsl cannot stop one task: HTEX has no per-task cancel, and its workers belong
to Parsl. So a task cancelled after it was handed to HTEX is answered at once
and its later result dropped (it may still run, or finish running). A task's
walltime is enforced in the worker (``worker.run_batch``): ``TaskTimeout`` is
raised inside the function when due, and a task still running
``worker.EXIT_GRACE`` seconds later ends its worker process, which Parsl
replaces; that task then comes back lost (``WorkerLost``). HTEX does not say
when a task starts, so there is no engine-side walltime clock here.

What a task can reach: Parsl starts its workers itself (the provider's job script runs
``worker_init``, then a launcher starts the worker pool), so the engine puts
``worker_env.exec_prefix`` in front of the pool's command: the pool and its workers start
with the scrubbed worker environment (``worker_env``, ``worker_env_passthrough``), made in the
job from the job's own environment. The job script's shell above them keeps the environment
the provider gave it (the agent's, with ``FARCALL_TOKEN`` already dropped, for a local or
Slurm block); ``worker_env`` values travel in the job script. With ``container_type`` set, the
same prefix runs the pool inside the image (``containers.run_pool``), with the run directory
(worker logs) mounted. Parsl's workers are shared:
tasks of several users may run in one worker process, one after another, so on a shared
endpoint a task can leave something behind for another user's task (``shared_caveat``).
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import threading
import time
import uuid
from collections.abc import Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, ClassVar

from farcall.endpoint import problems
from farcall.endpoint.engines import addresses
from farcall.endpoint.engines.base import EngineOptions, EngineStatus, OnDone, OnStart
from farcall.endpoint.engines.containers import ContainerOptions
from farcall.endpoint.engines.parsl_components import (
    BUILT_AT_START,
    build_launcher,
    build_provider,
    describe,
)
from farcall.endpoint.engines.parsl_config import (
    MPIOptions,
    ParslOptions,
    executor_class,
    interchange_cmd,
)
from farcall.endpoint.engines.policy import CHUNK_SECONDS, PolicyEngine, TaskDurations, TaskEntry
from farcall.endpoint.errors import EndpointConfigError
from farcall.endpoint.outcomes import failed_result
from farcall.endpoint.worker import EXIT_GRACE
from farcall.endpoint.worker_env import exec_prefix
from farcall.protocol.channel import ResultMessage, TaskMessage, join_task_batch

log = logging.getLogger(__name__)

TASK_EXECUTOR = {"f": "farcall.endpoint.worker.run_batch", "k": {"exit_past_walltime": True}}
"""HTEX's worker calls this on each payload instead of unpickling a Python function; no one
can stop a task in a Parsl worker from outside, so the worker enforces walltimes itself."""


class ParslEngine(PolicyEngine):
    """HTEX on a Parsl provider, scaled by Parsl's own strategy."""

    Options: ClassVar[type[EngineOptions]] = ParslOptions
    shared_caveat = ("Parsl's worker processes are shared, so tasks of several users may run in "
                     "one worker, one after another, and a task can leave something in it (a "
                     "global, a patched module) that a later task of another user meets")

    def __init__(
        self,
        provider: Mapping[str, Any] | None = None,
        address: str | Mapping[str, Any] = "127.0.0.1",
        label: str = "farcall",
        strategy: str = "htex_auto_scale",
        strategy_period: float = 1.0,
        max_idletime: float = 120.0,
        run_dir: str | None = None,
        prefetch: int = 128,
        max_chunk: int = 64,
        worker_env: dict[str, str] | None = None,
        worker_env_passthrough: list[str] | None = None,
        container_type: str | None = None,
        container_uri: str | None = None,
        container_cmd_options: str | None = None,
        max_retries_on_system_failure: int = 0,
        allowed_serializers: list[str] | None = None,
        **executor_options: Any,
    ) -> None:
        super().__init__(max_retries_on_system_failure, allowed_serializers)
        self.container = ContainerOptions(
            container_type=container_type, container_uri=container_uri,
            container_cmd_options=container_cmd_options).container()
        self.provider_spec = dict(provider or self.Options.model_fields["provider"].get_default(
            call_default_factory=True))
        self.address = address
        self.label = label
        self.strategy = strategy
        self.strategy_period = strategy_period
        self.max_idletime = max_idletime
        self.run_dir = run_dir
        self.prefetch = prefetch
        self.max_chunk = max_chunk
        self.worker_env = dict(worker_env or {})
        self.worker_env_passthrough = list(worker_env_passthrough or ())
        self.executor_options = executor_options
        self.htex: Any = None
        self._poller: Any = None
        self._idle = threading.Condition()
        self._outstanding = 0
        self._workers = 0
        self._pending: list[TaskEntry] = []
        self._inflight = 0  # Parsl tasks (single tasks or chunks) submitted, not finished
        self._stopping = False
        self._durations = TaskDurations()
        self._dispatcher: threading.Thread | None = None

    @property
    def executor_name(self) -> str:
        return str(getattr(self.Options, "EXECUTOR", "HighThroughputExecutor"))

    # ----------------------------------------------------------------- set-up

    def _build(self, *, starting: bool, provider: Any = None) -> tuple[Any, Any, str | None]:
        """The provider (with its launcher; ``provider`` instead when given), the executor and
        the resolved address: built, not started. When ``starting``, the address must resolve
        here, by any form; otherwise (``prepare``) only ``start``'s check requires it
        (``addresses.resolving_here``), and ``address_by_query`` is not asked."""
        address = addresses.resolve(
            self.address, on_this_host=starting or addresses.must_resolve_here(),
            networked=starting)
        if provider is None:
            provider = build_provider(self.provider_spec)
        executor_options = dict(self.executor_options)
        executor_options.setdefault("heartbeat_period", 5)
        executor_options.setdefault("heartbeat_threshold", 20)
        executor_options.setdefault("poll_period", 10)
        try:
            executor = executor_class(self.executor_name)(
                label=self.label,
                provider=provider,
                # A stand-in for an address resolved only at start: HTEX probes every address
                # (a web service too) when it has none.
                address=address or "127.0.0.1",
                **executor_options,
            )
        except Exception as e:  # noqa: BLE001 - typeguard and Parsl raise many kinds
            raise EndpointConfigError(f"engine: {self.executor_name} refused the options: {e}") from None
        return provider, executor, address

    def prepare(self) -> dict[str, str]:
        """Build the provider, its launcher and the executor as ``start`` does, starting nothing.

        A cloud provider (AWS, Google Cloud, Azure) acts on the cloud when constructed, so its
        options and packages are checked (when the config is read) but it is built at start.
        """
        spec = dict(self.provider_spec)
        kind = str(spec.get("type"))
        built = {"engine": self.name, "executor": self.executor_name}
        if kind in BUILT_AT_START:
            from parsl.providers import LocalProvider

            launcher = spec.get("launcher")
            _, _, address = self._build(starting=False, provider=LocalProvider())
            built["provider"] = (f"{kind} (checked; built when the endpoint starts, since "
                                 "constructing it creates cloud resources)")
            if isinstance(launcher, Mapping):
                built["launcher"] = describe("launcher", build_launcher(launcher))
        else:
            provider, _, address = self._build(starting=False)
            built["provider"] = describe("provider", provider)
            if getattr(provider, "launcher", None) is not None:
                built["launcher"] = describe("launcher", provider.launcher)
        if kind != "LocalProvider" and address is not None and address.startswith("127."):
            problems.warn("engine.address", f"is {address}, which only this host can reach, but "
                          f"{kind} starts workers on other machines: they will not connect. "
                          "Set the address of this host on the network the workers are on, e.g. "
                          "address: {type: address_by_interface, ifname: ib0} or {type: "
                          "address_by_route}")
        written = addresses.describe(self.address)
        built["address"] = (address if address == written else
                            f"{address} ({written})" if address else
                            f"{written}, resolved when the endpoint starts")
        built["strategy"] = (f"{self.strategy}, every {self.strategy_period:g} s; blocks idle "
                             f"{self.max_idletime:g} s are released")
        return built

    def start(self) -> None:
        from parsl.jobs.job_status_poller import JobStatusPoller

        provider, self.htex, _ = self._build(starting=True)
        # Set after construction: MPIExecutor's type check refuses a list here, HTEX needs one.
        self.htex.interchange_launch_cmd = interchange_cmd()
        run_dir = Path(self.run_dir or os.path.join(os.getcwd(), "parsl-runinfo"))
        run_dir = (run_dir / f"{self.label}-{time.strftime('%Y%m%d-%H%M%S')}-"
                             f"{uuid.uuid4().hex[:6]}").absolute()
        run_dir.mkdir(parents=True, exist_ok=True)
        # Formatted by Parsl (str.format): the prefix has no braces; worker_env values and the
        # container are base64 in it.
        container = None if self.container is None else self.container.encode(str(run_dir))
        self.htex.launch_cmd = (exec_prefix(self.worker_env_passthrough, self.worker_env, container)
                                + " " + self.htex.launch_cmd)
        self.htex.run_id = run_dir.name
        self.htex.run_dir = str(run_dir)
        if hasattr(provider, "script_dir"):
            provider.script_dir = str(run_dir / "submit_scripts")
            os.makedirs(provider.script_dir, exist_ok=True)
        self._prepare_blocks(provider, run_dir)
        self.htex.start()
        self._poller = JobStatusPoller(
            strategy=self.strategy, max_idletime=self.max_idletime, strategy_period=self.strategy_period
        )
        self._poller.add_executors([self.htex])
        self._dispatcher = threading.Thread(target=self._dispatch_loop, name="farcall-parsl-dispatch",
                                            daemon=True)
        self._dispatcher.start()
        log.info("%s started: %s on %s, run dir %s", self.name, self.executor_name,
                 type(provider).__name__, run_dir)

    def _prepare_blocks(self, provider: Any, run_dir: Path) -> None:
        """Last changes to the provider before the first block (none here)."""

    # -------------------------------------------------------------- tasks

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        if self._refuse(task, on_done):
            return
        spec = dict(task.resource_specification or {})
        try:
            if spec or self.executor_name == "MPIExecutor":
                self.htex.validate_resource_spec(spec)
        except Exception as e:  # noqa: BLE001 - a bad spec fails this task, not the engine
            on_done(failed_result(task.task_id, ValueError(
                f"resource_specification {spec!r} was refused by {self.executor_name}: {e}. "
                + ("MPI tasks need num_nodes and ranks_per_node (or num_ranks)."
                   if self.executor_name == "MPIExecutor" else
                   "Only 'priority' applies here; use an MPIEngine endpoint for MPI resources.")
            )))
            return
        entry = self._admit(task, on_done, payload=task.model_dump_json(), spec=spec or None)
        with self._idle:
            self._outstanding += 1
            # Tasks with resources (MPI ranks, priorities) always go alone; the others may share.
            self._pending.append(entry)
            self._idle.notify_all()

    def _dispatch_loop(self) -> None:
        """Hand pending tasks to HTEX.

        Short tasks (average well under CHUNK_SECONDS) are held while two Parsl tasks per
        worker are in flight, and go several to a Parsl task when room comes: under load
        they travel in chunks, alone they go at once. Other tasks go at once, one each, so
        Parsl sees the real backlog and scales out for it.
        """
        while True:
            with self._idle:
                self._idle.wait_for(lambda: self._stopping or (self._pending and self._room() > 0))
                if self._stopping:
                    return
                pending, self._pending = self._pending, []
                room = self._room()
            for chunk in self._chunks(pending, room):
                self._submit_chunk(chunk)

    def _short(self) -> bool:
        mean = self._durations.mean
        return mean is not None and mean < CHUNK_SECONDS / 2

    def _room(self) -> int:
        """Parsl tasks that may go out now (unbounded unless tasks are short)."""
        if not self._short():
            return 1 << 30
        return 2 * max(1, self._workers) - self._inflight

    def _chunks(self, pending: list[TaskEntry], room: int) -> list[list[TaskEntry]]:
        """Tasks with resources or a walltime, and suspects, go alone; short ones share."""
        short = self._short()
        alone = [[e] for e in pending if not e.done and (e.spec is not None or e.alone or not short)]
        rest = [e for e in pending if not e.done and e.spec is None and not e.alone and short]
        if not rest:
            return alone
        size = min(math.ceil(len(rest) / max(1, room - len(alone))),
                   self._durations.chunk_size(self.max_chunk))
        return alone + [rest[i : i + size] for i in range(0, len(rest), size)]

    def _submit_chunk(self, chunk: list[TaskEntry]) -> None:
        context: dict[str, Any] = {"task_executor": TASK_EXECUTOR}
        if len(chunk) == 1 and chunk[0].spec:
            context["resource_spec"] = chunk[0].spec
        with self._idle:
            self._inflight += 1
        try:
            future = self.htex.submit_payload(context, join_task_batch([e.payload for e in chunk]))
        except Exception as e:  # noqa: BLE001 - executor in a bad state: fail the tasks clearly
            self._chunk_left()
            for entry in chunk:
                self._finish(entry, failed_result(entry.task_id, e))
            return
        future.add_done_callback(lambda f: self._chunk_done(chunk, f))

    def _chunk_left(self) -> None:
        with self._idle:
            self._inflight -= 1
            self._idle.notify_all()

    def _chunk_done(self, chunk: list[TaskEntry], future: Future[Any]) -> None:
        self._chunk_left()
        exc = future.exception()
        if exc is not None:
            walltime = chunk[0].walltime
            hint = "" if walltime is None else (
                f"; a worker also ends itself when its task is still running {EXIT_GRACE:g} s "
                f"past its walltime of {walltime:g} s")
            self._lost(chunk, f"its Parsl worker or manager ({type(exc).__name__}: {exc}{hint})")
            return
        self._durations.add(self._deliver_chunk(chunk, future.result()))

    def _rerun_alone(self, entries: list[TaskEntry]) -> None:
        with self._idle:
            self._pending[:0] = entries
            self._idle.notify_all()

    def _stop_tasks(self, entries: list[TaskEntry]) -> None:
        """Drop answered tasks still in farcall's queue. Those handed to HTEX cannot be
        stopped: their results are dropped when they come (``_finish``)."""
        with self._idle:
            self._pending = [e for e in self._pending if not e.done]

    def _deliver(self, on_done: OnDone, result: ResultMessage) -> None:
        """Count the task as finished (``shutdown(wait=True)`` waits on that), then deliver."""
        with self._idle:
            self._outstanding -= 1
            if not self._outstanding:
                self._idle.notify_all()
        super()._deliver(on_done, result)

    # -------------------------------------------------------------- status

    def status(self) -> EngineStatus:
        """Workers and blocks as the interchange sees them (a connected manager means a running block)."""
        if self.htex is None:
            return EngineStatus()
        try:
            managers = [m for m in self.htex.connected_managers() if m.get("active", True)]
        except Exception:  # noqa: BLE001 - the interchange may be busy; report what we know
            managers = []
        workers = sum(int(m.get("worker_count", 0)) for m in managers)
        busy = sum(int(m.get("tasks", 0)) for m in managers)
        blocks: dict[str, int] = {}
        live_blocks = set()
        for block_id, job in self.htex.status_facade.items():
            if not job.terminal:
                live_blocks.add(str(block_id))
                state = job.state.name.lower()
                blocks[state] = blocks.get(state, 0) + 1
        running_blocks = {str(m.get("block_id")) for m in managers}
        with self._idle:
            outstanding = self._outstanding
        self._workers = workers
        provider = self.htex.provider
        return EngineStatus(
            workers=workers,
            idle_workers=max(workers - busy, 0),
            pending_tasks=max(outstanding - busy, 0),
            running_tasks=min(busy, outstanding),
            details={
                "provider": type(provider).__name__,
                "executor": self.executor_name,
                "blocks": blocks,
                "blocks_requested": len(live_blocks | running_blocks),
                "blocks_running": len(running_blocks),
                "managers": len(managers),
                "min_blocks": provider.min_blocks,
                "max_blocks": provider.max_blocks,
                "nodes_per_block": getattr(provider, "nodes_per_block", 1),
                "worker_python": sorted({str(m.get("python_version", "")) for m in managers} - {""}),
            },
        )

    @property
    def capacity(self) -> int:
        """Tasks to hold: ``prefetch`` per worker the provider could start at most."""
        provider = self.htex.provider if self.htex is not None else None
        per_node = (self.executor_options.get("max_workers_per_node")
                    or self.executor_options.get("max_workers_per_block") or os.cpu_count() or 1)
        nodes = getattr(provider, "nodes_per_block", 1) * max(getattr(provider, "max_blocks", 1), 1)
        return max(self._workers, int(per_node) * nodes) * self.prefetch

    def shutdown(self, wait: bool = True, timeout: float | None = None) -> None:
        """Stop scaling, cancel every block's scheduler job, stop the interchange."""
        if self.htex is None:
            return
        if wait:
            with self._idle:
                self._idle.wait_for(lambda: not self._outstanding, timeout if timeout is not None else 60)
        with self._idle:
            self._stopping = True
            self._idle.notify_all()
        try:
            if self._poller is not None:
                self._poller.close()  # scales every block in: the scheduler jobs are cancelled
        except Exception:
            log.exception("cancelling the blocks failed; check the scheduler for leftover jobs")
        finally:
            self.htex.shutdown()
            self.htex = None


class MPIEngine(ParslEngine):
    """Parsl's MPIExecutor: each task gets ``num_nodes`` x ``ranks_per_node`` from its block.

    Parsl's MPI mode learns a block's nodes from the batch job (``$SLURM_NODELIST`` or
    ``$PBS_NODEFILE``) and refuses to start without one. A ``LocalProvider`` block is this
    machine, so outside a batch job the engine gives it a node file naming this host, as PBS
    would: MPI tasks then run here with ``mpiexec``. A task asking for more nodes than a block
    has would wait in Parsl for ever; it fails at once instead.
    """

    Options: ClassVar[type[EngineOptions]] = MPIOptions
    NODE_VARS: ClassVar[tuple[str, ...]] = ("SLURM_NODELIST", "PBS_NODEFILE")
    LOCAL_HOST: ClassVar[str] = "localhost"
    """The node file's one host: always resolvable, and mpiexec (hydra) starts its ranks here."""

    block_nodes: int | None = None
    local_nodefile: Path | None = None

    def _prepare_blocks(self, provider: Any, run_dir: Path) -> None:
        from parsl.providers import LocalProvider

        if isinstance(provider, LocalProvider):
            if any(os.environ.get(var) for var in self.NODE_VARS):
                return  # the agent runs inside a batch job: its blocks use the job's nodes
            nodefile = run_dir / "nodefile"
            nodefile.write_text(self.LOCAL_HOST + "\n")
            provider.worker_init = f"export PBS_NODEFILE={shlex.quote(str(nodefile))}\n{provider.worker_init}"
            self.block_nodes = 1
            self.local_nodefile = nodefile
            log.info("%s: LocalProvider outside a batch job: blocks are one node, %s (%s)",
                     self.name, self.LOCAL_HOST, nodefile)
        else:
            self.block_nodes = int(getattr(provider, "nodes_per_block", 0) or 0) or None

    def submit(self, task: TaskMessage, on_done: OnDone, on_start: OnStart | None = None) -> None:
        wanted = (task.resource_specification or {}).get("num_nodes")
        limit = self.block_nodes
        try:
            too_many = wanted is not None and limit is not None and int(wanted) > limit
        except (TypeError, ValueError):
            too_many = False  # not a number: Parsl's own check below says what is wrong
        if too_many:
            on_done(failed_result(task.task_id, ValueError(
                f"resource_specification asks for num_nodes={wanted}, but this endpoint's blocks "
                f"have {self.block_nodes} node(s) ("
                + ("a LocalProvider block is this one machine" if self.local_nodefile
                   else "its provider's nodes_per_block")
                + "): ask for fewer nodes, or use an endpoint with bigger blocks")))
            return
        super().submit(task, on_done, on_start)
