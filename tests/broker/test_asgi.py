"""The broker's generic ASGI pieces: what the access log may show."""

from __future__ import annotations

import logging

from farcall.broker.asgi import RedactBlobIds


def test_blob_ids_never_reach_the_access_log() -> None:
    blob_id = "q1Vw8cB6lO2f9xY3s7K0pZr4mN5tJ8hD"
    record = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1,
                               '%s - "%s %s HTTP/%s" %d',
                               ("127.0.0.1:5", "GET", f"/v1/blobs/{blob_id}", "1.1", 200), None)
    assert RedactBlobIds().filter(record)
    assert blob_id not in record.getMessage() and "/v1/blobs/..." in record.getMessage()
    other = logging.LogRecord("uvicorn.access", logging.INFO, __file__, 1, '%s - "%s %s"',
                              ("127.0.0.1:5", "GET", "/v1/tasks/abc"), None)
    RedactBlobIds().filter(other)
    assert other.getMessage().endswith("/v1/tasks/abc\"")
