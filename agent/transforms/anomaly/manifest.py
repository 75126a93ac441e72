"""The model manifest (``*.model.yaml``): everything needed to use a frozen model and to
know what it is. A model is accepted only if its ``.onnx`` bytes hash to ``sha256``."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from cleanroom_common.fields import Duration, Strict
from cleanroom_common.yamlfile import YamlError, read_yaml


class ModelError(Exception):
    """A model cannot be used (missing, altered, malformed); the message says why."""


class SignalSpec(Strict):
    """One input signal of the model, with the statistics the model was trained on."""

    name: str
    """Signal name (a column of the training data; mapped to a device tag by the binding)."""
    unit: str | None = None
    """Engineering unit, for people reading anomaly events."""
    mean: float
    """Training mean: the model normalises inputs as (x - mean) / std."""
    std: float = Field(gt=0)
    """Training standard deviation (floored so a constant signal cannot divide by zero)."""
    normal_low: float
    """0.1th percentile of training values: the low end of the "normal range" shown in explanations."""
    normal_high: float
    """99.9th percentile of training values: the high end of the "normal range"."""
    bin_edges: list[float]
    """Inner edges of the training deciles, for the population stability index (PSI)."""
    bin_fractions: list[float]
    """Fraction of training values in each bin defined by ``bin_edges`` (one more than edges)."""

    @model_validator(mode="after")
    def _bins(self) -> SignalSpec:
        if len(self.bin_fractions) != len(self.bin_edges) + 1:
            raise ValueError("bin_fractions must have one more entry than bin_edges")
        return self


class Hysteresis(Strict):
    """How many scored windows in a row change the alarm state."""

    raise_after: int = Field(default=3, ge=1)
    """Consecutive windows over the threshold that raise an alarm."""
    clear_after: int = Field(default=6, ge=1)
    """Consecutive windows under ``clear_ratio`` x threshold that clear it."""
    clear_ratio: float = Field(default=0.7, gt=0, le=1)
    """An active alarm counts a window as "under" only below this fraction of the threshold, so a
    score hovering at the threshold while the process recovers does not clear and re-raise."""


class DriftBounds(Strict):
    """Input drift monitoring against the training baseline."""

    window: Duration = 21600.0
    """Rolling span of recent inputs compared with the training data."""
    mean_shift_sigma: float = Field(default=3.0, gt=0)
    """A signal drifts when its recent mean is this many training σ from the training mean."""
    psi: float = Field(default=0.25, gt=0)
    """A signal drifts when its population stability index exceeds this (0.25 = major shift)."""
    min_fill: float = Field(default=0.5, gt=0, le=1)
    """Drift is judged only once this fraction of ``window`` holds data."""


class EnvelopeCondition(Strict):
    """One bound of the operating state a model is valid for (see ``Manifest.envelope``)."""

    signal: str
    """Signal that defines the state (a column of the training data; mapped to a device tag by
    the binding like the model's inputs, but not an input of the model)."""
    min: float | None = None
    """Lowest value inside the envelope (inclusive)."""
    max: float | None = None
    """Highest value inside the envelope (inclusive)."""

    @model_validator(mode="after")
    def _bounded(self) -> EnvelopeCondition:
        if self.min is None and self.max is None:
            raise ValueError("an envelope condition needs 'min', 'max' or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError("'min' must not exceed 'max'")
        return self

    def holds(self, value: float) -> bool:
        """Inside the bounds; an unknown value (NaN) is outside: not knowing the state is not
        knowing that the model applies."""
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)

    def __str__(self) -> str:
        lo = "" if self.min is None else f"{self.min:g} <= "
        hi = "" if self.max is None else f" <= {self.max:g}"
        return f"{lo}{self.signal}{hi}"


def parse_condition(text: str) -> EnvelopeCondition:
    """``culture_day>=0.125``, ``state<=2`` or ``0.1<=culture_day<=14`` (the CLI's form)."""
    parts = [p.strip() for p in re.split(r"(<=|>=)", text)]
    try:
        if len(parts) == 3 and parts[1] == ">=":
            return EnvelopeCondition(signal=parts[0], min=float(parts[2]))
        if len(parts) == 3 and parts[1] == "<=":
            return EnvelopeCondition(signal=parts[0], max=float(parts[2]))
        if len(parts) == 5 and parts[1] == parts[3] == "<=":
            return EnvelopeCondition(signal=parts[2], min=float(parts[0]), max=float(parts[4]))
    except (ValueError, ValidationError) as exc:
        raise ModelError(f"envelope condition {text!r}: {exc}") from None
    raise ModelError(f"envelope condition {text!r}: write SIGNAL>=MIN, SIGNAL<=MAX or MIN<=SIGNAL<=MAX")


class Provenance(Strict):
    """Where the training data came from (so the model can be reproduced and audited)."""

    source: str
    """Data source: CSV path(s) or buffer file and device."""
    start: str
    """First training timestamp (ISO 8601 UTC)."""
    end: str
    """Last training timestamp (ISO 8601 UTC)."""
    rows: int
    """Rows used for fitting and calibration (abnormal-labelled rows excluded)."""
    excluded_rows: int = 0
    """Rows dropped because they were labelled abnormal or lay inside a fault window."""
    data_sha256: str
    """SHA-256 of the training data as read, so an auditor can tell whether the data in hand is what
    the model learnt from: the SHA-256 of the lowercase hex SHA-256 digests of every input, sorted and
    joined with no separator. A CSV file's digest is over its bytes (the whole file as read, before any
    row was excluded: ``sha256sum`` it); the agent's buffer's is over the device's committed record
    bodies (canonical JSON, UTF-8) in the order read, each followed by a newline."""
    notes: str = ""
    """Free text: scenario, seeds, split."""


class Approval(Strict):
    """A person's release of one exact model for alarming (Annex 22 draft: a model is used only as
    validated and approved). Bound to what was approved: any change of the manifest's content or of
    the ONNX file afterwards voids it, so evidence edited after the sign-off cannot ride on it."""

    actor: str = Field(min_length=1, pattern=r"\S")
    """Who approved (a person's name or user id)."""
    reason: str = Field(min_length=1, pattern=r"\S")
    """Why: the verification that supports it (protocol, report, change record)."""
    at: str
    """When (ISO 8601 UTC)."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the ONNX file approved (the manifest's ``sha256`` at approval)."""
    manifest_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """:func:`content_sha256` of the manifest at approval (everything but this block)."""


class Manifest(Strict):
    """A frozen anomaly model (``*.model.yaml`` next to its ``.onnx``)."""

    id: str = Field(pattern=r"^[A-Za-z0-9_.\-]+$")
    """Model id, stable across versions (e.g. ``bioreactor-pca``)."""
    version: str
    """Model version; a retrained model is a new version."""
    file: str
    """ONNX file name, relative to the manifest."""
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    """SHA-256 of the ONNX file: a model whose file does not match is refused."""
    method: Literal["pca", "iforest", "autoencoder"]
    """``pca`` (Hotelling T² + SPE/Q) or ``iforest`` (isolation forest)."""
    intended_use: str
    """What the model is for and what it must not be used for (advisory only)."""
    device_kind: str
    """Kind of equipment the model was trained on."""
    signals: list[SignalSpec]
    """Input signals in model order."""
    period: Duration
    """Resampling period: each window slot is the mean of the good samples in one period."""
    window: int = Field(ge=2)
    """Slots per scored window."""
    threshold: float = Field(gt=0)
    """Score above which a window counts as anomalous (calibrated on held-out normal data)."""
    hysteresis: Hysteresis = Field(default_factory=Hysteresis)
    """Windows in a row that raise / clear an alarm."""
    min_completeness: float = Field(default=0.8, gt=0, le=1)
    """Fraction of (slot, signal) cells that must hold good data for a window to be scored."""
    envelope: list[EnvelopeCondition] = Field(default_factory=list)
    """The operating state the model is for (its intended use, enforced): a window is scored only when
    every one of its slots satisfies every condition, e.g. ``culture_day >= 0.125`` keeps a culture's
    start-up transient, which the model was not trained on, out of scoring. Outside, the binding's state
    is ``out_of_envelope``: not scored, and an alarm neither raises nor clears."""
    drift: DriftBounds = Field(default_factory=DriftBounds)
    """Input drift bounds."""
    provenance: Provenance
    """Training data provenance."""
    validation: dict[str, float | int | str | None] = Field(default_factory=dict)
    """Metrics measured on held-out data before release (acceptance evidence)."""
    tool_version: str
    """cleanroom-edge version that trained the model."""
    created: str
    """When the model was trained (ISO 8601 UTC)."""
    approval: Approval | None = None
    """Who released the model for alarming, and why (``cleanroom-agent models approve``). Without a
    valid one, the agent runs the model in shadow mode only, whatever its bindings say."""

    @model_validator(mode="after")
    def _signals_unique(self) -> Manifest:
        names = [s.name for s in self.signals]
        if len(set(names)) != len(names):
            raise ValueError("signal names must be unique")
        if not names:
            raise ValueError("a model needs at least one signal")
        if clash := set(names) & {c.signal for c in self.envelope}:
            raise ValueError(f"envelope signals are not model inputs: {sorted(clash)}")
        return self

    @property
    def signal_names(self) -> list[str]:
        return [s.name for s in self.signals]

    @property
    def data_names(self) -> list[str]:
        """Columns a scoring path feeds, in order: the model's inputs, then its envelope signals."""
        return self.signal_names + list(dict.fromkeys(c.signal for c in self.envelope))


def content_sha256(manifest: Manifest) -> str:
    """SHA-256 of the manifest's content without its approval: canonical JSON (keys sorted, no
    spaces, UTF-8) of every field as validated, so re-saving or reformatting the YAML keeps an
    approval and changing any value (threshold, signals, evidence, the ONNX hash) voids it."""
    content = manifest.model_dump(mode="json", exclude={"approval"})
    text = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def approval_problem(manifest: Manifest) -> str | None:
    """Why the model is not released for alarming (a sentence naming it), or None when its
    approval holds."""
    a, name = manifest.approval, f"model {manifest.id} {manifest.version}"
    if a is None:
        return f"{name} is not approved (cleanroom-agent models approve)"
    if a.sha256 != manifest.sha256:
        return (
            f"{name} was approved by {a.actor} at {a.at} for ONNX sha256 {a.sha256[:16]}…, the manifest "
            f"names {manifest.sha256[:16]}…: approve it again"
        )
    if a.manifest_sha256 != content_sha256(manifest):
        return f"{name}: its manifest changed after the approval by {a.actor} at {a.at}: approve it again"
    return None


def approval_summary(manifest: Manifest) -> str:
    """One line for people (model card, report, ``models verify``): who released the model, or why
    it is not released."""
    a = manifest.approval
    problem = approval_problem(manifest)
    if problem is not None or a is None:
        return problem or "not approved"
    return f"approved by {a.actor} at {a.at}: {a.reason}"


def approve(manifest: Manifest, actor: str, reason: str, at: str) -> Manifest:
    """The manifest with an approval by ``actor`` bound to its present content; the ONNX file
    must already have been checked against ``manifest.sha256`` (:func:`verify`)."""
    try:
        approval = Approval(
            actor=actor.strip(),
            reason=reason.strip(),
            at=at,
            sha256=manifest.sha256,
            manifest_sha256=content_sha256(manifest),
        )
    except ValidationError as exc:
        fields = " and ".join(str(e["loc"][0]) for e in exc.errors())
        raise ModelError(
            f"model {manifest.id} {manifest.version}: an approval needs a non-blank {fields}"
        ) from None
    return manifest.model_copy(update={"approval": approval})


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_manifest(path: Path) -> Manifest:
    """Parse a manifest; any problem is a :class:`ModelError` naming the file."""
    try:
        data = read_yaml(path).data
    except YamlError as exc:
        where = f"{path}:{exc.line}" if exc.line else str(path)
        raise ModelError(f"{where}: cannot read manifest: {exc.message}") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or '(top)'}: {e['msg']}" for e in exc.errors())
        raise ModelError(f"{path}: invalid manifest: {problems}") from None


