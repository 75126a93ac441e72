"""What a Modbus profile and connection say: tags and where they live, poll groups (with the
record-buffer layout of records mode), and how to reach a device and its quirks.

These models are the configuration reference (``docs/configuration.md`` is generated from
their docstrings). Addresses follow the one rule of :mod:`cleanroom_common.modbus`.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from agent.core.compat import FIELDS as COMPARED
from agent.core.driver import ConnectionBase, GroupSpec, ProfileBase, TagBase
from cleanroom_common.codec import DataType, WordOrder
from cleanroom_common.fields import Duration, Strict
from cleanroom_common.modbus import BIT_TABLES, Table, locate, table_and_number


class Tag(TagBase):
    """One value in a Modbus device: where it is and how its registers decode.

    **Addresses.** With ``vendor_notation: true`` (the default) ``address`` is written as
    in most device manuals: the leading digit names the table (``4xxxx``/``4xxxxx``
    holding, ``3xxxx`` input, ``1xxxx`` discrete input, ``0xxxx`` i.e. a plain number below
    10000 for coils), the rest is the register number, counted from ``address_base``.
    With the default ``address_base: 1``, 40001 is holding register PDU address 0 (the
    number sent on the wire), 30010 is input register PDU address 9. With
    ``vendor_notation: false`` ``address`` is a plain register number in the table given
    by ``table``, again counted from ``address_base`` (``0`` when the manual lists PDU
    addresses, as e.g. MET ONE does). A device instance whose firmware is off by one
    overrides the base with its connection's ``address_base``.
    """

    address: int = Field(ge=0, le=465536)
    """Register (or coil) address. Vendor notation (default): the leading digit names the table
    (4xxxx holding, 3xxxx input, 1xxxx discrete input, below 10000 coil; six digits for
    registers above 9999) and the rest counts from ``address_base``, so 40001 is holding
    PDU address 0. With ``vendor_notation: false``: a plain number in ``table``, counted
    from ``address_base``."""
    table: Table | None = None
    """``holding``, ``input``, ``coil`` or ``discrete``; implied by a vendor-notation address
    (it must agree with it if given), required otherwise."""
    type: DataType | None = None
    """``int16``, ``uint16``, ``int32``, ``uint32``, ``int64``, ``uint64``, ``float32``,
    ``float64``, ``bool`` or ``string``; default ``uint16`` for registers, ``bool`` for coils,
    discrete inputs and bit fields. 64-bit integers stay exact in the payload unless scaled
    (see docs/payloads.md, "Integers", for consumers that parse numbers as doubles)."""
    word_order: WordOrder = WordOrder.ABCD
    """How multi-register values are laid out: ``ABCD`` (Modbus default, high word first),
    ``CDAB`` (low word first, e.g. BINDER), ``BADC``/``DCBA`` (bytes swapped); see
    :mod:`cleanroom_common.codec`."""
    bit: int | None = Field(default=None, ge=0, le=15)
    """Read one bit (0 = least significant) of a 16-bit register as a boolean, e.g. a status word."""
    length: int | None = Field(default=None, ge=1, le=250)
    """Characters of a ``string`` tag (two per register)."""
    address_base: Literal[0, 1] = 1
    """Number of the first register in ``address`` (1 for 40001-style manuals, 0 for PDU addresses)."""
    vendor_notation: bool = True
    """Whether ``address`` carries the table prefix (``40001``) or is a plain number (``0``)."""

    @model_validator(mode="after")
    def _resolvable(self) -> Tag:
        table, _ = locate(
            self.address, self.table, vendor_notation=self.vendor_notation, address_base=self.address_base
        )
        if table in BIT_TABLES:
            if self.type not in (None, DataType.BOOL) or self.bit is not None:
                raise ValueError(f"a {table} is one bit: type must be bool and bit unset")
        elif self.bit is not None and self.type not in (None, DataType.BOOL, DataType.UINT16, DataType.INT16):
            raise ValueError("bit selects one bit of a 16-bit register: type must be bool (or unset)")
        if (self.type is DataType.STRING) != (self.length is not None):
            raise ValueError("length is required for type string, and only for it")
        return self

    def table_and_number(self) -> tuple[Table, int]:
        """The table and the register number as written (before subtracting the base)."""
        return table_and_number(self.address, self.table, self.vendor_notation)

    def locate(self, address_base: int | None = None) -> tuple[Table, int]:
        """The table and PDU address, counted from ``address_base`` when a connection overrides
        the tag's own (firmware that is off by one)."""
        base = self.address_base if address_base is None else address_base
        return locate(self.address, self.table, vendor_notation=self.vendor_notation, address_base=base)

    @property
    def data_type(self) -> DataType:
        if self.bit is not None or self.table_and_number()[0] in BIT_TABLES:
            return DataType.BOOL
        return self.type or DataType.UINT16


