"""Load and validate the agent's YAML configuration, reporting *every* mistake with
its YAML path and line (Home Assistant's rule: validate before anything starts, say
exactly which key on which device is wrong and why).

Validation is layered the way the config is: the file against :class:`AgentConfig`,
then each device's ``connection`` and ``groups`` against its driver's own models, and
each referenced profile file against the driver's profile schema. Errors from all
layers are collected before anything is reported, so one run of
``cleanroom-agent validate`` shows the whole list.

A message never quotes the value of a secret (a password, a key passphrase, anything taken
from ``${ENV}``), and the configuration hash is computed with the values of secrets masked.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sqlite3
import stat
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field, SecretStr, ValidationError, field_validator

from agent.app.batchconfig import BatchConfig
from agent.app.health import HealthConfig
from agent.app.referenceconfig import ReferenceConfig
from agent.app.status import parse_listen
from agent.app.topics import payload_problems
from agent.buffer.config import BufferConfig
from agent.buffer.schema import SCHEMA_VERSION
from agent.core.chain import read_key
from agent.core.device import DeviceConfig, ResolvedDevice
from agent.core.driver import (
    ConnectionBase,
    Driver,
    GroupSpec,
    PollGroup,
    ProfileBase,
    available_protocols,
    build_groups,
    driver_for,
)
from agent.core.problems import Loc, Problem
from agent.sinks.forwarder import MqttConfig
from agent.transforms.inference import InferenceEngine, ModelBindingConfig, resolve_manifest
from agent.transforms.limits import LimitMonitor, LimitsConfig
from cleanroom_common.fields import FILE_DIR, ConfigPath, Duration, Strict
from cleanroom_common.profilefiles import ProfileFile, index_profiles
from cleanroom_common.yamlfile import YamlDoc, YamlError, forget_parsed, masked, read_yaml

log = logging.getLogger("cleanroom.config")


class ConfigError(Exception):
    """One or more configuration mistakes; ``str()`` lists them one per line."""

    def __init__(self, problems: list[Problem]) -> None:
        super().__init__("\n".join(map(str, problems)))
        self.problems = problems


# --------------------------------------------------------------------------- models


class AgentSection(Strict):
    """Identity of this gateway and its local interfaces."""

    id: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    """Agent id, unique per gateway: part of every payload and of the (agent, seq) de-duplication key."""
    site: str = ""
    """Free text naming the plant/suite, carried in the status message."""
    status_listen: str = "127.0.0.1:8765"
    """Where the status listener binds and ``cleanroom-agent status`` reaches it: ``HOST:PORT``, HOST an IPv4
    address, an IPv6 address in brackets or ``localhost`` (127.0.0.1). Plain HTTP without authentication:
    keep it on loopback (anywhere else is logged as a warning at every start)."""
    shutdown_grace: Duration = 5.0
    """Time a clean stop (SIGTERM) may spend delivering committed data before disconnecting."""
    log_format: Literal["text", "json"] = "text"
    """``json``: one JSON object per log line (ts, level, logger, message, device), for journald and log
    shippers; ``run --log-format`` overrides it."""

    @field_validator("status_listen")
    @classmethod
    def _bindable(cls, listen: str) -> str:
        parse_listen(listen)  # what run binds, checked by validate
        return listen


class IntegrityConfig(Strict):
    """The ``integrity:`` section: how records are made tamper-evident (docs/integrity.md)."""

    hmac_key_file: ConfigPath | None = None
    """File holding this agent's HMAC key (at least 32 bytes; a final newline is not part of it).
    With a key every segment also carries an HMAC-SHA256, so whoever holds the key downstream can
    tell a forged message from the agent's own; without one the SHA-256 chain still shows any change
    by someone who cannot rebuild the chain. Keep it readable by the agent's account only (a warning
    is logged otherwise); it is never logged, shown in status or quoted in an error."""
    clock_step_threshold: Duration = Field(default=1.0, gt=0)
    """A change of the wall clock against the monotonic clock larger than this, between two checks a
    second apart, is recorded as a ``clock_step`` event and an audit record."""


class AgentConfig(Strict):
    """The whole agent configuration file."""

    agent: AgentSection
    """Identity and local interfaces."""
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    """The durable store-and-forward buffer."""
    mqtt: MqttConfig | None = None
    """The broker readings and events are forwarded to. Without it the agent only buffers (commissioning)."""
    profiles_dirs: list[ConfigPath] = Field(default_factory=list)
    """The site's folders of device profiles (``*.yaml``), searched in order before the profiles
    shipped with the agent, which are always searched last; relative paths are relative to this file."""
    devices: list[DeviceConfig] = Field(default_factory=list)
    """Devices to acquire from."""
    models: list[ModelBindingConfig] = Field(default_factory=list)
    """Anomaly models bound to devices."""
    limits: LimitsConfig | None = None
    """Rule-based alert/action limits, independent of any model."""
    integrity: IntegrityConfig = Field(default_factory=IntegrityConfig)
    """The tamper-evident chain's key and the clock-step detection."""
    health: HealthConfig = Field(default_factory=HealthConfig)
    """When ``status``, the status API and the metrics call the agent unhealthy."""
    batch: BatchConfig = Field(default_factory=BatchConfig)
    """Batch assignment: device groups and the MES command topic."""
    reference: ReferenceConfig = Field(default_factory=ReferenceConfig)
    """Offline reference samples compared with the online probes, and the LIMS command topic."""