def model_path(manifest_path: Path, manifest: Manifest) -> Path:
    """The ONNX file ``manifest`` names, which must lie in the manifest's folder (or below it):
    a manifest cannot make the agent read, hash and run any other file of the gateway, whether
    by ``..``, an absolute path or a symbolic link that leads out."""
    folder = manifest_path.parent.resolve()
    target = (folder / manifest.file).resolve()
    if not target.is_relative_to(folder):
        raise ModelError(
            f"model {manifest.id} {manifest.version}: file {manifest.file!r} is outside the manifest's "
            f"folder {folder}: refused (keep the .onnx next to its manifest)"
        )
    return target


def verify(manifest_path: Path) -> tuple[Manifest, Path, bytes]:
    """Read a manifest and its ONNX file, check the file's hash; returns the manifest, the
    file's path and the very bytes that were hashed (load those: no window for a swap
    between checking and loading), or raises :class:`ModelError`."""
    manifest = read_manifest(manifest_path)
    onnx_path = model_path(manifest_path, manifest)
    try:
        data = onnx_path.read_bytes()
    except OSError:
        raise ModelError(f"model {manifest.id} {manifest.version}: file {onnx_path} is missing") from None
    actual = hashlib.sha256(data).hexdigest()
    if actual != manifest.sha256:
        raise ModelError(
            f"model {manifest.id} {manifest.version}: {onnx_path.name} has sha256 {actual[:16]}…, "
            f"manifest says {manifest.sha256[:16]}…: the file was altered or does not belong to this "
            "manifest; refusing to load it"
        )
    return manifest, onnx_path, data


def write_manifest(path: Path, manifest: Manifest) -> None:
    data = manifest.model_dump(mode="json")
    if data["approval"] is None:
        del data["approval"]  # an unapproved model's manifest reads as it did before approvals existed
    path.write_text(yaml.safe_dump(data, sort_keys=False, allow_unicode=True))