class TagDefaults(Strict):
    """Tag fields set once for a whole profile (a tag's own value wins)."""

    table: Table | None = None
    """Default table (e.g. ``input`` for a device whose map is all input registers)."""
    type: DataType | None = None
    """Default data type."""
    word_order: WordOrder | None = None
    """Default word order (e.g. ``CDAB`` for a BINDER incubator)."""
    group: str | None = None
    """Default poll group."""
    address_base: Literal[0, 1] | None = None
    """Default address base (see :class:`Tag`)."""
    vendor_notation: bool | None = None
    """Default address notation (see :class:`Tag`)."""


class RecordLayout(Strict):
    """Where a record-keeping device (remote particle counter) keeps its record buffer.

    The model is the Lighthouse-like one: ``count`` records at positions
    ``first_index … first_index + count - 1``, oldest first; writing a position to the
    index register makes the group's tags (input registers) show that record. When the
    buffer is full the oldest record drops out and every position moves down by one.
    The record's own fields are ordinary tags of the group: its timestamp
    (``timestamp_tag``) and its status bits (bit-field tags named in ``bad_when`` /
    ``uncertain_when``). The driver never clears the buffer nor sets the clock.
    """

    count_address: int = Field(ge=40001, le=465536)
    """Holding register with the number of records in the buffer (vendor notation, e.g. ``40024``)."""
    index_address: int = Field(ge=40001, le=465536)
    """Holding register the driver writes to select a record (vendor notation, e.g. ``40025``)."""
    newest_index: int = Field(default=0xFFFF, ge=0, le=0xFFFF)
    """Index value that selects the newest record (used on first contact, when no watermark exists)."""
    first_index: int = Field(default=0, ge=0)
    """Index of the oldest record in the buffer (0 on the simulated counter; some firmware counts from 1)."""
    capacity: int = Field(default=3000, ge=1)
    """Buffer size: a full buffer rotates (positions shift while it is drained)."""
    timestamp_tag: str
    """Tag of this group holding the record's sample time, Unix seconds (becomes the block's source time)."""
    bad_when: list[str] = Field(default_factory=list)
    """Tags of this group (status bits) that, when true, make the record's other readings bad
    (reason ``device_status``), e.g. laser or flow fault. The values are kept: the original
    record is stored, flagged."""
    uncertain_when: list[str] = Field(default_factory=list)
    """Tags of this group that, when true, make the record's other readings uncertain
    (reason ``device_status``), e.g. overflow or service due."""
    max_records_per_read: int = Field(default=100, ge=1)
    """Records drained per poll at most (a poll also stops taking records after half the group's
    timeout); the rest follow next poll."""
    backfill: bool = False
    """On first contact (no watermark yet), deliver the whole buffer instead of only the newest record."""

    def referenced_tags(self) -> list[str]:
        return [self.timestamp_tag, *self.bad_when, *self.uncertain_when]


class Group(GroupSpec):
    """A Modbus poll group."""

    mode: Literal["poll", "records"] = "poll"
    """``poll``: read the tags' current values. ``records``: drain the device's record buffer
    (see ``records``), one block per record."""
    records: RecordLayout | None = None
    """Record buffer layout; required for ``mode: records``."""

    @model_validator(mode="after")
    def _layout_for_records(self) -> Group:
        if (self.mode == "records") != (self.records is not None):
            raise ValueError("mode: records needs a records layout, and a records layout needs mode: records")
        return self


