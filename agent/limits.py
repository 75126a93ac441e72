"""Deterministic GMP limit monitoring: alert/action limits, rate of change and cleanroom
particle limits (EU GMP Annex 1 grades, ISO 14644-1 classes), independent of any model.

Rules see exactly the committed readings (``on_committed``), so every excursion event
refers to readings that exist in the buffer. Each rule is a small state machine: a
limit is *crossed* after ``consecutive`` samples beyond it and *cleared* when a sample
is back inside by the deadband; an excursion event is emitted at the start and at the
end (with duration and peak). Bad-quality readings neither start nor end an excursion:
an unknown value is not evidence either way.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from agent.fields import Duration, Strict

Grade = Literal["A", "B", "C", "D"]
RoomState = Literal["at_rest", "in_operation"]


class TagLimits(Strict):
    """Alert/action limits of one tag on one device (or on every device that has the tag)."""

    tag: str
    """Tag name as in the device profile."""
    devices: list[str] = Field(default_factory=list)
    """Device ids the limits apply to; empty = every device that has this tag."""
    alert_high: float | None = None
    """Early-warning upper limit (from trend data): crossing it emits an ``alert`` excursion."""
    action_high: float | None = None
    """Upper limit that requires investigation: crossing it emits an ``action`` excursion."""
    alert_low: float | None = None
    """Early-warning lower limit."""
    action_low: float | None = None
    """Lower limit that requires investigation."""
    deadband: float = Field(default=0.0, ge=0)
    """An excursion ends only when the value is back inside the limit by this much (stops chatter around a
    limit).
    """
    consecutive: int = Field(default=1, ge=1)
    """Samples in a row beyond a limit before the excursion starts (filters single-sample noise)."""
    rate_of_change: float | None = Field(default=None, gt=0)
    """Largest allowed change in engineering units per minute (absolute); faster change is an ``alert``
    excursion.
    """
    rate_window: Duration = 60.0
    """Span over which the rate of change is measured (longer = less sensitive to noise)."""

    @model_validator(mode="after")
    def _ordered(self) -> TagLimits:
        if (
            self.alert_high is not None
            and self.action_high is not None
            and self.alert_high > self.action_high
        ):
            raise ValueError("alert_high must not be above action_high (alert warns before action)")
        if self.alert_low is not None and self.action_low is not None and self.alert_low < self.action_low:
            raise ValueError("alert_low must not be below action_low (alert warns before action)")
        limits = (self.alert_high, self.action_high, self.alert_low, self.action_low, self.rate_of_change)
        if all(v is None for v in limits):
            raise ValueError(f"tag {self.tag!r}: no limit given (alert_/action_ high/low or rate_of_change)")
        return self


class ParticleLimits(Strict):
    """Cleanroom particle limits for one counter, by EU GMP grade or ISO class and room state."""

    device: str
    """Device id of the particle counter."""
    grade: Grade | None = None
    """EU GMP Annex 1 grade of the room (A-D); gives the 0.5 and 5.0 µm action limits per state."""
    iso_class_at_rest: int | None = Field(default=None, ge=1, le=9)
    """ISO 14644-1 class at rest (instead of a grade): limit Cn = 10^N x (0.1/D)^2.08, 3 s.f."""
    iso_class_in_operation: int | None = Field(default=None, ge=1, le=9)
    """ISO 14644-1 class in operation (instead of a grade)."""
    tag_0_5: str | None = None
    """Tag with the cumulative count >= 0.5 µm of each sample."""
    tag_5_0: str | None = None
    """Tag with the cumulative count >= 5.0 µm of each sample."""
    counts_are: Literal["per_sample", "per_m3"] = "per_sample"
    """``per_sample``: raw counts in the sampled volume (converted to /m³); ``per_m3``: already
    concentrations.
    """
    sample_volume_l: float = Field(default=28.3, gt=0)
    """Sampled volume per record in litres (28.3 L = 1 ft³ at 28.3 L/min for 1 min)."""
    volume_tag: str | None = None
    """Tag giving each sample's volume in litres; overrides ``sample_volume_l`` when good."""
    state: RoomState = "in_operation"
    """Room state when no ``state_tag`` is configured."""
    state_tag: str | None = None
    """Polled tag giving the room state: truthy/non-zero or ``in_operation`` = in operation. Until it is
    first read the stricter at-rest limits apply.
    """
    state_device: str | None = None
    """Device carrying ``state_tag`` (default: the counter itself)."""
    action_0_5: float | None = Field(default=None, gt=0)
    """Explicit 0.5 µm action limit (/m³), replacing the grade/ISO one; required for grade D in operation
    (set by risk assessment).
    """
    action_5_0: float | None = Field(default=None, gt=0)
    """Explicit 5.0 µm action limit (/m³), replacing the grade/ISO one."""
    alert_0_5: float | None = Field(default=None, gt=0)
    """0.5 µm alert limit (/m³), from trend data; none by default."""
    alert_5_0: float | None = Field(default=None, gt=0)
    """5.0 µm alert limit (/m³), from trend data; none by default."""
    consecutive_5_0: int = Field(default=2, ge=1)
    """Samples in a row over a 5.0 µm limit before an excursion starts: isolated single 5 µm counts are
    noise, repeated ones are an event (Annex 1).
    """
    min_count_5_0: int | None = Field(default=None, ge=1)
    """Count per sample that counts as "over" for the 5.0 µm rule; default: the smallest count above the
    limit for the sample volume.
    """

    @model_validator(mode="after")
    def _classified(self) -> ParticleLimits:
        iso = self.iso_class_at_rest is not None or self.iso_class_in_operation is not None
        if self.grade is not None and iso:
            raise ValueError("give either 'grade' or ISO classes, not both")
        if self.grade is None and not iso and self.action_0_5 is None and self.action_5_0 is None:
            raise ValueError("give a 'grade', ISO classes or explicit action limits")
        if self.tag_0_5 is None and self.tag_5_0 is None:
            raise ValueError("give 'tag_0_5' and/or 'tag_5_0' (the count tags to check)")
        return self


class LimitsConfig(Strict):
    """Rule-based limits (the ``limits:`` section): deterministic, evaluated on committed readings."""

    tags: list[TagLimits] = Field(default_factory=list)
    """Alert/action and rate-of-change limits per tag."""
    particles: list[ParticleLimits] = Field(default_factory=list)
    """Particle limits per counter."""
