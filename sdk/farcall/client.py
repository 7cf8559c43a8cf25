"""``Client``: the broker's REST API as Python calls, named as Globus Compute users know them.

Records come back as dicts whose ids are ``function_id``, ``endpoint_id``,
``task_id`` and ``task_group_id``. Every call raises a :class:`BrokerError`
subclass with the broker's message when the broker refuses it.
"""

from __future__ import annotations

import json
import logging
import numbers
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from farcall import config
from farcall.backoff import Backoff
from farcall.errors import AuthenticationError, BrokerError, NotFound, TaskPending
from farcall.messages import (
    MAX_RETRIES,
    MAX_WALLTIME,
    BatchSubmission,
    BatchSubmitted,
    CancelRequest,
    EndpointRegistration,
    FunctionRegistration,
    TaskIds,
    TasksCancelled,
    TaskSpec,
    TaskState,
    Versions,
    check_resource_specification,
)
from farcall.outcome import outcome_of
from farcall.serialize import pack_args, serialize_function
from farcall.transport import Response, Transport, TransportError
from farcall.urls import websocket_url
from farcall.version import __version__, local_versions

log = logging.getLogger(__name__)

SUBMITTER = Versions(**local_versions())
IDS_PER_REQUEST = 10_000
"""Most task ids the broker takes in one ``POST /v1/tasks/status`` or ``/v1/tasks/cancel``."""
MAX_BATCH_TASKS = 1024
MAX_BATCH_BYTES = 4 * 1024 * 1024
"""A batch is split below these, so a request stays well under the broker's body limit."""
RETRY_SECONDS = 30.0


class Batch:
    """Tasks to submit together with :meth:`Client.batch_run` (one request per ~1,000 tasks).

    ``resource_specification``, ``walltime`` and ``max_retries`` go with every task
    added (``add`` may set ``walltime`` and ``max_retries`` per task instead).
    """

    def __init__(
        self,
        task_group_id: str | None = None,
        resource_specification: dict[str, Any] | None = None,
        walltime: float | None = None,
        max_retries: int = 0,
    ) -> None:
        self.task_group_id = task_group_id
        self.resource_specification = check_resource_specification(resource_specification)
        self.walltime, self.max_retries = check_task_options(walltime, max_retries)
        self.tasks: list[TaskSpec] = []

    def add(
        self,
        function_id: str,
        args: Iterable[Any] | None = None,
        kwargs: dict[str, Any] | None = None,
        *,
        walltime: float | None = None,
        max_retries: int | None = None,
    ) -> None:
        """Add one call of a registered function (``Client.register_function``).

        ``walltime`` / ``max_retries``: for this task instead of the batch's (None: the batch's).
        """
        if not isinstance(function_id, str):
            raise TypeError(
                f"Batch.add takes a function_id string, got {type(function_id).__name__}; "
                "register the function first with Client.register_function"
            )
        if walltime is None and max_retries is None:
            own_walltime, own_retries = self.walltime, self.max_retries
        else:
            own_walltime, own_retries = check_task_options(
                self.walltime if walltime is None else walltime,
                self.max_retries if max_retries is None else max_retries,
            )
        self.tasks.append(
            TaskSpec.model_construct(
                function_id=function_id,
                args=pack_args(tuple(args or ()), dict(kwargs or {})),
                resource_specification=self.resource_specification,
                walltime=own_walltime,
                max_retries=own_retries,
            )
        )

    def __len__(self) -> int:
        return len(self.tasks)


