"""Register codec: the one place where Modbus data types and word orders are handled.

A Modbus register is 16 bits sent high byte first. Values wider than one register are
spread over consecutive registers, and vendors disagree on the order. We name the
orders by where the bytes of a big-endian value ``A B C D`` (A most significant) end up
on the wire, register by register:

* ``ABCD``: high word first, high byte first (the Modbus default, "big-endian");
* ``CDAB``: low word first, bytes in order ("word-swapped"; BINDER incubators);
* ``BADC``: high word first, bytes swapped in each register ("byte-swapped");
* ``DCBA``: low word first, bytes swapped ("little-endian").

The same rule applies to 64-bit values (``ABCDEFGH`` → ``GHEFCDAB`` for ``CDAB``) and to
16-bit values, where ``BADC``/``DCBA`` swap the two bytes and ``CDAB`` is ``ABCD``.
Strings are two characters per register in address order; ``BADC``/``DCBA`` swap the
two characters of each register (the word order of a string is always address order).
Bit numbers count from the least significant bit of the register value (after the byte
swap of ``BADC``/``DCBA``), so bit 0 is ``value & 1``.

Decoding comes in two forms sharing one implementation: :func:`decode_many` decodes
many values of one type from an array of registers at once (the driver's hot path:
index arrays are built once per poll group, each poll is a gather plus a ``view``), and
:func:`decode` decodes one value (strings, bits, tests). :func:`encode` is the inverse,
used by the simulators so that a profile and its simulated device cannot disagree.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from enum import StrEnum
from typing import Any

import numpy as np
import numpy.typing as npt


class DataType(StrEnum):
    INT16 = "int16"
    UINT16 = "uint16"
    INT32 = "int32"
    UINT32 = "uint32"
    INT64 = "int64"
    UINT64 = "uint64"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    BOOL = "bool"
    STRING = "string"


class WordOrder(StrEnum):
    ABCD = "ABCD"
    BADC = "BADC"
    CDAB = "CDAB"
    DCBA = "DCBA"


class CodecError(ValueError):
    """A value cannot be encoded (out of the type's range) or decoded (wrong register count,
    invalid text)."""


# numpy big-endian dtype of each fixed-width numeric type
_DTYPES: dict[DataType, str] = {
    DataType.INT16: ">i2",
    DataType.UINT16: ">u2",
    DataType.INT32: ">i4",
    DataType.UINT32: ">u4",
    DataType.INT64: ">i8",
    DataType.UINT64: ">u8",
    DataType.FLOAT32: ">f4",
    DataType.FLOAT64: ">f8",
}

INTEGER_TYPES = frozenset(
    {DataType.INT16, DataType.UINT16, DataType.INT32, DataType.UINT32, DataType.INT64, DataType.UINT64}
)
FLOAT_TYPES = frozenset({DataType.FLOAT32, DataType.FLOAT64})

Registers = npt.NDArray[np.uint16]


def register_count(dtype: DataType, length: int | None = None) -> int:
    """Registers one value occupies; ``length`` is the character count of a string."""
    if dtype is DataType.STRING:
        if not length or length < 1:
            raise CodecError("a string needs a length (characters) of at least 1")
        return (length + 1) // 2
    if dtype is DataType.BOOL:
        return 1
    return np.dtype(_DTYPES[dtype]).itemsize // 2


def _swaps(order: WordOrder) -> tuple[bool, bool]:
    """(reverse the words, swap the bytes in each word)."""
    return order in (WordOrder.CDAB, WordOrder.DCBA), order in (WordOrder.BADC, WordOrder.DCBA)


def swaps_bytes(order: WordOrder) -> bool:
    """Whether ``order`` swaps the two bytes of each register (what a bit's position depends on)."""
    return _swaps(order)[1]


def flag(word: int, bit: int | None, swap: bool) -> bool:
    """A bit field of one register as :func:`decode` reads it: bit ``bit`` of the word (its bytes
    swapped first when ``swap``), or, with no bit, whether the register is non-zero. Plain ints, so
    a read plan decodes a status word's flags without a numpy call per flag."""
    if swap:
        word = ((word >> 8) | (word << 8)) & 0xFFFF
    return word != 0 if bit is None else bool((word >> bit) & 1)


def _byteswap(words: Registers) -> Registers:
    return ((words >> 8) | (words << 8)).astype(np.uint16)


def as_registers(values: Sequence[int] | npt.NDArray[Any]) -> Registers:
    """Registers as a ``uint16`` array (what a Modbus response's register list becomes)."""
    return np.asarray(values, dtype=np.uint16)


def decode_many(
    registers: Registers, starts: npt.NDArray[np.intp], dtype: DataType, order: WordOrder = WordOrder.ABCD
) -> npt.NDArray[Any]:
    """Decode one value of ``dtype`` at each index in ``starts`` of ``registers``.

    Returns a native-endian numeric array (``int64``/``uint64``/``float64`` families as
    given by ``dtype``). Only fixed-width numeric types; strings and bits go through
    :func:`decode`.
    """
    if dtype not in _DTYPES:
        raise CodecError(f"decode_many handles numeric types only, not {dtype}")
    n = np.dtype(_DTYPES[dtype]).itemsize // 2
    reverse, swap = _swaps(order)
    if n == 1:
        words = registers[starts]
        if swap:
            words = _byteswap(words)
        return words.view(np.dtype(_DTYPES[dtype]).newbyteorder("="))
    words = registers[starts[:, None] + np.arange(n)]
    if reverse:
        words = words[:, ::-1]
    if swap:
        words = _byteswap(words)
    be = np.ascontiguousarray(words, dtype=">u2")
    return be.view(_DTYPES[dtype]).reshape(len(starts)).astype(np.dtype(_DTYPES[dtype]).newbyteorder("="))


def decode(
    registers: Sequence[int] | Registers,
    dtype: DataType,
    order: WordOrder = WordOrder.ABCD,
    *,
    bit: int | None = None,
    length: int | None = None,
) -> int | float | bool | str:
    """Decode one value from exactly the registers it occupies.

    ``bit`` selects one bit of a 16-bit register (the result is a ``bool``; a ``bool``
    without a bit means "register non-zero", as devices flagging with 0/1 or 0/0xFFFF
    mean it). ``length`` is the character count of a string (trailing NULs and spaces
    are dropped: devices pad fixed-width text fields with either). Non-ASCII text is a :class:`CodecError`:
    a garbled name must not pass as a valid one.
    """
    regs = as_registers(registers)
    if bit is not None or dtype is DataType.BOOL:
        if len(regs) != 1:
            raise CodecError(f"a bit field needs 1 register, got {len(regs)}")
        return flag(int(regs[0]), bit, swaps_bytes(order))
    expected = register_count(dtype, length)
    if len(regs) != expected:
        raise CodecError(f"{dtype} needs {expected} register(s), got {len(regs)}")
    if dtype is DataType.STRING:
        words = _byteswap(regs) if swaps_bytes(order) else regs
        raw = words.astype(">u2").tobytes()[: length or 0]
        try:
            return raw.decode("ascii").rstrip("\x00 ")
        except UnicodeDecodeError as exc:
            raise CodecError(f"string is not ASCII: {raw!r}") from exc
    value = decode_many(regs, np.zeros(1, dtype=np.intp), dtype, order)[0]
    return float(value) if dtype in FLOAT_TYPES else int(value)


def encode(
    value: float | bool | str,
    dtype: DataType,
    order: WordOrder = WordOrder.ABCD,
    *,
    length: int | None = None,
) -> list[int]:
    """Registers that a device holding ``value`` would send (the inverse of :func:`decode`).

    Integers must fit the type (no silent wrap-around: a simulator must not put a value
    on the wire that the profile would read back differently). Floats are rounded to the
    type's precision. A bool becomes ``1``/``0``; to set one bit of a status word,
    build the word and encode it as ``uint16``.
    """
    if dtype is DataType.STRING:
        if not isinstance(value, str):
            raise CodecError(f"a string tag needs text, got {value!r}")
        n = register_count(dtype, length)
        try:
            raw = value.encode("ascii")
        except UnicodeEncodeError as exc:
            raise CodecError(f"{value!r} is not ASCII") from exc
        if length is not None and len(raw) > length:
            raise CodecError(f"{value!r} is longer than {length} characters")
        words = np.frombuffer(raw.ljust(2 * n, b"\x00"), dtype=">u2").astype(np.uint16)
        return (_byteswap(words) if swaps_bytes(order) else words).tolist()  # type: ignore[no-any-return]
    if dtype is DataType.BOOL:
        return encode(int(bool(value)), DataType.UINT16, order)
    if isinstance(value, str):
        raise CodecError(f"{dtype} needs a number, got {value!r}")
    np_type = np.dtype(_DTYPES[dtype])
    if dtype in INTEGER_TYPES:
        if isinstance(value, float) and not value.is_integer():
            raise CodecError(f"{value!r} is not an integer ({dtype})")
        info = np.iinfo(np_type)
        if not info.min <= int(value) <= info.max:
            raise CodecError(f"{value!r} does not fit {dtype} [{info.min}, {info.max}]")
        scalar = np.array(int(value), dtype=np_type)
    else:
        if (
            dtype is DataType.FLOAT32
            and math.isfinite(value)
            and abs(value) > float(np.finfo(np.float32).max)
        ):
            raise CodecError(f"{value!r} does not fit float32")
        scalar = np.array(value, dtype=np_type)
    words = np.frombuffer(scalar.tobytes(), dtype=">u2").astype(np.uint16)
    reverse, swap = _swaps(order)
    if reverse:
        words = words[::-1]
    if swap:
        words = _byteswap(words)
    return words.tolist()  # type: ignore[no-any-return]
