"""Docs that cannot drift from the code: the configuration reference is generated, and every
command, configuration key, file and module the docs name must exist.

The name checks read every ``docs/*.md`` and the README the way a newcomer does: backticked
spans and fenced code blocks. Each test lists every offender at once, as ``file:line: what``,
so one run says everything a doc change has to fix.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import re
import types
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Annotated, Any, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel, ValidationError

from agent.app.config import AgentConfig, ConfigError, load_config
from agent.app.docgen import BEGIN, DOC, END, render
from agent.core.device import DeviceConfig
from agent.core.driver import ProfileBase, load_drivers

ROOT = Path(__file__).resolve().parent.parent
SITE_FILE_MISSING = re.compile(r"/etc/cleanroom-edge/\S+ does not exist")
"""A site's own certificates and secrets, which examples name and this machine lacks."""
DOCS = [*sorted((ROOT / "docs").glob("*.md")), ROOT / "README.md"]

FENCE = re.compile(r"^(?P<indent>[ \t]*)```(?P<lang>[\w-]*)[^\n]*\n(?P<body>.*?)^(?P=indent)```", re.S | re.M)
SPAN = re.compile(r"(`+)((?:(?!\n[ \t]*\n).)+?)\1", re.S)
COMMAND = re.compile(r"(?<![\w-])(?P<prog>cleanroom-(?:agent|sim))(?=\s|$)(?P<rest>.*)")
SHELL_BREAK = re.compile(r"\s(?:\|\||&&|\||;)\s")
SHELL_COMMENT = re.compile(r"(?:^|\s)#.*")
SHELL = {"", "sh", "bash", "shell", "console"}
PACKAGES = ("agent", "drivers", "simulators", "cleanroom_common", "bench")
FOLDERS = (*PACKAGES, "tests", "deploy", "models", "docs")
FILE_PATH = re.compile(
    rf"(?<![\w/.~$-])(?!agent/(?:events|audit|status)\b)((?:{'|'.join(FOLDERS)})/[\w./*<>-]*)"
)
"""A path into the tree; the agent's own MQTT streams (``agent/audit``...) are topics, not paths."""
MODULE_PATH = re.compile(rf"(?<![\w/.$-])((?:{'|'.join(PACKAGES)})(?:\.[A-Za-z_]\w*)+)")
DOTTED_KEY = re.compile(r"[a-z_]+(?:\[\d*\])?(?:\.[a-z_][a-z0-9_]*(?:\[\d*\])?)+")
LINK = re.compile(r"\]\((?!https?:|mailto:|#)([^)#\s]+)")
FILE_SUFFIXES = {"yaml", "yml", "db", "json", "py", "md", "pem", "der", "csv", "onnx", "env", "sh", "toml"}


# --------------------------------------------------------------------------- reading the docs


@dataclass(frozen=True)
class Found:
    """A piece of a doc, with where a reader finds it."""

    where: str
    text: str


@dataclass(frozen=True)
class Block:
    where: str
    lang: str
    body: str


@dataclass(frozen=True)
class Doc:
    path: Path
    text: str

    @property
    def name(self) -> str:
        return str(self.path.relative_to(ROOT))

    def at(self, offset: int) -> str:
        return f"{self.name}:{self.text.count(chr(10), 0, offset) + 1}"

    @property
    def prose(self) -> str:
        """The text with code blocks blanked out (same offsets, so line numbers stay right)."""
        return FENCE.sub(lambda m: re.sub(r"[^\n]", " ", m.group(0)), self.text)

    def blocks(self) -> Iterator[Block]:
        for m in FENCE.finditer(self.text):
            body = "\n".join(line.removeprefix(m["indent"]) for line in m["body"].splitlines())
            yield Block(self.at(m.start("body")), m["lang"], body)

    def spans(self) -> Iterator[Found]:
        for m in SPAN.finditer(self.prose):
            yield Found(self.at(m.start(2)), " ".join(m.group(2).split()))

    def code_lines(self, langs: set[str] | None = None) -> Iterator[Found]:
        """Lines of the code blocks (of ``langs`` only, when given)."""
        for m in FENCE.finditer(self.text):
            if langs is not None and m["lang"] not in langs:
                continue
            for i, line in enumerate(m["body"].splitlines()):
                yield Found(f"{self.name}:{self.text.count(chr(10), 0, m.start('body')) + i + 1}", line)