class _Retry:
    """Bounded, jittered retry of a request while the broker is restarting or overloaded."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self._backoff = Backoff(cap=5.0)

    def wait(self, why: str, url: str) -> bool:
        """Sleep before the next attempt; False when the time is up."""
        first = self._backoff.attempt == 0
        delay = self._backoff.next_delay()
        if time.monotonic() + delay > self.deadline:
            return False
        level = logging.WARNING if first else logging.DEBUG
        log.log(level, "broker at %s: %s; retrying for up to %.0f s", url, why, self.seconds)
        time.sleep(delay)
        return True


class Client:
    """A connection to one broker as one user.

    ``broker_url`` and ``token`` default to ``FARCALL_BROKER_URL`` and
    ``FARCALL_TOKEN``, then to ``$FARCALL_HOME/config``. Thread-safe. Requests
    are retried for up to ``retry_seconds`` while the broker does not answer or
    answers 503, so a broker restart does not fail a notebook cell.
    """

    def __init__(
        self,
        broker_url: str | None = None,
        token: str | None = None,
        *,
        timeout: float = 60.0,
        retry_seconds: float = RETRY_SECONDS,
    ) -> None:
        self.broker_url = config.broker_url(broker_url)
        self.token = config.token(token)
        self.retry_seconds = retry_seconds
        self._http = Transport(
            self.broker_url + "/v1",
            {"Authorization": f"Bearer {self.token}", "User-Agent": f"farcall/{__version__}",
             "Accept": "application/json"},
            timeout,
        )

    # ---------------------------------------------------------------- plumbing

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Client(broker_url={self.broker_url!r})"

    def request(self, method: str, path: str, body: Any = None, content: bytes | None = None) -> Any:
        """One REST call; the decoded JSON answer, or a :class:`BrokerError`."""
        retry = _Retry(self.retry_seconds)
        if body is not None:
            content = json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if content is not None else None
        while True:
            try:
                answer = self._http.request(method, path, content, headers)
            except TransportError as e:
                if retry.wait(f"{type(e).__name__}: {e}", self.broker_url):
                    continue
                raise BrokerError(
                    0,
                    f"cannot reach the broker at {self.broker_url} ({type(e).__name__}: {e}); "
                    "check the URL and that the broker is running",
                ) from None
            if answer.status == 503 and retry.wait("503 unavailable", self.broker_url):
                continue
            return _decode(answer)

    def websocket_url(self, path: str) -> str:
        """``ws(s)://`` URL of a broker WebSocket route under ``/v1`` (see :mod:`farcall.urls`)."""
        return websocket_url(self.broker_url, path)

    # ---------------------------------------------------------------- functions

    def register_function(
        self,
        function: Callable[..., Any],
        function_name: str | None = None,
        description: str = "",
        strategy: str = "auto",
    ) -> str:
        """Serialize ``function`` (dill, falling back to its source) and register it; its id."""
        payload = serialize_function(function, strategy)
        return self.register_function_payload(
            payload, function_name or str(getattr(function, "__name__", "")), description
        )

    def register_function_payload(
        self, payload: str, function_name: str = "", description: str = ""
    ) -> str:
        """Register an already serialized function (``farcall.serialize.serialize_function``)."""
        body = FunctionRegistration(
            function=payload, function_name=function_name, description=description
        )
        return str(self.request("POST", "/functions", body.model_dump())["function_id"])

    def get_function(self, function_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/functions/{function_id}"))

    def delete_function(self, function_id: str) -> dict[str, Any]:
        return dict(self.request("DELETE", f"/functions/{function_id}"))

    # ---------------------------------------------------------------- endpoints

    def register_endpoint(self, name: str, description: str = "") -> dict[str, Any]:
        """Register an endpoint; the answer holds its ``credential``, shown only this once.

        Operators normally let ``farcall-endpoint start`` do this.
        """
        body = EndpointRegistration(name=name, description=description)
        return dict(self.request("POST", "/endpoints", body.model_dump()))

    def get_endpoints(self) -> list[dict[str, Any]]:
        """Your endpoints: ``endpoint_id``, ``name``, ``status`` (online/offline), ..."""
        return list(self.request("GET", "/endpoints")["endpoints"])

    def get_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        return dict(self.request("GET", f"/endpoints/{endpoint_id}"))

    def get_endpoint_status(self, endpoint_id: str) -> dict[str, Any]:
        """``status`` plus workers, idle workers, pending/running/queued tasks and engine details."""
        return dict(self.request("GET", f"/endpoints/{endpoint_id}/status"))

    def delete_endpoint(self, endpoint_id: str) -> dict[str, Any]:
        """Delete the endpoint and its queue; its credential stops working at once."""
        return dict(self.request("DELETE", f"/endpoints/{endpoint_id}"))

    # ---------------------------------------------------------------- tasks

    def create_task_group(self) -> str:
        return str(self.request("POST", "/task_groups", {})["task_group_id"])

    def get_task_group(self, task_group_id: str) -> list[str]:
        """The ids of the tasks in a group, in submission order."""
        return list(self.request("GET", f"/task_groups/{task_group_id}")["task_ids"])

    def run(
        self,
        *args: Any,
        endpoint_id: str,
        function_id: str,
        resource_specification: dict[str, Any] | None = None,
        walltime: float | None = None,
        max_retries: int = 0,
        **kwargs: Any,
    ) -> str:
        """Run a registered function once with ``args``/``kwargs``; the new task's id.

        ``walltime``: seconds the task may run on a worker (past it, it fails with
        :class:`~farcall.errors.TaskTimeout`); ``max_retries``: times it is run again
        when a system failure (a lost worker) cuts it short.
        """
        batch = self.create_batch(resource_specification=resource_specification,
                                  walltime=walltime, max_retries=max_retries)
        batch.add(function_id, args, kwargs)
        return str(self.batch_run(endpoint_id, batch)["task_ids"][0])

    def create_batch(
        self,
        task_group_id: str | None = None,
        resource_specification: dict[str, Any] | None = None,
        walltime: float | None = None,
        max_retries: int = 0,
    ) -> Batch:
        """An empty :class:`Batch`; the options go with every task added to it."""
        return Batch(task_group_id, resource_specification, walltime, max_retries)

    def batch_run(self, endpoint_id: str, batch: Batch) -> dict[str, Any]:
        """Submit a batch; ``{"task_group_id", "endpoint_id", "task_ids", "tasks"}``.

        ``task_ids`` follows the order of ``batch.add`` calls; ``tasks`` maps each
        function id to its task ids (as Globus Compute's ``batch_run`` does).
        """
        if not batch.tasks:
            raise ValueError("the batch is empty; add tasks with batch.add(function_id, args)")
        group = batch.task_group_id
        task_ids: list[str] = []
        for chunk in split_batch(batch.tasks):
            answer = self.submit_tasks(endpoint_id, chunk, group)
            group = answer.task_group_id
            task_ids += answer.task_ids
        by_function: dict[str, list[str]] = {}
        for spec, task_id in zip(batch.tasks, task_ids, strict=True):
            by_function.setdefault(spec.function_id, []).append(task_id)
        return {
            "task_group_id": group,
            "endpoint_id": endpoint_id,
            "task_ids": task_ids,
            "tasks": by_function,
        }

    def submit_tasks(
        self, endpoint_id: str, tasks: list[TaskSpec], task_group_id: str | None = None
    ) -> BatchSubmitted:
        """One ``POST /v1/tasks``; callers keep it under the body limit (see :func:`split_batch`)."""
        body = BatchSubmission.model_construct(
            endpoint_id=endpoint_id, tasks=tasks, task_group_id=task_group_id, submitter=SUBMITTER
        )
        answer = self.request("POST", "/tasks", content=body.model_dump_json().encode())
        return BatchSubmitted.model_validate(answer)

    def get_task(self, task_id: str) -> dict[str, Any]:
        """The task record: ``state``, ``transitions`` (state -> timestamp), versions, ..."""
        return dict(self.request("GET", f"/tasks/{task_id}"))

    def get_result(self, task_id: str) -> Any:
        """The task's return value; raises its remote exception, ``concurrent.futures.CancelledError``
        if it was cancelled, or ``TaskPending`` if unfinished."""
        record = self.get_task(task_id)
        if not TaskState(record["state"]).terminal:
            raise TaskPending(task_id, record["state"])
        return outcome_of(record).unwrap()  # a cancelled task raises CancelledError

    def get_tasks(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Records of many tasks, in requests of up to 10,000; unknown or foreign ids are left out."""
        ids = list(dict.fromkeys(task_ids))
        found: dict[str, dict[str, Any]] = {}
        for i in range(0, len(ids), IDS_PER_REQUEST):
            body = TaskIds(task_ids=ids[i : i + IDS_PER_REQUEST])
            found.update(self.request("POST", "/tasks/status", body.model_dump())["tasks"])
        return found

    def cancel(self, task_ids: str | Iterable[str], *, only_queued: bool = False) -> dict[str, Any]:
        """Cancel tasks: queued ones never run, running ones are stopped; each ends ``cancelled``.

        A running task's worker process is killed (or its thread abandoned and
        replaced). With ``only_queued`` tasks that have started are left to finish.
        The answer is ``{"cancelled": [task ids], "unchanged": {task id: why}}``,
        ``why`` being a finished task's state, ``"running"`` (``only_queued``) or
        ``"not_found"``. In requests of up to 10,000 ids.
        """
        ids = [task_ids] if isinstance(task_ids, str) else list(dict.fromkeys(task_ids))
        cancelled: list[str] = []
        unchanged: dict[str, str] = {}
        for i in range(0, len(ids), IDS_PER_REQUEST):
            body = CancelRequest(task_ids=ids[i : i + IDS_PER_REQUEST], only_queued=only_queued)
            answer = TasksCancelled.model_validate(
                self.request("POST", "/tasks/cancel", body.model_dump(exclude_defaults=True))
            )
            cancelled += answer.cancelled
            unchanged.update(answer.unchanged)
        return {"cancelled": cancelled, "unchanged": unchanged}

    def get_batch_result(self, task_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """Per task id: ``pending``, ``status`` and, once finished, ``result`` or ``exception``.

        A cancelled task has ``status`` ``"cancelled"`` and a ``CancelledError`` as ``exception``.

        Ids the broker does not know (never submitted, someone else's, or expired)
        are left out of the answer.
        """
        out: dict[str, dict[str, Any]] = {}
        for task_id, record in self.get_tasks(task_ids).items():
            entry: dict[str, Any] = {"pending": not TaskState(record["state"]).terminal,
                                     "status": record["state"]}
            if not entry["pending"]:
                outcome = outcome_of(record)
                entry["result" if outcome.ok else "exception"] = outcome.value
                entry["completion_t"] = record.get("completed_at")
            out[task_id] = entry
        return out


# ------------------------------------------------------------------ helpers


def check_task_options(walltime: float | None, max_retries: int) -> tuple[float | None, int]:
    """``(walltime, max_retries)`` as every task carries them, checked where the user passed
    them (the broker would refuse them only at submission)."""
    if walltime is not None:
        number = isinstance(walltime, numbers.Real) and not isinstance(walltime, bool)
        if not number or not 0 < walltime <= MAX_WALLTIME:
            raise ValueError(
                f"walltime must be a number of seconds above 0 and at most {MAX_WALLTIME:.0f} "
                f"(a year), got {walltime!r}; pass walltime=None for no limit"
            )
        walltime = float(walltime)
    whole = isinstance(max_retries, numbers.Integral) and not isinstance(max_retries, bool)
    if not whole or not 0 <= max_retries <= MAX_RETRIES:
        raise ValueError(
            f"max_retries must be a whole number from 0 to {MAX_RETRIES}, got {max_retries!r}: "
            "the times a task is run again after a lost worker cut it short (default 0)"
        )
    return walltime, int(max_retries)


def split_batch(
    tasks: list[TaskSpec], max_tasks: int = MAX_BATCH_TASKS, max_bytes: int = MAX_BATCH_BYTES
) -> Iterator[list[TaskSpec]]:
    """Consecutive chunks of at most ``max_tasks`` tasks and about ``max_bytes`` of payload."""
    chunk: list[TaskSpec] = []
    size = 0
    for spec in tasks:
        n = len(spec.args) + 200
        if chunk and (len(chunk) >= max_tasks or size + n > max_bytes):
            yield chunk
            chunk, size = [], 0
        chunk.append(spec)
        size += n
    if chunk:
        yield chunk


def _decode(answer: Response) -> Any:
    try:
        body = answer.json()
    except ValueError:
        body = None
    if answer.status < 400:
        if body is None:
            raise BrokerError(answer.status, f"the broker answered non-JSON: {answer.text[:200]}")
        return body
    error = body.get("error", "") if isinstance(body, dict) else ""
    message = body.get("message", "") if isinstance(body, dict) else ""
    raise broker_error(answer.status, message or answer.text[:500] or answer.reason, error, body)


def broker_error(status: int, message: str, error: str = "", body: Any = None) -> BrokerError:
    """The SDK exception for a broker error answer (HTTP status and JSON body)."""
    kind = {401: AuthenticationError, 404: NotFound}.get(status, BrokerError)
    return kind(status, message, error, body)
