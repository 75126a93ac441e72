"""``cleanroom-agent status``: the running agent answers over HTTP.

HTTP rather than a bespoke socket protocol so that ``curl 127.0.0.1:8765/status``
works for an engineer at the gateway, and a Prometheus endpoint can be added on the
same listener later. It binds whatever ``agent.status_listen`` names (loopback by
default, since status is local information; anywhere else is logged as a warning at
every start) and has no authentication.

The server is a few lines over asyncio streams rather than a web framework: it answers
one ``GET`` and closes, and what matters here is what a framework does not bound for us
(aiohttp, the candidate, limits line and field sizes but has neither a deadline for
receiving the request head nor a connection cap). Every request is bounded in size
(request line, head, field count), in time (head, status, response) and in number
(connections): a slow or hostile client costs a bounded number of file descriptors for a
bounded time, and acquisition never notices it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from agent.sinks.forwarder import MqttConfig
from cleanroom_common.net import is_loopback_host

log = logging.getLogger("cleanroom.status")

StatusFn = Callable[[], Awaitable[dict[str, Any]]]

MAX_REQUEST_LINE = 2048
"""Bytes of ``GET /status HTTP/1.1`` at most (414 beyond)."""
MAX_HEAD_BYTES = 8192
"""Bytes of request line and header fields at most (431 beyond), as most servers allow."""
MAX_HEADER_FIELDS = 64
"""Header fields at most (431 beyond); curl sends three."""
MAX_CONNECTIONS = 16
"""Connections served at once. A new one beyond it replaces the oldest still sending its request
head, so a client trickling bytes cannot lock out an engineer's ``curl``."""
HEAD_TIMEOUT_S = 5.0
"""Time to receive the whole request head, however it trickles in (slowloris)."""
RESPONSE_TIMEOUT_S = 10.0
"""Time to compute the status and to hand the response to a client that reads it."""
DISCARD_BYTES = 256 * 1024
"""After an error response, unread request bytes read and dropped at most (within a second): closing
with unread input would reset the connection and the client would never see the error."""


# --------------------------------------------------------------------------- the address


