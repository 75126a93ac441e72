"""Load and validate the agent's YAML configuration, reporting *every* mistake with
its YAML path and line (Home Assistant's rule: validate before anything starts, say
exactly which key on which device is wrong and why).

Validation is layered the way the config is: the file against :class:`AgentConfig`,
then each device's ``connection`` and ``groups`` against its driver's own models, and
each referenced profile file against the driver's profile schema. Errors from all
layers are collected before anything is reported, so one run of
``cleanroom-agent validate`` shows the whole list.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, Field, ValidationError

from agent.buffer.store import BufferConfig
from agent.core.device import DeviceConfig, ResolvedDevice
from agent.core.driver import (
    ConnectionBase,
    Driver,
    GroupSpec,
    ProfileBase,
    available_protocols,
    build_groups,
    driver_for,
)
from agent.sinks.forwarder import MqttConfig
from agent.transforms.inference import InferenceEngine, ModelBindingConfig
from agent.transforms.limits import LimitMonitor, LimitsConfig
from cleanroom_common.bundled import profiles_dir
from cleanroom_common.fields import Duration, Strict

BUNDLED_PROFILES = profiles_dir()
"""Profiles shipped with the agent (simulators and generic examples)."""

Loc = tuple[str | int, ...]


class ConfigError(Exception):
    """One or more configuration mistakes; ``str()`` lists them one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# --------------------------------------------------------------------------- models


class AgentSection(Strict):
    """Identity of this gateway and its local interfaces."""

    id: str = Field(pattern=r"^[A-Za-z0-9_\-]+$")
    """Agent id, unique per gateway: part of every payload and of the (agent, seq) de-duplication key."""
    site: str = ""
    """Free text naming the plant/suite, carried in the status message."""
    status_listen: str = "127.0.0.1:8765"
    """Where ``cleanroom-agent status`` reaches the running agent: ``HOST:PORT`` (HTTP on loopback)."""
    shutdown_grace: Duration = 5.0
    """Time a clean stop (SIGTERM) may spend delivering committed data before disconnecting."""


class AgentConfig(Strict):
    """The whole agent configuration file."""

    agent: AgentSection
    """Identity and local interfaces."""
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    """The durable store-and-forward buffer."""
    mqtt: MqttConfig | None = None
    """The broker readings and events are forwarded to. Without it the agent only buffers (commissioning)."""
    profiles_dirs: list[Path] = Field(default_factory=lambda: [BUNDLED_PROFILES])
    """Folders searched for device profiles (``*.yaml``); relative paths are relative to this file."""
    devices: list[DeviceConfig] = Field(default_factory=list)
    """Devices to acquire from."""
    models: list[ModelBindingConfig] = Field(default_factory=list)
    """Anomaly models bound to devices."""
    limits: LimitsConfig | None = None
    """Rule-based alert/action limits, independent of any model."""


# --------------------------------------------------------------------------- loaded result


@dataclass
class LoadedConfig:
    path: Path
    config: AgentConfig
    devices: list[ResolvedDevice]
    sha256: str
    """SHA-256 over the config file's bytes and every profile it uses: what ``status`` and payloads report."""
    profiles: dict[str, Path] = field(default_factory=dict)

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
        return "\n".join(lines)


# --------------------------------------------------------------------------- YAML with lines


class _Lines:
    """YAML data plus the line of every path in it, for error messages."""

    def __init__(self, file: Path, data: Any, lines: dict[Loc, int]) -> None:
        self.file = file
        self.data = data
        self.lines = lines

    def problem(self, loc: Loc, msg: str) -> str:
        """The one format of every config message: ``file:line: yaml.path: what is wrong``."""
        return f"{self.where(loc)}: {_dotted(loc)}: {msg}"

    def where(self, loc: Loc) -> str:
        """``file:line`` of the deepest existing prefix of ``loc``."""
        for n in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:n]))
            if line is not None:
                return f"{self.file}:{line}"
        return str(self.file)


def _walk(node: yaml.Node, loc: Loc, lines: dict[Loc, int]) -> None:
    lines.setdefault(loc, node.start_mark.line + 1)
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            k: Any = key.value
            sub = (*loc, k)
            lines[sub] = key.start_mark.line + 1
            _walk(value, sub, lines)
            lines[sub] = key.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _walk(item, (*loc, i), lines)


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when PyYAML has it: a 10,000-tag profile loads in a fraction of the time."""


class _UniqueKeyLoader(_BaseLoader):  # type: ignore[misc,valid-type]
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def load_yaml(path: Path) -> _Lines:
    """Parse ``path`` keeping line numbers; YAML syntax errors become :class:`ConfigError`."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: not UTF-8 text"]) from None
    try:
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError([f"{path}{line}: YAML syntax: {exc.problem or exc.context}"]) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    return _Lines(path, data, lines)


