"""A device instance: its entry in the configuration file, and the same device once
resolved against its profile and driver (what the scheduler runs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import Field, field_validator

from agent.core.driver import ConnectionBase, Driver, PollGroup, ProfileBase
from cleanroom_common.fields import Strict


class DeviceConfig(Strict):
    """One device instance: which profile it is and how to reach it."""

    id: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    """Device id, unique in this config; the ``{device}`` level of MQTT topics (``agent`` is reserved)."""

    @field_validator("id")
    @classmethod
    def _not_reserved(cls, v: str) -> str:
        if v == "agent":
            raise ValueError("'agent' is reserved for the agent's own topics; choose another device id")
        return v

    profile: str
    """Name of the device profile: the ``profile:`` key inside a file of ``profiles_dirs`` or of
    the profiles shipped with the agent."""
    connection: dict[str, Any] = Field(default_factory=dict)
    """Protocol connection settings, validated by the profile's driver (see the driver sections)."""
    groups: dict[str, dict[str, Any]] = Field(default_factory=dict)
    """Per-device overrides of the profile's poll groups (e.g. ``{fast: {interval: 500ms}}``)."""
    enabled: bool = True
    """A disabled device is validated but not polled."""
    description: str = ""
    """Where the device stands, what it is for."""


@dataclass
class ResolvedDevice:
    """A device with its driver, validated profile, connection and compiled groups."""

    config: DeviceConfig
    driver: type[Driver]
    profile: ProfileBase
    profile_path: Path
    connection: ConnectionBase
    groups: dict[str, PollGroup]

    @property
    def id(self) -> str:
        return self.config.id
