"""farcall's wire protocol: every message that crosses a process boundary, one typed model each.

One module per conversation, so a reader finds a frame by who talks:

| module | conversation |
|---|---|
| :mod:`.common` | what all share: ``PROTOCOL_VERSION``, ``TaskState``, ``Versions``, ids, limits |
| :mod:`.rest` | the REST API's request and answer bodies (``/v1/...``), errors, the data plane |
| :mod:`.timers` | timers' REST bodies |
| :mod:`.channel` | broker <-> endpoint WebSocket, and the task batches queued in RabbitMQ |
| :mod:`.stream` | broker <-> SDK result stream (results pushed, batches submitted) |
| :mod:`.control` | broker replica <-> replica on pub/sub: endpoint control, token revocations |

Nobody assembles these frames by hand. The format of each is pinned by saved sample frames in
``tests/protocol/frames`` that today's code must read and write back unchanged.
"""
