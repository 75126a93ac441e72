"""The serial counter driver's configuration: which record field a tag takes, how the
record group drains, and the serial port.

These models are the reference: docs/configuration.md is generated from their field
docstrings (``python -m agent.app.docgen --write``).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from agent.core.compat import DeviceCompat
from agent.core.driver import ConnectionBase, GroupSpec, ProfileBase, TagBase
from cleanroom_common.fields import Duration


class Tag(TagBase):
    """One value taken from each sample record."""

    field: Literal[
        "count", "sample_time", "volume", "laser_ok", "flow_ok", "sample_valid", "laser_fault", "flow_fault"
    ] = "count"
    """Record field: a channel's cumulative ``count``, the ``sample_time`` (s), the sampled
    ``volume`` (litres), or a status flag (1/0): ``laser_ok``/``flow_ok``/``sample_valid``, or
    their negations ``laser_fault``/``flow_fault`` (the sense Modbus counters and the shipped
    anomaly model use)."""
    size_um: float | None = Field(default=None, gt=0)
    """For ``count``: the channel (particles ≥ this size, µm) as the counter names it."""
    per: Literal["sample", "m3", "ft3"] = "sample"
    """For ``count``: counts per sample as reported, or a concentration per m³ / ft³
    computed with the record's own sampled volume."""

    @model_validator(mode="after")
    def _count_has_size(self) -> Tag:
        if self.field == "count" and self.size_um is None:
            raise ValueError("a count tag needs size_um (the channel)")
        if self.field != "count" and (self.size_um is not None or self.per != "sample"):
            raise ValueError("size_um and per apply to count tags only")
        return self


class Group(GroupSpec):
    """The record group of one counter (a profile has exactly one: records drain once)."""

    mode: Literal["subscribe", "poll"] = "subscribe"
    """``subscribe``: drain continuously, the next record as soon as the previous one is
    committed; the interval is the idle period and liveness check. ``poll``: at most one
    new record per interval."""


class Connection(ConnectionBase):
    """The serial port of one counter."""

    port: str = Field(min_length=1)
    """Serial device, e.g. ``/dev/ttyUSB0`` or a simulator's ``/dev/pts/N``."""
    baudrate: int = Field(default=9600, gt=0)
    """Line speed (the counter's setting; 9600 on Lasair-like units)."""
    parity: Literal["N", "E", "O"] = "N"
    """Parity bit: none, even or odd."""
    stopbits: Literal[1, 2] = 1
    """Stop bits."""
    retries: int = Field(default=2, ge=0, le=10)
    """Extra attempts of a non-destructive command whose reply was garbled or refused as busy."""
    commit_wait: Duration = 30.0
    """How long an emitted record may stay uncommitted before it is emitted again (the
    block was lost on its way to the buffer); the buffer commits far sooner."""
    loss_counter: bool = True
    """Ask the counter (``CST``) how many records it dropped from its full queue, and
    commit each new loss as a ``data_loss`` event with the next record. Counters without
    ``CST`` answer ``ERR UNKNOWN`` and are then not asked again."""


class Profile(ProfileBase):
    """A serial counter profile: exactly one group (two would race to pop the same records)."""

    @field_validator("device")
    @classmethod
    def _device_not_reported(cls, device: DeviceCompat | None) -> DeviceCompat | None:
        """The counter reports only its serial number: a model, vendor or firmware named here
        would never be compared, and every connect would only say ``unknown``."""
        if device is not None:
            raise ValueError(
                "never compared: a serial counter reports only its serial number (CSN), not its "
                "model, vendor or firmware; leave device out"
            )
        return device

    @model_validator(mode="after")
    def _one_group(self) -> Profile:
        if len(self.groups) != 1:
            raise ValueError(
                "a serial_counter profile has exactly one group (records are drained once), "
                f"got {', '.join(self.groups)}"
            )
        if self.identity is not None:
            raise ValueError(
                "a serial_counter profile has no identity: the driver asks the counter for its "
                "serial number (CSN) on every connect"
            )
        return self
