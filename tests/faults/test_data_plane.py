"""Faults while big arguments and results move on the data plane: 20 tasks, each taking 20 MiB
and returning 20 MiB, through a broker ``kill -9`` (restarted 3 s later), an agent ``kill -9``
and a Redis restart.

A worker's blob download or upload cut off by the fault is made again (``farcall.retry``,
within the endpoint's ``data_retry_seconds``), so none fails: 0 failed, 0 lost, each result
checked against the hash of the argument it was made from. Each fault waits until every
argument is up and a few results are back, so the workers are moving the rest when it strikes.
The broker and agent faults keep blobs in a directory (``FARCALL_BLOB_DIR``) and also wait
until an upload is being written to it; the Redis restart keeps them in that Redis (its own,
with AOF). ``FARCALL_FAULT_DATA_RETRY_SECONDS`` sets the endpoints' ``data_retry_seconds``
(0: one attempt, as workers made before; see docs/reliability.md for what that did).
"""

from __future__ import annotations

import hashlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from harness.faults import Workload, run_scenario
from harness.private_services import PrivateRedis
from harness.procs import wait_until
from tests.faults.helpers import Deployment, agent_sessions, kill_agent

pytestmark = pytest.mark.integration

MiB = 1 << 20
SIZE = 20 * MiB
"""Bytes of each task's argument, and of its result."""
TASKS = 20
TASK_SECONDS = 0.4
"""Each task's own work (a sleep): 2 workers take longer over 20 tasks than the client over their
arguments, so tasks wait in the agent when a fault strikes, as in a real campaign."""
DEADLINE = 120.0
FAULT_WHEN = 0.1
"""The scenario calls the fault once 2 of the 20 results are back; it then waits for the moment
below."""
STORED_FIRST = TASKS
"""The fault strikes once this many blobs are stored, which is when every argument is up: a
task's argument blob is freed as its result blob is recorded (issue 20), so from then on the
count stays at ``TASKS`` (plus results being written). The scenario calls the fault once 2
results are back, so the 2 workers are moving the rest; where it can be seen (a blob directory)
it also waits until an upload is being written."""
OUTAGE = 3.0
"""Seconds the killed broker stays down before it is started again (a supervisor's restart
delay): the transfers begun meanwhile fail too, as they would in production."""
FAULT_WAIT = 60.0
"""Seconds a fault waits for that moment before it strikes anyway (the report says which)."""
RETRY_LINE = "retrying for up to"
DATA_RETRY_SECONDS = float(os.environ.get("FARCALL_FAULT_DATA_RETRY_SECONDS") or 120)
"""The endpoints' ``data_retry_seconds`` (their default unless the variable is set)."""