_LIMITS_LOC = re.compile(r"^limits\.(tags|particles)\[(\d+)\]")
_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(value: Any, loc: Loc, problems: list[tuple[Loc, str]]) -> Any:
    """Replace ``${NAME}`` in strings by the environment variable's value (secrets stay
    out of the file). A missing variable is an error naming it, never an empty string."""
    if isinstance(value, str):

        def sub(m: re.Match[str]) -> str:
            env = os.environ.get(m.group(1))
            if env is None:
                problems.append((loc, f"environment variable {m.group(1)} is not set"))
                return ""
            return env

        return _ENV_RE.sub(sub, value)
    if isinstance(value, dict):
        return {k: _expand_env(v, (*loc, k), problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_expand_env(v, (*loc, i), problems) for i, v in enumerate(value)]
    return value


def _format_errors(src: _Lines, exc: ValidationError, prefix: Loc = ()) -> Iterator[str]:
    for err in exc.errors(include_url=False, include_input=False):
        loc = (*prefix, *err["loc"])
        # pydantic adds validator names to the location of tagged/union fields; they are no YAML key
        yaml_loc = tuple(
            p for p in loc if not (isinstance(p, str) and ("[" in p or p.startswith("function-")))
        )
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and its indentation)"
        if err["type"] == "missing":
            msg = "required key is missing"
        if err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        yield src.problem(yaml_loc, msg)


def _dotted(loc: Loc) -> str:
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


# --------------------------------------------------------------------------- profiles


@dataclass
class _ProfileSource:
    path: Path
    src: _Lines
    protocol: str | None


def _index_profiles(dirs: list[Path], problems: list[str]) -> dict[str, _ProfileSource]:
    found: dict[str, _ProfileSource] = {}
    for d in dirs:
        if not d.is_dir():
            problems.append(f"{d}: profiles folder does not exist")
            continue
        for f in sorted(d.glob("*.yaml")):
            try:
                src = load_yaml(f)
            except ConfigError as exc:
                problems.extend(exc.problems)
                continue
            if not isinstance(src.data, dict) or "profile" not in src.data:
                continue
            name = str(src.data["profile"])
            if name in found:
                problems.append(f"{f}: profile {name!r} is also defined in {found[name].path}")
                continue
            protocol = src.data.get("protocol")
            found[name] = _ProfileSource(f, src, str(protocol) if protocol is not None else None)
    return found


def _validate_profile(source: _ProfileSource, problems: list[str]) -> tuple[type[Driver], ProfileBase] | None:
    driver = driver_for(source.protocol) if source.protocol else None
    if driver is None:
        known = ", ".join(available_protocols())
        problems.append(
            source.src.problem(("protocol",), f"{source.protocol!r} has no driver (known: {known})")
        )
        return None
    try:
        return driver, driver.profile_model().model_validate(source.src.data)
    except ValidationError as exc:
        problems.extend(_format_errors(source.src, exc))
        return None


# --------------------------------------------------------------------------- entry point


