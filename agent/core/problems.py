"""What ``validate`` and the start-up checks report: one :class:`Problem` per mistake, with
where it is (file, line, YAML path), what is wrong and, when there is one, how to fix it.

Checks return these objects and callers place or print them; nobody parses a message
back. ``str(problem)`` is the one text form every command prints.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

Loc = tuple[str | int, ...]
"""A YAML path as keys and list indexes: ``("devices", 0, "connection", "port")``."""


def dotted(loc: Loc) -> str:
    """``devices[0].connection.port``, the way a person points into a YAML file."""
    out = ""
    for p in loc:
        out += f"[{p}]" if isinstance(p, int) else (f".{p}" if out else str(p))
    return out or "(top level)"


@dataclass(frozen=True, slots=True)
class Problem:
    """One mistake in an input."""

    message: str
    """What is wrong, e.g. ``required key is missing``."""
    path: Loc | None = None
    """The YAML path of the offending value; None when the problem is the file itself
    (unreadable, not YAML, a folder that does not exist)."""
    file: Path | None = None
    """The file the path is in; None for a check that only sees validated models."""
    line: int | None = None
    """The 1-based line of ``path`` in ``file`` (or of the deepest part of it that exists)."""
    hint: str = ""
    """How to fix it or what would be valid, e.g. ``known: modbus, opcua``."""
    subject: str = ""
    """Names the entry when there is no line to point at (``syn-pca@br-01``, ``(ph)``)."""

    def at(self, file: Path, line: int | None) -> Problem:
        """The same problem placed in the file its path belongs to."""
        return replace(self, file=file, line=line)

    def __str__(self) -> str:
        where = "" if self.file is None else f"{self.file}:{self.line}: " if self.line else f"{self.file}: "
        hint = f" ({self.hint})" if self.hint else ""
        if self.path is None:
            return f"{where}{self.message}{hint}"
        # inside a file the line already points at the entry; without one the subject names it
        subject = f" {self.subject}" if self.subject and self.file is None else ""
        return f"{where}{dotted(self.path)}{subject}: {self.message}{hint}"
