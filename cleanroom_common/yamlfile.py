"""YAML files read the way every configuration, profile, manifest, limits and scenario file is
read: strictly (a duplicate key is an error, not a silently kept last value), with the line of
every key for error messages, parsed once per content (a 10,000-tag profile is not parsed again
for every device that uses it, nor for every simulator unit that serves it), and within bounds
(size, alias expansion, nesting), so a hostile or broken file is refused at once instead of
taking minutes and gigabytes: a 441-byte "billion laughs" expands to 10^9 values.

This is the one YAML reader of the agent and the simulators; nothing else calls PyYAML's loaders.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]

MAX_BYTES = 16 * 1024 * 1024
"""Largest file read (ten times a 10,000-tag profile); a larger one is refused before parsing."""
MAX_VALUES = 2_000_000
"""Values (scalars, lists, mappings) a document may hold with every alias expanded, as every
reader of the data walks it: an alias bomb expands past this within a few hundred bytes."""
MAX_DEPTH = 64
"""Deepest nesting of lists and mappings; real files nest a handful of levels."""


class YamlError(ValueError):
    """A file that cannot be read or is not valid YAML; says which file and, when known, which line."""

    def __init__(self, path: Path, message: str, line: int | None = None) -> None:
        super().__init__(f"{path}:{line}: {message}" if line else f"{path}: {message}")
        self.path = path
        self.message = message
        self.line = line


@dataclass(frozen=True)
class YamlDoc:
    """A parsed file and the line of every YAML path in it. ``data`` is shared by every
    reader of the same content: read it, never change it."""

    path: Path
    data: Any
    lines: dict[Loc, int]
    sha256: str
    """Of the file's bytes: what the agent reports as the configuration it runs."""

    def line_of(self, loc: Loc) -> int | None:
        """The line of ``loc``, or of the deepest part of it the file has (a missing key
        is reported where its parent is)."""
        for n in range(len(loc), -1, -1):
            line = self.lines.get(tuple(loc[:n]))
            if line is not None:
                return line
        return None


_BaseLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
"""libyaml's parser when PyYAML has it: a 10,000-tag profile loads in a fraction of the time."""


class _UniqueKeyLoader(_BaseLoader):  # type: ignore[misc,valid-type]
    """SafeLoader that rejects duplicate keys (PyYAML silently keeps the last one)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                raise yaml.constructor.ConstructorError(
                    None, None, "a key must be a plain value, not a list or a mapping", key_node.start_mark
                )
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


def _check_bounds(path: Path, root: yaml.Node) -> None:
    """Refuse a document whose aliases expand past :data:`MAX_VALUES`, that nests deeper than
    :data:`MAX_DEPTH` or whose aliases refer to themselves, before anything walks it.

    The composed document is a graph (an alias is the anchored node itself), so sizes are
    counted once per node: the cost is that of the file, not of its expansion."""
    size: dict[int, int] = {}
    height: dict[int, int] = {}
    ancestors: set[int] = set()
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, finished = stack.pop()
        key = id(node)
        line = node.start_mark.line + 1
        if finished:
            kids = _children(node)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            height[key] = 1 + max((height[id(k)] for k in kids), default=0)
            ancestors.discard(key)
            if size[key] > MAX_VALUES:
                msg = f"its aliases expand to more than {MAX_VALUES:,} values (an alias bomb?): refused"
                raise YamlError(path, msg, line)
            if height[key] > MAX_DEPTH:
                raise YamlError(path, f"lists and mappings nested deeper than {MAX_DEPTH} levels", line)
            continue
        if key in size:
            continue
        if key in ancestors:
            raise YamlError(path, "an alias refers to itself (a recursive structure)", line)
        ancestors.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in _children(node) if id(k) not in size)


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


_parsed: dict[Path, YamlDoc] = {}
"""The last content read from each file, by absolute path."""


def forget_parsed() -> None:
    """Drop every kept parse. A load reads a profile once however many devices use it; once the
    load is done the parses (data and line maps: about 15 MB for a 10,000-tag profile) would only
    sit in a long-running agent's memory, and the next load reads the files again anyway."""
    _parsed.clear()


def read_yaml(path: Path) -> YamlDoc:
    """Parse ``path`` keeping line numbers, or return the earlier parse of the same bytes.

    The file is read every time (an edited file is never served stale, however quickly it
    changed); only the parse is reused. Raises :class:`YamlError`.
    """
    key = Path(path).absolute()
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YamlError(path, f"cannot read: {exc.strerror or exc}") from None
    if len(raw) > MAX_BYTES:
        raise YamlError(path, f"larger than {MAX_BYTES // (1024 * 1024)} MiB: not read")
    digest = hashlib.sha256(raw).hexdigest()
    cached = _parsed.get(key)
    if cached is not None and cached.sha256 == digest:
        return cached
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise YamlError(path, "not UTF-8 text") from None
    node, data = _parse(path, text)
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    doc = YamlDoc(path, data, lines, digest)
    _parsed[key] = doc
    return doc


def _parse(path: Path, text: str) -> tuple[yaml.Node | None, Any]:
    """The composed document and its data; every way the text can be wrong is a :class:`YamlError`
    that never quotes a value (it may be a password)."""
    loader = _UniqueKeyLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _check_bounds(path, node)
        return node, loader.construct_document(node) if node is not None else None
    except YamlError:
        raise
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise YamlError(path, f"YAML syntax: {exc.problem or exc.context}", line) from None
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        char = f"#x{ord(exc.character):04x}" if isinstance(exc.character, str) else "a byte"
        raise YamlError(path, f"YAML syntax: character {char} is not allowed in YAML", line) from None
    except yaml.YAMLError as exc:
        raise YamlError(path, f"YAML syntax: {type(exc).__name__}") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a date like 2024-13-45
        raise YamlError(path, f"a value cannot be read as YAML ({type(exc).__name__})") from None
    finally:
        loader.dispose()


def masked(doc: YamlDoc, keys: frozenset[str]) -> bytes:
    """The bytes of ``doc``'s file with the value of every mapping entry named in ``keys``
    replaced by ``<secret>``: what identifies a configuration without its secrets (a password
    changes nothing in it, and cannot be read back from it). Raises :class:`YamlError`, also
    when the file changed since ``doc`` was read."""
    try:
        with doc.path.open("rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as exc:
        raise YamlError(doc.path, f"cannot read: {exc.strerror or exc}") from None
    if hashlib.sha256(raw).hexdigest() != doc.sha256:
        raise YamlError(doc.path, "changed while it was being read: read it again")
    text = raw.decode("utf-8")
    loader = _UniqueKeyLoader(text)
    try:
        root = loader.get_single_node()
    finally:
        loader.dispose()
    spans: list[tuple[int, int]] = []
    seen: set[int] = set()
    stack = [root] if root is not None else []
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value in keys:
                    spans.append((value.start_mark.index, value.end_mark.index))
        stack.extend(_children(node))
    for start, end in sorted(set(spans), reverse=True):
        text = text[:start] + "<secret>" + text[end:]
    return text.encode("utf-8")
