"""On-device anomaly detection: committed readings -> per-binding windows -> ONNX score
-> hysteresis -> ``anomaly`` / ``drift`` events.

A *binding* is one model applied to one device. The engine sees exactly what the
buffer committed (``on_committed`` runs on the event loop after each commit), copies
the bound tags into per-binding accumulators and returns; a single worker thread
resamples, scores (one onnxruntime session per model, batched across every device of
that model) and decides. Models stay advisory (Annex 22 draft): an anomaly is an
event for people, and ``shadow`` bindings record what they would have raised without
alerting anyone.

Report-by-exception sources (OPC UA subscriptions, deadbands) send a tag only when it
changes, and poll groups of one device arrive as separate blocks; so a block rarely
carries every signal of a model. A signal missing from a block takes its last good
value (*held*) for as long as no other news of it arrives: an unchanged value is still
the value, and an OPC UA server never re-sends a setpoint or a flow that stays constant
for days. A bad or uncertain reading ends the hold at once, and a lost link or a dead
subscription yields bad-quality gap readings on every tick of every group
(:mod:`agent.sources.scheduler`), so a hold never bridges a period the agent knows nothing about.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from pydantic import Field, model_validator

from agent.buffer.audit import Auditor
from agent.core.driver import ProfileBase
from agent.core.problems import Problem
from agent.core.records import Block, Event, Quality, Severity, Value
from agent.core.supervise import FailureLog, Supervised, Supervisor
from agent.transforms.anomaly.drift import DriftChange
from agent.transforms.anomaly.manifest import Manifest, ModelError, approval_problem, read_manifest
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.track import Ready, Settings, Track, Transition
from cleanroom_common.bundled import package_dir
from cleanroom_common.fields import Strict, relative_to_file

log = logging.getLogger("cleanroom.inference")


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

    manifest: Annotated[Path, relative_to_file(fallback=package_dir("agent.bundled"))]
    """The model's ``*.model.yaml`` manifest; the ``.onnx`` it names must match its sha256 or the model is
    refused. A relative path is relative to this file; when nothing is there, the models shipped with
    the agent are looked up under the same path (``models/bioreactor-pca.model.yaml``).
    """
    devices: list[str] = Field(default_factory=list)
    """Device ids the model scores. Give either this or ``device_kind``."""
    device_kind: str | None = None
    """Bind to every configured device whose profile has this ``device_kind`` (e.g. ``bioreactor``)."""
    signals: dict[str, str] = Field(default_factory=dict)
    """Model signal name -> device tag name, for tags named differently from the model's signals (default:
    same name). Covers the signals of the model's operating envelope too.
    """
    mode: Literal["shadow", "active"] = "shadow"
    """``shadow``: anomalies are recorded (``"shadow": true``, severity info) but never alert; ``active``:
    they are alarms. Start in shadow; activating is an audited change. Only an approved model
    (``cleanroom-agent models approve``) runs active: an unapproved one runs in shadow, with a warning.
    """
    overrides: ModelOverrides = Field(default_factory=ModelOverrides)
    """Optional replacements of the manifest's threshold, hysteresis and completeness settings."""

    @model_validator(mode="after")
    def _one_target(self) -> ModelBindingConfig:
        if bool(self.devices) == (self.device_kind is not None):
            raise ValueError("give exactly one of 'devices' (a list of ids) or 'device_kind'")
        return self


# --------------------------------------------------------------------------- runtime

INSTALL_ROOT = package_dir("agent.bundled")
"""Where the bundled data is installed (``models/`` ships here)."""


def resolve_manifest(path: Path) -> Path:
    """The manifest as given, else relative to the install folder (so ``models/x.model.yaml`` works
    anywhere).
    """
    if path.is_absolute() or path.exists():
        return path
    return INSTALL_ROOT / path


PENDING_MAX = 100_000
"""Committed blocks kept for the models while they load (seconds at most on a gateway);
older ones beyond it go unscored, as a gap in the windows."""


def load_model(path: Path) -> LoadedModel | ModelError:
    """Load a model as the engine does at start, or say why it cannot be used: ``validate``
    runs exactly this, so it finds every model ``run`` would disable. Any failure of one
    model is that model's alone (the agent never stops for a model)."""
    try:
        return LoadedModel(path)
    except ModelError as exc:
        return exc
    except Exception as exc:  # a malformed graph or manifest onnxruntime trips over in its own way
        return ModelError(f"model {path}: cannot be loaded: {type(exc).__name__}: {exc}")


