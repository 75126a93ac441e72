"""The integrity chain: how a committed segment becomes the exact bytes that are stored, forwarded
and verified (docs/integrity.md specifies it for a third party).

A *segment* is what one MQTT message carries: the records of one stream committed together. Its
payload is built once, at commit, and never re-encoded: the buffer stores these bytes, the forwarder
publishes them, and a verifier downstream hashes what it received. So the hash that links a segment
to the previous one of its stream covers exactly what left the gateway, with no canonicalisation
that a third party would have to reproduce: ``hash = SHA-256(payload bytes)``, and the next segment
of the stream names it as ``chain.prev``. With a per-agent key, the payload also ends with an
HMAC-SHA256 over the same payload without its ``mac`` member, so a forger without the key cannot
rebuild a consistent chain.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from agent.core.records import dumps

GENESIS = "0" * 64
"""``chain.prev`` of the first segment of a stream (``chain.i`` 0)."""

Kind = Literal["data", "events", "audit"]

SCHEMAS: Mapping[str, str] = {
    "data": "cleanroom-edge/data/2",
    "events": "cleanroom-edge/events/2",
    "audit": "cleanroom-edge/events/2",
}
"""Payload schema per stream kind; an audit segment is an events document on its own topic."""

_ITEMS = {"data": "blocks", "events": "events", "audit": "events"}

MAC_KEY_MIN_BYTES = 32

_MAC_TAIL = re.compile(rb',"mac":"([0-9a-f]{64})"\}\Z')


class ChainFormatError(ValueError):
    """A payload that is not a well-formed segment (not JSON, no ``chain`` member, wrong types)."""


def stream_of(device: str, kind: Kind) -> str:
    """The stream a record belongs to, which is also its topic below the prefix: ``{device}/data``,
    ``{device}/events``, and ``agent/audit`` for every audit record (whatever device it concerns)."""
    if kind == "audit":
        return "agent/audit"
    return f"{device}/{kind}"


def digest(payload: bytes) -> str:
    """The segment's hash: SHA-256 of the payload bytes as published, lower-case hex."""
    return hashlib.sha256(payload).hexdigest()


def mac_of(unsigned: bytes, key: bytes) -> str:
    """HMAC-SHA256 of a payload without its ``mac`` member, lower-case hex."""
    return hmac.new(key, unsigned, hashlib.sha256).hexdigest()


def build_payload(
    *,
    kind: Kind,
    agent: str,
    device: str,
    stream: str,
    i: int,
    prev: str,
    source: Mapping[str, Any] | None,
    clock: Mapping[str, Any] | None,
    bodies: Sequence[str],
    key: bytes | None = None,
) -> bytes:
    """The payload of one segment. ``bodies`` are the canonical JSON texts of its records
    (``Block.body()`` / ``Event.body()``), spliced unchanged. Member order is fixed; ``mac``, when
    there is a key, is always the last member."""
    text = (
        f'{{"schema":{dumps(SCHEMAS[kind])},"agent":{dumps(agent)},"device":{dumps(device)},'
        f'"source":{dumps(source or {})},"clock":{dumps(clock or {})},'
        f'"chain":{{"stream":{dumps(stream)},"i":{i},"prev":"{prev}"}},'
        f'"{_ITEMS[kind]}":[{",".join(bodies)}]}}'
    )
    payload = text.encode()
    return payload if key is None else sign(payload, key)


def sign(document: bytes, key: bytes) -> bytes:
    """A JSON object's bytes with the ``mac`` member appended last: what segments and, with a key,
    the agent's status messages carry (a status message is not chained, but an unsigned one could
    be forged to pass off a replay as a reconnect)."""
    return document[:-1] + b',"mac":"' + mac_of(document, key).encode() + b'"}'


def key_id(key: bytes) -> str:
    """A short public name of a key (16 hex digits of a domain-separated SHA-256): stored and audited
    so a key change is visible, without revealing anything that helps guess the key."""
    return hashlib.sha256(b"cleanroom-edge/key-id\n" + key).hexdigest()[:16]


def split_mac(payload: bytes) -> tuple[bytes, str | None]:
    """The payload without its ``mac`` member (what the MAC covers), and the MAC (None: unsigned)."""
    m = _MAC_TAIL.search(payload)
    if m is None:
        return payload, None
    return payload[: m.start()] + b"}", m.group(1).decode()


def mac_ok(payload: bytes, key: bytes) -> bool:
    """Whether the payload carries a MAC and it is the key's."""
    unsigned, mac = split_mac(payload)
    return mac is not None and hmac.compare_digest(mac, mac_of(unsigned, key))


@dataclass(frozen=True, slots=True)
class Link:
    """Where a segment sits in its stream."""

    stream: str
    i: int
    prev: str


@dataclass(frozen=True, slots=True)
class Segment:
    """A parsed segment payload: its place in the chain, its hash, and its document."""

    link: Link
    hash: str
    doc: dict[str, Any]
    mac: str | None

    @property
    def items(self) -> list[dict[str, Any]]:
        """Its blocks (data) or events."""
        key = "blocks" if "blocks" in self.doc else "events"
        items = self.doc.get(key)
        return items if isinstance(items, list) else []


_HEX64 = re.compile(r"[0-9a-f]{64}\Z")


def parse(payload: bytes) -> Segment:
    """Parse and check the shape of a segment payload; raises :class:`ChainFormatError`."""
    try:
        doc = json.loads(payload)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ChainFormatError(f"not JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ChainFormatError("not a JSON object")
    chain = doc.get("chain")
    if not isinstance(chain, dict):
        raise ChainFormatError("no chain member")
    stream, i, prev = chain.get("stream"), chain.get("i"), chain.get("prev")
    if not isinstance(stream, str) or not stream:
        raise ChainFormatError("chain.stream is not a string")
    if isinstance(i, bool) or not isinstance(i, int) or i < 0:
        raise ChainFormatError("chain.i is not a non-negative integer")
    if not isinstance(prev, str) or not _HEX64.match(prev):
        raise ChainFormatError("chain.prev is not 64 lower-case hex digits")
    _, mac = split_mac(payload)
    return Segment(Link(stream, i, prev), digest(payload), doc, mac)


def read_key_file(path: str | Path) -> bytes:
    """:func:`read_key` of a file (``--key`` of the offline tools); a file that cannot be read or a
    short key is a ValueError naming the file, never quoting the key."""
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise ValueError(f"{path}: {exc.strerror or exc}") from None
    try:
        return read_key(raw)
    except ValueError as exc:
        raise ValueError(f"{path}: {exc}") from None


def read_key(raw: bytes) -> bytes:
    """The HMAC key from a key file's bytes: trailing whitespace (a final newline) is not part of
    it. Raises ValueError when it is shorter than :data:`MAC_KEY_MIN_BYTES` (the message never
    quotes the key)."""
    key = raw.rstrip()
    if len(key) < MAC_KEY_MIN_BYTES:
        raise ValueError(f"the HMAC key must be at least {MAC_KEY_MIN_BYTES} bytes, it has {len(key)}")
    return key
