"""The one small interface every protocol driver implements, and what they share.

A driver is one package (``drivers/<protocol>/`` here, or a third party's own) that
defines a :class:`Driver` subclass and names it in the ``cleanroom_edge.drivers``
entry-point group (see :func:`driver_for`). Its three pydantic models say what it accepts:

* ``Tag``: one entry of a device profile's ``tags`` (extends :class:`TagBase` with
  protocol fields such as a Modbus address or an OPC UA node id);
* ``Group``: one entry of a profile's ``groups`` (extends :class:`GroupSpec`);
* ``Connection``: the ``connection:`` block of a device instance in the agent config.

The scheduler owns timing, timeouts and reconnects; a driver only connects, reads a
poll group (or subscribes to one) and closes. On every connect it reports who the device
says it is (:meth:`DeviceContext.identify`), and with the connection's ``record_raw`` its
blocks keep each value as the device sent it (``Block.raw``). A driver that needs a task of its own (a
drain, a keep-alive) starts it with ``ctx.tasks.spawn`` (see :class:`DeviceContext`). Events the device
pushes that must not wait for a block (an alarm) go to the buffer at once through ``ctx.submit_events``.
Device problems are data, not crashes: a reply that cannot be decoded becomes bad-quality readings (see
:meth:`PollGroup.finish`), and a lost connection is a :class:`DeviceError`, which the
scheduler turns into bad-quality readings for the group and a reconnect with backoff.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
from abc import ABC, abstractmethod
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar, NamedTuple, cast

import numpy as np
from pydantic import Field, model_validator

from agent.core.compat import DeviceCompat
from agent.core.precision import MAX_DECIMALS, Rounding, derived_precision, rint_one, round_one
from agent.core.records import Block, Event, Quality, Reason, Value, now_ns
from agent.core.stats import percentile
from agent.core.supervise import Supervisor
from cleanroom_common.fields import Duration, Strict

# --------------------------------------------------------------------------- models


class TagBase(Strict):
    """Fields every tag has, whatever the protocol."""

    name: str = Field(pattern=r"^[A-Za-z0-9_.\-/]+$")
    """Tag name, unique within the profile; appears in payloads as is."""
    unit: str | None = None
    """Engineering unit after scaling (e.g. ``degC``, ``pH``, ``%``, ``counts/m3``)."""
    description: str = ""
    """What the tag measures, for people."""
    group: str = "default"
    """Poll group this tag is read in; the group sets interval and timeout."""
    scale: float = 1.0
    """Engineering value = raw × scale + offset."""
    offset: float = 0.0
    """Engineering value = raw × scale + offset."""
    precision: int | None = Field(default=None, ge=0, le=MAX_DECIMALS)
    """Decimal places the engineering value is rounded to, so a payload carries ``95.1``, not the
    binary noise of ``95.10000000000001``. Unset: the decimals of ``scale`` and ``offset`` (``0.1``
    → 1, ``0.05`` → 2; none without them), applied where the device sent a whole number (an
    integer register), where they are exact. Set it for a device that sends fractional values and
    is scaled. A float32 value is published as its shortest decimal (``95.1``) by its driver
    either way. ``raw`` keeps the device's value unrounded."""
    range: tuple[float, float] | None = None
    """Physically valid range of the engineering value; outside it a reading is bad (``out_of_range``)."""

    @model_validator(mode="after")
    def _range_ordered(self) -> TagBase:
        if self.range is not None and self.range[0] > self.range[1]:
            raise ValueError("range must be [low, high] with low <= high")
        return self


class GroupSpec(Strict):
    """A poll group: tags read together on one schedule."""

    interval: Duration = 1.0
    """Time between polls, on absolute ticks (no drift)."""
    timeout: Duration | None = None
    """Time allowed for one poll of the group; defaults to the connection's timeout."""


