"""Shell commands: a ShellFunction formatted per call, one stopped at its walltime, one returning
a dict, and one whose output is kept in files on the endpoint."""

import os

from globus_compute_sdk import Executor, ShellFunction, ShellResult

ep_id = os.environ["ENDPOINT_ID"]
out_dir = os.environ["OUTPUT_DIR"]  # a directory the endpoint can write

bf = ShellFunction("echo '{message}'")
with Executor(endpoint_id=ep_id) as ex:
    for msg in ("hello", "hola", "bonjour"):
        shell_result = ex.submit(bf, message=msg).result()
        assert isinstance(shell_result, ShellResult)
        print(shell_result.stdout, end="")

    slow = ShellFunction("sleep 20", walltime=1)
    print("walltime returncode:", ex.submit(slow).result().returncode)

    func = ShellFunction("echo '{message}'; exit 3", return_dict=True)
    res = ex.submit(func, message="as a dict").result()
    print("dict:", isinstance(res, dict), res["returncode"], res["stdout"].strip(), res["exception_name"])

    logged = ShellFunction(
        "seq 1 {n}",
        stdout=os.path.join(out_dir, "seq.out"),
        stderr=os.path.join(out_dir, "seq.err"),
        snippet_lines=3,
    )
    tail = ex.submit(logged, n=50).result()
    print("snippet:", tail.stdout.split())

with open(os.path.join(out_dir, "seq.out")) as f:
    print("file lines:", len(f.read().split()))
