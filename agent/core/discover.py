"""The optional discovery ability of a driver: read a device's own description of itself (an OPC UA
address space, a Modbus register map probed block by block) and write a profile that ``validate``
accepts as it is, for the engineer to review, name and commit.

A driver offers it by naming a :class:`Discoverer` in the ``cleanroom_edge.discover`` entry-point
group, under its protocol name; ``cleanroom-agent discover PROTOCOL ...`` finds it there, so the
agent imports no driver (the same rule as :mod:`agent.core.driver`).

Every discoverer's result is written the same way (:meth:`Discovery.render`): the header as
comment lines, then the profile with one tag per line, so that a profile of thousands of tags
stays reviewable and two runs against an unchanged device differ only where the device did.
"""

from __future__ import annotations

import argparse
import re
import unicodedata
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, ClassVar

import yaml

ENTRY_POINT_GROUP = "cleanroom_edge.discover"

_DUMPER: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
"""libyaml's emitter where PyYAML has it: several times faster on a profile of thousands of tags."""
_NOT_IN_NAME = re.compile(r"[^A-Za-z0-9_.\-]")
"""What a tag name element may not hold: the TagBase name pattern, less ``/`` (the path separator)."""


@dataclass
class Discovery:
    """What a discovery found: the profile document (plain YAML-able data, in the order it should be
    written) and the header comment lines that record where and how it was found."""

    profile: dict[str, Any]
    header: list[str] = field(default_factory=list)
    """Comment lines (without ``#``): the device's self-description, the time, the options used."""
    summary: str = ""
    """One line for the terminal: what was found, how long it took."""

    def render(self) -> str:
        """The profile file: the header as ``#`` lines, then the document, each tag a one-line
        flow mapping. Header text cannot end the comment (a device's name with a line break in
        it stays inside its comment line)."""
        out = [f"# {clean_text(line)}".rstrip() + "\n" for text in self.header for line in text.splitlines()]
        for key, value in self.profile.items():
            if key == "tags" and isinstance(value, list) and value:
                out.append("tags:\n")
                out += [f"  - {_flow(tag)}\n" for tag in value]
            else:
                out.append(
                    yaml.dump({key: value}, Dumper=_DUMPER, sort_keys=False, allow_unicode=True, width=100)
                )
        return "".join(out)


def _flow(value: Any) -> str:
    text: str = yaml.dump(
        value, Dumper=_DUMPER, default_flow_style=True, sort_keys=False, allow_unicode=True, width=2**30
    )
    return text.rstrip("\n")


class Discoverer(ABC):
    """One protocol's discovery command: its own arguments, then one run against one device."""

    protocol: ClassVar[str]
    help: ClassVar[str]
    """One line: the description ``cleanroom-agent discover PROTOCOL --help`` shows."""

    @classmethod
    @abstractmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """The protocol's arguments (address, security, limits); ``--out`` and ``--force`` are
        the CLI's own."""

    @abstractmethod
    async def discover(self, args: argparse.Namespace) -> Discovery:
        """Talk to the device, bounded in time and requests. Raise ``DiscoveryError`` with an
        operator's message for anything expected (unreachable, refused, nothing readable)."""


class DiscoveryError(Exception):
    """An expected failure of a discovery, worded for the operator (no traceback is shown).

    ``bad_input``: the arguments are at fault (a malformed address, a root node the device does
    not have, a bad pattern), so the command exits 2; otherwise the device or the link is (exit 1).
    """

    def __init__(self, message: str, *, bad_input: bool = False) -> None:
        super().__init__(message)
        self.bad_input = bad_input

    @property
    def exit_code(self) -> int:
        return 2 if self.bad_input else 1


def discoverers() -> dict[str, metadata.EntryPoint]:
    """Installed discoverers by protocol (nothing imported)."""
    return {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}


def clean_text(text: str) -> str:
    """Device-supplied text made safe to write into a profile: control characters and lone
    surrogates (which no UTF-8 file can hold) become spaces, runs of white space one space."""
    kept = (" " if unicodedata.category(ch) in ("Cc", "Cs", "Zl", "Zp") else ch for ch in text)
    return " ".join("".join(kept).split())


def tag_names(paths: Sequence[Sequence[str]]) -> list[str]:
    """A tag name per path (its elements joined by ``/``), valid for ``TagBase.name`` and unique.

    Characters a tag name cannot hold become ``_``; a name already taken gets ``_2``, ``_3``...
    in the order of ``paths``, so sorted paths always get the same names."""
    taken: set[str] = set()
    names: list[str] = []
    for path in paths:
        base = "/".join(_NOT_IN_NAME.sub("_", element) or "_" for element in path) or "_"
        name, n = base, 1
        while name in taken:
            n += 1
            name = f"{base}_{n}"
        taken.add(name)
        names.append(name)
    return names
