"""``python -m bench.serialization_coverage``: what each pickling library carries from a notebook.

Every case of :mod:`harness.serialization_cases` is defined in one subprocess's ``__main__`` and
loaded in another that lacks the definitions (a worker's situation), once per library setting:
the standard pickle, dill (default, ``recurse=True``, ``byref=True``), cloudpickle, and farcall's
own choice (``farcall.serialize.dumps`` for data, ``serialize_function`` for functions). Prints a
Markdown coverage table, then dumps+loads times of a plain-data case and a ``__main__``-heavy one.
``--path-first DIR`` measures another version of a library (``pip install --target DIR dill==0.3.9``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from collections.abc import Sequence

from harness.serialization_cases import CASES, LIBRARIES, SPEED_CASES, Outcome, applies, round_trip

SPEED_LIBRARIES = ("pickle", "dill", "dill recurse=True", "cloudpickle", "farcall")


def cell(outcome: Outcome | None, show_code: bool) -> str:
    """One table cell: pass (with farcall's strategy code), in band, or the error's type."""
    if outcome is None:
        return "–"
    code = f" `{outcome.code}`" if show_code and outcome.code else ""
    if outcome.status == "pass":
        return "✓" + code
    if outcome.status == "in band":
        return "✓ in band" + code
    kind = outcome.error.split(":")[1].strip() if outcome.error.count(":") >= 2 else "wrong value"
    return f"✗ {kind}"


def coverage_table(results: dict[str, dict[str, Outcome]]) -> str:
    libraries = list(results)
    lines = ["| case | " + " | ".join(libraries) + " |", "|---" * (len(libraries) + 1) + "|"]
    for case in CASES:
        cells = [cell(results[lib].get(case.name), lib.startswith("farcall")) for lib in libraries]
        lines.append(f"| {case.title} | " + " | ".join(cells) + " |")
    totals = []
    for lib in libraries:
        ran = [case for case in CASES if applies(lib, case)]
        passed = sum(results[lib][case.name].status == "pass" for case in ran)
        totals.append(f"**{passed}/{len(ran)}**")
    lines.append("| passed (in band: loaded, buffers copied; not counted) | " + " | ".join(totals) + " |")
    return "\n".join(lines)


def speed_table(results: dict[str, dict[str, Outcome]]) -> str:
    lines = ["| library | " + " | ".join(case.title for case in SPEED_CASES) + " |",
             "|---" * (len(SPEED_CASES) + 1) + "|"]
    for lib, outcomes in results.items():
        cells = []
        for case in SPEED_CASES:
            o = outcomes[case.name]
            cells.append(f"{1e3 * o.dump_s:.1f} + {1e3 * o.load_s:.1f} ms" if o.status == "pass"
                         else cell(o, False))
        lines.append(f"| {lib} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def failures(results: dict[str, dict[str, Outcome]]) -> list[str]:
    return [f"- {lib} / {name}: {o.error}" for lib, outcomes in results.items()
            for name, o in outcomes.items() if o.status == "FAIL"]


def child_versions(path_first: Sequence[str]) -> str:
    """The dill and cloudpickle versions the measuring subprocesses import."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path_first)}
    return subprocess.run(
        [sys.executable, "-c", "import dill, cloudpickle; "
         "print(f'dill {dill.__version__}, cloudpickle {cloudpickle.__version__}')"],
        env=env, capture_output=True, text=True, check=True).stdout.strip()


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.serialization_coverage",
                                description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--path-first", action="append", default=[], metavar="DIR",
                   help="a directory the subprocesses import from first (another library version)")
    p.add_argument("--repeat", type=int, default=7, help="timed repetitions (best is shown)")
    p.add_argument("--errors", action="store_true", help="list every failure's error message")
    args = p.parse_args(argv)
    print(f"Python {sys.version.split()[0]}, {child_versions(args.path_first)}\n")
    coverage = {lib: round_trip(lib, CASES, path_first=args.path_first) for lib in LIBRARIES}
    print(coverage_table(coverage) + "\n")
    speed = {lib: round_trip(lib, SPEED_CASES, repeat=args.repeat, path_first=args.path_first)
             for lib in SPEED_LIBRARIES}
    print("dumps + loads, best of", args.repeat, "\n")
    print(speed_table(speed))
    if args.errors:
        print("\n" + "\n".join(failures(coverage)))


if __name__ == "__main__":
    main()
