"""A parameter sweep: one task per point of a grid, results in submission order.

The Executor is given the arguments Globus Compute programs commonly pass; farcall honours
label and batch_size, and accepts amqp_port and the API burst settings.
"""

import itertools
import os

from globus_compute_sdk import Executor


def simulate(temperature: float, pressure: float) -> float:
    # a stand-in for a model run: an ideal-gas density, rounded
    return round(pressure / (0.287 * temperature), 4)


ep_id = os.environ["ENDPOINT_ID"]  # "<your_endpoint_id>"
temperatures = [250.0, 275.0, 300.0]
pressures = [90.0, 100.0]

with Executor(
    endpoint_id=ep_id,
    label="density-sweep",
    batch_size=4,
    amqp_port=443,
    api_burst_limit=4,
    api_burst_window_s=16,
) as gce:
    grid = list(itertools.product(temperatures, pressures))
    futures = [gce.submit(simulate, t, p) for t, p in grid]
    print(f"submitted {len(futures)} tasks from {gce.label}")
    for (t, p), future in zip(grid, futures, strict=True):
        print(f"T={t:.0f} P={p:.0f} -> {future.result()}")