@cache
def docs() -> tuple[Doc, ...]:
    return tuple(Doc(p, p.read_text()) for p in DOCS)


def test_the_docs_are_read() -> None:
    """The checks below mean something only if they find what they look for."""
    names = {d.path.name for d in docs()}
    assert {"README.md", "architecture.md", "configuration.md", "operations.md"} <= names
    assert any(COMMAND.search(f.text) for d in docs() for f in d.spans())
    assert any(b.lang == "yaml" for d in docs() for b in d.blocks())


# --------------------------------------------------------------------------- commands


def _parsers() -> dict[str, argparse.ArgumentParser]:
    from agent.cli import build_parser as agent_parser
    from simulators.cli import build_parser as sim_parser

    return {"cleanroom-agent": agent_parser(), "cleanroom-sim": sim_parser()}


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser] | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return None


def command_problems(parser: argparse.ArgumentParser, words: list[str], shown: str) -> Iterator[str]:
    """What in ``words`` (the doc's words after ``shown``) the parser does not have: a
    subcommand (``a|b`` names alternatives) or an option. Other words are arguments."""
    sub = _subcommands(parser)
    if shown == "cleanroom-agent discover" and words:
        # discover's protocols are parsers built on demand from the installed discoverers
        from agent.cli.discover import discoverer_class, discoverers, protocol_parser

        protocol = words[0].strip("[](),")
        if protocol in discoverers():
            parser = protocol_parser(protocol, discoverer_class(protocol))
            yield from command_problems(parser, words[1:], f"{shown} {protocol}")
            return
    i = 0
    while i < len(words):
        word = words[i].strip("[](),")
        i += 1
        if not word or word in {"…", "..."}:
            continue
        if word.startswith("-"):
            option = word.split("=", 1)[0]
            action = parser._option_string_actions.get(option)
            if action is None:
                yield f"`{shown}` has no option {option}"
            elif action.nargs != 0 and "=" not in word:
                i += 1  # its value
            continue
        if sub is None:
            continue  # an argument (a file, a value)
        for name in word.split("|"):
            if name in sub:
                yield from command_problems(sub[name], words[i:], f"{shown} {name}")
            else:
                yield f"`{shown}` has no subcommand {name!r} (it has: {', '.join(sorted(sub))})"
        return


def test_every_command_the_docs_name_exists() -> None:
    parsers = _parsers()
    offenders: list[str] = []
    for doc in docs():
        shell = [Found(f.where, SHELL_COMMENT.sub("", f.text)) for f in doc.code_lines(SHELL)]
        for found in [*doc.spans(), *shell]:
            for m in COMMAND.finditer(found.text):
                rest = SHELL_BREAK.split(m["rest"], maxsplit=1)[0]
                for problem in command_problems(parsers[m["prog"]], rest.split(), m["prog"]):
                    offenders.append(f"{found.where}: {problem}")
    assert not offenders, "commands the docs name that do not exist:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- configuration keys


def _fields(model: type[BaseModel]) -> set[str]:
    return {n for n in model.model_fields} | {f.alias for f in model.model_fields.values() if f.alias}


