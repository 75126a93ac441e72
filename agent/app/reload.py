"""What a reload changes: the running configuration against a newly validated one.

A reload (SIGHUP, ``cleanroom-agent reload``) applies only what can change under a running agent
without touching the rest: a device whose effective configuration (its entry, its resolved
connection and its profile's content) is unchanged keeps its connection and its poll ticks; the
broker section, the limits and the models are replaced when they differ (the models also when a
bound manifest file did: an approval), and so is the forwarder of a payload format that declares
the devices' tags (``flat``, ``sparkplug_b``: a new session, whose Sparkplug births declare the
devices as they are now) when those changed. What the agent opened
once for its whole run (the buffer file and its owner id, the HMAC key the buffer signs with,
the status listener) cannot change under it: such a reload is refused with the reason, and the
agent runs on with the configuration it has.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from agent.app.catalog import build_catalog
from agent.app.config import LoadedConfig
from agent.core.device import ResolvedDevice


class ReloadRefused(Exception):
    """The new configuration is valid but needs a restart; the message says why."""


@dataclass(frozen=True)
class ReloadPlan:
    """The differences a reload applies."""

    unchanged: tuple[str, ...]
    """Devices that keep running untouched."""
    stop: tuple[str, ...]
    """Running devices to stop: changed or removed."""
    start: tuple[ResolvedDevice, ...]
    """Devices to start: changed or added."""
    mqtt: bool
    limits: bool
    models: bool
    catalog: bool = False
    """The devices' tags a payload other than ``json`` declares (:func:`agent.app.catalog.build_catalog`)
    changed, or their order (which numbers the Sparkplug aliases): the forwarder is made again, as
    for a changed broker section."""

    def summary(self) -> dict[str, Any]:
        """What the ``config_change`` audit record and the status say was applied."""
        started = {d.id for d in self.start}
        return {
            "devices_unchanged": list(self.unchanged),
            "devices_restarted": sorted(started.intersection(self.stop)),
            "devices_added": sorted(started.difference(self.stop)),
            "devices_removed": sorted(set(self.stop).difference(started)),
            "mqtt_reconnected": self.mqtt or self.catalog,
            "limits_reloaded": self.limits,
            "models_reloaded": self.models,
        }


@dataclass(frozen=True)
class ReloadOutcome:
    """The result of one reload request, as ``status`` shows it under ``reload``."""

    generation: int
    """Counts reload requests since start (applied or refused): ``cleanroom-agent reload`` waits
    for it to change."""
    outcome: str
    """``applied``, ``refused`` or ``none`` (no reload yet)."""
    at_ns: int | None
    reason: str = ""
    errors: tuple[str, ...] = ()
    applied: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "generation": self.generation,
            "last_outcome": self.outcome,
            "at": self.at_ns,
            "reason": self.reason,
            "errors": list(self.errors),
            "applied": self.applied,
        }


def _fingerprint(device: ResolvedDevice) -> tuple[Any, ...]:
    """Everything a running device depends on: its entry (connection with secrets expanded, group
    overrides, enabled), its driver, and its profile as validated (so an edited profile file or a
    profile now found in another folder restarts it, a comment does not)."""
    return (device.config, device.driver, device.profile, device.connection)


def refusal(old: LoadedConfig, new: LoadedConfig) -> str | None:
    """Why ``new`` needs a restart rather than a reload, or None."""
    a, b = old.config, new.config
    if a.agent.id != b.agent.id:
        return f"agent.id changed ({a.agent.id!r} -> {b.agent.id!r}): the buffer belongs to one agent id"
    if a.buffer != b.buffer:
        return "the buffer section changed: the buffer is opened once per run"
    if a.integrity.hmac_key_file != b.integrity.hmac_key_file or old.hmac_key() != new.hmac_key():
        return "the HMAC key (integrity.hmac_key_file or its content) changed: the buffer signs with one key"
    if a.agent.status_listen != b.agent.status_listen:
        return "agent.status_listen changed: the status listener is bound once per run"
    return None


def plan(old: LoadedConfig, new: LoadedConfig) -> ReloadPlan:
    """The differences between the running configuration and ``new``; :class:`ReloadRefused`
    when ``new`` cannot be applied without a restart."""
    reason = refusal(old, new)
    if reason is not None:
        raise ReloadRefused(reason)
    running = {d.id: d for d in old.devices if d.config.enabled}
    wanted = {d.id: d for d in new.devices if d.config.enabled}
    unchanged = tuple(
        i for i, d in wanted.items() if i in running and _fingerprint(running[i]) == _fingerprint(d)
    )
    stop = tuple(i for i in running if i not in unchanged)
    start = tuple(d for i, d in wanted.items() if i not in unchanged)
    profiles_changed = {d.id: d.profile for d in old.devices} != {d.id: d.profile for d in new.devices}
    mqtt = new.config.mqtt
    return ReloadPlan(
        unchanged=unchanged,
        stop=stop,
        start=start,
        # the command subscriptions live in the MQTT session: a change of them is a new session
        mqtt=old.config.mqtt != new.config.mqtt or _subscriptions(old) != _subscriptions(new),
        limits=old.config.limits != new.config.limits or (profiles_changed and new.config.limits is not None),
        models=old.config.models != new.config.models
        or old.model_files != new.model_files
        or (profiles_changed and bool(new.config.models)),
        catalog=mqtt is not None
        and mqtt.payload != "json"
        and list(build_catalog(old.devices).items()) != list(build_catalog(new.devices).items()),
    )


def _subscriptions(loaded: LoadedConfig) -> tuple[object, ...]:
    """What the agent subscribes to besides its payload format's topics."""
    cfg = loaded.config
    return (
        cfg.batch.mqtt_commands,
        cfg.batch.command_topic,
        cfg.reference.mqtt_commands,
        cfg.reference.command_topic,
    )
