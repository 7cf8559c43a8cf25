"""farcall's benchmark suite: farcall and its peers (Celery, Parsl, Dask) on the same no-op task.

Run ``python -m bench --help``. It is not part of the test suite: it starts real
processes on loopback, measures, and removes everything it made.
"""
