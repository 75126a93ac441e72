"""YAML files read the way every configuration, profile and scenario file is read: strictly
(a duplicate key is an error, not a silently kept last value), with the line of every key
for error messages, and parsed once per content (a 10,000-tag profile is not parsed again
for every device that uses it, nor for every simulator unit that serves it).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

Loc = tuple[str | int, ...]


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
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        mapping: dict[Any, Any] = super().construct_mapping(node, deep=deep)
        return mapping


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


def read_yaml(path: Path) -> YamlDoc:
    """Parse ``path`` keeping line numbers, or return the earlier parse of the same bytes.

    The file is read every time (an edited file is never served stale, however quickly it
    changed); only the parse is reused. Raises :class:`YamlError`.
    """
    key = Path(path).absolute()
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise YamlError(path, f"cannot read: {exc.strerror or exc}") from None
    digest = hashlib.sha256(raw).hexdigest()
    cached = _parsed.get(key)
    if cached is not None and cached.sha256 == digest:
        return cached
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise YamlError(path, "not UTF-8 text") from None
    try:
        loader = _UniqueKeyLoader(text)
        try:
            node = loader.get_single_node()
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark else None
        raise YamlError(path, f"YAML syntax: {exc.problem or exc.context}", line) from None
    lines: dict[Loc, int] = {}
    if node is not None:
        _walk(node, (), lines)
    doc = YamlDoc(path, data, lines, digest)
    _parsed[key] = doc
    return doc