def _models_in(annotation: Any) -> tuple[list[type[BaseModel]], bool]:
    """The models a field's value is made of, and whether they sit in a mapping keyed by a name."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return _models_in(get_args(annotation)[0])
    if origin in (Union, types.UnionType):
        found = [_models_in(a) for a in get_args(annotation)]
        return [m for ms, _ in found for m in ms], any(keyed for _, keyed in found)
    if origin in (list, tuple, set, frozenset):
        return _models_in(get_args(annotation)[0])[0], False
    if origin is dict:
        return _models_in(get_args(annotation)[1])[0], True
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation], False
    return [], False


def _targets(model: type[BaseModel], name: str) -> tuple[list[type[BaseModel]], bool]:
    """What the value of ``model.name`` is checked against. A device's connection and group
    overrides belong to its driver, which a doc snippet may not name: any driver's will do."""
    drivers = load_drivers().values()
    if issubclass(model, DeviceConfig) and name == "connection":
        return [d.Connection for d in drivers], False
    if issubclass(model, (DeviceConfig, ProfileBase)) and name == "groups":
        return [d.Group for d in drivers], True
    if issubclass(model, ProfileBase) and name == "tags":
        return [d.Tag for d in drivers], False
    field = next(f for n, f in model.model_fields.items() if name in (n, f.alias))
    return _models_in(field.annotation)


def _profile_models() -> list[type[BaseModel]]:
    return [d.profile_model() for d in load_drivers().values()]


def _step(models: list[type[BaseModel]], key: str) -> tuple[list[type[BaseModel]], bool] | None:
    owners = [m for m in models if key in _fields(m)]
    if not owners:
        return None
    found = [_targets(m, key) for m in owners]
    return [m for ms, _ in found for m in ms], any(keyed for _, keyed in found)


