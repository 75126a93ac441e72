"""The ``flat`` payload: one value per name, for historians and a Unified Namespace.

A historian (InfluxDB through Telegraf's ``json_v2`` parser, TimescaleDB through plain SQL) or
a UNS consumer wants ``{"<tag>": value}`` per device sample, not the stored segment's parallel
columns. So each block of a committed segment becomes one message, on a topic that can place
the device in an ISA-95 path (``{site}/{area}/{line}/{device}``); each event becomes one
message of its own. What the message cannot carry it points to: ``segment`` names the chained
segment (stream, ``i``, hash) the values were committed in, which keeps the raw values, units
and attribution, so a flat message is always traceable to the record the integrity chain
protects. Nothing is dropped on the way: a bad reading's value is ``null`` in ``values`` (so a
historian never files it as a measurement), and what the device sent, if anything, stays in
its ``quality`` entry.

docs/payloads.md ("Flat JSON and UNS") is the contract; agent/bundled/schemas/flat.schema.json
its machine-checkable form.
"""

from __future__ import annotations

import string
from collections.abc import Iterable, Mapping
from typing import Any

from pydantic import Field, model_validator

from agent.buffer.rows import StoredSegment
from agent.core import chain
from agent.core.records import AGENT_DEVICE, dumps
from agent.sinks.payload import Catalog, Encoder, Message
from cleanroom_common.fields import Strict

DATA_PLACEHOLDERS = ("prefix", "site", "area", "line", "device", "group")
"""What ``flat.topic`` may name."""
EVENT_PLACEHOLDERS = ("prefix", "site", "area", "line", "device")
"""What ``flat.events_topic`` may name (an event belongs to no poll group)."""
PLACE_PLACEHOLDERS = ("area", "line")
"""Placeholders each device's ``flat.uns`` entry fills."""

_LEVEL = r"^[^/#+\x00]+$"
"""One topic level: no separator, no MQTT wildcard, no NUL."""


def placeholders(template: str, allowed: Iterable[str], key: str) -> set[str]:
    """The placeholders a topic template names; ``ValueError`` naming ``key`` for one that is not in
    ``allowed``, a format spec or conversion (``{device!r}``, ``{line:>3}``), unbalanced braces, or
    an MQTT wildcard in the template's own text (a publish topic cannot hold one)."""
    allowed = tuple(allowed)
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise ValueError(f"{key} {template!r} is not a topic template: {exc}") from None
    names: set[str] = set()
    for literal, name, spec, conversion in parts:
        if "+" in literal or "#" in literal:
            raise ValueError(f"{key} {template!r}: a published topic cannot hold the MQTT wildcards + or #")
        if name is None:
            continue
        if name not in allowed:
            known = ", ".join("{" + a + "}" for a in allowed)
            raise ValueError(f"{key} names {{{name}}}, which is not a placeholder here (known: {known})")
        if spec or conversion:
            raise ValueError(f"{key}: {{{name}}} takes no format spec or conversion")
        names.add(name)
    return names


class UnsPlace(Strict):
    """Where one device sits in the plant's ISA-95 hierarchy (below ``flat.site``)."""

    area: str | None = Field(default=None, pattern=_LEVEL)
    """The area (e.g. ``upstream``, ``fill-finish``): fills ``{area}``."""
    line: str | None = Field(default=None, pattern=_LEVEL)
    """The line or cell (e.g. ``line-2``, ``suite-3``): fills ``{line}``."""


