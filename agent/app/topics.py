"""What ``validate`` checks of the payload formats against the configured devices, beyond each
section's own model: what would otherwise fail only when the forwarder builds its encoder at start,
or never fail and mislead a consumer.

* ``flat``: every ``mqtt.flat.uns`` entry names a configured device, and every configured device has
  the ``area``/``line`` its topic templates name.
* ``sparkplug_b``: every enabled device's tags make valid Sparkplug metrics (no tag named like one of
  the agent's own metrics, such as ``Events/event``).
* One topic, one payload: the topics each published payload renders for the configured devices,
  groups and tags never meet. With ``publish_segments`` the JSON segments go on
  ``{prefix}/{device}/data`` beside the ``flat`` messages, and a consumer of either would have to
  guess which shape each message has; nor may a flat events topic be a per-tag topic. Nothing but
  Sparkplug goes under ``spBv1.0/``, which Sparkplug host applications decode as Sparkplug B.

The topics are rendered for the configuration as it is (a reload validates again), so only a
template that really meets another topic is an error, each reported once, at its key.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

from agent.app.catalog import build_catalog
from agent.core.device import ResolvedDevice
from agent.core.problems import Loc, Problem, dotted
from agent.core.records import AGENT_DEVICE
from agent.sinks.flat import FlatConfig, UnsPlace
from agent.sinks.forwarder import MqttConfig
from agent.sinks.json_segments import status_topic
from agent.sinks.sparkplug import codec
from agent.sinks.sparkplug.session import NAMESPACE

MQTT: Loc = ("mqtt",)
FLAT: Loc = ("mqtt", "flat")
AGENT_STREAMS = (f"{AGENT_DEVICE}/events", f"{AGENT_DEVICE}/audit")


def payload_problems(
    mqtt: MqttConfig,
    agent_id: str,
    devices: Sequence[ResolvedDevice],
    where: Mapping[str, Loc],
    commands: Sequence[tuple[str, str, Loc]] = (),
) -> list[Problem]:
    """The problems of ``mqtt``'s payload against ``devices`` (those that resolved); ``where`` is
    every configured device's entry (``("devices", i)``), where a problem of its profile is reported.
    ``commands``: the command topics the agent subscribes to, as (topic, what, config key): the agent
    would read its own messages published there as commands."""
    if mqtt.payload == "sparkplug_b":
        metrics = list(_sparkplug_metrics(devices, where))
        return metrics + _shared_topics(mqtt, agent_id, devices, commands)
    if mqtt.payload == "flat" and (places := list(_flat_places(mqtt.flat, list(where)))):
        return places  # a device without its place has no topic to compare
    return _shared_topics(mqtt, agent_id, devices, commands)


def _flat_places(flat: FlatConfig, configured: list[str]) -> Iterator[Problem]:
    for device in flat.uns:
        if device not in configured:
            yield Problem(
                f"names device {device!r}, which is not configured",
                path=(*FLAT, "uns", device),
                hint=f"configured: {', '.join(configured) or 'none'}",
            )
    for device in configured:
        for level in flat.missing_levels(device):
            yield Problem(
                f"device {device!r} has no {level}, and a topic template names {{{level}}}: every "
                f"device needs its {level} (never an empty topic level)",
                path=(*FLAT, "uns", device, level),
            )


def _sparkplug_metrics(devices: Sequence[ResolvedDevice], where: Mapping[str, Loc]) -> Iterator[Problem]:
    """Each device alone, so that every bad one is reported: the aliases that numbering across
    devices gives cannot fail."""
    for device, tags in build_catalog(devices).items():
        try:
            codec.catalog_metrics({device: tags})
        except ValueError as exc:
            profile = next(d.profile_path for d in devices if d.id == device)
            yield Problem(
                f"payload sparkplug_b: {exc}",
                path=(*where.get(device, ("devices",)), "profile"),
                hint=f"rename the tag in {profile}",
            )


class _Topics:
    """Every topic rendered so far, with the shape of message published on it and what publishes
    it; a second shape on one topic (or a second owner of an ``exclusive`` one: a retained value) is
    a problem at the key that rendered it, once per key."""

    def __init__(self, publish_segments: bool) -> None:
        self.owners: dict[str, tuple[str, str]] = {}
        self.problems: dict[Loc, Problem] = {}
        self.publish_segments = publish_segments

    def add(self, topic: str, shape: str, what: str, key: Loc, *, exclusive: bool = False) -> None:
        if key in self.problems:
            return
        if topic.split("/", 1)[0] == NAMESPACE:
            self.problems[key] = Problem(
                f"{what} would be published on {topic!r}, in the Sparkplug B namespace {NAMESPACE}/, "
                "which Sparkplug host applications decode as Sparkplug B",
                path=key,
                hint=f"choose a topic outside {NAMESPACE}/",
            )
            return
        owner_shape, owner = self.owners.setdefault(topic, (shape, what))
        if owner_shape == shape and not (exclusive and owner != what):
            return
        hint = "give each kind of message a topic of its own"
        if owner_shape == "json":
            hint = f"change {dotted(key)} (its default keeps flat messages under {{prefix}}/flat/)" + (
                ", or set mqtt.publish_segments: false" if self.publish_segments else ""
            )
        self.problems[key] = Problem(
            f"{what} would be published on {topic!r}, the topic of {owner}: one topic, one kind of message",
            path=key,
            hint=hint,
        )


def _shared_topics(
    mqtt: MqttConfig,
    agent_id: str,
    devices: Sequence[ResolvedDevice],
    commands: Sequence[tuple[str, str, Loc]],
) -> list[Problem]:
    topics = _Topics(mqtt.publish_segments)
    for topic, what, key in commands:
        topics.add(topic, "command", what, key, exclusive=True)
    prefix = mqtt.topic_prefix
    prefix_key = (*MQTT, "topic_prefix")
    if mqtt.payload == "json" or mqtt.publish_segments:
        streams = [f"{d.id}/{kind}" for d in devices for kind in ("data", "events")] + list(AGENT_STREAMS)
        for stream in streams:
            topics.add(f"{prefix}/{stream}", "json", f"the JSON segments of {stream}", prefix_key)
        topics.add(status_topic(prefix, agent_id), "json", "the agent's status", prefix_key)
    if mqtt.payload != "flat":
        return list(topics.problems.values())
    flat = mqtt.flat
    for stream in AGENT_STREAMS:
        topics.add(flat.agent_topic(prefix, stream), "events", f"the flat {stream}", prefix_key)
    for device in devices:
        place = flat.uns.get(device.id, UnsPlace())
        fields = {"prefix": prefix, "site": flat.site, "device": device.id, "area": place.area,
                  "line": place.line}  # fmt: skip
        events = flat.events_topic.format(**fields)
        topics.add(events, "events", f"the flat events of {device.id}", (*FLAT, "events_topic"))
        for name, group in device.groups.items():
            data = flat.topic.format(**fields, group=name)
            topics.add(data, "samples", f"the flat samples of {device.id}", (*FLAT, "topic"))
            for tag in group.tags if flat.retain_per_tag else ():
                topics.add(f"{data}/{tag}", "retained", f"the retained {tag!r} of {device.id}",
                           (*FLAT, "retain_per_tag"), exclusive=True)  # fmt: skip
    return list(topics.problems.values())
