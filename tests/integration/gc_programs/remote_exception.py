"""A task that raises: the exception reaches the caller as TaskExecutionFailed, with the remote
traceback, through a future and through Client.get_result."""

import os
import time

from globus_compute_sdk import Client, Executor
from globus_compute_sdk.errors import TaskExecutionFailed, TaskPending


def generate_collatz_sequence(n: int, sequence_limit: int = 100) -> list[int]:
    seq = [n]
    while n != 1 and len(seq) < sequence_limit:
        n = 3 * n + 1 if n % 2 else n // 2
        seq.append(n)
    if n != 1:
        raise ValueError(f"Sequence not terminated in {sequence_limit} steps")
    return seq


ep_id = os.environ["ENDPOINT_ID"]

with Executor(endpoint_id=ep_id) as gce:
    future = gce.submit(generate_collatz_sequence, 1234567890, sequence_limit=20)

try:
    print(future.result())
except TaskExecutionFailed as exc:
    print("future: caught TaskExecutionFailed")
    print("names the error:", "Sequence not terminated in 20 steps" in str(exc))
    print("remote traceback:", "generate_collatz_sequence" in exc.remote_data)

gcc = Client()
task_id = gcc.run(27, endpoint_id=ep_id, function_id=gcc.register_function(generate_collatz_sequence))
deadline = time.monotonic() + 60
while time.monotonic() < deadline:
    try:
        gcc.get_result(task_id)
        print("no error?")
        break
    except TaskPending:
        time.sleep(0.2)
    except TaskExecutionFailed as exc:
        print("get_result: caught TaskExecutionFailed:", "Sequence not terminated" in str(exc))
        break
