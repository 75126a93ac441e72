"""What a sink publishes, whatever the payload format: the seam between the MQTT session (the
forwarder: connection, acknowledgements, delivery marks in the buffer) and the encoders
(``json`` segments as stored, ``flat`` one value per name, ``sparkplug_b``).

A committed segment is the unit of delivery: an encoder turns it into one or more messages,
and the forwarder marks the segment delivered only when the broker acknowledged every one of
them. Whatever the format, the buffer keeps the segment bytes the integrity chain hashes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.buffer.rows import StoredSegment
from agent.core.records import now_ns


@dataclass(frozen=True, slots=True)
class Message:
    """One MQTT publish."""

    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = False


@dataclass(slots=True)
class Reaction:
    """What an incoming message (a command, a host's state) asks of the session."""

    publish: list[Message] = field(default_factory=list)
    """Messages to send now, before any further segment (e.g. a rebirth's NBIRTH and DBIRTHs)."""
    reconnect: bool = False
    """End this MQTT session and start a new one (e.g. the primary host went offline)."""


@dataclass(frozen=True)
class AgentIdentity:
    """Who is publishing: carried in the retained status, so a consumer can tell which agent build
    and configuration produced the data it receives."""

    agent_id: str
    version: str
    config_hash: str
    site: str = ""
    started_ns: int = field(default_factory=now_ns)
    """When the agent started: the first half of every connection's session."""


class Encoder:
    """Turns committed segments into messages, and owns what a payload format adds to the MQTT
    session (a will, births, subscriptions, commands). The base is the session-less behaviour;
    formats override what they need. Every method runs on the event loop, except
    :meth:`on_connect` of an encoder that lets paho re-send (see there)."""

    name: str = ""
    resend_after_reconnect: bool = True
    """Whether messages left unacknowledged by a lost connection may be re-sent as they are in the
    next session (MQTT's own re-send). ``False`` for formats whose messages carry per-session
    sequence numbers: their segments are encoded again, in the new session, on a new paho client
    (an old session's messages are never sent after the new session's first ones)."""
    messages_per_segment: int | None = None
    """How many messages every segment becomes, when that is fixed: paho's in-flight limit is then
    exactly the forwarder's window. ``None``: paho gets no limit of its own (the forwarder's window,
    counted in segments, bounds what is in flight), so it never holds a message back in its queue
    behind a re-send."""

    def will(self, session: str) -> Message | None:
        """The last will of the next connection attempt (``session`` names it); called once per
        attempt, just before it."""
        return None

    def subscriptions(self) -> list[str]:
        """Topic filters to subscribe to once connected (QoS 1)."""
        return []

    def on_connect(self, session: str) -> list[Message]:
        """What goes out first on a new connection, before any segment. With
        ``resend_after_reconnect`` it runs in paho's connect callback (on the event loop): the
        only place that comes before paho's re-sends of the previous session. The loop publishes no
        segment of the new connection before it returned, but it may still be encoding one into the
        old session's queue: such an encoder keeps no state that ``encode`` changes."""
        return []

    def on_disconnect(self) -> None:
        """The connection ended (lost, refused or closed): whatever the session knew is void."""

    def ready(self) -> bool:
        """Whether segments may be published now (False: hold them in the buffer)."""
        return True

    def on_message(self, topic: str, payload: bytes) -> Reaction:
        """A message on a subscribed topic."""
        return Reaction()

    def encode(self, seg: StoredSegment, *, historical: bool) -> list[Message]:
        """The messages that carry a segment. ``historical``: the segment was committed before this
        session's connection (it waited in the buffer through an outage)."""
        raise NotImplementedError

    def on_clean_stop(self) -> list[Message]:
        """What goes out on a clean stop, before the disconnect (the broker sends no will then)."""
        return []

    def on_identity(self, identity: AgentIdentity) -> list[Message]:
        """A reload changed the agent's identity (its configuration hash) and kept the connection:
        what says so at once."""
        return []

    def stats(self) -> dict[str, Any]:
        """Counters of the format's own (births, refused commands...), for ``status``."""
        return {}


@dataclass(frozen=True, slots=True)
class TagInfo:
    """What a sink may declare about a tag before any value is sent (a Sparkplug DBIRTH, a UNS
    topic per tag): taken from the device's profile when the agent starts."""

    name: str
    unit: str | None = None
    description: str = ""
    kind: str = "float"
    """``float``, ``int``, ``bool`` or ``string``: the value type the tag's readings have."""


Catalog = dict[str, list[TagInfo]]
"""Device id -> its tags, in profile order (which also fixes Sparkplug aliases)."""
