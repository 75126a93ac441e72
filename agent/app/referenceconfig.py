"""The ``reference:`` configuration section: offline reference samples (the lab's pH, dissolved
oxygen, cell density) compared with the online probe, and whether a LIMS may enter them over MQTT.

Kept apart from :mod:`agent.app.config` so the sample sources (CLI, MQTT command topic) and the
configuration share one model without the sources importing the whole loader.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from agent.app.batchconfig import check_command_topic
from agent.core.problems import Problem
from cleanroom_common.fields import Duration, Strict


class ReferenceConfig(Strict):
    """The ``reference:`` section (docs/operations.md, "Reference samples")."""

    window: Duration = Field(default=60.0, gt=0)
    """How far from the sample time the online reading compared with it may be: the nearest good
    reading within ± the larger of this and two poll intervals of the tag's group. None within it:
    the ``reference_sample`` event says so (``online`` null) instead of comparing with a reading
    taken at another time."""
    mqtt_commands: bool = False
    """Accept reference samples published by a LIMS on ``command_topic``. Off by default: any client
    allowed to publish on that topic could enter samples, so turn it on together with a broker ACL
    that lets only the LIMS publish there."""
    command_topic: str = "{prefix}/agent/reference/{agent}"
    """Where the LIMS publishes reference samples (JSON, one sample per message); ``{prefix}`` is
    ``mqtt.topic_prefix``, ``{agent}`` this agent's id."""

    @model_validator(mode="after")
    def _topic_valid(self) -> ReferenceConfig:
        check_command_topic(self.command_topic)
        return self

    def topic(self, prefix: str, agent_id: str) -> str:
        """The reference-sample topic of this agent."""
        return self.command_topic.format(prefix=prefix, agent=agent_id)

    def check(self, mqtt_configured: bool) -> list[Problem]:
        """Problems against the broker configuration (for ``validate``)."""
        if self.mqtt_commands and not mqtt_configured:
            return [
                Problem(
                    "reference samples come over MQTT: there is no mqtt section",
                    ("reference", "mqtt_commands"),
                )
            ]
        return []

    def security_warnings(self, prefix: str, agent_id: str) -> list[str]:
        """What every start logs and ``status`` shows: who may publish on the topic enters samples."""
        if not self.mqtt_commands:
            return []
        return [f"reference: MQTT reference samples are on: any client allowed to publish on "
                f"{self.topic(prefix, agent_id)} enters samples; restrict it to the LIMS with a "
                "broker ACL (reference.mqtt_commands)"]  # fmt: skip
