"""The agent's log output: text for a terminal, JSON lines for journald and log shippers, and
repeated device errors rate-limited.

A device that flaps (connects, fails, connects again) for a night would otherwise write the same
line thousands of times and bury everything else: the same (device, error kind) is written at most
once per interval, and the next one written after the interval is preceded by a line saying how
many were left out. Records say which device they concern through ``extra={"device": ...,
"error_kind": ...}``; the JSON line carries ``device`` whenever it is known.

Secrets stay out because nothing logs them (the configuration layer never puts one in a
message); as a second line of defence every known secret value is replaced by ``***`` in the
formatted line, whatever logged it.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Literal, TextIO

from pydantic import BaseModel, SecretStr

LogFormat = Literal["text", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DEVICE_ERROR_INTERVAL_S = 60.0
"""How often the same (device, error kind) is written at most."""


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ``ts`` (UTC, ISO 8601), ``level``, ``logger``, ``message``, and
    ``device`` / ``error_kind`` / ``suppressed`` when the record has them; ``exc`` with the traceback."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in ("device", "error_kind", "suppressed"):
            value = getattr(record, key, None)
            if value is not None:
                doc[key] = value
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, ensure_ascii=False)


class Redacting(logging.Formatter):
    """Wraps a formatter: every known secret value in the formatted line becomes ``***``."""

    def __init__(self, inner: logging.Formatter, secrets: Iterable[str]) -> None:
        super().__init__()
        self.inner = inner
        words = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)
        self._pattern = re.compile("|".join(map(re.escape, words))) if words else None

    def format(self, record: logging.LogRecord) -> str:
        line = self.inner.format(record)
        return line if self._pattern is None else self._pattern.sub("***", line)


class RateLimitedHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A stream handler that writes a record naming a device and an error kind at most once per
    ``interval_s`` for that pair; the first one written after a quiet interval is preceded by a
    summary of how many were left out (and :meth:`close` writes the summaries still owed)."""

    def __init__(
        self,
        stream: TextIO,
        interval_s: float = DEVICE_ERROR_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(stream)
        self.interval_s = interval_s
        self._clock = clock
        self._last: dict[tuple[str, str], float] = {}
        self._held: dict[tuple[str, str], tuple[int, logging.LogRecord]] = {}

    def handle(self, record: logging.LogRecord) -> bool:
        device, kind = getattr(record, "device", None), getattr(record, "error_kind", None)
        if device is None or kind is None:
            return bool(super().handle(record))
        key = (str(device), str(kind))
        now = self._clock()
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            count, _ = self._held.get(key, (0, record))
            self._held[key] = (count + 1, record)
            return False
        self._last[key] = now
        self._summarise(key)
        return bool(super().handle(record))

    def _summarise(self, key: tuple[str, str]) -> None:
        held = self._held.pop(key, None)
        if held is None:
            return
        count, last = held
        summary = logging.LogRecord(
            last.name, last.levelno, last.pathname, last.lineno,
            "%s: %d more %s errors not logged (at most one per %gs)",
            (key[0], count, key[1], self.interval_s), None,
        )  # fmt: skip
        summary.device, summary.error_kind, summary.suppressed = key[0], key[1], count
        super().handle(summary)

    def close(self) -> None:
        for key in list(self._held):
            self._summarise(key)
        super().close()


def secret_values(*values: Any) -> set[str]:
    """The values of every :class:`SecretStr` in ``values`` and the models, lists and mappings they
    hold (a configuration and its devices' connections): what :class:`Redacting` masks."""
    found: set[str] = set()
    stack = list(values)
    while stack:
        value = stack.pop()
        if isinstance(value, SecretStr):
            found.add(value.get_secret_value())
        elif isinstance(value, BaseModel):
            stack.extend(getattr(value, name) for name in type(value).model_fields)
        elif isinstance(value, dict):
            stack.extend(value.values())
        elif isinstance(value, list | tuple):
            stack.extend(value)
    return found


def configure(
    level: str | int = "INFO",
    fmt: LogFormat = "text",
    secrets: Iterable[str] = (),
    stream: TextIO | None = None,
    interval_s: float = DEVICE_ERROR_INTERVAL_S,
) -> RateLimitedHandler:
    """Replace the root logger's handlers by one :class:`RateLimitedHandler` in ``fmt``."""
    handler = RateLimitedHandler(stream or sys.stderr, interval_s)
    inner = JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(Redacting(inner, secrets))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
