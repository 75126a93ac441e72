"""Whether a device is the one its profile was written for.

A register map or node map is only right for the device models and firmware it was read from: a
firmware update may move a register, rescale a value or retype a node, and the agent would go on
publishing good-looking readings that mean something else. A profile's ``device:`` block
(:class:`DeviceCompat`) records what it was written for; on every connect the agent compares it
with the identity the device reports (:meth:`DeviceCompat.check`) and says so when they differ.

Firmware strings are no standard (``2.4.1``, ``V2.04``, ``112``, ``2.4.1 (build 2041)``,
``FW 3.1-rc2``), so they are read tolerantly rather than as PEP 440 versions: the first run of
dotted numbers is the version, compared number by number (``2.4`` equals ``2.4.0``), and the text
after it is its suffix. A firmware string with no number in it is *unknown*, never an error: the
device still measures, and whether it matches cannot be said.
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from pydantic import field_validator, model_validator

from cleanroom_common.fields import Strict

_VERSION_RE = re.compile(r"\d+(?:\.\d+)*")
_CLAUSE_RE = re.compile(r"(?P<op>==|!=|>=|<=|>|<)?\s*(?P<num>\d+(?:\.\d+)*)(?P<star>\.\*)?(?P<suffix>.*)")
MAX_DIGITS = 18
"""Longest number in a version: a longer run of digits is a serial number or noise, not a version
(and Python refuses to convert very long digit strings)."""
_SEPARATORS = " -_.+"


def _suffix(text: str) -> str:
    """The text after a version's numbers, in the one form two suffixes are compared in."""
    return " ".join(text.split()).strip(_SEPARATORS).casefold()


@dataclass(frozen=True, slots=True)
class Version:
    """A firmware version: its dotted numbers and the text after them (``rc1``, ``(build 2041)``)."""

    numbers: tuple[int, ...]
    suffix: str = ""

    def padded(self, width: int) -> tuple[int, ...]:
        """The numbers with missing trailing components as 0, so ``2.4`` compares equal to ``2.4.0``."""
        return self.numbers + (0,) * (width - len(self.numbers))


def parse_version(text: str) -> Version | None:
    """The version in a firmware string as a device reports it, or None when there is none
    (no digits, or a number too long to be a version component): never raises."""
    m = _VERSION_RE.search(text)
    if m is None:
        return None
    parts = m.group().split(".")
    if any(len(p) > MAX_DIGITS for p in parts):
        return None
    return Version(tuple(int(p) for p in parts), _suffix(text[m.end() :]))


@dataclass(frozen=True, slots=True)
class Clause:
    """One comparison of a range: ``>=2.1``, ``<3``, ``==2.4.*``, ``!=2.5.0``, ``==2.4.1-rc1``."""

    op: str
    version: Version
    wildcard: bool = False
    """``==2.4.*``: every version whose numbers begin with 2.4."""

    def admits(self, v: Version) -> bool:
        if self.wildcard:
            n = len(self.version.numbers)
            same = v.padded(n)[:n] == self.version.numbers
        else:
            width = max(len(v.numbers), len(self.version.numbers))
            a, b = v.padded(width), self.version.padded(width)
            if self.op in ("==", "!="):
                # a bound without a suffix compares numbers only: 2.4.1-rc1 is a 2.4.1
                same = a == b and (not self.version.suffix or v.suffix == self.version.suffix)
            else:
                return {">=": a >= b, "<=": a <= b, ">": a > b, "<": a < b}[self.op]
        return same if self.op == "==" else not same


@dataclass(frozen=True, slots=True)
class VersionRange:
    """Comparisons that must all hold (``>=2.1,<3``), as written in a profile."""

    text: str
    clauses: tuple[Clause, ...]

    def admits(self, v: Version) -> bool:
        return all(c.admits(v) for c in self.clauses)


def _parse_clause(text: str) -> Clause:
    m = _CLAUSE_RE.fullmatch(text)
    if m is None:
        raise ValueError(
            f"{text!r} is not a comparison with a version: write e.g. '>=2.1', '<3', '==2.4.*', '2.4.1'"
        )
    op = m.group("op") or "=="
    numbers = m.group("num").split(".")
    if any(len(p) > MAX_DIGITS for p in numbers):
        raise ValueError(f"{text!r}: a version number has more than {MAX_DIGITS} digits")
    if m.group("suffix").startswith("."):
        raise ValueError(f"{text!r}: a dot must be followed by a number (or by * for a series: ==2.4.*)")
    suffix = _suffix(m.group("suffix"))
    if m.group("star") and op not in ("==", "!="):
        raise ValueError(f"{text!r}: a wildcard (.*) goes only with == or !=")
    if m.group("star") and m.group("suffix").strip():
        raise ValueError(f"{text!r}: nothing may follow the wildcard (.*)")
    if suffix and op not in ("==", "!="):
        raise ValueError(
            f"{text!r}: a suffix ({suffix!r}) can only be matched exactly (== or !=); "
            "suffixes have no order that holds across vendors"
        )
    return Clause(op, Version(tuple(int(p) for p in numbers), suffix), wildcard=bool(m.group("star")))


def parse_range(text: str) -> VersionRange:
    """A firmware range as a profile writes it: comparisons joined by commas, all of which must hold;
    a bare version means ``==``. ValueError naming what is wrong."""
    parts = [p.strip() for p in text.split(",")]
    if not any(parts):
        raise ValueError("empty firmware range: write e.g. '>=2.1,<3' or '==2.4.*'")
    if not all(parts):
        raise ValueError(f"{text!r} has an empty comparison between its commas")
    return VersionRange(text.strip(), tuple(_parse_clause(p) for p in parts))


