"""MPI hello: an MPIFunction on an endpoint whose engine is an MPIEngine, two ranks on one node."""

import os

from globus_compute_sdk import Executor, MPIFunction

mpi_ep_id = os.environ["MPI_ENDPOINT_ID"]

mpi_func = MPIFunction("sh -c 'echo rank $PMI_RANK of $PMI_SIZE'")
with Executor(endpoint_id=mpi_ep_id) as ex:
    ex.resource_specification = {"num_nodes": 1, "ranks_per_node": 2}
    result = ex.submit(mpi_func).result()

print("returncode:", result.returncode)
print("launched with:", result.cmd.split()[0])
for line in sorted(result.stdout.splitlines()):
    print(line)
