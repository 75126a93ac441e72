"""asyncua's client log, kept in line: its records go to DEBUG, and passwords never show.

Left alone, asyncua writes about a dozen INFO lines per connection attempt (one of them 12 KB
of endpoint descriptions), logs tracebacks when a server refuses it or goes away at
shutdown, and logs every request it sends at DEBUG, the ActivateSession request with the
user's password in it. The driver reports each failure itself, in one line with what to do
about it; asyncua's own account stays available at DEBUG for whoever needs it. Passwords
are removed from asyncua's records at every level.

A logging filter works on the logger it is attached to, not on its children, so
:func:`tame_asyncua_logs` attaches it to every asyncua client logger that exists (asyncua
creates them at import and when a connection opens) and is called again on each connect.
The server side of asyncua (the simulators) is left as it is.
"""

from __future__ import annotations

import logging

_CLIENT_LOGGERS = (
    "asyncua.client.ua_client.UASocketProtocol",
    "asyncua.client.ua_client.UaClient",
    "asyncua.client.ua_session.UaSession",
)
"""Per-connection loggers asyncua creates only once a socket opens: made now, so they are filtered."""


class _AsyncuaFilter(logging.Filter):
    """Demotes asyncua records to DEBUG and blanks the secrets it was told about."""

    def __init__(self) -> None:
        super().__init__("asyncua")
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG:
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
            # The logger passed the record at its old level; at DEBUG it may not pass at all.
            if not logging.getLogger(record.name).isEnabledFor(logging.DEBUG):
                return False
        if self.secrets:
            record.msg, record.args = self._redact(record.getMessage()), None
            if record.exc_info:  # formatted once here, redacted: handlers reuse exc_text
                record.exc_text = self._redact(logging.Formatter().formatException(record.exc_info))
            if record.stack_info:
                record.stack_info = self._redact(record.stack_info)
        return True

    def _redact(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


_FILTER = _AsyncuaFilter()


def forbid_in_log(secret: str) -> None:
    """Never let ``secret`` (as text, or as the bytes asyncua puts on the wire) reach the log."""
    if secret:
        _FILTER.secrets.add(secret)
        raw = secret.encode()
        _FILTER.secrets.add(repr(raw)[2:-1])  # how it appears inside a logged b'...'
        _FILTER.secrets.add(raw.hex())


def tame_asyncua_logs() -> None:
    """Attach the filter to every asyncua client logger (idempotent; cheap enough per connect)."""
    for name in _CLIENT_LOGGERS:
        logging.getLogger(name)
    names = [
        n
        for n in logging.root.manager.loggerDict
        if n.startswith("asyncua") and not n.startswith("asyncua.server")
    ]
    for name in names:
        logger = logging.getLogger(name)
        if _FILTER not in logger.filters:
            logger.addFilter(_FILTER)