class FlatConfig(Strict):
    """The ``mqtt.flat:`` section: topics and UNS placement of ``payload: flat`` (one value per name)."""

    topic: str = Field(default="{prefix}/flat/{device}/data", min_length=1)
    """Topic template of a device sample. Placeholders: ``{prefix}`` (``mqtt.topic_prefix``),
    ``{site}``, ``{area}``, ``{line}`` (see ``site`` and ``uns``), ``{device}`` (the device id),
    ``{group}`` (the poll group). A UNS path: ``"{site}/{area}/{line}/{device}"``. The default keeps
    the flat messages in a subtree of their own (``{prefix}/flat/#``), apart from the JSON
    segments' ``{prefix}/{device}/data`` that ``publish_segments`` publishes beside them: a topic
    that would carry both payloads is a configuration error naming the key."""
    events_topic: str = Field(default="{prefix}/flat/{device}/events", min_length=1)
    """Topic template of a device's events, one message per event; the same placeholders but
    ``{group}``. The agent's own events and the audit trail go to ``{prefix}/flat/agent/events`` and
    ``{prefix}/flat/agent/audit``."""
    site: str | None = Field(default=None, pattern=_LEVEL)
    """The site (the ISA-95 level above areas): fills ``{site}`` for every device. Required when
    a template names ``{site}``."""
    uns: dict[str, UnsPlace] = Field(default_factory=dict)
    """Per device id, its ``area`` and ``line``. Every device needs each of them a template names:
    a device missing one is a configuration error naming it, never an empty topic level."""
    retain_per_tag: bool = False
    """Also publish each tag's newest value as a retained message on ``{topic}/{tag}`` (``ts``,
    ``value``, ``unit``, ``quality``), so a UNS consumer that subscribes later sees every tag's
    current value at once. One more message per tag and segment for the broker to acknowledge."""

    @model_validator(mode="after")
    def _templates(self) -> FlatConfig:
        if "site" in self.placeholders() and self.site is None:
            raise ValueError("a topic template names {site}: set site")
        return self

    def placeholders(self) -> set[str]:
        """The placeholders the two templates name."""
        return placeholders(self.topic, DATA_PLACEHOLDERS, "topic") | placeholders(
            self.events_topic, EVENT_PLACEHOLDERS, "events_topic"
        )

    def missing_levels(self, device: str) -> list[str]:
        """The ``area``/``line`` the templates name that ``device`` has no ``uns`` entry for."""
        need = self.placeholders()
        place = self.uns.get(device, UnsPlace())
        return [level for level in PLACE_PLACEHOLDERS if level in need and getattr(place, level) is None]

    def check_devices(self, devices: Iterable[str]) -> None:
        """``ValueError`` naming the first of ``devices`` (those published for) without an ``area``
        or ``line`` a template names. A ``uns`` entry may name a device that is not among them (a
        disabled one: its buffered data still needs its place); ``validate`` reports one that names
        no configured device (:mod:`agent.app.topics`)."""
        for device in devices:
            if missing := self.missing_levels(device):
                level = missing[0]
                raise ValueError(
                    f"mqtt.flat.uns.{device}.{level} is not set, and the topic template names "
                    f"{{{level}}}: every device needs its {level}"
                )

    @staticmethod
    def agent_topic(prefix: str, stream: str) -> str:
        """Where the agent's own events (``stream`` ``agent/events``) and the audit trail
        (``agent/audit``) go: beside the devices' default topics, apart from the JSON segments'."""
        return f"{prefix}/flat/{stream}"


