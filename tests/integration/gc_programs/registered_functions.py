"""An Executor with functions registered up front, submitted by id, and its tasks reloaded by a
second Executor from the task group id (as after a restart)."""

import os

from globus_compute_sdk import Client, Executor


def task_kernel(num: int) -> str:
    return f"result from task {num}"


ep_id = os.environ["ENDPOINT_ID"]
gcc = Client()
fn_id = gcc.register_function(task_kernel)

with Executor(endpoint_id=ep_id, client=gcc) as gce:
    assert gce.register_function(task_kernel, function_id=fn_id) == fn_id
    futures = [gce.submit_to_registered_function(fn_id, args=(i,)) for i in range(1, 4)]
    futures.append(gce.submit_to_registered_function(function_id=fn_id, kwargs={"num": 4}))
    print([f.result() for f in futures])
    task_group_id = gce.task_group_id
    print("submitted:", gce.task_count_submitted)

with Executor(endpoint_id=ep_id, task_group_id=task_group_id) as again:
    reloaded = again.reload_tasks()
    print("reloaded:", sorted(f.result() for f in reloaded))
