"""A Globus Compute engine section runs as written: broker on real Redis and RabbitMQ, the
endpoint a ``farcall-endpoint start`` process whose engine section is in Globus Compute's shapes
(address mapping, strategy mapping, job_status_kwargs, label, allowed_serializers,
max_retries_on_system_failure), its blocks from LocalProvider.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from farcall import Client, Executor
from farcall.errors import DeserializationError
from farcall.protocol.common import TaskState
from harness.procs import wait_until
from tests.integration.helpers import Endpoint

pytestmark = pytest.mark.integration


def test_a_globus_compute_engine_section_runs_tasks(
    make_endpoint: Callable[..., Endpoint], client: Client, tmp_path: Path
) -> None:
    ep = make_endpoint("gc-section", engine="ParslEngine", engine_spec={
        "type": "GlobusComputeEngine",
        "label": "Lab@Cluster",
        "max_workers_per_node": 1,
        "encrypted": False,
        "heartbeat_period": 1,
        "heartbeat_threshold": 5,
        "address": {"type": "address_by_interface", "ifname": "lo"},
        "strategy": {"type": "SimpleStrategy", "max_idletime": 5},
        "job_status_kwargs": {"strategy_period": 0.5},
        "max_retries_on_system_failure": 1,
        "allowed_serializers": ["globus_compute_sdk.*Code", "globus_compute_sdk.*Data"],
        "provider": {"type": "LocalProvider", "init_blocks": 0, "min_blocks": 0, "max_blocks": 1},
    })
    checked = ep.cli("check", "gc-section")
    assert checked.returncode == 0, checked.stderr
    assert "address: 127.0.0.1 (address_by_interface(ifname=lo))" in checked.stdout
    eid = ep.start(client)
    marker = str(tmp_path / "worker-died-once")

    def die_once(x: int) -> int:  # kills its worker the first time: run again by the engine
        import os
        from pathlib import Path

        if not os.path.exists(marker):
            Path(marker).touch()
            os._exit(5)
        return x + 1

    with Executor(endpoint_id=eid, client=client) as ex:
        assert ex.submit(die_once, 41).result(timeout=120) == 42
    (run_dir,) = (ep.dir / "runinfo").iterdir()
    assert run_dir.name.startswith("Lab@Cluster-")
    ep.stop()


def test_allowed_serializers_refuse_what_the_list_leaves_out(
    make_endpoint: Callable[..., Endpoint], client: Client
) -> None:
    ep = make_endpoint("gc-source-only", engine="ProcessPoolEngine", engine_spec={
        "type": "ProcessPoolEngine", "max_workers": 1,
        "allowed_serializers": ["globus_compute_sdk.serialize.PureSourceTextInspect",
                                "globus_compute_sdk.serialize.DillDataBase64"],
    })
    eid = ep.start(client)

    def add_one(x: int) -> int:
        return x + 1

    with Executor(endpoint_id=eid, client=client) as ex:
        with pytest.raises(DeserializationError, match="which this endpoint does not accept"):
            ex.submit(add_one, 1).result(timeout=60)
    source_id = client.register_function(add_one, strategy="source")
    task_id = client.run(1, endpoint_id=eid, function_id=source_id)
    wait_until(lambda: TaskState(client.get_task(task_id)["state"]).terminal, 60, "the task")
    assert client.get_result(task_id) == 2
    ep.stop()