class Connection(ConnectionBase):
    """How to reach one Modbus device (unit), and its quirks."""

    transport: Literal["tcp", "rtu"] = "tcp"
    """``tcp`` (Modbus TCP) or ``rtu`` (serial line)."""
    host: str | None = None
    """TCP: device or gateway host name / IP address."""
    port: int | str | None = None
    """TCP: port number (default 502). RTU: serial device path, e.g. ``/dev/ttyUSB0``."""
    unit_id: int = Field(default=1, ge=0, le=255)
    """Unit (slave) id of the device on its bus or behind its gateway."""
    baudrate: int = Field(default=19200, gt=0)
    """RTU: line speed in bit/s."""
    parity: Literal["N", "E", "O"] = "N"
    """RTU: parity."""
    stopbits: Literal[1, 2] = 1
    """RTU: stop bits."""
    bytesize: Literal[7, 8] = 8
    """RTU: data bits."""
    retries: int = Field(default=1, ge=0, le=10)
    """Repeats of a request that got no reply (or a server-busy reply) before giving up."""
    retry_busy_wait: Duration = 0.5
    """Wait before repeating a request the device refused as busy (exception 6); the bus is free meanwhile."""
    address_base: Literal[0, 1] | None = None
    """Override the profile's address base for this device (firmware that is off by one)."""
    connect_delay: Duration = 0.0
    """Pause after connecting before the first request (devices that need time to accept)."""
    request_delay: Duration = 0.0
    """Minimum pause between the end of one request on the bus and the next."""
    one_request_per_tag: bool = False
    """Never coalesce: one request per tag (devices that reject multi-register reads)."""
    max_registers_per_request: int = Field(default=125, ge=1, le=125)
    """Largest register read the device accepts (the protocol allows 125)."""
    max_bits_per_request: int = Field(default=2000, ge=1, le=2000)
    """Largest coil/discrete-input read the device accepts (the protocol allows 2000)."""
    max_gap: int = Field(default=10, ge=0)
    """Unused registers a coalesced read may span between two tags (0: only adjacent tags)."""
    close_after_scan: bool = False
    """Disconnect after every poll (devices or gateways that allow one TCP client and time it out)."""
    degrade_after: int = Field(default=3, ge=1)
    """Consecutive unanswered requests after which the device is skipped for ``degrade_for``."""
    degrade_for: Duration = 30.0
    """How long a degraded device is skipped (its readings are bad ``degraded``), so a dead
    unit cannot slow down the others on its bus."""

    @model_validator(mode="after")
    def _transport_fields(self) -> Connection:
        if self.transport == "tcp":
            if not self.host:
                raise ValueError("transport tcp needs a host")
            if self.port is not None and not isinstance(self.port, int):
                raise ValueError("transport tcp needs a numeric port")
        elif not isinstance(self.port, str) or not self.port:
            raise ValueError("transport rtu needs port: the serial device path, e.g. /dev/ttyUSB0")
        elif self.host is not None:
            raise ValueError("transport rtu has no host (port is the serial device)")
        return self

    def bus_key(self) -> tuple[str, ...]:
        if self.transport == "tcp":
            return ("tcp", str(self.host), str(self.port or 502))
        return ("rtu", str(self.port))

    def frame_gap_s(self) -> float:
        """RTU inter-frame silence: 3.5 character times, fixed at 1.75 ms above 19200 bit/s
        (Modbus over serial line, §2.5.1.1). Zero on TCP."""
        if self.transport == "tcp":
            return 0.0
        if self.baudrate > 19200:
            return 0.00175
        bits = 1 + self.bytesize + (0 if self.parity == "N" else 1) + self.stopbits
        return 3.5 * bits / self.baudrate


def apply_defaults(data: Any) -> Any:
    """Merge ``defaults:`` into the tags before they validate, so each tag is checked whole
    (a tag's own value wins)."""
    if not isinstance(data, dict) or not data.get("defaults"):
        return data
    defaults = {
        k: v for k, v in TagDefaults.model_validate(data["defaults"]).model_dump().items() if v is not None
    }
    tags = [{**defaults, **t} if isinstance(t, dict) else t for t in data.get("tags", [])]
    return {**data, "tags": tags}


def as_tag(spec: TagBase) -> Tag:
    """A profile's tag as the Modbus tag it must be."""
    if isinstance(spec, Tag):
        return spec
    raise TypeError(f"tag {spec.name!r} is not a modbus tag (profile protocol mismatch)")


class Profile(ProfileBase):
    """A Modbus device profile: the generic profile plus ``defaults:``."""

    defaults: TagDefaults | None = None
    """Tag fields applied to every tag that does not set them (e.g. ``table: input``,
    ``word_order: CDAB``)."""

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, data: Any) -> Any:
        return apply_defaults(data)

    @model_validator(mode="after")
    def _device_fields_read(self) -> Profile:
        """A Modbus device says who it is only through the profile's ``identity`` tags: a field of
        ``device:`` that no tag reads would never be compared, and nothing would say so. Each such
        field is an error on its own line, naming the tag it needs."""
        if self.device is None:
            return self
        named = self.identity.named() if self.identity is not None else {}
        unread = [f for f in COMPARED if getattr(self.device, f) is not None and f not in named]
        if unread:
            raise ValidationError.from_exception_data(
                type(self).__name__,
                [
                    InitErrorDetails(
                        type=PydanticCustomError(
                            "value_error",
                            "never compared: a Modbus device reports its {field} only through a tag; "
                            "name that tag in identity.{field} (or leave device.{field} out)",
                            {"field": f},
                        ),
                        loc=("device", f),
                        input=getattr(self.device, f),
                    )
                    for f in unread
                ],
            )
        return self

    @model_validator(mode="after")
    def _record_tags_in_group(self) -> Profile:
        for name, spec in self.groups.items():
            if isinstance(spec, Group) and spec.records is not None:
                here = {t.name for t in self.tags if t.group == name}
                missing = [n for n in spec.records.referenced_tags() if n not in here]
                if missing:
                    raise ValueError(f"group {name!r}: records layout names tags not in the group: {missing}")
        return self