def blob_task(calls_file: str, seconds: float) -> Callable[[int, bytes, str], bytes]:
    """A task that checks its argument against ``digest``, records its call id ``x`` in
    ``calls_file``, sleeps ``seconds`` and returns its argument reversed (as many bytes back as
    came in).

    Made by a factory so it is sent by value: the endpoint's workers cannot import this module.
    """

    def farcall_blob_task(x: int, data: bytes, digest: str) -> bytes:
        import hashlib
        import os
        import time

        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"the {len(data):,}-byte argument of call {x} arrived changed")
        fd = os.open(calls_file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{x}\n".encode())
        finally:
            os.close(fd)
        time.sleep(seconds)
        return data[::-1]

    return farcall_blob_task


def big_blobs() -> Workload:
    """20 MiB of random bytes in, reversed out; a result is right when its hash is the one
    expected (the payloads themselves are not kept)."""
    expected: dict[int, str] = {}

    def args(i: int) -> tuple[Any, ...]:
        data = os.urandom(SIZE)
        expected[i] = hashlib.sha256(data[::-1]).hexdigest()
        return i, data, hashlib.sha256(data).hexdigest()

    def right(i: int, result: Any) -> bool:
        return isinstance(result, bytes) and hashlib.sha256(result).hexdigest() == expected[i]

    return Workload(lambda calls: blob_task(calls, TASK_SECONDS), args, right)


def _stored_files(blob_dir: Path) -> tuple[int, bool]:
    """Blobs stored in the directory, and whether one is being written now (a temporary file)."""
    names = os.listdir(blob_dir) if blob_dir.is_dir() else []
    writing = any(n.startswith(".tmp-") and "secret" not in n for n in names)
    return sum(1 for n in names if not n.startswith(".")), writing


def _stored_in_redis(url: str, prefix: str) -> int:
    """Blobs stored in Redis: their meta keys (``<prefix>blob:<id>``, chunks add ``:<i>``)."""
    import redis

    with redis.Redis.from_url(url) as r:
        return sum(1 for key in r.scan_iter(f"{prefix}blob:*", count=1000)
                   if b":" not in key[len(prefix) + 5:])


def _when(moment: Callable[[], bool], seen: dict[str, Any]) -> None:
    """Wait (bounded) for ``moment``; the report's ``struck_mid_transfer`` says if it came."""
    try:
        seen["struck_mid_transfer"] = wait_until(moment, FAULT_WAIT, "the transfers under way",
                                                 interval=0.005)
    except TimeoutError:
        seen["struck_mid_transfer"] = False


def _while_uploading(blob_dir: Path) -> Callable[[], bool]:
    def moment() -> bool:
        stored, writing = _stored_files(blob_dir)
        return stored >= STORED_FIRST and writing

    return moment


def _figures(ep: Any, seen: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def extra() -> dict[str, Any]:
        log = "" if ep.proc is None else ep.proc.output()
        return {**seen, "agent_sessions": agent_sessions(ep),
                "worker_retry_lines": log.count(RETRY_LINE)}

    return extra


def _run(scenario: str, dep: Deployment, eid: str, fault: Callable[[], None], workdir: Path,
         extra: Callable[[], dict[str, Any]]) -> None:
    report = run_scenario(scenario, dep.broker.url, dep.token, eid, fault, workdir, tasks=TASKS,
                          deadline=DEADLINE, fault_when=FAULT_WHEN, extra=extra,
                          workload=big_blobs())
    report.assert_ok()
    assert report.failed_clear == 0, f"tasks failed:\n{report.line()}"
    assert report.succeeded == TASKS, report.line()


def _with_blob_dir(deployment: Callable[..., Deployment], tmp_path: Path,
                   name: str) -> tuple[Deployment, Path]:
    blob_dir = tmp_path / "blobs"
    dep = deployment(name=name, settings={"FARCALL_BLOB_DIR": str(blob_dir)}).start()
    return dep, blob_dir


def test_broker_kill_while_blobs_move(deployment: Callable[..., Deployment], tmp_path: Path) -> None:
    dep, blob_dir = _with_blob_dir(deployment, tmp_path, "blob-broker-kill")
    ep = dep.endpoint("blob-broker-kill", data_retry_seconds=DATA_RETRY_SECONDS)
    eid = dep.start_endpoint(ep)
    seen: dict[str, Any] = {}

    def fault() -> None:
        _when(_while_uploading(blob_dir), seen)
        dep.broker.proc.stop(timeout=10, sig=signal.SIGKILL)
        time.sleep(OUTAGE)  # the outage itself, not a wait for a condition
        dep.broker.start()  # the same port, as a supervisor would

    _run("kill -9 broker, 20 MiB blobs", dep, eid, fault, tmp_path, _figures(ep, seen))


def test_agent_kill_while_blobs_move(deployment: Callable[..., Deployment], tmp_path: Path) -> None:
    dep, blob_dir = _with_blob_dir(deployment, tmp_path, "blob-agent-kill")
    ep = dep.endpoint("blob-agent-kill", data_retry_seconds=DATA_RETRY_SECONDS)
    eid = dep.start_endpoint(ep)
    seen: dict[str, Any] = {}

    def fault() -> None:
        _when(_while_uploading(blob_dir), seen)
        kill_agent(ep)
        ep.spawn()  # as systemd would

    _run("kill -9 agent, 20 MiB blobs", dep, eid, fault, tmp_path, _figures(ep, seen))


def test_redis_restart_while_blobs_move(private_redis: PrivateRedis,
                                        deployment: Callable[..., Deployment],
                                        tmp_path: Path) -> None:
    """Blobs in Redis: while it restarts the broker's blob routes answer 503 and a download
    being streamed from it is cut off; workers and the SDK send those again."""
    dep = deployment(redis_url=private_redis.url, name="blob-redis-restart").start()
    ep = dep.endpoint("blob-redis-restart", data_retry_seconds=DATA_RETRY_SECONDS)
    eid = dep.start_endpoint(ep)
    seen: dict[str, Any] = {}

    def fault() -> None:
        _when(lambda: _stored_in_redis(private_redis.url, dep.redis_prefix) >= STORED_FIRST, seen)
        private_redis.restart()

    _run("Redis restart (AOF), 20 MiB blobs", dep, eid, fault, tmp_path, _figures(ep, seen))


def test_a_blob_filler_gets_quota_exceeded_and_a_full_redis_answers_store_full(
        private_redis: PrivateRedis, deployment: Callable[..., Deployment]) -> None:
    """Issue 20, finding 3: one user filling the store. Past their byte quota the filler gets
    403 ``quota_exceeded`` while another user's uploads go on; and a Redis at ``maxmemory``
    with ``noeviction`` (as docs/deploy.md advises) answers 503 ``store_full``, never 500."""
    import httpx
    import redis

    mib = 1024 * 1024
    dep = deployment(redis_url=private_redis.url, name="blob-quota",
                     settings={"FARCALL_MAX_BLOB_BYTES_PER_USER": str(8 * mib)}).start()
    filler = {"Authorization": f"Bearer {dep.token}"}
    victim = {"Authorization": f"Bearer {dep.broker.create_user('victim')}"}
    with httpx.Client(base_url=dep.broker.url, timeout=30) as http:
        for _ in range(4):
            assert http.post("/v1/blobs", content=os.urandom(2 * mib), headers=filler
                             ).status_code == 201
        r = http.post("/v1/blobs", content=os.urandom(2 * mib), headers=filler)
        assert r.status_code == 403 and r.json()["error"] == "quota_exceeded", r.text
        assert "FARCALL_MAX_BLOB_BYTES_PER_USER" in r.json()["message"]
        assert http.post("/v1/blobs", content=os.urandom(2 * mib), headers=victim
                         ).status_code == 201, "the filler's quota is theirs alone"

        r_admin = redis.Redis.from_url(private_redis.url)
        try:
            used = int(r_admin.info("memory")["used_memory"])
            r_admin.config_set("maxmemory-policy", "noeviction")
            r_admin.config_set("maxmemory", str(used + mib))
            answers = [http.post("/v1/blobs", content=os.urandom(2 * mib), headers=victim),
                       http.post("/v1/functions", json={"function": "F" * 4 * mib},
                                 headers=victim)]
            for r in answers:
                assert r.status_code == 503 and r.json()["error"] == "store_full", r.text
                assert "maxmemory" in r.json()["message"]
                assert "FARCALL_MAX_BLOB_BYTES_PER_USER" in r.json()["message"]
        finally:
            r_admin.config_set("maxmemory", "0")
            r_admin.close()
        assert http.post("/v1/blobs", content=b"x" * 1000, headers=victim).status_code == 201
