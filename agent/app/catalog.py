"""What the sinks may declare about each device's tags before any value is sent (a Sparkplug
DBIRTH, a UNS topic per tag), from the loaded configuration's devices and their profiles.

The agent knows drivers' tag models only as objects (it never imports a driver), so a tag's value
type is read from attributes a protocol's tag may have: ``type`` (a Modbus register's data type),
``bit`` (one bit of a register), ``field``/``per`` (a particle counter record's field), and the
``scale``/``offset`` every tag has, which make any number a float. A tag whose type its profile
does not say (an OPC UA node) is declared ``float``, the type of nearly every process value; the
Sparkplug session declares it again from its first value of another type (a state text, a flag).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from agent.core.device import ResolvedDevice
from agent.sinks.payload import Catalog, TagInfo
from cleanroom_common.modbus import BIT_TABLES, locate

_INTEGERS = frozenset({"int16", "uint16", "int32", "uint32", "int64", "uint64"})
_COUNTER_INTEGERS = frozenset({"laser_ok", "flow_ok", "sample_valid", "laser_fault", "flow_fault"})
"""A particle counter's status flags: 1 or 0."""


def kind_of(tag: Any) -> str:
    """``float``, ``int``, ``bool`` or ``string``: the type the tag's readings have after scaling."""
    scaled = getattr(tag, "scale", 1.0) != 1.0 or getattr(tag, "offset", 0.0) != 0.0
    dtype = getattr(tag, "type", None)
    dtype = None if dtype is None else str(getattr(dtype, "value", dtype))
    if dtype == "string":
        return "string"
    if dtype == "bool" or (dtype is None and getattr(tag, "bit", None) is not None):
        return "bool"
    if dtype is None and _bit_table(tag):
        return "bool"
    if scaled:
        return "float"
    if dtype in _INTEGERS or (dtype is None and hasattr(tag, "address")):
        return "int"  # a Modbus register without a type is a uint16
    counter_field = getattr(tag, "field", None)
    if counter_field in _COUNTER_INTEGERS or (
        counter_field == "count" and getattr(tag, "per", None) == "sample"
    ):
        return "int"
    return "float"


def _bit_table(tag: Any) -> bool:
    """A Modbus coil or discrete input (one bit), by its table or its vendor-notation address."""
    address = getattr(tag, "address", None)
    if not isinstance(address, int):
        return False
    try:
        table, _ = locate(address, getattr(tag, "table", None),
                          vendor_notation=getattr(tag, "vendor_notation", True),
                          address_base=getattr(tag, "address_base", 1))  # fmt: skip
    except ValueError:
        return False  # the profile validated it; a tag that does not locate is no bit
    return table in BIT_TABLES


def build_catalog(devices: Iterable[ResolvedDevice]) -> Catalog:
    """Enabled device id -> its tags in profile order (the order Sparkplug aliases follow). A
    disabled device is not polled, so nothing is declared for it (no Sparkplug DBIRTH): what it left
    in the buffer is still published, as a device the sinks were not told of."""
    return {
        device.id: [
            TagInfo(name=tag.name, unit=tag.unit, description=tag.description, kind=kind_of(tag))
            for tag in device.profile.tags
        ]
        for device in devices
        if device.config.enabled
    }
