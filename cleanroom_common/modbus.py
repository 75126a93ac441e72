"""Modbus addressing: the one rule by which an address written in a profile becomes a table
and a PDU address (the number sent on the wire).

The driver reads by this rule and the simulators serve by it, so a profile cannot name
one register to the agent and another to the simulated device. Word orders and data
types are the other half of that contract, in :mod:`cleanroom_common.codec`.

Addresses are written the way device manuals write them. In vendor ("Modicon") notation
the leading digit names the table (``4xxxx``/``4xxxxx`` holding, ``3xxxx`` input,
``1xxxx`` discrete input, a plain number below 10000 a coil) and the rest is the register
number; five digits address registers up to 9999, six digits up to 65536. Without vendor
notation the address is a plain register number in an explicitly named table. Either way
the register number counts from the address base: 1 for manuals that list 40001 as the
first holding register, 0 for those that list PDU addresses.
"""

from __future__ import annotations

from typing import Literal

Table = Literal["holding", "input", "coil", "discrete"]
TABLES: tuple[Table, ...] = ("holding", "input", "coil", "discrete")
BIT_TABLES: frozenset[Table] = frozenset({"coil", "discrete"})
"""Tables of single bits (coils and discrete inputs); the others hold 16-bit registers."""

LAST_PDU_ADDRESS = 65535

_PREFIX: dict[Table, int] = {"coil": 0, "discrete": 1, "input": 3, "holding": 4}
_TABLE_OF_PREFIX: dict[int, Table] = {v: k for k, v in _PREFIX.items()}

TABLE_OF_FUNCTION: dict[int, Table] = {
    1: "coil",
    2: "discrete",
    3: "holding",
    4: "input",
    5: "coil",
    6: "holding",
    15: "coil",
    16: "holding",
    22: "holding",
    23: "holding",
}
"""Function code → the table it reads or writes (read coils … read/write multiple registers)."""


class AddressError(ValueError):
    """An address that names no register: not in vendor notation, no table, or outside the table."""


def _split_vendor_address(address: int) -> tuple[Table, int]:
    """``40001`` → ``("holding", 1)``; ``300010`` → ``("input", 10)``; ``17`` → ``("coil", 17)``.

    Five-digit numbers carry a one-digit table prefix and a register number 0-9999; six
    digits, a register number 0-65536.
    """
    if address < 10000:
        return "coil", address
    prefix, number = divmod(address, 10000 if address < 100000 else 100000)
    if prefix not in _TABLE_OF_PREFIX or number > 65536:
        raise AddressError(
            f"address {address} is not in vendor notation (0xxxx coil, 1xxxx discrete, 3xxxx input, "
            "4xxxx holding; 5 or 6 digits); write the plain register number with an explicit table "
            "and vendor_notation: false"
        )
    return _TABLE_OF_PREFIX[prefix], number


def table_and_number(
    address: int, table: Table | None = None, vendor_notation: bool = True
) -> tuple[Table, int]:
    """The table and the register number as written (before subtracting the base).

    A vendor-notation address implies its table (an explicit ``table`` must agree); a plain
    one needs ``table``.
    """
    if not vendor_notation:
        if table is None:
            raise AddressError("a plain address (vendor_notation: false) needs an explicit table")
        return table, address
    implied, number = _split_vendor_address(address)
    if table is not None and table != implied:
        raise AddressError(
            f"address {address} is a {implied} address in vendor notation, but table is "
            f"{table!r}; use vendor_notation: false for plain register numbers"
        )
    return implied, number


def locate(
    address: int, table: Table | None = None, *, vendor_notation: bool = True, address_base: int = 1
) -> tuple[Table, int]:
    """The table and the 0-based PDU address of ``address`` (see the module docstring):
    ``40001`` → ``("holding", 0)``; ``307`` in ``holding`` without vendor notation and base 0
    → ``("holding", 307)``."""
    table, number = table_and_number(address, table, vendor_notation)
    pdu = number - address_base
    if pdu > LAST_PDU_ADDRESS:
        raise AddressError(f"address {address} is past the last register (PDU address {LAST_PDU_ADDRESS})")
    if pdu < 0:
        raise AddressError(f"address {address} is below the first register (address_base {address_base})")
    return table, pdu