class FlatEncoder(Encoder):
    """Committed segments as flat messages: one per block (device sample), one per event, and with
    ``retain_per_tag`` one retained message per tag. The messages of a segment are its delivery
    unit: the segment is marked delivered only when the broker acknowledged them all."""

    name = "flat"

    def __init__(self, cfg: FlatConfig, catalog: Catalog, prefix: str) -> None:
        cfg.check_devices(catalog)
        self.cfg = cfg
        self.prefix = prefix
        self._topics: dict[tuple[str, str, str | None], str] = {}

    def topic(self, kind: str, device: str, group: str | None = None) -> str:
        """The topic of a device's samples (``kind`` ``data``, one poll group) or events, rendered
        once per device and group."""
        key = (kind, device, group)
        topic = self._topics.get(key)
        if topic is None:
            place = self.cfg.uns.get(device, UnsPlace())
            template = self.cfg.topic if kind == "data" else self.cfg.events_topic
            fields = {"prefix": self.prefix, "site": self.cfg.site, "area": place.area,
                      "line": place.line, "device": device, "group": group}  # fmt: skip
            missing = sorted(k for k in placeholders(template, DATA_PLACEHOLDERS, kind) if fields[k] is None)
            if missing:  # a device not in the catalog the encoder was built with
                raise ValueError(f"device {device!r} has no {', '.join(missing)} for mqtt.flat topics")
            topic = template.format(**fields)
            self._topics[key] = topic
        return topic

    def encode(self, seg: StoredSegment, *, historical: bool) -> list[Message]:
        """Raises :class:`agent.core.chain.ChainFormatError` (a ``ValueError``) for a payload that
        is not a segment."""
        doc = chain.parse(seg.payload).doc
        link = {"stream": seg.stream, "i": seg.i, "hash": seg.hash}
        device = str(doc.get("device", seg.device))
        agent = doc.get("agent")
        if seg.kind == "data":
            return self._samples(doc.get("blocks") or [], device, agent, link, historical)
        topic = (
            self.cfg.agent_topic(self.prefix, seg.stream)
            if device == AGENT_DEVICE
            else self.topic("events", device)
        )
        out = []
        for event in doc.get("events") or []:
            msg = {"ts": event.get("ts"), "agent": agent, "device": device, **event, "segment": link}
            if historical:
                msg["historical"] = True
            out.append(Message(topic, dumps(msg).encode()))
        return out

    def _samples(
        self, blocks: list[dict[str, Any]], device: str, agent: Any, link: dict[str, Any], historical: bool
    ) -> list[Message]:
        out: list[Message] = []
        newest: dict[tuple[str, str], dict[str, Any]] = {}
        for block in blocks:
            if not block.get("tags"):
                continue  # an empty block carries no reading (and owns no seq)
            msg = _sample(block, device, agent, link, historical)
            topic = self.topic("data", device, str(block.get("group")))
            out.append(Message(topic, dumps(msg).encode()))
            if self.cfg.retain_per_tag:
                units = block.get("units") or [None] * msg["n"]
                for tag, unit in zip(msg["values"], units, strict=True):
                    mark = msg.get("quality", {}).get(tag)
                    last = {"ts": msg["ts"], "value": msg["values"][tag], "unit": unit,
                            "quality": mark["quality"] if mark else "good"}  # fmt: skip
                    if mark:
                        last["reason"] = mark["reason"]
                    newest[(topic, tag)] = last
        out.extend(
            Message(f"{topic}/{tag}", dumps(last).encode(), retain=True)
            for (topic, tag), last in newest.items()
        )
        return out


def _sample(
    block: dict[str, Any], device: str, agent: Any, link: dict[str, Any], historical: bool
) -> dict[str, Any]:
    """One block as a flat sample: bad readings ``null`` in ``values``, with their quality, reason
    and what the device sent (if anything) in ``quality``."""
    tags: list[str] = block["tags"]
    values: list[Any] = block.get("values") or []
    reasons: list[str | None] = block.get("reasons") or [None] * len(tags)
    flat: dict[str, Any] = dict(zip(tags, values, strict=True))
    marks: dict[str, dict[str, Any]] = {}
    for i, q in enumerate(block.get("quality") or []):
        if q == "good":
            continue
        mark: dict[str, Any] = {"quality": q, "reason": reasons[i]}
        if q == "bad":
            if values[i] is not None:
                mark["value"] = values[i]  # what the device sent stays, apart from the values
            flat[tags[i]] = None
        marks[tags[i]] = mark
    msg: dict[str, Any] = {"ts": block["ts"], "agent": agent, "device": device, "group": block.get("group"),
                           "seq": block["seq"], "n": len(tags), "values": flat}  # fmt: skip
    if marks:
        msg["quality"] = marks
    src = _source_times(tags, block.get("src_ts"))
    if src is not None:
        msg["src_ts"] = src
    msg["batch"] = block.get("batch")  # always present: null is "no batch at acquisition"
    msg["segment"] = link
    if historical:
        msg["historical"] = True
    return msg


def _source_times(tags: list[str], src: Any) -> int | Mapping[str, int] | None:
    """The device's own time: one number for the whole sample, or per tag where it gave one."""
    if isinstance(src, list):
        per_tag = {t: ts for t, ts in zip(tags, src, strict=False) if ts is not None}
        return per_tag or None
    return src if isinstance(src, int) else None
