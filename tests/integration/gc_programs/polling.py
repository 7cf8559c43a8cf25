"""The Client alone: register a function, run it, poll for the result; look at the endpoint and
the function; delete the function."""

import os
import time

from globus_compute_sdk import Client
from globus_compute_sdk.errors import TaskPending


def hello_world(name: str, punctuation: str = "!") -> str:
    """Say hello."""
    return f"Hello, {name}{punctuation}"


ep_id = os.environ["ENDPOINT_ID"]
gcc = Client(do_version_check=True)

print("endpoint:", gcc.get_endpoint_status(ep_id)["status"])
print("listed:", ep_id in [ep["endpoint_id"] for ep in gcc.get_endpoints()])

func_uuid = gcc.register_function(hello_world)
print("function:", gcc.get_function(func_uuid)["function_name"])
task_id = gcc.run("farcall", endpoint_id=ep_id, function_id=func_uuid, punctuation="?")

deadline = time.monotonic() + 60
while True:
    task = gcc.get_task(task_id)
    if not task["pending"]:
        break
    if time.monotonic() > deadline:
        raise SystemExit(f"task still {task['status']} after 60 s")
    time.sleep(0.1)
print("task:", task["status"], task["result"], task["completion_t"] is not None)

while True:
    try:
        print("result:", gcc.get_result(task_id))
        break
    except TaskPending:
        time.sleep(0.1)

gcc.delete_function(func_uuid)
print("deleted")