def _manifest_of(path: Path) -> Manifest | ModelError:
    try:
        return read_manifest(path)
    except ModelError as exc:
        return exc


def _number(v: Value) -> float:
    """A reading as a model input; NaN (a missing sample) when it is not a number a float holds."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, int | float):
        try:
            return float(v)
        except OverflowError:
            return math.nan
    return math.nan


@dataclass
class Binding:
    """One model on one device: the tag mapping, the decision track and the samples
    copied from commits that the worker has not taken yet."""

    key: str
    device: str
    model: LoadedModel
    track: Track
    tags: list[str]
    """Device tag per model signal, in model order, then per envelope signal
    (:attr:`Manifest.data_names`)."""
    mode: Literal["shadow", "active"]
    shadow_reason: str | None = None
    """Why the binding runs in shadow although configured active (its model is not approved)."""
    cols: dict[tuple[str, ...], tuple[list[int], list[int]]] = field(default_factory=dict)
    ts: list[float] = field(default_factory=list)
    rows: list[list[float]] = field(default_factory=list)
    held: list[float] = field(default_factory=list)
    """Last good value per signal (NaN after a bad reading), for signals a block lacks."""

    def row(self, block: Block, sig: list[int], pos: list[int]) -> list[float]:
        """One sample row: the block's readings, held values for the signals it lacks."""
        if not self.held:
            self.held = [math.nan] * len(self.tags)
        held = self.held
        values, quality = block.values, block.quality
        for s, i in zip(sig, pos, strict=True):
            v = values[i] if quality is None or quality[i] is Quality.GOOD else math.nan
            held[s] = v if type(v) is float else _number(v)  # a float (the usual reading) as it is
        return held.copy()

    def columns(self, tags: Sequence[str]) -> tuple[list[int], list[int]]:
        """(model signal indices, block positions) of this binding's tags in a block."""
        key = tuple(tags)
        got = self.cols.get(key)
        if got is None:
            where = {t: i for i, t in enumerate(tags)}
            pairs = [(s, where[t]) for s, t in enumerate(self.tags) if t in where]
            got = ([s for s, _ in pairs], [i for _, i in pairs])
            self.cols[key] = got
        return got

    def take(self) -> tuple[list[float], list[list[float]]]:
        """The copied samples, as lists: a tick's one sample stays plain floats up to its window."""
        ts, rows = self.ts, self.rows
        self.ts, self.rows = [], []
        return ts, rows


def _block_time(block: Block, positions: list[int]) -> float:
    """Source time when the device gave one, else acquisition time (seconds)."""
    src = block.source_ts_ns
    if isinstance(src, int):
        return src / 1e9
    if isinstance(src, list):
        known = [src[i] for i in positions if src[i] is not None]
        if known:
            return max(t for t in known if t is not None) / 1e9
    return block.acq_ts_ns / 1e9


def plan(
    cfg: ModelBindingConfig, manifest: Manifest | ModelError, devices: Mapping[str, ProfileBase]
) -> list[tuple[str, str, list[str], str | None]]:
    """(binding key, device, tag per data signal, problem or None) for each target device."""
    if cfg.device_kind is not None:
        targets = [d for d, p in devices.items() if p.device_kind == cfg.device_kind]
        if not targets:
            return [
                (
                    f"{cfg.manifest}@kind:{cfg.device_kind}",
                    "agent",
                    [],
                    f"no device of kind {cfg.device_kind!r}",
                )
            ]
    else:
        targets = cfg.devices
    out: list[tuple[str, str, list[str], str | None]] = []
    for device in targets:
        if isinstance(manifest, ModelError):
            out.append((f"{cfg.manifest}@{device}", device, [], str(manifest)))
            continue
        key = f"{manifest.id}@{device}"
        names = manifest.data_names
        tags = [cfg.signals.get(s, s) for s in names]
        profile = devices.get(device)
        if profile is None:
            out.append((key, device, tags, f"device {device!r} is not configured"))
            continue
        known = {t.name for t in profile.tags}
        missing = [f"{s}->{t}" for s, t in zip(names, tags, strict=True) if t not in known]
        problem = f"profile {profile.profile!r} has no tag for {', '.join(missing)}" if missing else None
        out.append((key, device, tags, problem))
    return out


def _taken(key: str, i: int, owner: dict[str, int]) -> str | None:
    """A model scores a device once: a second binding of the same model to the same device
    (two entries, or ``devices`` and ``device_kind`` overlapping) would double every event."""
    first = owner.setdefault(key, i)
    return None if first == i else f"this model is already bound to this device by models[{first}]"


