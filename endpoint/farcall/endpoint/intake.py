"""The agent's intake: tasks frames from the broker in, tasks to the engine out, with credit.

What the agent may rely on:

- Credit: the broker is never granted more than the engine's ``capacity`` minus the tasks
  the engine holds and those granted but not delivered yet (``owed_credit``); every task
  delivered and not run (held already, refused, unreadable) gives its credit back.
- A task the agent holds (running, or with its result in the outbox) is never run again.
- Function bodies travel once per session: a task without one takes it from the cache; a
  task whose body is nowhere fails alone, saying so.
- With ``allowed_functions`` set, a task for any other function never reaches the engine:
  it fails at once with ``FunctionNotAllowed``.
- A tasks frame that does not parse is read task by task: the good tasks run, each bad one
  fails alone under its id.

Everything here runs on the agent's event loop.
"""

from __future__ import annotations

import json
import logging

from cachetools import LRUCache
from pydantic import ValidationError

from farcall.blobs import task_grant
from farcall.endpoint.engines.base import Engine, OnDone, OnStart
from farcall.endpoint.errors import ProtocolError
from farcall.endpoint.outbox import Outbox
from farcall.errors import FunctionNotAllowed
from farcall.protocol.channel import DataAccess, TaskMessage
from farcall.protocol.common import MAX_SPEC_BYTES, MAX_SPEC_DEPTH

log = logging.getLogger(__name__)

FUNCTION_CACHE = 4096
"""Function bodies kept by id; the broker sends each once per session."""


def _problem(error: BaseException) -> str:
    """What was wrong with a task, in one line: each bad field and why."""
    if isinstance(error, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in item['loc']) or 'task'}: {item['msg']}"
                         for item in error.errors()[:5])[:2000]
    return f"{type(error).__name__}: {error}"[:2000]


