"""The Celery application both sides load: ``celery -A bench.celery_app worker`` and the benchmark.

The worker reads its private queue name and Redis key prefix from the
environment (``FCBENCH_CELERY_QUEUE``, ``FCBENCH_CELERY_KEYPREFIX``); the
benchmark builds the same app with ``make_app``. Remote control, events and
gossip are off, so Celery makes no queues or exchanges beyond the run's own.
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

from bench.noop import noop
from bench.services import CELERY_AMQP_URL
from harness.services import REDIS_URL

TASK_NAME = "bench.noop"


def make_app(queue: str, keyprefix: str) -> Celery:
    """A Celery app on the run's RabbitMQ queue with results in Redis under ``keyprefix``."""
    app = Celery("fcbench", broker=CELERY_AMQP_URL, backend=REDIS_URL)
    app.conf.update(
        task_default_queue=queue,
        task_default_exchange=queue,
        task_default_routing_key=queue,
        result_backend_transport_options={"global_keyprefix": keyprefix},
        result_expires=3600,
        worker_enable_remote_control=False,
        worker_send_task_events=False,
        task_send_sent_event=False,
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
    )
    app.task(name=TASK_NAME)(noop)
    return app


def task(app: Celery) -> Any:
    return app.tasks[TASK_NAME]


app = make_app(os.environ.get("FCBENCH_CELERY_QUEUE", "fcbench-unset.celery"),
               os.environ.get("FCBENCH_CELERY_KEYPREFIX", "fcbench-unset:celery:"))