class InferenceEngine:
    """Scores committed readings with the bound models; see the module docstring.

    Lifecycle: ``await start()`` loads and verifies every model (a model whose file
    does not match its manifest is refused, audited and shown in ``status()``; the
    other bindings run), ``on_committed`` feeds it, ``await stop()`` ends it.
    """

    def __init__(
        self,
        config: Sequence[ModelBindingConfig],
        devices: Mapping[str, ProfileBase],
        emit: Callable[[Event], None],
        auditor: Auditor,
    ) -> None:
        self.config = list(config)
        self.devices = devices
        self.emit = emit
        self.auditor = auditor
        self.bindings: dict[str, Binding] = {}
        self.refused: dict[str, str] = {}
        self._by_device: dict[str, list[Binding]] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._task: Supervised | None = None
        self._wake = asyncio.Event()
        self._done = asyncio.Event()
        self._busy = False
        self.score_seconds = 0.0
        """Time spent in ``session.run`` (all models), for the metrics: written by the worker thread
        only, read as a plain float."""
        self.score_calls = 0
        self._faults = FailureLog(log)
        self.tasks = Supervisor("inference", log, failures=self._faults)
        self.loading: set[str] = set()
        """Bindings whose model is still being loaded."""
        self._pending: list[Block] | None = []
        """Blocks committed while the models load (None once they are loaded)."""
        self._loaded = asyncio.Event()
        self._unscored = 0

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Start scoring and load the models in the background: acquisition never waits for a
        model (onnxruntime takes seconds per model on a small gateway, and a model can be slow
        to read). Blocks committed meanwhile are kept and scored once their model is there."""
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="inference")
        self._task = self.tasks.spawn("inference", self._run)
        self.tasks.spawn("inference-load", self._load, restart=False)

    async def _load(self) -> None:
        """Worker thread: read the manifests (the bindings show ``loading``), then load and bind each
        model; a model that cannot be used is refused alone."""
        loop = asyncio.get_running_loop()
        try:
            manifests: dict[Path, Manifest | ModelError] = {}
            for cfg in self.config:
                path = resolve_manifest(cfg.manifest)
                if path not in manifests:
                    manifests[path] = await loop.run_in_executor(self._pool, _manifest_of, path)
                self.loading.update(
                    k for k, _, _, problem in plan(cfg, manifests[path], self.devices) if not problem
                )
            models: dict[Path, LoadedModel | ModelError] = {}
            owner: dict[str, int] = {}
            for i, cfg in enumerate(self.config):
                path = resolve_manifest(cfg.manifest)
                if path not in models:
                    models[path] = await loop.run_in_executor(self._pool, load_model, path)
                self._bind(i, cfg, models[path], manifests[path], owner)
        finally:
            self.loading.clear()
            pending, self._pending = self._pending or [], None
            self._loaded.set()
        self.on_committed(pending, ())

    def _bind(
        self,
        i: int,
        cfg: ModelBindingConfig,
        loaded: LoadedModel | ModelError,
        read: Manifest | ModelError,
        owner: dict[str, int],
    ) -> None:
        """Bind ``cfg``'s devices to ``loaded``, or refuse them under the model's id when its
        manifest could be ``read`` but the model not loaded."""
        manifest = loaded.manifest if isinstance(loaded, LoadedModel) else read
        failed = str(loaded) if isinstance(loaded, ModelError) else None
        for key, device, tags, planned in plan(cfg, manifest, self.devices):
            self.loading.discard(key)
            problem = planned or failed or _taken(key, i, owner)
            if problem is not None:
                self._refuse(key if key not in self.bindings else f"models[{i}]:{key}", problem, device)
                continue
            assert isinstance(loaded, LoadedModel)
            m = loaded.manifest
            overrides = cfg.overrides.model_dump(exclude_none=True)
            problem = approval_problem(m)
            unapproved = problem if cfg.mode == "active" else None
            mode: Literal["shadow", "active"] = "shadow" if unapproved else cfg.mode
            approved = (
                None if problem or m.approval is None else {"by": m.approval.actor, "at": m.approval.at}
            )
            track = Track(loaded, Settings.of(m, **overrides))
            binding = Binding(key, device, loaded, track, tags, mode, unapproved)
            self.bindings[key] = binding
            self._by_device.setdefault(device, []).append(binding)
            self.auditor.record(
                "model_load",
                key,
                device=device,
                new={
                    **loaded.ident,
                    "mode": mode,
                    "approved": approved,
                    "tags": dict(zip(m.data_names, tags, strict=True)),
                },
                reason=f"binding from configuration; overrides {overrides or 'none'}",
            )
            if unapproved:
                log.warning("model binding %s configured active runs in shadow mode: %s", key, unapproved)
                self.auditor.record(
                    "model_mode",
                    key,
                    device=device,
                    old="active",
                    new="shadow",
                    reason=f"configured active, runs in shadow: {unapproved}",
                    severity=Severity.WARNING,
                )

    @staticmethod
    def check(
        config: Sequence[ModelBindingConfig], devices: Mapping[str, ProfileBase], *, load: bool = True
    ) -> list[Problem]:
        """Every binding problem (unusable model, unknown device, unmapped tag), for ``validate``:
        the same loading and binding :meth:`start` does, without starting anything.

        ``load=False`` is what the configuration itself gets wrong (what ``run`` refuses to start
        with): a model file that cannot be used (missing, altered, a bad graph) is then no
        problem, since the running agent disables that model alone."""
        problems = []
        owner: dict[str, int] = {}
        found: dict[Path, Manifest | ModelError] = {}
        for i, cfg in enumerate(config):
            path = resolve_manifest(cfg.manifest)
            if path not in found:
                got = load_model(path) if load else _manifest_of(path)
                found[path] = got.manifest if isinstance(got, LoadedModel) else got
            manifest = found[path]
            if isinstance(manifest, ModelError) and not load:
                continue
            for key, _, _, planned in plan(cfg, manifest, devices):
                problem = planned or _taken(key, i, owner)
                if problem:
                    problems.append(Problem(problem, path=("models", i), subject=key))
        return problems

    def _refuse(self, key: str, reason: str, device: str = "agent") -> None:
        """The binding is disabled, the rest runs: people are told (an alarm event) and the
        refusal is in the audit trail."""
        log.error("model binding %s refused: %s", key, reason)
        self.refused[key] = reason
        self.emit(Event(device, "model_disabled", Severity.ALARM, {"binding": key, "reason": reason}))
        self.auditor.record("model_refused", key, device=device, reason=reason, severity=Severity.ALARM)

    async def stop(self) -> None:
        """Score what was already copied (bounded: 5 s), then stop the worker."""
        if self._task is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await self.idle()
            await self.tasks.stop()
            self._task = None
        if self._pool is not None:
            # a model load that never returns (a hung file system) must not hold up the stop
            self._pool.shutdown(wait=self._loaded.is_set(), cancel_futures=True)
            self._pool = None
        for key, b in self.bindings.items():
            self.auditor.record(
                "model_unload", key, device=b.device, old=b.model.ident, reason="agent stopping"
            )
        self.bindings.clear()
        self._by_device.clear()

    def set_mode(self, key: str, mode: Literal["shadow", "active"], *, actor: str, reason: str) -> None:
        """Switch a binding between shadow and active: a change of what raises alarms, so it is
        audited with who asked for it and why. An unapproved model cannot be made active
        (:class:`ModelError`)."""
        b = self.bindings[key]
        if b.mode == mode:
            return
        if mode == "active" and (why := approval_problem(b.model.manifest)):
            raise ModelError(f"{key} stays in shadow mode: {why}")
        self.auditor.record(
            "model_mode", key, device=b.device, old=b.mode, new=mode, actor=actor, reason=reason
        )
        b.mode = mode

    # ------------------------------------------------------------------ data path

    def on_committed(self, blocks: Sequence[Block], events: Sequence[Event]) -> None:
        """Copy the bound tags' good readings of committed blocks; never blocks the loop."""
        if self._task is None:
            return
        if self._pending is not None:  # the models are loading: keep the blocks for them
            self._pending.extend(blocks)
            if len(self._pending) > PENDING_MAX:
                if not self._unscored:
                    log.warning(
                        "models still loading with %d blocks waiting: older ones go unscored", PENDING_MAX
                    )
                self._unscored += len(self._pending) - PENDING_MAX
                del self._pending[: len(self._pending) - PENDING_MAX]
            return
        fed = False
        for block in blocks:
            for b in self._by_device.get(block.device, ()):
                try:
                    fed = self._copy(b, block) or fed
                except Exception as exc:  # costs this record only: the rest of the batch is copied
                    self._faults.record(f"inference: {b.key}", exc)
        if fed:
            self._wake.set()

    @property
    def failed_records(self) -> int:
        """Records the engine could not copy or score (each logged once per kind, all counted)."""
        return self._faults.total

    @staticmethod
    def _copy(b: Binding, block: Block) -> bool:
        sig, pos = b.columns(block.tags)
        if not sig:
            return False
        row = b.row(block, sig, pos)
        b.ts.append(_block_time(block, pos))
        b.rows.append(row)
        return True

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._wake.wait()
            self._wake.clear()
            work = [(b, *b.take()) for b in self.bindings.values() if b.ts]
            if not work:
                self._done.set()
                continue
            self._busy = True
            try:
                events = await loop.run_in_executor(self._pool, self._score, work)
            except Exception as exc:  # a scoring bug must not stop acquisition: count it, keep going
                self._faults.record("inference: scoring (these samples were not scored)", exc)
                events = []
            finally:
                self._busy = False
            for event in events:
                self.emit(event)
            self._done.set()

    async def idle(self) -> None:
        """Wait until every copied sample has been scored and its events emitted (for tests
        and clean hand-overs; bound it with ``asyncio.timeout``)."""
        if self._task is not None:
            await self._loaded.wait()
        while self._task is not None and (
            self._busy or self._wake.is_set() or any(b.ts for b in self.bindings.values())
        ):
            self._done.clear()
            await self._done.wait()

    def _score(self, work: list[tuple[Binding, list[float], list[list[float]]]]) -> list[Event]:
        """Worker thread: windows of all bindings of one model in one ``session.run``."""
        by_model: dict[int, list[tuple[Binding, Ready]]] = {}
        for b, ts, rows in work:
            by_model.setdefault(id(b.model), []).append((b, b.track.feed_rows(ts, rows)))
        events: list[Event] = []
        for group in by_model.values():
            model = group[0][0].model
            windows = [r.windows for _, r in group]
            t0 = time.perf_counter()
            scores, contribs = model.score(np.concatenate(windows))
            self.score_seconds += time.perf_counter() - t0
            self.score_calls += 1
            at = 0
            for b, ready in group:
                n = len(ready.windows)
                decision = b.track.decide(ready, scores[at : at + n], contribs[at : at + n])
                at += n
                events += [self._anomaly(b, t) for t in decision.transitions]
                events += [self._drift(b, d) for d in ready.drift]
        return events

    def _anomaly(self, b: Binding, t: Transition) -> Event:
        shadow = b.mode == "shadow"
        top = [{**x, "tag": b.tags[b.model.manifest.signal_names.index(x["signal"])]} for x in t.top]
        data: dict[str, Any] = {
            "phase": t.phase,
            "binding": b.key,
            "model": b.model.ident,
            "mode": b.mode,
            "shadow": shadow,
            "score": round(t.score, 4),
            "peak_score": round(t.peak_score, 4),
            "threshold": b.track.settings.threshold,
            "start_ts": int(t.started * 1e9),
            "top_signals": top,
        }
        if t.phase == "end":
            data["end_ts"] = int(t.ts * 1e9)
            data["duration_s"] = round(t.ts - t.started, 3)
        if shadow:
            data["severity_if_active"] = str(Severity.ALARM if t.phase == "start" else Severity.INFO)
        severity = Severity.ALARM if t.phase == "start" and not shadow else Severity.INFO
        return Event(b.device, "anomaly", severity, data)

    def _drift(self, b: Binding, d: DriftChange) -> Event:
        bounds = b.model.manifest.drift
        data = {
            "phase": d.phase,
            "binding": b.key,
            "model": b.model.ident,
            "mode": b.mode,
            "ts": int(d.ts * 1e9),
            "signals": d.signals,
            "bounds": {"mean_shift_sigma": bounds.mean_shift_sigma, "psi": bounds.psi},
        }
        return Event(b.device, "drift", Severity.WARNING if d.phase == "start" else Severity.INFO, data)

    # ------------------------------------------------------------------ status

    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for key, b in self.bindings.items():
            t = b.track
            drift = t.drift
            out[key] = {
                "device": b.device,
                "model": b.model.ident,
                "mode": b.mode,
                "shadow_reason": b.shadow_reason,
                "state": t.state,
                "alarm": t.debounce.active,
                "last_score": None if t.last_score is None else round(t.last_score, 4),
                "threshold": t.settings.threshold,
                "window_completeness": None if t.last_completeness is None else round(t.last_completeness, 3),
                "windows_scored": t.windows_scored,
                "windows_incomplete": t.windows_incomplete,
                "windows_out_of_envelope": t.windows_out_of_envelope,
                "late_samples": t.acc.late,
                "drift": {"active": drift.active, "signals": drift.last} if drift else None,
            }
        for key, reason in self.refused.items():
            out[key] = {"state": "refused", "error": reason}
        for key in self.loading:
            out.setdefault(key, {"state": "loading"})
        return out
