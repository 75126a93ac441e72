"""On-device anomaly detection: committed readings -> per-binding windows -> ONNX score
-> hysteresis -> ``anomaly`` / ``drift`` events.

A *binding* is one model applied to one device. The engine sees exactly what the
buffer committed (``on_committed`` runs on the event loop after each commit), copies
the bound tags into per-binding accumulators and returns; a single worker thread
resamples, scores (one onnxruntime session per model, batched across every device of
that model) and decides. Models stay advisory (Annex 22 draft): an anomaly is an
event for people, and ``shadow`` bindings record what they would have raised without
alerting anyone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from agent.fields import Strict


class ModelOverrides(Strict):
    """Site-specific adjustments of a model's decision settings. Every override is audited
    at load, because it changes what the validated model reports."""

    threshold: float | None = Field(default=None, gt=0)
    """Replaces the manifest's calibrated score threshold (higher = fewer, later alarms)."""
    raise_after: int | None = Field(default=None, ge=1)
    """Replaces the manifest's number of consecutive windows over the threshold that raise an alarm."""
    clear_after: int | None = Field(default=None, ge=1)
    """Replaces the manifest's number of consecutive windows under the threshold that clear an alarm."""
    min_completeness: float | None = Field(default=None, gt=0, le=1)
    """Replaces the manifest's minimum fraction of good samples a window needs to be scored."""


class ModelBindingConfig(Strict):
    """One anomaly model applied to one or more devices (one entry of ``models:``)."""

    manifest: Path
    """The model's ``*.model.yaml`` manifest; the ``.onnx`` it names must match its sha256 or the model is
    refused. Relative paths are tried against the working directory, then the agent's install folder
    (where ``models/`` ships).
    """
    devices: list[str] = Field(default_factory=list)
    """Device ids the model scores. Give either this or ``device_kind``."""
    device_kind: str | None = None
    """Bind to every configured device whose profile has this ``device_kind`` (e.g. ``bioreactor``)."""
    signals: dict[str, str] = Field(default_factory=dict)
    """Model signal name -> device tag name, for tags named differently from the model's signals (default:
    same name).
    """
    mode: Literal["shadow", "active"] = "shadow"
    """``shadow``: anomalies are recorded (``"shadow": true``, severity info) but never alert; ``active``:
    they are alarms. Start in shadow; activating is an audited change.
    """
    overrides: ModelOverrides = Field(default_factory=ModelOverrides)
    """Optional replacements of the manifest's threshold, hysteresis and completeness settings."""

    @model_validator(mode="after")
    def _one_target(self) -> ModelBindingConfig:
        if bool(self.devices) == (self.device_kind is not None):
            raise ValueError("give exactly one of 'devices' (a list of ids) or 'device_kind'")
        return self