# --------------------------------------------------------------------------- loaded result


@dataclass
class LoadedConfig:
    path: Path
    config: AgentConfig
    devices: list[ResolvedDevice]
    sha256: str
    """SHA-256 over the config file's bytes, the values of secrets masked (:func:`hashed_bytes`), and
    every profile it uses: what ``status``, payloads and the ``config_changed`` audit report. Rotating a
    secret (a password in the file, in ``${ENV}`` or in a ``*_file``) does not change it."""
    profiles: dict[str, Path] = field(default_factory=dict)
    masked_text: str = ""
    """What :attr:`sha256` covers, as text: the file with the values of secrets masked, then a line per
    profile it uses with that file's SHA-256. Kept by the agent from one start to the next so a
    ``config_change`` audit record can show the change as a diff, which never shows a secret."""
    model_files: dict[Path, str] = field(default_factory=dict)
    """SHA-256 of each bound model's manifest as read at load. A reload re-binds the models when one
    changed (an approval given or voided, a retrained model), not only when the ``models:`` section
    did: an approval would otherwise take effect only at the next restart."""

    def hmac_key(self) -> bytes | None:
        """The HMAC key of ``integrity.hmac_key_file`` (None: none configured). ValueError saying what
        is wrong with the file, never quoting what it holds."""
        path = self.config.integrity.hmac_key_file
        return None if path is None else read_hmac_key(path)

    def summary(self) -> str:
        c = self.config
        lines = [f"config   {self.path}", f"sha256   {self.sha256}", f"agent    {c.agent.id}"]
        if c.mqtt is None:
            lines.append("broker   none (buffer only)")
        else:
            tls = " tls" if c.mqtt.tls.enabled else ""
            lines.append(f"broker   {c.mqtt.host}:{c.mqtt.port} mqtt {c.mqtt.protocol}{tls}")
        lines.append(f"buffer   {c.buffer.path} (max {c.buffer.max_bytes} bytes)")
        tags = sum(len(d.profile.tags) for d in self.devices)
        lines.append(f"devices  {len(self.devices)} ({tags} tags)")
        for d in self.devices:
            groups = ", ".join(f"{g.name}={g.interval_s:g}s/{len(g.tags)}" for g in d.groups.values())
            state = "" if d.config.enabled else " [disabled]"
            lines.append(f"  {d.id:<16} {d.profile.profile} ({d.driver.protocol}) {groups}{state}")
        lines.append(f"models   {len(c.models)}")
        key = c.integrity.hmac_key_file
        lines.append(f"chain    sha256{f' + hmac (key {key})' if key else ' (no hmac key)'}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- problems


def _load_yaml(path: Path) -> YamlDoc:
    """Parse ``path`` keeping line numbers; an unreadable file or bad YAML is a :class:`ConfigError`."""
    try:
        return read_yaml(path)
    except YamlError as exc:
        raise ConfigError([_file_problem(exc)]) from None


def _file_problem(exc: YamlError) -> Problem:
    return Problem(exc.message, file=exc.path, line=exc.line)


def _place(doc: YamlDoc, problem: Problem) -> Problem:
    """``problem`` (found on validated models) at its line in the file it came from."""
    return problem.at(doc.path, doc.line_of(problem.path or ()))


def _problem(doc: YamlDoc, loc: Loc, message: str, hint: str = "") -> Problem:
    return _place(doc, Problem(message, path=loc, hint=hint))


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, loc: Loc, problems: list[Problem], secrets: set[str]) -> Any:
    """Replace ``${NAME}`` in strings by the environment variable's value (secrets stay
    out of the file). A missing variable is an error naming it, never an empty string.
    Every value taken from the environment is added to ``secrets``: no message quotes it."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            env = os.environ.get(m.group(1))
            if env is None:
                problems.append(Problem(f"environment variable {m.group(1)} is not set", path=loc))
                return ""
            secrets.add(env)
            return env

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, (*loc, k), problems, secrets) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, (*loc, i), problems, secrets) for i, v in enumerate(value)]
    return value


def _secret_fields(model: type[BaseModel], found: set[str]) -> set[str]:
    """Names of the fields of ``model`` and of the models it holds that are typed as secrets."""
    for name, info in model.model_fields.items():
        stack: list[Any] = [info.annotation]
        while stack:
            t = stack.pop()
            if t is SecretStr:
                found.add(name)
            elif isinstance(t, type) and issubclass(t, BaseModel) and t is not model:
                _secret_fields(t, found)
            elif isinstance(t, types.UnionType) or typing.get_origin(t) is not None:
                stack.extend(typing.get_args(t))
    return found


def secret_keys(drivers: list[type[Driver]]) -> frozenset[str]:
    """The keys whose values are secrets, read off the configuration models (the agent's and
    those of the drivers in use): one source of truth for masking and redaction."""
    found = _secret_fields(AgentConfig, set())
    for driver in drivers:
        _secret_fields(driver.Connection, found)
    return frozenset(found)


def _secret_values(data: Any, keys: frozenset[str], found: set[str]) -> set[str]:
    if isinstance(data, dict):
        for k, v in data.items():
            if k in keys and isinstance(v, str | int | float):
                found.add(str(v))
            else:
                _secret_values(v, keys, found)
    elif isinstance(data, list):
        for v in data:
            _secret_values(v, keys, found)
    return found


def _redact(problems: list[Problem], secrets: set[str]) -> list[Problem]:
    """``problems`` with every secret value blanked out of their texts (values too short to be
    told apart from ordinary words are no secret worth the name and are left)."""
    words = sorted((w for w in secrets if len(w) >= 4), key=len, reverse=True)
    if not words:
        return problems
    pattern = re.compile("|".join(map(re.escape, words)))

    def clean(p: Problem) -> Problem:
        return replace(p, message=pattern.sub("***", p.message), hint=pattern.sub("***", p.hint))

    return [clean(p) for p in problems]


def _format_errors(doc: YamlDoc, exc: ValidationError, prefix: Loc = ()) -> Iterator[Problem]:
    for err in exc.errors(include_url=False, include_input=False):
        loc = (*prefix, *err["loc"])
        # pydantic adds validator names to the location of tagged/union fields; they are no YAML key
        yaml_loc = tuple(
            p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))
        )
        msg, hint = err["msg"], ""
        if err["type"] == "extra_forbidden":
            msg, hint = "unknown key", "check its spelling and its indentation"
        if err["type"] == "missing":
            msg = "required key is missing"
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        yield _problem(doc, yaml_loc, msg, hint)


def _validate_profile(
    source: ProfileFile, problems: list[Problem]
) -> tuple[type[Driver], ProfileBase] | None:
    driver = driver_for(source.protocol) if source.protocol else None
    if driver is None:
        known = ", ".join(available_protocols())
        problems.append(
            _problem(source.doc, ("protocol",), f"{source.protocol!r} has no driver", f"known: {known}")
        )
        return None
    try:
        context = {FILE_DIR: source.path.parent}
        return driver, driver.profile_model().model_validate(_detached(source.doc.data), context=context)
    except ValidationError as exc:
        problems.extend(_format_errors(source.doc, exc))
        return None


def _detached(data: Any) -> Any:
    """``data`` rebuilt with a string of its own for every string value (keys interned), to be
    validated instead of the parse.

    The validated profile keeps strings of its input (a tag's name and group). Taken from the
    parse, each sits among the parse's transient objects (nodes, marks, line maps), and the few
    bytes kept per page keep the whole page: after a 10,000-tag profile some 25 MB the agent no
    longer used stayed resident for good. Copied once the parse's nodes are gone, they share pages
    with the validated models instead, and forgetting the parse (before the poll groups are
    compiled, see :func:`_load`) returns its memory."""
    if isinstance(data, dict):
        return {sys.intern(k) if isinstance(k, str) else k: _detached(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_detached(v) for v in data]
    if isinstance(data, str):
        return data.encode("utf-8", "surrogatepass").decode("utf-8", "surrogatepass")
    return data


# --------------------------------------------------------------------------- entry point


def hashed_bytes(doc: YamlDoc, keys: frozenset[str]) -> bytes:
    """The configuration file as it enters the hash: its bytes with the value of every secret
    key (``keys``, see :func:`secret_keys`) masked."""
    return masked(doc, keys)


def _hash_and_text(doc: YamlDoc, keys: frozenset[str], profile_paths: list[Path]) -> tuple[str, str]:
    """The configuration hash and its :attr:`LoadedConfig.masked_text`, from one reading of each file."""
    body = hashed_bytes(doc, keys)
    h = hashlib.sha256(body)
    lines = [body.decode("utf-8")]
    if lines[0] and not lines[0].endswith("\n"):
        lines[0] += "\n"
    for p in sorted(set(profile_paths)):
        raw = p.read_bytes()
        h.update(b"\0" + p.name.encode() + b"\0" + raw)
        lines.append(f"# profile {p.name} sha256 {hashlib.sha256(raw).hexdigest()}\n")
    return h.hexdigest(), "".join(lines)


def read_hmac_key(path: Path) -> bytes:
    """The key in ``path`` (see :func:`agent.core.chain.read_key`); ValueError naming the file and the
    problem, never its content. A key others can read is used, with a warning: refusing it would
    stop acquisition over a permission an installer can fix."""
    try:
        with path.open("rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            raw = f.read(4096)
    except OSError as exc:
        raise ValueError(f"integrity.hmac_key_file {path}: cannot read: {exc.strerror or exc}") from None
    try:
        key = read_key(raw)
    except ValueError as exc:
        raise ValueError(f"integrity.hmac_key_file {path}: {exc}") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning(
            "integrity.hmac_key_file %s can be read by other accounts (mode %o): chmod 600 it",
            path,
            stat.S_IMODE(mode),
        )
    return key


def load_config(path: str | Path) -> LoadedConfig:
    """Load, validate and resolve a config file; raise :class:`ConfigError` listing every problem."""
    try:
        return _load_config(Path(path).resolve())
    finally:
        forget_parsed()


def _load_config(path: Path) -> LoadedConfig:
    src = _load_yaml(path)
    if not isinstance(src.data, dict):
        raise ConfigError(
            [Problem("the file must be a mapping with at least an 'agent:' section", file=path, line=1)]
        )
    env_problems: list[Problem] = []
    secrets: set[str] = set()
    data = _expand_env(src.data, (), env_problems, secrets)
    try:
        return _load(path, src, data, env_problems, secrets)
    except ConfigError as exc:
        raise ConfigError(_redact(exc.problems, secrets)) from None


def _known_secrets(src: YamlDoc, data: Any, drivers: list[type[Driver]], secrets: set[str]) -> frozenset[str]:
    """The secret keys of the agent and of ``drivers``; their values (as written and as
    expanded from the environment) are added to ``secrets``."""
    keys = secret_keys(drivers)
    _secret_values(src.data, keys, secrets)
    _secret_values(data, keys, secrets)
    return keys


def _load(
    path: Path, src: YamlDoc, data: Any, env_problems: list[Problem], secrets: set[str]
) -> LoadedConfig:
    problems = [_place(src, p) for p in env_problems]
    context = {FILE_DIR: path.parent}
    _known_secrets(src, data, [], secrets)
    try:
        cfg = AgentConfig.model_validate(data, context=context)
    except ValidationError as exc:
        problems.extend(_format_errors(src, exc))
        raise ConfigError(problems) from None

    found = _validate_devices(src, data, cfg, secrets, problems)
    # The profiles' parses end here, before the groups are compiled: what the groups keep is then
    # not scattered among them, and forgetting the parses returns their memory (see _detached).
    forget_parsed()
    compiled: dict[tuple[int, str, int, float], PollGroup] = {}
    devices = [pending.resolve(compiled) for pending in found.devices]
    seen_ids, keys = found.seen_ids, found.keys
    if cfg.mqtt is not None:
        problems += [_place(src, p) for p in _missing_files(cfg.mqtt, ("mqtt",))]
    if (key_file := cfg.integrity.hmac_key_file) is not None:
        try:
            read_hmac_key(key_file)
        except ValueError as exc:
            problems.append(_problem(src, ("integrity", "hmac_key_file"), str(exc)))
    profiles_by_device = {d.id: d.profile for d in devices}
    problems += [_place(src, p) for p in InferenceEngine.check(cfg.models, profiles_by_device, load=False)]
    if cfg.limits is not None:
        problems += [_place(src, p) for p in LimitMonitor.check(cfg.limits, profiles_by_device)]
    if cfg.mqtt is not None:  # what the forwarder's encoder would refuse at start, found by validate
        entries: dict[str, Loc] = {d: ("devices", i) for d, i in seen_ids.items()}
        prefix, me = cfg.mqtt.topic_prefix, cfg.agent.id
        commands = [
            (section.topic(prefix, me), what, (name, "command_topic"))
            for name, section, what in (
                ("batch", cfg.batch, "the batch commands"),
                ("reference", cfg.reference, "the reference samples"),
            )
            if section.mqtt_commands
        ]
        problems += [
            _place(src, p) for p in payload_problems(cfg.mqtt, cfg.agent.id, devices, entries, commands)
        ]
    problems += [_place(src, p) for p in cfg.batch.check(seen_ids, cfg.mqtt is not None)]
    problems += [_place(src, p) for p in cfg.reference.check(cfg.mqtt is not None)]
    if problems:
        raise ConfigError(problems)
    used = [d.profile_path for d in devices]
    try:
        sha256, text = _hash_and_text(src, keys, used)
    except YamlError as exc:
        raise ConfigError([_file_problem(exc)]) from None
    return LoadedConfig(path, cfg, devices, sha256, found.profiles, text, _model_files(cfg.models))


def _model_files(bindings: list[ModelBindingConfig]) -> dict[Path, str]:
    """The digests :attr:`LoadedConfig.model_files` keeps; a manifest that cannot be read is left
    out (binding it is refused and reported by the inference engine, not here)."""
    digests: dict[Path, str] = {}
    for binding in bindings:
        path = resolve_manifest(binding.manifest)
        with contextlib.suppress(OSError):
            digests[path] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digests


@dataclass
class _PendingDevice:
    """A device whose configuration and profile are valid, its poll groups not yet compiled."""

    config: DeviceConfig
    driver: type[Driver]
    profile: ProfileBase
    profile_path: Path
    connection: ConnectionBase
    overrides: dict[str, GroupSpec]

    def resolve(self, compiled: dict[tuple[int, str, int, float], PollGroup]) -> ResolvedDevice:
        groups = build_groups(self.config.id, self.profile, self.connection, self.overrides, compiled)
        return ResolvedDevice(
            self.config, self.driver, self.profile, self.profile_path, self.connection, groups
        )


@dataclass
class _ValidDevices:
    devices: list[_PendingDevice]
    seen_ids: dict[str, int]
    """Each device id and the index of the entry that declared it first."""
    profiles: dict[str, Path]
    """Every profile found, by name."""
    keys: frozenset[str]
    """The secret keys of the agent and of the drivers in use."""


def _validate_devices(
    src: YamlDoc, data: Any, cfg: AgentConfig, secrets: set[str], problems: list[Problem]
) -> _ValidDevices:
    """The devices against their profiles and drivers; each profile used is validated once, and its
    parse (held by the index) is let go when this returns."""
    index = index_profiles(cfg.profiles_dirs)
    problems += [_file_problem(e) for e in index.errors]
    profiles = index.profiles
    # Only the drivers this configuration uses are imported (an agent without OPC UA devices
    # never loads the OPC UA stack); their connection secrets join the agent's.
    protocols = {pr for d in cfg.devices if d.profile in profiles and (pr := profiles[d.profile].protocol)}
    drivers = [drv for pr in sorted(protocols) if (drv := driver_for(pr)) is not None]
    keys = _known_secrets(src, data, drivers, secrets)
    validated: dict[str, tuple[type[Driver], ProfileBase] | None] = {}
    devices: list[_PendingDevice] = []
    seen_ids: dict[str, int] = {}
    for i, dev in enumerate(cfg.devices):
        loc: Loc = ("devices", i)
        if dev.id in seen_ids:
            problems.append(
                _problem(src, (*loc, "id"), f"{dev.id!r} is already used by devices[{seen_ids[dev.id]}]")
            )
            continue
        seen_ids[dev.id] = i
        if dev.profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none found"
            problems.append(
                _problem(src, (*loc, "profile"), f"no profile {dev.profile!r}", f"known: {known}")
            )
            continue
        if dev.profile not in validated:
            validated[dev.profile] = _validate_profile(profiles[dev.profile], problems)
        resolved = validated[dev.profile]
        if resolved is None:
            problems.append(
                _problem(src, (*loc, "profile"), f"profile {dev.profile!r} is invalid (see above)")
            )
            continue
        driver, profile = resolved
        device = _resolve_device(src, loc, dev, driver, profile, profiles[dev.profile].path, problems)
        if device is not None:
            devices.append(device)
            problems += [_place(src, p) for p in _missing_files(device.connection, (*loc, "connection"))]
    return _ValidDevices(devices, seen_ids, {n: p.path for n, p in profiles.items()}, keys)


def _missing_files(model: BaseModel, at: Loc) -> Iterator[Problem]:
    """Files a section names (passwords, certificates, keys, trust folders) that are not
    there or cannot be read: found by ``validate``, not at the first connection attempt hours
    later. A password file must be UTF-8 text; what it holds is never quoted."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _missing_files(value, (*at, name))
        elif isinstance(value, Path):
            problem = _unreadable(value, name)
            if problem:
                yield Problem(problem, path=(*at, name))


def _unreadable(path: Path, field_name: str) -> str | None:
    if not path.exists():
        return f"{path} does not exist"
    if path.is_dir():
        return None if field_name.endswith("_dir") else f"cannot read {path}: it is a folder"
    try:
        with path.open("rb") as f:
            head = f.read(65536)
    except OSError as exc:
        return f"cannot read {path}: {exc.strerror or exc}"
    if field_name.endswith("password_file"):
        try:
            head.decode("utf-8")
        except UnicodeDecodeError:
            return f"{path} is not UTF-8 text (the password is its first line)"
    return None


# --------------------------------------------------------------------------- what start would meet


def check_startup(loaded: LoadedConfig) -> list[Problem]:
    """What ``run`` would meet at start beyond the configuration itself: the buffer it must open
    and every model it must load. ``validate`` reports these too; ``run`` meets them itself (a
    buffer it cannot open stops it, a model it cannot load is disabled alone)."""
    src = read_yaml(loaded.path)
    cfg = loaded.config
    problems = [_place(src, p) for p in _buffer_problems(cfg)]
    profiles = {d.id: d.profile for d in loaded.devices}
    problems += [_place(src, p) for p in InferenceEngine.check(cfg.models, profiles)]
    return problems


def _buffer_problems(cfg: AgentConfig) -> list[Problem]:
    """The checks the buffer makes when it opens, made read-only: a folder that cannot be made
    or written, a newer schema, another agent's buffer."""
    path, at = cfg.buffer.path, ("buffer", "path")
    folder = path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        return [Problem(f"{folder} is not a folder: the buffer {path} cannot be created", path=at)]
    if not path.exists():
        ok = os.access(folder, os.W_OK | os.X_OK)
        return [] if ok else [Problem(f"the agent cannot create files in {folder}", path=at)]
    if not path.is_file():
        return [Problem(f"{path} is not a file", path=at)]
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            tables = {n for (n,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            meta = dict(conn.execute("SELECT key, value FROM meta").fetchall()) if "meta" in tables else {}
    except sqlite3.Error:  # a damaged file: the agent moves it aside at start and begins a new one
        return []
    owner, schema = meta.get("agent_id"), int(meta.get("schema_version") or 0)
    if owner is not None and owner != cfg.agent.id:
        return [Problem(f"{path} is the buffer of agent {owner!r}, not {cfg.agent.id!r}", path=at)]
    if schema > SCHEMA_VERSION:
        return [
            Problem(f"{path} has buffer schema {schema}, newer than this agent's ({SCHEMA_VERSION})", path=at)
        ]
    return []


def _resolve_device(
    src: YamlDoc,
    loc: Loc,
    dev: DeviceConfig,
    driver: type[Driver],
    profile: ProfileBase,
    profile_path: Path,
    problems: list[Problem],
) -> _PendingDevice | None:
    before = len(problems)
    context = {FILE_DIR: src.path.parent}
    connection: ConnectionBase | None = None
    try:
        connection = driver.Connection.model_validate(dev.connection, context=context)
    except ValidationError as exc:
        problems.extend(_format_errors(src, exc, (*loc, "connection")))
    overrides: dict[str, GroupSpec] = {}
    for name, override in dev.groups.items():
        if name not in profile.groups:
            msg = f"profile {profile.profile!r} has no group {name!r}"
            problems.append(
                _problem(src, (*loc, "groups", name), msg, f"groups: {', '.join(profile.groups)}")
            )
            continue
        try:
            base = profile.groups[name].model_dump(exclude_unset=True)
            overrides[name] = driver.Group.model_validate({**base, **override}, context=context)
        except ValidationError as exc:
            problems.extend(_format_errors(src, exc, (*loc, "groups", name)))
    if connection is None or len(problems) > before:
        return None
    return _PendingDevice(dev, driver, profile, profile_path, connection, overrides)
