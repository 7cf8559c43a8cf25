"""``farcall``: the SDK's command line. ``farcall demo`` shows the whole system on this machine."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from farcall.version import __version__


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="farcall", description="farcall SDK command line")
    parser.add_argument("--version", action="version", version=f"farcall {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="run a parameter sweep on an embedded broker and a local endpoint"
    )
    demo.add_argument("--tasks", type=int, default=200, help="number of tasks in the sweep")
    demo.add_argument("--workers", type=int, default=2, help="endpoint worker processes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if args.tasks < 1 or args.workers < 1:
        parser.error("--tasks and --workers must be at least 1")
    return demo_main(args.tasks, args.workers)


def estimate_pi(samples: int, seed: int) -> float:
    """One point of the sweep: a Monte Carlo estimate of pi (defined here, shipped by value)."""
    import random

    rng = random.Random(seed)
    inside = sum(1 for _ in range(samples) if rng.random() ** 2 + rng.random() ** 2 <= 1.0)
    return 4.0 * inside / samples


def demo_main(n_tasks: int, workers: int) -> int:
    try:
        from farcall.broker.embedded import EmbeddedBroker
        from farcall.endpoint.embedded import EmbeddedEndpoint
    except ImportError as e:
        print(f"the demo runs a broker and an endpoint here and needs them installed ({e}): "
              "pip install 'farcall[all]'", file=sys.stderr)
        return 1
    from farcall import Client, Executor

    t0 = time.perf_counter()
    with EmbeddedBroker() as broker:
        token = broker.create_user("demo")
        with EmbeddedEndpoint(broker.url, token, name="laptop", max_workers=workers) as ep:
            ready = time.perf_counter()
            print(f"broker on {broker.url} (embedded store and queue), endpoint {ep.endpoint_id} "
                  f"with {workers} worker processes, up in {ready - t0:.2f} s")
            client = Client(broker_url=broker.url, token=token)
            sizes = [1_000 * 2**k for k in range(5)]
            params = [(sizes[i % len(sizes)], i) for i in range(n_tasks)]
            remote_error = "(none raised)"
            start = time.perf_counter()
            with Executor(endpoint_id=ep.endpoint_id, client=client) as ex:
                estimates = list(ex.map(estimate_pi, *zip(*params, strict=True)))
                try:
                    ex.submit(estimate_pi, 0, 1).result()
                except ZeroDivisionError as e:
                    remote_error = f"{type(e).__name__}: {e}"
            took = time.perf_counter() - start
            print(f"\n{'samples':>8}  {'tasks':>5}  {'mean estimate of pi':>20}")
            for size in sizes:
                values = [v for (s, _), v in zip(params, estimates, strict=True) if s == size]
                if values:
                    print(f"{size:>8}  {len(values):>5}  {sum(values) / len(values):>20.5f}")
            print(f"\n{n_tasks} tasks in {took:.2f} s ({n_tasks / took:.0f} tasks/s end to end)")
            print(f"a remote error comes back as itself: {remote_error}")
            client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
