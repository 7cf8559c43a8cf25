"""``Executor.reload_tasks``: a process that submitted tasks dies; another one gets their futures
back from the task group's id, finished or not, and they resolve as fresh ones do."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from farcall import Client, Executor
from farcall.errors import NotFound
from harness.procs import wait_until
from tests.integration.helpers import Broker, Endpoint

pytestmark = pytest.mark.integration

SUBMITTER = textwrap.dedent(
    """
    import json, os, sys, time
    from farcall import Executor

    def square(x):
        return x * x

    def fail(x):
        raise ValueError(f"bad value {x}")

    def wait_for_file(path):
        deadline = time.monotonic() + 120
        while not os.path.exists(path) and time.monotonic() < deadline:
            time.sleep(0.02)
        return "released"

    gate = sys.argv[1]
    ex = Executor(endpoint_id=os.environ["EP"])
    futures = [ex.submit(square, 3), ex.submit(fail, 1)]
    futures += [ex.submit(wait_for_file, gate) for _ in range(3)]
    futures[0].result(60)
    futures[1].exception(60)
    deadline = time.monotonic() + 60
    while not all(f.task_id for f in futures) and time.monotonic() < deadline:
        time.sleep(0.01)
    print(json.dumps({"group": ex.task_group_id, "tasks": [f.task_id for f in futures]}),
          flush=True)
    os._exit(0)  # the kernel dies: no shutdown, three tasks not finished
    """
)


def test_a_new_process_gets_the_futures_of_a_dead_one(
    make_endpoint: Callable[..., Endpoint], broker: Broker, token: str, client: Client,
    tmp_path: Path,
) -> None:
    # Two threads, each task marked running when a thread takes it: a third one stays queued.
    endpoint = make_endpoint("reload", engine="ThreadPoolEngine", workers=2)
    endpoint.start(client)
    gate = tmp_path / "gate"
    script = tmp_path / "notebook.py"
    script.write_text(SUBMITTER)
    env = dict(broker.env, FARCALL_BROKER_URL=broker.url, FARCALL_TOKEN=token,
               EP=endpoint.endpoint_id)
    done = subprocess.run([sys.executable, str(script), str(gate)], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    submitted = json.loads(done.stdout.strip().splitlines()[-1])
    square, fail, *slow = submitted["tasks"]
    wait_until(lambda: [client.get_task(t)["state"] for t in slow]
               == ["running", "running", "waiting-for-endpoint"], 60, "two slow tasks running")

    ex = Executor(endpoint_id=endpoint.endpoint_id, client=client,
                  task_group_id=submitted["group"])
    futures = ex.reload_tasks()
    assert [f.task_id for f in futures] == submitted["tasks"]
    assert futures[0].done() and futures[0].result() == 9
    with pytest.raises(ValueError, match="bad value 1") as raised:
        futures[1].result()
    assert any(frame.name == "fail" for frame in raised.traceback)  # the remote frame
    assert not any(f.done() for f in futures[2:])

    queued = futures[4]
    assert queued.cancel() and queued.cancelled()
    assert client.get_task(slow[2])["state"] == "cancelled"
    gate.touch()
    assert [f.result(60) for f in futures[2:4]] == ["released", "released"]
    ex.shutdown()

    again = Executor(endpoint_id=endpoint.endpoint_id, client=client,
                     task_group_id=submitted["group"])
    states = [(f.done(), f.cancelled()) for f in again.reload_tasks()]
    assert states == [(True, False)] * 4 + [(True, True)]
    again.shutdown()


def test_a_group_that_is_not_yours_is_not_found(broker: Broker, client: Client) -> None:
    bob = Client(broker_url=broker.url, token=broker.create_user(f"bob-{uuid.uuid4().hex[:6]}"))
    theirs = bob.create_task_group()
    for group in (theirs, str(uuid.uuid4())):
        ex = Executor(endpoint_id="any", client=client, task_group_id=group)
        with pytest.raises(NotFound, match=f"task group {group} is not known to the broker"):
            ex.reload_tasks()
        ex.shutdown()
    bob.close()
    with pytest.raises(ValueError, match="task_group_id="):
        Executor(endpoint_id="any", client=client).reload_tasks()
