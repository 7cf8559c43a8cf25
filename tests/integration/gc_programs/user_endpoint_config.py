"""A multi-user endpoint: the tasks run on the user endpoint made for these configuration values."""

import os

from globus_compute_sdk import Client, Executor


def greet(name: str) -> str:
    return f"hello, {name}"


mep_id = os.environ["MULTI_USER_ENDPOINT_ID"]
gcc = Client()

with Executor(endpoint_id=mep_id, client=gcc) as gce:
    gce.user_endpoint_config = {"account": "abc123", "nodes": 2}
    future = gce.submit(greet, "researcher")
    print(future.result())

where = gcc.get_task(future.task_id)["endpoint_id"]
print("ran on a user endpoint of the site:", where != mep_id)
print("config kept:", gce.user_endpoint_config)