class Intake:
    """Takes the broker's tasks frames, hands the tasks to ``engine`` (this module's docstring).

    Tasks it does not run are answered through ``outbox``; the engine's callbacks are
    ``on_done`` and ``on_start``.
    """

    def __init__(
        self,
        engine: Engine,
        outbox: Outbox,
        on_done: OnDone,
        on_start: OnStart,
        *,
        allowed_functions: frozenset[str] | None = None,
        endpoint_name: str = "",
    ) -> None:
        self.engine = engine
        self.outbox = outbox
        self.allowed_functions = allowed_functions
        self.endpoint_name = endpoint_name
        """How refusals name this endpoint."""
        self.running: set[str] = set()
        """Ids of tasks handed to the engine whose results have not come back."""
        self.data: DataAccess | None = None
        """How workers reach the data plane (from the session's Welcome); set on every task,
        with that task's own grant (see ``set_data``)."""
        self._grant: tuple[str, bytes] | None = None
        self._on_done = on_done
        self._on_start = on_start
        self._functions: LRUCache[str, str] = LRUCache(FUNCTION_CACHE)
        self._granted = 0
        self._received = 0
        self._stopping = False

    @property
    def stopping(self) -> bool:
        """``stop`` was called: no more tasks are taken, no more credit given."""
        return self._stopping

    def stop(self) -> None:
        """Take no more tasks, and give back those the engine has not started (the broker
        hands them out again)."""
        self._stopping = True
        for task_id in self.engine.cancel_pending():
            self.running.discard(task_id)

    # ------------------------------------------------------------- credit

    def open_session(self) -> int:
        """The credit to offer in a new session's ``Hello``; the session's count starts from it."""
        credit = 0 if self._stopping else max(0, self.engine.capacity - len(self.running))
        self._granted, self._received = credit, 0
        return credit

    def owed_credit(self) -> int:
        """Credit that tops (running + granted, undelivered) back up to the engine's capacity;
        counted as granted, so the caller must send it."""
        if self._stopping:
            return 0
        n = self.engine.capacity - len(self.running) - (self._granted - self._received)
        if n <= 0:
            return 0
        self._granted += n
        return n

    def set_data(self, data: DataAccess | None, endpoint_id: str = "", key: bytes = b"") -> None:
        """How this session's tasks reach the data plane: ``data`` with, for each task, the
        grant derived from ``key`` for it (``farcall.blobs.task_grant``). The key stays here:
        a worker gets only its own task's grant, which ends with the task."""
        self.data = data
        self._grant = (endpoint_id, key) if data is not None and key else None

    def _data_of(self, task_id: str) -> DataAccess | None:
        data, grant = self.data, self._grant
        if data is None or grant is None:
            return data
        return data.model_copy(update={"grant": task_grant(grant[0], grant[1], task_id)})

    # ------------------------------------------------------------- tasks

    def take(self, tasks: list[TaskMessage], functions: dict[str, str]) -> bool:
        """A tasks frame: run what should run. ``True`` if some tasks were not run (answered
        or dropped): their credit is owed now, and any answers are in the outbox."""
        self._received += len(tasks)
        known = self._functions
        for function_id, body in functions.items():
            known[function_id] = body
        skipped = False
        submit, on_done, on_start = self.engine.submit, self._on_done, self._on_start
        running, holds, allowed = self.running, self.outbox.holds, self.allowed_functions
        data_of = self._data_of
        for task in tasks:
            task_id = task.task_id
            if self._stopping or task_id in running or holds(task_id):
                skipped = True
                continue
            if allowed is not None and task.function_id not in allowed:
                self._refuse(task)
                skipped = True
                continue
            if not task.function:
                try:
                    task.function = known[task.function_id]
                except KeyError:
                    self.outbox.answer(task_id, ProtocolError(
                        f"the broker sent task {task_id} without the body of function "
                        f"{task.function_id}, which this endpoint does not have; submit it again"))
                    skipped = True
                    continue
            task.data = data_of(task_id)
            running.add(task_id)
            submit(task, on_done, on_start)
        return skipped

    def take_unreadable(self, raw: str | bytes) -> bool:
        """A frame that failed to parse: if it is a tasks frame, read its tasks one by one, so
        one bad task fails alone. The good ones run, each bad one with an id fails, every
        one's credit comes back. ``False`` if ``raw`` is not a tasks frame at all."""
        try:
            found = json.loads(raw)
        except (ValueError, RecursionError):
            return False
        if not isinstance(found, dict) or found.get("type") != "tasks":
            return False
        items = found.get("tasks")
        functions = found.get("functions")
        if not isinstance(items, list):
            return False
        if not isinstance(functions, dict):
            functions = {}
        good: list[TaskMessage] = []
        bad: list[tuple[str, str]] = []
        for item in items:
            try:
                good.append(TaskMessage.model_validate(item))
            except (ValueError, RecursionError) as e:
                task_id = item.get("task_id") if isinstance(item, dict) else None
                bad.append((task_id if isinstance(task_id, str) else "", _problem(e)))
        log.error("a tasks frame from the broker did not parse: %d of its %d task(s) are "
                  "unreadable and fail alone", len(bad), len(items))
        self.take(good, {k: v for k, v in functions.items() if isinstance(v, str)})
        self._received += len(bad)
        for task_id, problem in bad:
            if not task_id or task_id in self.running or self.outbox.holds(task_id):
                continue  # nothing to answer; its credit comes back all the same
            self.outbox.answer(task_id, ValueError(
                f"the endpoint could not read task {task_id}: {problem}. Fix the task and "
                f"submit it again (a resource_specification may be at most {MAX_SPEC_DEPTH} "
                f"levels deep and {MAX_SPEC_BYTES} bytes as JSON)."))
        return True

    def _refuse(self, task: TaskMessage) -> None:
        log.warning("refusing task %s: function %s is not in allowed_functions",
                    task.task_id, task.function_id)
        self.outbox.answer(task.task_id, FunctionNotAllowed(
            f"endpoint {self.endpoint_name} does not run function "
            f"{task.function_id}: it is not in the endpoint's allowed_functions. Ask the "
            "endpoint's operator to allow it, or use another endpoint."))
