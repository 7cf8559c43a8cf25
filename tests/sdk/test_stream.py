"""TaskGroupStream: batches submitted and results pushed on one WebSocket, and a refused stream."""

from __future__ import annotations

import threading

import pytest

from farcall import Client
from farcall.client import SUBMITTER
from farcall.errors import FarcallError, NotFound
from farcall.outcome import outcome_of
from farcall.protocol.rest import BatchSubmission, TaskSpec
from farcall.protocol.stream import TaskResult
from farcall.serialize import pack_args
from farcall.stream import TaskGroupStream
from tests.sdk.helpers import Stack


def _batch(endpoint_id: str, function_id: str, group: str, *values: int) -> BatchSubmission:
    tasks = [TaskSpec(function_id=function_id, args=pack_args((v,), {})) for v in values]
    return BatchSubmission(endpoint_id=endpoint_id, tasks=tasks, task_group_id=group, submitter=SUBMITTER)


def test_a_batch_submitted_on_the_stream_has_its_results_pushed(stack: Stack, client: Client) -> None:
    def negate(x: int) -> int:
        return -x

    function_id = client.register_function(negate)
    group = client.create_task_group()
    pushed: list[TaskResult] = []
    all_in = threading.Event()

    def on_results(results: list[TaskResult]) -> None:
        pushed.extend(results)
        if len(pushed) == 3:
            all_in.set()

    def on_refused(error: FarcallError) -> None:
        pytest.fail(f"the stream was refused: {error}")

    stream = TaskGroupStream(client, group, on_results=on_results, poll=lambda: None,
                             on_refused=on_refused, done=all_in.is_set)
    assert stream.submit(_batch(stack.endpoint_id, function_id, group, 1)) is None  # not started
    stream.start()
    try:
        assert stream.wait_connected(10)
        with pytest.raises(NotFound):
            stream.submit(_batch("00000000-0000-0000-0000-000000000000", function_id, group, 4))
        answer = stream.submit(_batch(stack.endpoint_id, function_id, group, 1, 2, 3))
        assert answer is not None and answer.task_group_id == group and len(answer.task_ids) == 3
        assert all_in.wait(30)
        values = {r.task_id: outcome_of(r).unwrap() for r in pushed}
        assert [values[t] for t in answer.task_ids] == [-1, -2, -3]
    finally:
        stream.close()


def test_a_refused_stream_reports_once_and_ends(client: Client) -> None:
    refusals: list[FarcallError] = []
    refused = threading.Event()

    def on_refused(error: FarcallError) -> None:
        refusals.append(error)
        refused.set()

    stream = TaskGroupStream(client, "no-such-group", on_results=lambda results: None,
                             poll=lambda: None, on_refused=on_refused, done=lambda: False)
    stream.start()
    try:
        assert refused.wait(10)
        assert not stream.wait_connected(0)
    finally:
        stream.close()
    assert len(refusals) == 1
    assert "refused the result stream of task group no-such-group (404)" in str(refusals[0])
    assert "Client.get_batch_result" in str(refusals[0])
