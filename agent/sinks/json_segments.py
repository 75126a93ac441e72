"""The ``json`` payload: each committed segment published byte for byte on ``{prefix}/{stream}``,
and the agent's retained status.

A segment's payload was built once, at commit, and is the unit the integrity chain hashes
(agent/core/chain.py): it is published unchanged, one segment per message, never merged or
re-encoded, so what a verifier downstream hashes is what was stored. Messages left
unacknowledged by a lost connection are re-sent by paho in the next session.

Each connection has a *session* (``{agent start ns}.{connection attempt}``) that its retained
``online`` status and its last will carry; ``online`` is published before paho re-sends
anything, so a re-sent duplicate always follows the ``online`` of a newer session in any
capture, which is how a verifier tells a re-send from a replay. With a key, every status
message (``online``, the will, the clean-stop ``offline``) is signed like a segment: a forged
``online`` could otherwise pass off a replay as a re-send.
"""

from __future__ import annotations

from typing import Any, Literal

from agent.buffer.rows import StoredSegment
from agent.core import chain
from agent.core.records import AGENT_DEVICE, dumps, now_ns
from agent.sinks.payload import AgentIdentity, Encoder, Message

STATUS_SCHEMA = "cleanroom-edge/status/2"


def status_topic(prefix: str, agent_id: str) -> str:
    """The retained status topic: it names the agent, so gateways sharing a broker never overwrite
    each other's retained status."""
    return f"{prefix}/{AGENT_DEVICE}/status/{agent_id}"


class JsonSegmentsEncoder(Encoder):
    """Segments as stored; the retained, optionally signed, status of each session."""

    name = "json"
    resend_after_reconnect = True
    messages_per_segment = 1

    def __init__(self, prefix: str, identity: AgentIdentity, key: bytes | None) -> None:
        self.prefix = prefix
        self.identity = identity
        self.status_topic = status_topic(prefix, identity.agent_id)
        self._key = key
        """The key the buffer signs segments with: the status messages are signed with it too."""
        self._session = ""

    def _status(self, status: Literal["online", "offline"], **extra: Any) -> Message:
        doc = {"schema": STATUS_SCHEMA, "status": status, "agent": self.identity.agent_id,
               "session": self._session, **extra}  # fmt: skip
        text = dumps(doc).encode()
        return Message(
            self.status_topic, text if self._key is None else chain.sign(text, self._key), retain=True
        )

    def _online(self) -> Message:
        identity = self.identity
        return self._status("online", version=identity.version, config_hash=identity.config_hash,
                            site=identity.site, ts=now_ns())  # fmt: skip

    def will(self, session: str) -> Message:
        """Published by the broker if the connection dies: it names the session that ended."""
        self._session = session
        return self._status("offline", reason="connection_lost")

    def on_connect(self, session: str) -> list[Message]:
        self._session = session
        return [self._online()]

    def encode(self, seg: StoredSegment, *, historical: bool) -> list[Message]:
        return [Message(f"{self.prefix}/{seg.stream}", seg.payload)]

    def on_clean_stop(self) -> list[Message]:
        return [self._status("offline", reason="clean_stop", ts=now_ns())]

    def on_identity(self, identity: AgentIdentity) -> list[Message]:
        """In the current session, not a newer one: a re-publish explains no re-send."""
        self.identity = identity
        return [self._online()]
