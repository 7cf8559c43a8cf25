"""Reading the messages in an endpoint's queue (each a submitted batch, ``dump_task_batch``),
for the channel session that sends them on and for endpoint deletion that fails them.

Tasks wait in durable queues across broker upgrades, so a reader must not lose a batch to
one task it cannot read: that task fails alone, with an error that says so.
"""

from __future__ import annotations

import json
import logging

from pydantic import ValidationError

from farcall.protocol.channel import TaskMessage, parse_task_batch

log = logging.getLogger(__name__)


def read_queued(body: bytes) -> tuple[list[TaskMessage], dict[str, str]]:
    """The tasks of a queued message, and ``task id -> error`` for any that cannot be read.

    The fast path parses the whole batch; if that fails, each element is read alone so
    one bad task fails alone instead of taking its batch with it.
    """
    try:
        return parse_task_batch(body), {}
    except ValidationError:
        pass
    try:
        items = json.loads(body)
    except (ValueError, RecursionError) as e:
        log.error("dropping a queued message that is not JSON (%d bytes): %.200s", len(body), e)
        return [], {}
    good: list[TaskMessage] = []
    bad: dict[str, str] = {}
    for item in items if isinstance(items, list) else [items]:
        try:
            good.append(TaskMessage.model_validate(item))
        except (ValidationError, RecursionError) as e:
            task_id = item.get("task_id") if isinstance(item, dict) else None
            if isinstance(task_id, str):
                bad[task_id] = f"the broker could not read this task ({str(e)[:300]}); submit it again"
            else:
                log.error("dropping a queued element that is not a task: %.200r", item)
    return good, bad


def queued_task_ids(bodies: list[bytes]) -> list[str]:
    """The task ids in queued messages, readable tasks or not."""
    ids: list[str] = []
    for body in bodies:
        tasks, unreadable = read_queued(body)
        ids += [t.task_id for t in tasks] + list(unreadable)
    return ids