def config_hash(config_path: Path, profile_paths: list[Path]) -> str:
    h = hashlib.sha256(config_path.read_bytes())
    for p in sorted(set(profile_paths)):
        h.update(b"\0" + p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


def load_config(path: str | Path) -> LoadedConfig:
    """Load, validate and resolve a config file; raise :class:`ConfigError` listing every problem."""
    path = Path(path).resolve()
    src = load_yaml(path)
    if not isinstance(src.data, dict):
        raise ConfigError([f"{path}:1: the file must be a mapping with at least an 'agent:' section"])
    env_problems: list[tuple[Loc, str]] = []
    data = _expand_env(src.data, (), env_problems)
    problems = [src.problem(loc, msg) for loc, msg in env_problems]
    _resolve_relative(data, path.parent)
    try:
        cfg = AgentConfig.model_validate(data)
    except ValidationError as exc:
        problems.extend(_format_errors(src, exc))
        raise ConfigError(problems) from None

    profiles = _index_profiles(list(cfg.profiles_dirs), problems)
    validated: dict[str, tuple[type[Driver], ProfileBase] | None] = {}
    devices: list[ResolvedDevice] = []
    seen_ids: dict[str, int] = {}
    for i, dev in enumerate(cfg.devices):
        loc: Loc = ("devices", i)
        if dev.id in seen_ids:
            problems.append(
                src.problem((*loc, "id"), f"{dev.id!r} is already used by devices[{seen_ids[dev.id]}]")
            )
            continue
        seen_ids[dev.id] = i
        if dev.profile not in profiles:
            known = ", ".join(sorted(profiles)) or "none found"
            problems.append(src.problem((*loc, "profile"), f"no profile {dev.profile!r} (known: {known})"))
            continue
        if dev.profile not in validated:
            validated[dev.profile] = _validate_profile(profiles[dev.profile], problems)
        resolved = validated[dev.profile]
        if resolved is None:
            problems.append(src.problem((*loc, "profile"), f"profile {dev.profile!r} is invalid (see above)"))
            continue
        driver, profile = resolved
        device = _resolve_device(src, loc, dev, driver, profile, profiles[dev.profile].path, problems)
        if device is not None:
            devices.append(device)
            missing = _missing_files(device.connection, (*loc, "connection"))
            problems += [src.problem(at, msg) for at, msg in missing]
    if cfg.mqtt is not None:
        problems += [src.problem(at, msg) for at, msg in _missing_files(cfg.mqtt, ("mqtt",))]
    profiles_by_device = {d.id: d.profile for d in devices}
    for i, binding in enumerate(cfg.models):
        for msg in InferenceEngine.check([binding], profiles_by_device):
            problems.append(src.problem(("models", i), msg.split(": ", 1)[-1]))
    if cfg.limits is not None:
        for msg in LimitMonitor.check(cfg.limits, profiles_by_device):
            m = _LIMITS_LOC.match(msg)
            at: Loc = ("limits", m.group(1), int(m.group(2))) if m else ("limits",)
            problems.append(src.problem(at, msg.split(": ", 1)[-1]))
    if problems:
        raise ConfigError(problems)
    used = [profiles[d.config.profile].path for d in devices]
    return LoadedConfig(path, cfg, devices, config_hash(path, used), {n: p.path for n, p in profiles.items()})


def _missing_files(model: BaseModel, at: Loc) -> Iterator[tuple[Loc, str]]:
    """Files a section names (passwords, certificates, keys, trust folders) that are not
    there: found by ``validate``, not at the first connection attempt hours later."""
    for name in type(model).model_fields:
        value = getattr(model, name)
        if isinstance(value, BaseModel):
            yield from _missing_files(value, (*at, name))
        elif isinstance(value, Path) and not value.exists():
            yield (*at, name), f"{value} does not exist"


def _resolve_device(
    src: _Lines,
    loc: Loc,
    dev: DeviceConfig,
    driver: type[Driver],
    profile: ProfileBase,
    profile_path: Path,
    problems: list[str],
) -> ResolvedDevice | None:
    before = len(problems)
    connection: ConnectionBase | None = None
    try:
        connection = driver.Connection.model_validate(dev.connection)
    except ValidationError as exc:
        problems.extend(_format_errors(src, exc, (*loc, "connection")))
    overrides: dict[str, GroupSpec] = {}
    for name, override in dev.groups.items():
        if name not in profile.groups:
            known = ", ".join(profile.groups)
            msg = f"profile {profile.profile!r} has no group {name!r} (groups: {known})"
            problems.append(src.problem((*loc, "groups", name), msg))
            continue
        try:
            base = profile.groups[name].model_dump(exclude_unset=True)
            overrides[name] = driver.Group.model_validate({**base, **override})
        except ValidationError as exc:
            problems.extend(_format_errors(src, exc, (*loc, "groups", name)))
    if connection is None or len(problems) > before:
        return None
    groups = build_groups(dev.id, profile, connection, overrides)
    return ResolvedDevice(dev, driver, profile, profile_path, connection, groups)


def _resolve_relative(data: dict[str, Any], base: Path) -> None:
    """Paths in the file are relative to the file, not to wherever the agent was started."""

    def fix(v: Any) -> Any:
        return str(base / v) if isinstance(v, str) and not os.path.isabs(v) else v

    if isinstance(data.get("profiles_dirs"), list):
        data["profiles_dirs"] = [fix(p) for p in data["profiles_dirs"]]
    buf = data.get("buffer")
    if isinstance(buf, dict) and "path" in buf:
        buf["path"] = fix(buf["path"])
    mq = data.get("mqtt")
    if isinstance(mq, dict):
        if "password_file" in mq:
            mq["password_file"] = fix(mq["password_file"])
        tls = mq.get("tls")
        if isinstance(tls, dict):
            for k in ("ca_file", "cert_file", "key_file"):
                if k in tls:
                    tls[k] = fix(tls[k])
    for m in data.get("models") or []:
        # a model next to the config wins; otherwise the shipped models/ folder is searched
        if isinstance(m, dict) and isinstance(m.get("manifest"), str) and os.path.exists(fix(m["manifest"])):
            m["manifest"] = fix(m["manifest"])
