"""A user's script submits a function that fails; the traceback it catches shows the script's
file, the failing line's number and its source, as a local failure would (issue 18): the
function runs in a worker process of a real endpoint, through the real broker."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from farcall import Client
from tests.integration.helpers import Broker, Endpoint

pytestmark = pytest.mark.integration

SCRIPT = '''\
import os
import sys
import traceback

from farcall import Executor


def boom(tag):
    raise ValueError(f"boom-{tag}")


strategy = sys.argv[1]
with Executor(endpoint_id=os.environ["EP"]) as ex:
    if strategy == "auto":
        future = ex.submit(boom, "script")
    else:
        function_id = ex.client.register_function(boom, strategy=strategy)
        future = ex.submit_to_registered_function(function_id, ("script",))
    try:
        future.result(timeout=60)
    except ValueError as e:
        print("".join(traceback.format_exception(e)))
'''
RAISE_LINE = 9


@pytest.fixture(scope="module")
def endpoint_id(broker: Broker, token: str, make_module_endpoint: Callable[..., Endpoint]
                ) -> Iterator[str]:
    """A process-pool endpoint: the function fails in another process than the script's."""
    with Client(broker_url=broker.url, token=token) as client:
        yield make_module_endpoint("tracebacks").start(client)


@pytest.mark.parametrize("strategy", ["auto", "dill", "source"])
def test_a_script_sees_its_own_failing_line_in_a_remote_traceback(
        strategy: str, broker: Broker, token: str, endpoint_id: str, tmp_path: Path) -> None:
    script = tmp_path / "analysis.py"
    script.write_text(SCRIPT)
    env = dict(broker.env, FARCALL_BROKER_URL=broker.url, FARCALL_TOKEN=token, EP=endpoint_id,
               FARCALL_HOME=str(tmp_path / "home"))
    done = subprocess.run([sys.executable, str(script), strategy], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert (f'  File "{script}", line {RAISE_LINE}, in boom\n'
            '    raise ValueError(f"boom-{tag}")\n'
            "ValueError: boom-script\n") in done.stdout, done.stdout
