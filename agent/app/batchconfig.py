"""The ``batch:`` configuration section: which devices are assigned to a batch together, and
whether the MES may assign batches over MQTT.

Kept apart from :mod:`agent.app.config` so the batch sources (CLI, MQTT command topic, the device
itself) and the configuration share one model without the sources importing the whole loader.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from pydantic import Field, field_validator, model_validator

from agent.core.problems import Problem
from cleanroom_common.fields import Strict

TOPIC_FIELDS = frozenset({"prefix", "agent"})
"""The placeholders ``command_topic`` may use."""


class BatchConfig(Strict):
    """The ``batch:`` section: device groups and the MES command topic (docs/operations.md, "Batches")."""

    groups: dict[str, list[str]] = Field(default_factory=dict)
    """Devices assigned to a batch together, by group name (a bioreactor with its incubator):
    ``batch start --group NAME`` and an MQTT command's ``group`` name one. A device belongs to one
    group at most."""
    mqtt_commands: bool = False
    """Accept batch assignments (start, step, end) published by the MES on ``command_topic``. Off by
    default: any client allowed to publish on that topic could assign batches, so turning it on logs
    a warning at every start recommending a broker ACL that lets only the MES publish there."""
    command_topic: str = "{prefix}/agent/batch/{agent}"
    """Where the MES publishes batch commands (JSON, docs/batch-command.schema.json); ``{prefix}`` is
    ``mqtt.topic_prefix``, ``{agent}`` this agent's id."""

    @field_validator("groups")
    @classmethod
    def _groups_valid(cls, groups: dict[str, list[str]]) -> dict[str, list[str]]:
        owner: dict[str, str] = {}
        for name, devices in groups.items():
            if not name or not name.replace("-", "").replace("_", "").isalnum():
                raise ValueError(f"group name {name!r}: letters, digits, '-' and '_' only")
            if not devices:
                raise ValueError(f"group {name!r} names no device")
            for device in devices:
                if device in owner:
                    where = "twice" if owner[device] == name else f"in groups {owner[device]!r} and {name!r}"
                    raise ValueError(f"device {device!r} is {where}: a device belongs to one group at most")
                owner[device] = name
        return groups

    @model_validator(mode="after")
    def _topic_valid(self) -> BatchConfig:
        check_command_topic(self.command_topic)
        return self

    def topic(self, prefix: str, agent_id: str) -> str:
        """The command topic of this agent."""
        return self.command_topic.format(prefix=prefix, agent=agent_id)

    def group_of(self, device: str) -> list[str] | None:
        """The devices of ``device``'s group, None when it belongs to none."""
        return next((devices for devices in self.groups.values() if device in devices), None)

    def check(self, devices: Iterable[str], mqtt_configured: bool) -> list[Problem]:
        """Problems against the configured devices and broker (for ``validate``)."""
        known = set(devices)
        problems = [
            Problem(f"device {device!r} is not configured", ("batch", "groups", name, i))
            for name, members in self.groups.items()
            for i, device in enumerate(members)
            if device not in known
        ]
        if self.mqtt_commands and not mqtt_configured:
            problems.append(
                Problem("batch commands come over MQTT: there is no mqtt section", ("batch", "mqtt_commands"))
            )
        return problems

    def security_warnings(self, prefix: str, agent_id: str) -> list[str]:
        """What every start logs and ``status`` shows: who may publish on the topic assigns batches."""
        if not self.mqtt_commands:
            return []
        return [f"batch: MQTT batch commands are on: any client allowed to publish on "
                f"{self.topic(prefix, agent_id)} assigns batches; restrict it to the MES with a "
                "broker ACL (batch.mqtt_commands)"]  # fmt: skip


def check_command_topic(template: str) -> None:
    """A command topic template (``batch.command_topic``, ``reference.command_topic``): one topic
    name with only the ``{prefix}`` and ``{agent}`` placeholders; ValueError naming what is wrong."""
    try:
        fields = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise ValueError(f"command_topic {template!r}: {exc}") from None
    if unknown := fields - TOPIC_FIELDS:
        raise ValueError(
            f"command_topic: unknown placeholder(s) {', '.join(sorted(unknown))} "
            f"(known: {{prefix}}, {{agent}})"
        )
    if "+" in template or "#" in template or not template.strip("/"):
        raise ValueError("command_topic must be one topic name, without the wildcards + and #")