@dataclass(frozen=True)
class ListenAddress:
    """A parsed ``HOST:PORT``: an IP address to bind (``localhost`` is 127.0.0.1) and a port."""

    host: str
    port: int

    @property
    def loopback(self) -> bool:
        return is_loopback_host(self.host)

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def parse_listen(text: str) -> ListenAddress:
    """``HOST:PORT`` as ``run`` binds it; anything else is a ``ValueError`` saying what is wrong.

    HOST is an IPv4 address, an IPv6 address in brackets or ``localhost``. Other names are refused
    rather than resolved: a name may resolve to several addresses, or to different ones tomorrow,
    and what ``validate`` accepted must be what ``run`` binds."""
    example = "e.g. 127.0.0.1:8765, [::1]:8765 or localhost:8765"
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or text[end + 1 : end + 2] != ":":
            raise ValueError(f"{text!r} is not HOST:PORT ({example})")
        host, port_text = text[1:end], text[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{host!r} in brackets is not an IPv6 address") from None
    else:
        host, sep, port_text = text.rpartition(":")
        if not sep:
            raise ValueError(f"{text!r} is not HOST:PORT ({example})")
        if not host:
            raise ValueError(f"no host before the port ({example}): ':PORT' does not say which interface")
        if ":" in host:
            raise ValueError(f"an IPv6 address goes in brackets: [{host}]:{port_text}")
        if host.lower() == "localhost":
            host = "127.0.0.1"
        else:
            try:
                ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IP address or localhost ({example})") from None
    if not (port_text.isascii() and port_text.isdigit()):
        raise ValueError(f"the port {port_text!r} is not a number ({example})")
    port = int(port_text)
    if not 1 <= port <= 65535:
        raise ValueError(f"the port must be 1 to 65535, not {port}")
    return ListenAddress(host, port)


def listener_warnings(address: ListenAddress) -> list[str]:
    if address.loopback:
        return []
    return [f"status listener on {address} is not loopback: anyone who reaches it reads the agent's "
            "status without authentication (agent.status_listen)"]  # fmt: skip


def security_report(
    mqtt: MqttConfig | None, address: ListenAddress, devices: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The ``security`` section of the status: the settings an auditor asks about, and the warnings
    every start logs (the agent's own and each device driver's, e.g. OPC UA without security)."""
    device_warnings = [
        f"device {name}: {w}"
        for name, dev in sorted((devices or {}).items())
        for w in (dev.get("driver") or {}).get("warnings", [])
    ]
    return {
        "mqtt_tls": mqtt.tls_mode if mqtt is not None else None,
        "status_listener": "loopback" if address.loopback else "exposed",
        "warnings": [
            *(mqtt.security_warnings() if mqtt is not None else []),
            *listener_warnings(address),
            *device_warnings,
        ],
    }


# --------------------------------------------------------------------------- HTTP


class HttpError(Exception):
    """A request answered with an error status."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"{status} {reason}")
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Request:
    method: str
    path: str


def parse_request_head(head: bytes) -> Request:
    """The request line of ``head`` (request line and header fields, up to the blank line);
    anything malformed or oversized is an :class:`HttpError`. Header fields are checked for form
    and number only: none of them changes the answer."""
    line, _, fields = head.partition(b"\r\n")
    if len(line) > MAX_REQUEST_LINE:
        raise HttpError(414, "URI Too Long")
    field_lines = [f for f in fields.split(b"\r\n") if f]
    if len(head) > MAX_HEAD_BYTES or len(field_lines) > MAX_HEADER_FIELDS:
        raise HttpError(431, "Request Header Fields Too Large")
    try:
        method, target, version = line.decode("ascii").split(" ")
    except (UnicodeDecodeError, ValueError):
        raise HttpError(400, "Bad Request") from None
    if not (method.isascii() and method.isalpha() and method.isupper()) or not target.startswith("/"):
        raise HttpError(400, "Bad Request")
    if version not in ("HTTP/1.0", "HTTP/1.1"):
        major, dot, minor = version.removeprefix("HTTP/").partition(".")
        if version.startswith("HTTP/") and dot and major.isdigit() and minor.isdigit():
            raise HttpError(505, "HTTP Version Not Supported")
        raise HttpError(400, "Bad Request")
    for f in field_lines:
        name, colon, _ = f.partition(b":")
        if not colon or not name or not name.isascii() or any(c in b" \t" for c in name):
            raise HttpError(400, "Bad Request")
    return Request(method, target.partition("?")[0])


def _response(status: int, reason: str, body: bytes, content_type: str = "text/plain") -> bytes:
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class StatusServer:
    """The status listener: :meth:`start` binds (a failure is logged, never raised: acquisition runs
    without status), :meth:`stop` closes it and every open connection. It runs no task of its own:
    asyncio's server accepts, and each connection's handler catches everything it can raise."""

    def __init__(
        self,
        listen: str,
        status: StatusFn,
        *,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT_S,
    ) -> None:
        self.address = parse_listen(listen)
        self.port = self.address.port
        self._status = status
        self._max_connections = max_connections
        self._head_timeout = head_timeout
        self._server: asyncio.Server | None = None
        self._reading_head: dict[asyncio.StreamWriter, float] = {}
        """Open connections still sending their request head, with when they opened."""
        self._busy: set[asyncio.StreamWriter] = set()
        """Open connections being answered."""
        self.counts = dict.fromkeys(("served", "errors", "timed_out", "evicted", "refused"), 0)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def open_connections(self) -> int:
        return len(self._reading_head) + len(self._busy)

    async def start(self) -> None:
        for warning in listener_warnings(self.address):
            log.warning("%s", warning)
        try:
            self._server = await asyncio.start_server(
                self._handle, self.address.host, self.address.port, limit=MAX_HEAD_BYTES, backlog=32
            )
        except OSError as exc:
            # Status is a convenience; acquisition must run without it.
            log.warning("status listener %s unavailable: %s", self.address, exc)
            return
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        for writer in [*self._reading_head, *self._busy]:
            writer.transport.abort()
        self._reading_head.clear()
        self._busy.clear()
        await self._server.wait_closed()
        self._server = None

    def _admit(self, writer: asyncio.StreamWriter) -> bool:
        """Make room for a new connection: the oldest one still sending its head goes; when every
        slot is answering a request, the newcomer is refused."""
        if self.open_connections >= self._max_connections:
            if not self._reading_head:
                self.counts["refused"] += 1
                return False
            oldest = min(self._reading_head, key=self._reading_head.__getitem__)
            del self._reading_head[oldest]
            oldest.transport.abort()
            self.counts["evicted"] += 1
        self._reading_head[writer] = time.monotonic()
        return True

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self._admit(writer):
            writer.transport.abort()
            return
        try:
            try:
                async with asyncio.timeout(self._head_timeout):
                    head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.LimitOverrunError:
                data = await reader.read(MAX_HEAD_BYTES)
                raise HttpError(*((414, "URI Too Long") if b"\r\n" not in data[:MAX_REQUEST_LINE]
                                  else (431, "Request Header Fields Too Large"))) from None  # fmt: skip
            if self._reading_head.pop(writer, None) is None:
                return  # evicted meanwhile
            self._busy.add(writer)
            await self._respond(writer, parse_request_head(head))
        except HttpError as exc:
            self.counts["errors"] += 1
            await self._respond_error(reader, writer, exc)
        except TimeoutError:
            self.counts["timed_out"] += 1
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        except Exception:
            self.counts["errors"] += 1
            log.exception("status request failed")
        finally:
            self._reading_head.pop(writer, None)
            self._busy.discard(writer)
            writer.close()

    async def _respond(self, writer: asyncio.StreamWriter, request: Request) -> None:
        if request.method not in ("GET", "HEAD"):
            raise HttpError(405, "Method Not Allowed")
        if request.path.rstrip("/") not in ("", "/status"):
            raise HttpError(404, "Not Found")
        async with asyncio.timeout(RESPONSE_TIMEOUT_S):
            body = json.dumps(await self._status(), indent=2, default=str).encode()
            response = _response(200, "OK", body, "application/json")
            if request.method == "HEAD":
                response = response[: len(response) - len(body)]
            writer.write(response)
            await writer.drain()
        self.counts["served"] += 1

    async def _respond_error(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, exc: HttpError
    ) -> None:
        """Answer, half-close, and read what the client still sends for a moment, so the answer is
        not lost in a reset (closing with unread input resets the connection)."""
        with contextlib.suppress(TimeoutError, ConnectionError, OSError):
            async with asyncio.timeout(1.0):
                writer.write(_response(exc.status, exc.reason, f"{exc}\n".encode()))
                await writer.drain()
                if writer.can_write_eof():
                    writer.write_eof()
                discarded = 0
                while discarded < DISCARD_BYTES and (chunk := await reader.read(65536)):
                    discarded += len(chunk)


def fetch_status(listen: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running agent for its status; raises ``ConnectionError`` with a readable message
    (``ValueError`` for an address that is not ``HOST:PORT``)."""
    url = f"http://{parse_listen(listen)}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"no agent answers at {url} ({exc}); is it running with this config?") from None
