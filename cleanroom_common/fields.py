"""Field types shared by every config model (agent config, device profiles, drivers).

Durations and sizes are written the way people write them (``250ms``, ``7d``,
``512MiB``) and stored as plain floats/ints so the runtime never re-parses them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo

_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|min|m|h|d|w)\s*$")

_SIZE_UNITS = {
    "b": 1,
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]i?b|b)\s*$", re.IGNORECASE)


def parse_duration(value: Any) -> float:
    """Seconds from ``"250ms"``, ``"1.5s"``, ``"10m"``, ``"7d"``; bare numbers are seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as '250ms', '1s', '5m', '7d'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        m = _DURATION_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a duration; write e.g. '250ms', '1s', '5m', '2h', '7d'")
        seconds = float(m.group(1)) * _DURATION_UNITS[m.group(2)]
    else:
        raise ValueError("expected a duration such as '250ms', '1s', '5m', '7d'")
    if seconds < 0:
        raise ValueError("a duration cannot be negative")
    return seconds


def parse_size(value: Any) -> int:
    """Bytes from ``"512MiB"``, ``"2GiB"``, ``"100MB"``; bare integers are bytes."""
    if isinstance(value, bool):
        raise ValueError("expected a size such as '512MiB' or '2GiB'")
    if isinstance(value, int):
        size = value
    elif isinstance(value, str):
        m = _SIZE_RE.match(value)
        if not m:
            raise ValueError(f"{value!r} is not a size; write e.g. '512MiB', '2GiB', '100MB'")
        size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).lower()])
    else:
        raise ValueError("expected a size such as '512MiB' or '2GiB'")
    if size < 0:
        raise ValueError("a size cannot be negative")
    return size


Duration = Annotated[float, BeforeValidator(parse_duration)]
"""Seconds, written as ``250ms``, ``1s``, ``5m``, ``2h``, ``7d`` (or a bare number of seconds)."""

ByteSize = Annotated[int, BeforeValidator(parse_size)]
"""Bytes, written as ``512MiB``, ``2GiB``, ``100MB`` (or a bare number of bytes)."""


FILE_DIR = "file_dir"
"""Key of the validation context naming the folder of the file being validated:
``Model.model_validate(data, context={FILE_DIR: path.parent})``."""


def relative_to_file(fallback: Path | None = None) -> AfterValidator:
    """The one rule for paths written in a file: a relative path is relative to the folder
    of the file that names it, never to wherever the program was started. With
    ``fallback`` (a folder shipped in the package), a relative path that names nothing
    next to the file is looked up under ``fallback`` instead: the site's files first, the
    shipped ones after. Without a :data:`FILE_DIR` context (a model built in code) a path
    is kept as given."""

    def resolve(value: Path, info: ValidationInfo) -> Path:
        base = info.context.get(FILE_DIR) if isinstance(info.context, dict) else None
        return value if base is None else resolve_path(value, Path(base), fallback)

    return AfterValidator(resolve)


def resolve_path(value: Path, base: Path, fallback: Path | None = None) -> Path:
    """``value`` as named in a file in folder ``base``: the rule :func:`relative_to_file`
    applies, for the few paths read outside a pydantic model."""
    if value.is_absolute():
        return value
    local = base / value
    if fallback is None or local.exists() or not (fallback / value).exists():
        return local
    return fallback / value


ConfigPath = Annotated[Path, relative_to_file()]
"""A file or folder named in a configuration or profile file (relative to that file)."""


class Strict(BaseModel):
    """Base of every config model: unknown keys are errors (a typo must not be ignored)."""

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


def read_secret_file(path: Path) -> str:
    """The secret a ``*_file`` key names: the first line of a UTF-8 text file ("" when empty).

    One reading for every such key, so a password file means the same to the broker session
    and to a device. Raises :class:`OSError` or :class:`UnicodeDecodeError`; neither quotes
    the file's content."""
    text = path.read_text(encoding="utf-8")
    return text.splitlines()[0] if text else ""