class Outcome(StrEnum):
    """How a device compares with its profile. Closed: a consumer may act on each value."""

    MATCH = "match"
    """Everything the profile names is what the device reported."""
    MISMATCH = "mismatch"
    """The device reported a model, vendor or firmware the profile was not written for."""
    UNKNOWN = "unknown"
    """Nothing differs, but the device did not report (readably) something the profile names."""


FIELDS = ("model", "vendor", "firmware")
"""The identity fields a profile can require, in the order they are reported."""


class Reported(Protocol):
    """What a device said it is (:class:`~agent.core.driver.DeviceIdentity`), as far as compared here."""

    @property
    def model(self) -> str | None: ...
    @property
    def vendor(self) -> str | None: ...
    @property
    def firmware(self) -> str | None: ...


@dataclass(frozen=True, slots=True)
class Compat:
    """The result of comparing a device with its profile."""

    outcome: Outcome
    fields: dict[str, Outcome]
    """Each field the profile names, and how the device's report of it compares."""
    detail: str
    """Why it is not a match, for people (empty for a match)."""


def _patterns(value: str | list[str] | None) -> list[str]:
    return [] if value is None else [value] if isinstance(value, str) else list(value)


def _norm(text: str) -> str:
    """Case and runs of whitespace do not tell two model names apart (``CO2-170 r`` = ``co2-170  R``)."""
    return " ".join(text.split()).casefold()


class DeviceCompat(Strict):
    """The device the profile was written for, checked against what it reports on every connect.

    The models, vendor and firmware its map was read from. A device that differs raises a
    ``profile_mismatch`` event (severity warning) once per change and is flagged in ``status``;
    acquisition goes on, since refusing data would lose more than it protects. Name only fields the
    device reports: a Modbus profile needs ``identity`` tags for them, an OPC UA server's BuildInfo
    reports model, vendor and firmware by itself; a field the device leaves unreported makes the
    outcome ``unknown`` (an info event)."""

    model: str | list[str] | None = None
    """Model (product) names the map fits, as glob patterns (``*``, ``?``, ``[...]``), case and
    repeated spaces ignored: ``"CellCube 2*"`` or a list of names, any of which may match."""
    vendor: str | list[str] | None = None
    """Manufacturer names (glob patterns like ``model``)."""
    firmware: str | list[str] | None = None
    """Firmware range the map fits: comparisons joined by commas that must all hold
    (``">=2.1,<3"``), ``==2.4.*`` for a series, a bare version for exactly that one, or a list of
    ranges any of which may hold. The first run of dotted numbers in what the device reports is
    its version, compared number by number (``2.4`` = ``2.4.0``); text after the numbers (``-rc1``,
    ``(build 2041)``) is ignored unless the bound names it (``==2.4.1-rc1``). A report with no
    number in it is unknown, not a mismatch. Versions are compared as the device reports them:
    a register holding ``112`` for firmware 1.12 needs ``">=100,<200"``."""

    @field_validator("model", "vendor")
    @classmethod
    def _patterns_given(cls, v: str | list[str] | None) -> str | list[str] | None:
        names = _patterns(v)
        if v is not None and (not names or not all(n.strip() for n in names)):
            raise ValueError("name at least one non-empty pattern (or leave the key out)")
        return v

    @field_validator("firmware")
    @classmethod
    def _ranges_parse(cls, v: str | list[str] | None) -> str | list[str] | None:
        ranges = _patterns(v)
        if v is not None and not ranges:
            raise ValueError("name at least one range (or leave the key out)")
        for i, text in enumerate(ranges):
            try:
                parse_range(text)
            except ValueError as exc:
                raise ValueError(str(exc) if isinstance(v, str) else f"entry {i}: {exc}") from None
        return v

    @model_validator(mode="after")
    def _something_required(self) -> DeviceCompat:
        if all(getattr(self, f) is None for f in FIELDS):
            raise ValueError("name at least one of model, vendor, firmware (or leave device out)")
        return self

    def expected(self) -> dict[str, list[str] | None]:
        """What the profile requires, every field present (None: anything)."""
        return {f: (None if getattr(self, f) is None else _patterns(getattr(self, f))) for f in FIELDS}

    def check(self, reported: Reported) -> Compat:
        """How the device that reported ``reported`` compares with this block. Never raises: what
        the device said is untrusted input."""
        fields: dict[str, Outcome] = {}
        why: list[str] = []
        for name in FIELDS:
            wanted = _patterns(getattr(self, name))
            if not wanted:
                continue
            value: str | None = getattr(reported, name)
            if value is None:
                fields[name] = Outcome.UNKNOWN
                why.append(f"the device reported no {name}")
            elif name == "firmware":
                fields[name] = _firmware(value, wanted, why)
            elif any(fnmatch.fnmatchcase(_norm(value), _norm(p)) for p in wanted):
                fields[name] = Outcome.MATCH
            else:
                fields[name] = Outcome.MISMATCH
                why.append(f"{name} {value!r} is not {' or '.join(repr(p) for p in wanted)}")
        outcomes = set(fields.values())
        outcome = next((o for o in (Outcome.MISMATCH, Outcome.UNKNOWN) if o in outcomes), Outcome.MATCH)
        return Compat(outcome, fields, "; ".join(why))


def _firmware(value: str, ranges: list[str], why: list[str]) -> Outcome:
    version = parse_version(value)
    if version is None:
        why.append(f"firmware {value!r} holds no version number")
        return Outcome.UNKNOWN
    if any(parse_range(r).admits(version) for r in ranges):
        return Outcome.MATCH
    why.append(f"firmware {value!r} is outside {' or '.join(repr(r) for r in ranges)}")
    return Outcome.MISMATCH
