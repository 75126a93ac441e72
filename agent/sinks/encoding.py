"""Payload encoders: how committed rows become MQTT message payloads.

The forwarder decides *what* to send and when (order, batching, acknowledgement); an
encoder decides only the bytes. One small interface keeps that seam clean, so another
payload format (Sparkplug B) is a new encoder, not a change to the delivery logic.
See docs/payloads.md for the contract the JSON encoder implements.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from agent.buffer.rows import StoredRecord
from agent.core.records import dumps

DATA_SCHEMA = "cleanroom-edge/data/1"
EVENTS_SCHEMA = "cleanroom-edge/events/1"
STATUS_SCHEMA = "cleanroom-edge/status/1"


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT message: published on ``{prefix}/{device}/{suffix}``; ``records`` are the rows it
    carries, marked delivered when its PUBACK arrives."""

    suffix: str
    payload: bytes
    records: Sequence[StoredRecord]


class PayloadEncoder(Protocol):
    def encode(self, device: str, kind: str, records: Sequence[StoredRecord]) -> list[Message]:
        """Messages carrying ``records`` (all of ``device`` and ``kind``, in id order), each record in
        exactly one message, messages in record order."""
        ...


class JsonEncoder:
    """Splices the stored canonical bodies into one JSON document: no record is re-encoded, so the
    forwarded bytes of each block are exactly the committed ones."""

    def __init__(self, agent_id: str) -> None:
        self._agent = dumps(agent_id)

    def encode(self, device: str, kind: str, records: Sequence[StoredRecord]) -> list[Message]:
        if kind == "data":
            schema, key, suffix = DATA_SCHEMA, "blocks", "data"
        else:
            schema, key, suffix = EVENTS_SCHEMA, "events", "events"
        body = ",".join([r.body for r in records])
        text = f'{{"schema":"{schema}","agent":{self._agent},"device":{dumps(device)},"{key}":[{body}]}}'
        return [Message(suffix, text.encode(), records)]