def unknown_keys(value: Any, models: list[type[BaseModel]], keyed: bool, path: str) -> Iterator[str]:
    """Keys of a YAML snippet that no model in ``models`` has, as dotted paths."""
    if keyed and isinstance(value, dict):
        for name, item in value.items():
            yield from unknown_keys(item, models, False, f"{path}.{name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from unknown_keys(item, models, keyed, f"{path}[{i}]")
    elif models and isinstance(value, dict):
        for key, item in value.items():
            step = _step(models, str(key))
            if step is None:
                yield f"{path}.{key}".lstrip(".")
            else:
                yield from unknown_keys(item, *step, f"{path}.{key}")


def dotted_key_problem(key: str) -> str | None:
    """``mqtt.tls.ca_file``: each part must be a field of the part before (``profile.*`` is a
    device profile's key)."""
    parts = [p.split("[")[0] for p in key.split(".")]
    if parts[0] == "profile":
        models, keyed = _profile_models(), False
        parts = parts[1:]
    else:
        models, keyed = [AgentConfig], False
    for part in parts:
        step = _step(models, part)
        if step is not None:
            models, keyed = step
        elif keyed:
            keyed = False  # a name in a mapping (a group's name, say)
        else:
            return f"`{key}`: no configuration key {part!r} there"
    return None


def _is_config_key(text: str) -> bool:
    parts = text.split(".")
    roots = _fields(AgentConfig) | {"profile"}
    return (
        bool(DOTTED_KEY.fullmatch(text))
        and parts[0].split("[")[0] in roots
        and parts[-1] not in FILE_SUFFIXES
    )


def _yaml_block_problems(block: Block, tmp: Path) -> Iterator[str]:
    from simulators.process.scenario import Scenario
    from simulators.servers.plant import ServeSpec

    try:
        data = yaml.safe_load(block.body)
    except yaml.YAMLError as exc:
        yield f"not YAML: {exc}"
        return
    if not isinstance(data, dict):
        yield "a YAML example that is not a mapping"
        return
    keys = set(data)
    if keys <= _fields(AgentConfig) and "agent" in keys:
        config = tmp / f"{block.where.replace('/', '_').replace(':', '_')}.yaml"
        config.write_text(block.body)
        try:
            load_config(config)
        except ConfigError as exc:
            # the site's own certificates and secrets are not on this machine; anything
            # else wrong with an example is a broken example
            yield from (str(p) for p in exc.problems if not SITE_FILE_MISSING.fullmatch(p.message))
    elif keys <= _fields(AgentConfig):
        yield from (f"no configuration key `{k}`" for k in unknown_keys(data, [AgentConfig], False, ""))
    elif {"protocol", "tags"} <= keys:
        yield from (f"no profile key `{k}`" for k in unknown_keys(data, _profile_models(), False, ""))
    elif keys <= _fields(Scenario):
        try:
            scenario = Scenario.model_validate(data)
            for device in scenario.devices:
                ServeSpec.model_validate(device.serve)
        except ValidationError as exc:
            yield from (f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
    else:
        yield f"keys {sorted(keys)} are neither an agent configuration, a profile nor a scenario"


def test_every_configuration_key_the_docs_name_exists(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """YAML examples that are whole agent configurations must load; snippets and backticked
    dotted keys (``mqtt.tls.ca_file``) must name fields of the models."""
    monkeypatch.setenv("MQTT_PASSWORD", "from-the-environment")
    offenders: list[str] = []
    for doc in docs():
        for block in doc.blocks():
            if block.lang in ("yaml", "yml"):
                offenders += [f"{block.where}: {p}" for p in _yaml_block_problems(block, tmp_path)]
        for span in doc.spans():
            if _is_config_key(span.text) and not _resolves_as_module(span.text):
                problem = dotted_key_problem(span.text)
                if problem:
                    offenders.append(f"{span.where}: {problem}")
    assert not offenders, "configuration the docs show that the models do not have:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- files and modules


def _resolves_as_module(dotted: str) -> bool:
    """``agent.core.driver`` or ``agent.core.driver.load_drivers``: a module, or a name in one."""
    parts = dotted.split(".")
    for n in range(len(parts), 0, -1):
        name = ".".join(parts[:n])
        try:
            found = importlib.util.find_spec(name) is not None
        except ModuleNotFoundError:
            found = False
        if found:
            obj: Any = importlib.import_module(name)
            for attr in parts[n:]:
                if not hasattr(obj, attr):
                    return False
                obj = getattr(obj, attr)
            return True
    return False


def _path_exists(path: str) -> bool:
    pattern = re.sub(r"<[^>]*>", "*", path.rstrip("."))
    if "*" in pattern:
        return any(ROOT.glob(pattern))
    return (ROOT / pattern).exists()


def test_every_file_and_module_the_docs_name_exists() -> None:
    offenders: list[str] = []
    for doc in docs():
        for m in FILE_PATH.finditer(doc.text):
            if not _path_exists(m.group(1)):
                offenders.append(f"{doc.at(m.start(1))}: no file or folder {m.group(1).rstrip('.')}")
        for m in LINK.finditer(doc.text):
            if not (doc.path.parent / m.group(1)).exists():
                offenders.append(f"{doc.at(m.start(1))}: broken link {m.group(1)}")
        for found in [*doc.spans(), *doc.code_lines()]:
            for m in MODULE_PATH.finditer(found.text):
                name = m.group(1)
                if name.split(".")[-1] in FILE_SUFFIXES or _is_config_key(name):
                    continue  # a file name (agent.yaml) or a configuration key (checked above)
                if not _resolves_as_module(name):
                    offenders.append(f"{found.where}: no module or name {name}")
    assert not offenders, "files and modules the docs name that do not exist:\n" + "\n".join(offenders)


# --------------------------------------------------------------------------- generated reference


def test_configuration_reference_is_generated_from_the_models() -> None:
    text = DOC.read_text()
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert generated == render().strip(), (
        "docs/configuration.md is stale: run python -m agent.app.docgen --write"
    )


def test_every_config_key_has_a_description() -> None:
    missing = [
        line for line in render().splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")
    ]
    assert not missing, f"config fields without a docstring: {missing[:5]}"


def test_deploy_examples_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_PASSWORD", "from-the-environment")
    examples = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        try:
            assert load_config(path).devices, path
        except ConfigError as exc:
            # the example names the site's own secrets and certificates, which this machine
            # lacks; anything else wrong with it is a broken example
            others = [str(p) for p in exc.problems if not SITE_FILE_MISSING.fullmatch(p.message)]
            assert not others, others
            assert exc.problems