class IdentityTags(Strict):
    """Which tags of the profile name the instrument: serial number, firmware, model, vendor.

    Read once on every connect, their values become the device's :class:`DeviceIdentity`
    (the ``source`` of its data, so every record names the instrument that measured it).
    Each field names a tag of the profile; the tag's value as the device sent it (before
    scale and offset) is taken as text. A tag needed only here can sit in a group of its
    own with a long interval."""

    serial: str | None = None
    """Tag holding the instrument's serial number."""
    firmware: str | None = None
    """Tag holding the firmware (software) version."""
    model: str | None = None
    """Tag holding the model (product) name."""
    vendor: str | None = None
    """Tag holding the manufacturer's name."""

    def named(self) -> dict[str, str]:
        """Identity field → tag name, for the fields the profile names."""
        return {k: v for k, v in self.model_dump().items() if isinstance(v, str)}


class BatchTags(Strict):
    """Which tags of the profile say the batch the device itself runs: a device-declared batch.

    An OPC UA LADS program's batch id and step nodes, a PLC's batch register: the agent follows
    them on what it commits, and a change of the batch id starts (or ends) the device's batch with
    source ``device``. An empty text or ``0`` says "no batch". Where the batch was assigned by the
    CLI or the MES, a device saying otherwise is recorded as a ``batch_conflict``, never obeyed."""

    batch_id: str
    """Tag holding the batch (lot) id."""
    step: str | None = None
    """Tag holding the ISA-88 procedure step."""
    product: str | None = None
    """Tag holding the product."""
    coi_id: str | None = None
    """Tag holding the chain-of-identity id."""

    def named(self) -> dict[str, str]:
        """Batch field → tag name, for the fields the profile names."""
        return {k: v for k, v in self.model_dump().items() if isinstance(v, str)}


class ProfileBase(Strict):
    """A device profile: the register/node map of one device model, as data."""

    profile: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    """Profile name that device instances refer to."""
    protocol: str
    """Driver that speaks to this device model (e.g. ``modbus``, ``opcua``, ``serial_counter``)."""
    description: str = ""
    """Device model, vendor, and where the map comes from."""
    device_kind: str = "generic"
    """Kind of equipment (``bioreactor``, ``incubator``, ``particle_counter``...): models bind by kind."""
    groups: dict[str, GroupSpec] = Field(default_factory=lambda: {"default": GroupSpec()})
    """Poll groups by name."""
    tags: list[TagBase]
    """The tags, in payload order. ``tags: []`` for a device read only for its events (an OPC UA
    profile with ``alarms`` and nothing to poll); the key itself is required, so a profile that
    lost its tags is an error, not a device that silently reads nothing."""
    identity: IdentityTags | None = None
    """Tags whose values identify the device (serial number, firmware, model, vendor), read on
    every connect (Modbus, OPC UA). A serial counter reports its serial number by itself."""
    batch: BatchTags | None = None
    """Tags through which the device reports the batch it runs (batch id, step, product,
    chain-of-identity id): a device-declared batch assignment (docs/operations.md, "Batches")."""
    device: DeviceCompat | None = None
    """The device models, vendor and firmware range this profile was written for, compared with
    what the device reports on every connect: a device that differs raises a ``profile_mismatch``
    event and a warning in ``status``, and is still read."""
    reference_limits: dict[str, float] = Field(default_factory=dict)
    """Largest allowed difference between a tag's online reading and an offline reference sample
    of it (the lab's pH, dissolved oxygen, viable cell density), in the tag's unit, by tag name:
    ``{ph: 0.1}``. A ``reference_sample`` event whose difference exceeds it is an alarm (the probe
    drifted: a fault no model trained on the probe can see); a tag without one is compared and
    recorded with no limit (docs/operations.md, "Reference samples")."""

    @model_validator(mode="after")
    def _tags_consistent(self) -> ProfileBase:
        seen: set[str] = set()
        for tag in self.tags:
            if tag.name in seen:
                raise ValueError(f"tag {tag.name!r} is defined twice")
            seen.add(tag.name)
            if tag.group not in self.groups:
                raise ValueError(f"tag {tag.name!r} names group {tag.group!r}, which is not in groups")
        if self.identity is not None:
            for field_name, tag_name in self.identity.named().items():
                if tag_name not in seen:
                    raise ValueError(f"identity.{field_name} names tag {tag_name!r}, which is not in tags")
        if self.batch is not None:
            for field_name, tag_name in self.batch.named().items():
                if tag_name not in seen:
                    raise ValueError(f"batch.{field_name} names tag {tag_name!r}, which is not in tags")
        for tag_name, limit in self.reference_limits.items():
            if tag_name not in seen:
                raise ValueError(f"reference_limits names tag {tag_name!r}, which is not in tags")
            if not (limit > 0 and math.isfinite(limit)):
                raise ValueError(f"reference_limits.{tag_name} must be a positive number, not {limit!r}")
        return self


