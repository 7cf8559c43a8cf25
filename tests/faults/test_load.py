"""A bounded load: 20 submitting clients and 5 endpoints for ``FARCALL_LOAD_SECONDS`` (default 120 s).

No errors, nothing lost, every result right, and the broker's memory flat
afterwards: its RSS at the end at most 100 MiB above the sample taken after the
warm-up (``harness.load.RSS_SLACK``). ``python -m bench.load`` runs the same
with arguments.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from harness.load import load_seconds, run_load
from harness.procs import process_tree
from tests.faults.helpers import Deployment

pytestmark = pytest.mark.integration

CLIENTS = 20
ENDPOINTS = 5
SECONDS = load_seconds()


@pytest.mark.timeout(SECONDS + 300)
def test_twenty_clients_five_endpoints(deployment: Callable[..., Deployment]) -> None:
    dep = deployment(name="load").start()
    # ThreadPoolEngine: one process per endpoint, so 5 endpoints fit the 2-core machine beside the broker.
    endpoints = [dep.endpoint(f"load-{i}", engine="ThreadPoolEngine") for i in range(ENDPOINTS)]
    for ep in endpoints:
        ep.spawn()
    with dep.client() as c:
        ids = [ep.wait_online(c) for ep in endpoints]

    def broker_rss() -> int:
        return sum(p.memory_info().rss for p in process_tree(dep.broker.proc.pid))

    report = run_load(dep.broker.url, dep.token, ids, broker_rss, seconds=SECONDS, clients=CLIENTS)
    report.assert_ok()
