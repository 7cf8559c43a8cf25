"""A batch through the Client: register once, add many calls, submit them in one request, then
poll get_batch_result until nothing is pending."""

import os
import time

from globus_compute_sdk import Client


def expensive_task(task_arg: int, scale: int = 1) -> int:
    return task_arg * task_arg * scale


ep_id = os.environ["ENDPOINT_ID"]
gcc = Client()

fn_id = gcc.register_function(expensive_task)
batch = gcc.create_batch(create_websocket_queue=True)
for task_i in range(10):
    batch.add(fn_id, args=(task_i,), kwargs={"scale": 3})
r = gcc.batch_run(endpoint_id=ep_id, batch=batch)
print("answer keys:", sorted(k for k in r if k in ("endpoint_id", "request_id", "task_group_id", "tasks")))
task_ids = r["tasks"][fn_id]
print(f"submitted {len(task_ids)} tasks")

deadline = time.monotonic() + 60
while True:
    results = gcc.get_batch_result(task_ids)
    if not any(res["pending"] for res in results.values()):
        break
    if time.monotonic() > deadline:
        raise SystemExit("the batch did not finish in 60 s")
    time.sleep(0.2)

print("statuses:", sorted({res["status"] for res in results.values()}))
print("results:", [results[t]["result"] for t in task_ids])
