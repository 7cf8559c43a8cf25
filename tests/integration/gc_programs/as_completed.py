"""Results as they arrive: a map-like loop over futures with concurrent.futures.as_completed."""

import concurrent.futures
import os

from globus_compute_sdk import Executor


def generate_collatz_sequence(n: int, sequence_limit: int = 10_000) -> list[int]:
    seq = [n]
    while n != 1 and len(seq) < sequence_limit:
        n = 3 * n + 1 if n % 2 else n // 2
        seq.append(n)
    return seq


endpoint_id = os.environ["ENDPOINT_ID"]

with Executor(endpoint_id=endpoint_id) as gce:
    futs = {gce.submit(generate_collatz_sequence, n): n for n in range(1, 21)}
    lengths = {}
    for fut in concurrent.futures.as_completed(futs):
        seq = fut.result()
        lengths[futs[fut]] = len(seq)
        if seq[-1] != 1:
            print("Possible conjecture disproving integer:", seq[0])
    print("task group:", "set" if gce.task_group_id else "missing")

longest = max(lengths, key=lambda n: lengths[n])
print(f"received {len(lengths)} sequences; the longest starts at {longest} ({lengths[longest]} steps)")