class ConnectionBase(Strict):
    """Settings every device connection has."""

    timeout: Duration = 2.0
    """Per-request (and per-poll, unless the group sets its own) timeout."""
    backoff_min: Duration = 1.0
    """First reconnect delay after a failure; doubles on each failure (with jitter)."""
    backoff_max: Duration = 60.0
    """Upper bound of the reconnect delay."""
    record_raw: bool = False
    """Keep each reading's value as the device sent it (``raw`` in the block, beside the
    engineering ``values``): register words, the node's value before scale and offset, a
    record's field text. For records that must be kept in their original form (ALCOA+
    "original"); costs payload and buffer space, nothing when off. Bad readings keep what the
    device sent; raw is null only where nothing was received."""

    def bus_key(self) -> tuple[str, ...] | None:
        """The link this connection shares with other devices (a serial line, a TCP gateway),
        named the same by every device on it; ``None`` when the device has a link of its own.
        The scheduler spreads the devices sharing a link over time, so that their requests
        do not queue behind each other."""
        return None


# --------------------------------------------------------------------------- runtime


class DeviceError(Exception):
    """The device could not be talked to (connection lost, timeout, garbage on the line).

    ``reason`` goes into the quality reason of the readings the failed poll produces.
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class DeviceIdentity:
    """Who the device says it is: what makes its records attributable to one instrument.

    Every field is what the device itself reported on this connection, or ``None`` where it
    reports nothing (or its reply could not be read): never guessed, never carried over from
    an earlier connection, so a swapped instrument cannot inherit its predecessor's serial number.
    """

    serial: str | None = None
    firmware: str | None = None
    model: str | None = None
    vendor: str | None = None

    def as_dict(self) -> dict[str, str]:
        """The known fields (the keys of a segment's ``source`` they fill)."""
        return {
            k: v for k in ("serial", "firmware", "model", "vendor") if (v := getattr(self, k)) is not None
        }


IDENTITY_UNAVAILABLE = "identity_unavailable"
"""Error kind counted when the device's identity (or part of it) could not be read."""

IDENTITY_TEXT_MAX = 128
"""Longest identity text kept: a longer one is noise, not a serial number."""


def identity_text(value: object) -> str | None:
    """An identity value as text, or ``None`` when it cannot be one: empty, too long, or
    holding control characters (a garbled reply must not pass as an instrument's name)."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        return None
    text = str(value).strip()
    if not text or len(text) > IDENTITY_TEXT_MAX or not text.isprintable():
        return None
    return text


def _no_identity_listener(identity: DeviceIdentity) -> None:
    """Default :attr:`DeviceContext.on_identity`: a driver run without a runtime (tests, bench)."""


def _no_event_sink(events: Sequence[Event]) -> None:
    """Default :attr:`DeviceContext.submit_events`: a driver run without a runtime (tests, bench)
    has no buffer to commit to; said at debug level so a harness can see what it did not keep."""
    logging.getLogger("cleanroom.drivers").debug("no runtime: %d events not kept", len(events))


@dataclass
class DriverStats:
    """Per-device counters, exposed through ``cleanroom-agent status``."""

    requests: int = 0
    retries: int = 0
    reconnects: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    rtt_s: deque[float] = field(default_factory=lambda: deque(maxlen=2048))
    warnings: list[str] = field(default_factory=list)
    """Settings that weaken the device's link (e.g. an unencrypted OPC UA session), shown by ``status``."""

    def error(self, kind: str) -> None:
        self.errors[kind] += 1

    def request_done(self, rtt_s: float) -> None:
        self.requests += 1
        self.rtt_s.append(rtt_s)

    def snapshot(self) -> dict[str, Any]:
        def pct(q: float) -> float | None:
            rtt = percentile(self.rtt_s, q)
            return None if rtt is None else round(rtt * 1000, 3)

        return {
            "requests": self.requests,
            "retries": self.retries,
            "reconnects": self.reconnects,
            "errors": dict(self.errors),
            "rtt_p50_ms": pct(0.5),
            "rtt_p99_ms": pct(0.99),
            "warnings": list(self.warnings),
        }


class PollGroup:
    """A group's tags compiled for the hot path: names, units and the scale/offset/range
    transform that turns raw numbers into a :class:`Block`.

    Everything a poll needs is worked out once per configuration, here or on the first poll that
    needs it: a plant's groups are small (3 to 30 tags) and polled every second, so a
    :meth:`finish` costs what its Python does per call, not per tag, and looks nothing up again."""

    def __init__(self, device: str, name: str, spec: GroupSpec, tags: Sequence[TagBase], timeout_s: float):
        self.device = device
        self.name = name
        self.spec = spec
        self.interval_s = spec.interval
        self.timeout_s = spec.timeout if spec.timeout is not None else timeout_s
        self.tag_specs: tuple[TagBase, ...] = tuple(tags)
        self.tags: tuple[str, ...] = tuple(t.name for t in tags)
        self.units: tuple[str | None, ...] = tuple(t.unit for t in tags)
        self.index: dict[str, int] = {t: i for i, t in enumerate(self.tags)}
        self._scale = np.array([t.scale for t in tags], dtype=np.float64)
        self._offset = np.array([t.offset for t in tags], dtype=np.float64)
        self._identity = bool(np.all(self._scale == 1.0) and np.all(self._offset == 0.0))
        self._lo = np.array([t.range[0] if t.range else -np.inf for t in tags], dtype=np.float64)
        self._hi = np.array([t.range[1] if t.range else np.inf for t in tags], dtype=np.float64)
        self._ranged = any(t.range is not None for t in tags)
        self._rounding = Rounding.of(
            [t.precision for t in tags], [derived_precision(t.scale, t.offset) for t in tags]
        )

    def for_device(self, device: str) -> PollGroup:
        """This group for another device of the same profile, spec and timeout. Nothing compiled
        here changes after ``__init__`` (the scheduler and drivers only read it), so ten devices of
        a 10,000-tag profile share one set of arrays instead of compiling ten (about 1 MB each)."""
        twin = copy.copy(self)
        twin.device = device
        return twin

    @functools.cached_property
    def _math(self) -> tuple[_TagMath, ...]:
        """Each tag's transform as plain floats, for the value-by-value paths (indexing numpy arrays
        one value at a time costs ten times the arithmetic it feeds); worked out on a group's first
        poll that needs it, so a large register map read as arrays never holds it."""
        return _tag_math(self.tag_specs, self._lo.tolist(), self._hi.tolist(), self._rounding)

    def bad(self, reason: str, acq_ts_ns: int | None = None) -> Block:
        return Block.bad(self.device, self.name, self.tags, self.units, reason, acq_ts_ns)

    def finish(
        self,
        readings: np.ndarray | Sequence[Value],
        *,
        acq_ts_ns: int | None = None,
        quality: list[Quality] | None = None,
        reasons: list[str | None] | None = None,
        source_ts_ns: int | list[int | None] | None = None,
        state: dict[str, str] | None = None,
        device_raw: Sequence[Value | list[int]] | None = None,
    ) -> Block:
        """Apply scale/offset, mark non-finite values bad (``decode_error``) and values
        outside the tag's range bad (``out_of_range``), and build the block.

        ``readings`` holds one decoded value per tag of the group, in group order. Numeric input
        should be an array (float64, or an integer type for registers): its readings keep their
        value when out of range. A list may hold non-numeric values (strings, booleans, ``None``
        for readings the driver already marked bad), which pass through untransformed; a number
        in it that is out of range becomes null. ``device_raw`` (only when the device records raw
        values) is what the device sent for each tag; it becomes the block's ``raw``, null
        for every reading that ends up bad.
        """
        n = len(self.tags)
        if len(readings) != n:
            raise ValueError(f"group {self.name!r} has {n} tags, driver produced {len(readings)} values")
        if device_raw is not None and len(device_raw) != n:
            raise ValueError(
                f"group {self.name!r} has {n} tags, driver produced {len(device_raw)} raw values"
            )
        values: list[Value]
        if isinstance(readings, np.ndarray):
            if n <= SMALL_GROUP and readings.dtype.kind in _SMALL_KINDS:
                values, quality, reasons = self._array_small(readings, quality, reasons)
            else:
                values, quality, reasons = self._array_vectorised(readings, quality, reasons)
        else:
            values, quality, reasons = self._per_value(readings, quality, reasons)
        if quality is not None and quality.count(Quality.GOOD) == len(quality):
            quality, reasons = None, None
        return Block(
            device=self.device,
            group=self.name,
            acq_ts_ns=now_ns() if acq_ts_ns is None else acq_ts_ns,
            tags=self.tags,
            units=self.units,
            values=values,
            quality=quality,
            reasons=reasons,
            source_ts_ns=source_ts_ns,
            state=state,
            raw=None if device_raw is None else list(device_raw),
        )

    def _array_vectorised(
        self, readings: np.ndarray, quality: list[Quality] | None, reasons: list[str | None] | None
    ) -> tuple[list[Value], list[Quality] | None, list[str | None] | None]:
        """An array of readings, transformed a column at a time: what a large register map needs."""
        n = len(self.tags)
        # Integer registers read without scaling stay integers (``7``, not ``7.0``) and
        # cannot be NaN: the common case of large register maps skips both conversions.
        integral = self._identity and readings.dtype.kind in _INTEGER_KINDS
        arr = readings if integral else readings.astype(np.float64, copy=False)
        if not self._identity:
            arr = arr * self._scale + self._offset
        if self._rounding is not None and not integral:
            arr = self._rounding.apply(arr, readings)
        bad_nan = None if integral else ~np.isfinite(arr)
        bad_range = None
        if self._ranged:
            bad_range = (arr < self._lo) | (arr > self._hi)
            if bad_nan is not None:
                bad_range &= ~bad_nan
        values: list[Value] = arr.tolist()
        if (bad_nan is not None and bad_nan.any()) or (bad_range is not None and bad_range.any()):
            quality = list(quality) if quality is not None else [Quality.GOOD] * n
            reasons = list(reasons) if reasons is not None else [None] * n
            if bad_nan is not None:
                for i in np.flatnonzero(bad_nan):
                    quality[i], reasons[i], values[i] = Quality.BAD, Reason.DECODE_ERROR, None
            if bad_range is not None:
                for i in np.flatnonzero(bad_range):
                    quality[i], reasons[i] = Quality.BAD, Reason.OUT_OF_RANGE
        return values, quality, reasons

    def _array_small(
        self, readings: np.ndarray, quality: list[Quality] | None, reasons: list[str | None] | None
    ) -> tuple[list[Value], list[Quality] | None, list[str | None] | None]:
        """:meth:`_array_vectorised`, value by value, to the same bits: for a handful of tags a
        dozen numpy calls cost more than the loop. Arithmetic is the same IEEE double operations
        in the same order; rounding is :meth:`Rounding.apply`'s (``rint``, keeping the sign of a
        zero); integers compare with a range as numpy compares them (as doubles)."""
        integral = self._identity and readings.dtype.kind in _INTEGER_KINDS
        raw: list[Any] = readings.tolist()
        bad: list[tuple[int, str]] | None = None
        if integral:
            if self._ranged:
                for i, (v, m) in enumerate(zip(raw, self._math, strict=True)):
                    x = float(v)
                    if x < m.lo or x > m.hi:
                        bad = bad or []
                        bad.append((i, Reason.OUT_OF_RANGE))
            values: list[Value] = raw
        else:
            identity, ranged, rounding = self._identity, self._ranged, self._rounding is not None
            integer_raw = readings.dtype.kind in _INTEGER_KINDS
            values = []
            for i, (v, m) in enumerate(zip(raw, self._math, strict=True)):
                f = float(v)
                x = f if identity else f * m.scale + m.offset
                if rounding and m.p10 is not None and (integer_raw or not m.only_whole or f.is_integer()):
                    x = rint_one(x, m.p10)
                if x - x != 0.0:  # NaN or infinite
                    bad = bad or []
                    bad.append((i, Reason.DECODE_ERROR))
                    values.append(None)
                    continue
                if ranged and (x < m.lo or x > m.hi):
                    bad = bad or []
                    bad.append((i, Reason.OUT_OF_RANGE))
                values.append(x)
        if bad is not None:
            n = len(raw)
            quality = list(quality) if quality is not None else [Quality.GOOD] * n
            reasons = list(reasons) if reasons is not None else [None] * n
            for i, reason in bad:
                quality[i], reasons[i] = Quality.BAD, reason
        return values, quality, reasons

    def _per_value(
        self, readings: Sequence[Value], quality: list[Quality] | None, reasons: list[str | None] | None
    ) -> tuple[list[Value], list[Quality], list[str | None]]:
        """A list of readings of any type: numbers transformed one by one, bad ones (given, or
        non-finite or out of range after the transform) null, anything else passed through."""
        n = len(readings)
        quality = list(quality) if quality is not None else [Quality.GOOD] * n
        reasons = list(reasons) if reasons is not None else [None] * n
        bad_q = Quality.BAD
        values: list[Value] = []
        append = values.append
        for i, (v, m) in enumerate(zip(readings, self._math, strict=True)):
            if quality[i] is bad_q:
                append(None)
                continue
            t = type(v)
            if t is not float and t is not int and (t is bool or not isinstance(v, _NUMBERS)):
                append(v)
                continue
            f = float(v)  # type: ignore[arg-type]
            x = f * m.scale + m.offset
            if m.p10 is not None and not (m.only_whole and not f.is_integer()):
                x = round_one(x, m.p10)
            if x - x != 0.0:  # NaN or infinite
                quality[i], reasons[i] = bad_q, Reason.DECODE_ERROR
                append(None)
            elif not (m.lo <= x <= m.hi):
                quality[i], reasons[i] = bad_q, Reason.OUT_OF_RANGE
                append(None)
            else:
                append(v if m.plain and isinstance(v, int) else x)
        return values, quality, reasons


SMALL_GROUP = 24
"""Groups of at most this many tags transform an array of readings value by value
(:meth:`PollGroup._array_small`), larger ones a column at a time: a scaled, ranged and rounded
array costs numpy some 15-20 µs whatever its length, the loop about 0.6 µs a tag (measured on
the plant's groups, most of 3 to 16 tags)."""

_INTEGER_KINDS = "iu"
"""``dtype.kind`` of signed and unsigned integer arrays (``np.issubdtype(dtype, np.integer)``,
at a fraction of its cost)."""

_SMALL_KINDS = "biuf"
"""Arrays of booleans, integers and floats take the value-by-value path when small (an object
array, which numpy would convert its own way, never does)."""

_NUMBERS = (int, float)


def _tag_math(
    tags: Sequence[TagBase], lo: list[float], hi: list[float], rounding: Rounding | None
) -> tuple[_TagMath, ...]:
    """Each tag's :class:`_TagMath`, one shared object for the tags that transform alike (most
    of a register map): a pointer a tag, not a tuple and four floats (10 MB at 100,000 tags)."""
    per_tag = rounding.per_tag() if rounding is not None else [(None, False)] * len(tags)
    shared: dict[tuple[_TagMath, str], _TagMath] = {}
    out = []
    for t, low, high, (p10, only_whole) in zip(tags, lo, hi, per_tag, strict=True):
        scale, offset = float(t.scale), float(t.offset)
        m = _TagMath(scale, offset, low, high, p10, only_whole, scale == 1.0 and offset == 0.0)
        out.append(shared.setdefault((m, repr(m)), m))  # repr: -0.0 equals 0.0 but adds otherwise
    return tuple(out)


class _TagMath(NamedTuple):
    """One tag's transform as :meth:`PollGroup.finish` applies it to a single value."""

    scale: float
    offset: float
    lo: float
    hi: float
    p10: float | None
    """10^decimals the value is rounded to; None: not rounded."""
    only_whole: bool
    """Rounded only where the raw value is a whole number (a derived precision)."""
    plain: bool
    """Scale 1, offset 0: an integer reading stays an integer."""


@dataclass
class DeviceContext:
    """Everything a driver instance gets from the agent."""

    id: str
    profile: ProfileBase
    connection: ConnectionBase
    groups: dict[str, PollGroup]
    state: Mapping[str, str] = field(default_factory=dict)
    """Driver state committed earlier with its blocks (e.g. record watermarks)."""
    stats: DriverStats = field(default_factory=DriverStats)
    tasks: Supervisor = field(
        default_factory=lambda: Supervisor(
            "driver", logging.getLogger("cleanroom.drivers"), expected=(DeviceError,)
        )
    )
    """Where a driver starts every task of its own (``ctx.tasks.spawn(name, factory, restart=False)``),
    never with ``asyncio.create_task``: a task that raises is then counted and logged, and the
    scheduler is told at once (a :class:`DeviceError` as a lost link, anything else as a
    ``driver_error``), shows bad readings and reconnects, which starts the task again. The scheduler
    also cancels these tasks whenever it closes the driver, so none outlives its connection."""
    on_identity: Callable[[DeviceIdentity], None] = _no_identity_listener
    """Set by the runtime: hears the device's identity whenever a driver reports it (:meth:`identify`)."""
    submit_events: Callable[[Sequence[Event]], None] = _no_event_sink
    """Set by the scheduler: hands events to the buffer at once, on the path blocks take (committed
    in the buffer's next group commit, then forwarded), for events that must not wait for the
    device's next block (an OPC UA alarm: a 60 s group would hold it 60 s). Call it on the event
    loop, with the events that arrived together (one protocol message), not one call per event.
    Events about a block (a counter's buffer wrap) ride on that block instead (``Block.events``),
    in its transaction."""
    identity: DeviceIdentity | None = None
    """The identity reported on the current connection; ``None`` before the first report."""

    def identify(self, identity: DeviceIdentity) -> None:
        """Report the device's identity; a driver calls it on every connect with what the device
        said this time (an empty :class:`DeviceIdentity` when it said nothing readable, so the
        previous instrument's identity no longer applies). A failing listener is logged and
        counted, never the device's failure: identity is never a reason to stop acquiring."""
        self.identity = identity
        try:
            self.on_identity(identity)
        except Exception:
            self.stats.error("identity_listener_failed")
            logging.getLogger("cleanroom.drivers").exception("%s: identity listener failed", self.id)

    @property
    def record_raw(self) -> bool:
        """Whether blocks carry the device's raw values (``record_raw`` of the connection)."""
        return self.connection.record_raw


Emit = Callable[[Block], None]


class Driver(ABC):
    """Connect, read a poll group (or subscribe to it), close.

    ``read`` returns one or more blocks: usually one (the group's current values), or
    one per device record for devices that buffer their own samples (particle
    counters), each carrying its own source timestamp and watermark ``state``.
    """

    protocol: ClassVar[str]
    Tag: ClassVar[type[TagBase]] = TagBase
    Group: ClassVar[type[GroupSpec]] = GroupSpec
    Connection: ClassVar[type[ConnectionBase]] = ConnectionBase
    Profile: ClassVar[type[ProfileBase]] = ProfileBase
    """Profile-wide fields and rules of this protocol; :meth:`profile_model` adds the tag
    and group types, so a driver never builds (or caches) a profile model itself."""
    supports_subscribe: ClassVar[bool] = False
    """True when :meth:`subscribe` is implemented (the device pushes changes)."""

    def __init__(self, ctx: DeviceContext) -> None:
        self.ctx = ctx

    @abstractmethod
    async def connect(self) -> None:
        """Open the connection; raise :class:`DeviceError` when the device is unreachable."""

    @abstractmethod
    async def read(self, group: PollGroup) -> list[Block]:
        """Poll one group. Undecodable data → bad-quality readings; lost link → DeviceError."""

    @abstractmethod
    async def close(self) -> None:
        """Release the connection; must not raise."""

    def reads_together(self, group: PollGroup) -> bool:
        """True when this group may be polled in one :meth:`read_together` call with the device's
        other such groups due on the same ticks (same interval and timeout): the driver then puts
        their requests in one exchange (a Modbus device's process and status registers a few
        addresses apart are one read, not two), and the scheduler wakes once for them."""
        return False

    async def read_together(self, groups: Sequence[PollGroup]) -> list[Block]:
        """Poll several groups (each one :meth:`reads_together` accepts) in one exchange: one block
        per group, as :meth:`read` gives it. A failed request marks bad the readings it carried,
        whichever group they belong to; a lost link (:class:`DeviceError`) fails every group."""
        raise NotImplementedError(f"{self.protocol} does not read groups together")

    def backfills(self, group: PollGroup) -> bool:
        """True when the device keeps what it measures while unreachable and this driver
        reads it back after reconnecting (a counter's record buffer). The scheduler then
        writes no gap readings for the group: the real records fill the gap, and the
        driver reports records the device itself lost as a ``data_loss`` event."""
        return False

    async def subscribe(self, group: PollGroup, emit: Emit) -> None:
        """Start pushing the group's changes through ``emit`` (only if ``supports_subscribe``)."""
        raise NotImplementedError(f"{self.protocol} does not support subscriptions")

    @classmethod
    def profile_model(cls) -> type[ProfileBase]:
        """The profile schema for this protocol: the driver's ``Profile`` base with its
        ``Tag`` and ``Group`` types (built once per driver class)."""
        cached: type[ProfileBase] | None = cls.__dict__.get("_profile_model")
        if cached is None:
            from pydantic import create_model

            base_fields = ProfileBase.model_fields
            built: Any = create_model(
                f"{cls.__name__}Profile",
                __base__=cls.Profile,
                __doc__=cls.Profile.__doc__,
                groups=(
                    dict[str, cls.Group],  # type: ignore[name-defined]
                    Field(
                        default_factory=lambda: {"default": cls.Group()},
                        description=base_fields["groups"].description,
                    ),
                ),
                tags=(list[cls.Tag], Field(description=base_fields["tags"].description)),  # type: ignore[name-defined]
            )
            cls._profile_model = built  # type: ignore[attr-defined]
            return cast(type[ProfileBase], built)
        return cached


# --------------------------------------------------------------------------- registry

ENTRY_POINT_GROUP = "cleanroom_edge.drivers"
"""Entry-point group drivers register in: ``protocol = "package.module:DriverClass"``.

A third party adds a protocol with a package of its own declaring one entry point in
this group; nothing here changes."""

_REGISTRY: dict[str, type[Driver]] = {}


def _entry_points() -> dict[str, metadata.EntryPoint]:
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def available_protocols() -> list[str]:
    """Protocol names of every installed driver (entry-point names; nothing imported)."""
    return sorted(_entry_points())


def driver_for(protocol: str) -> type[Driver] | None:
    """The driver of ``protocol``, importing its module on first use: an agent without OPC UA
    devices never loads the OPC UA stack (memory on a small gateway is not free)."""
    if protocol not in _REGISTRY:
        ep = _entry_points().get(protocol)
        if ep is None:
            return None
        cls = ep.load()
        if not (isinstance(cls, type) and issubclass(cls, Driver)) or cls.protocol != protocol:
            raise RuntimeError(
                f"entry point {ep.name} = {ep.value!r} in {ENTRY_POINT_GROUP} is not a Driver "
                f"with protocol {protocol!r}"
            )
        _REGISTRY[protocol] = cls
    return _REGISTRY[protocol]


def load_drivers() -> dict[str, type[Driver]]:
    """Import every installed driver (for generated docs and tests) and return them by protocol."""
    found = {p: driver_for(p) for p in available_protocols()}
    return {p: d for p, d in found.items() if d is not None}


def build_groups(
    device_id: str,
    profile: ProfileBase,
    connection: ConnectionBase,
    overrides: Mapping[str, GroupSpec],
    compiled: dict[tuple[int, str, int, float], PollGroup] | None = None,
) -> dict[str, PollGroup]:
    """Compile the profile's groups (with per-device overrides) into :class:`PollGroup`s.

    With ``compiled`` (one dict per configuration load, so the ``id()`` keys stay valid while the
    profiles and specs they name are held), a group another device of the same profile compiled
    with the same spec and timeout is shared (:meth:`PollGroup.for_device`)."""
    groups: dict[str, PollGroup] = {}
    for name, default in profile.groups.items():
        spec = overrides.get(name, default)
        key = (id(profile), name, id(spec), connection.timeout)
        twin = compiled.get(key) if compiled is not None else None
        if twin is not None:
            groups[name] = twin.for_device(device_id)
            continue
        tags = [t for t in profile.tags if t.group == name]
        if tags:
            groups[name] = PollGroup(device_id, name, spec, tags, connection.timeout)
            if compiled is not None:
                compiled[key] = groups[name]
    return groups
