"""The status listener: the status API, the local status page and ``/metrics`` on one address.

HTTP so that ``curl 127.0.0.1:8765/api/status`` works for an engineer at the gateway, a browser
shows the page, and Prometheus scrapes the same listener. It binds whatever ``agent.status_listen``
names (loopback by default, since status is local information; anywhere else is logged as a warning
at every start), has no authentication and is read-only: ``GET`` and ``HEAD`` only, nothing it
answers changes the agent. The one exception is the batch control endpoint (:mod:`agent.app.control`),
which answers only to the bearer token the agent writes next to its buffer.

aiohttp parses and answers (a well-kept server, not hand-written HTTP) and bounds the request head
(line, field size, field count). What it does not bound, this module adds in front of its protocol:
a cap on connections (a new one beyond it replaces the oldest still sending its head, so a client
trickling bytes cannot lock out an engineer's ``curl``), a deadline for the request head
(slowloris) and one for the answer, and one request per connection. A slow or hostile client costs
a bounded number of file descriptors for a bounded time, and acquisition never notices it.

On a loopback listener, a request must name a loopback host (``Host: 127.0.0.1:8765``,
``localhost``...): a web page elsewhere cannot read the status through a name that it makes resolve
to 127.0.0.1 (DNS rebinding).
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import time
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

from agent.app.control import ControlEndpoint
from agent.app.trend import BUCKET_S, WINDOW_S, TrendRecorder
from agent.sinks.forwarder import MqttConfig
from cleanroom_common.net import is_loopback_host

log = logging.getLogger("cleanroom.status")

StatusFn = Callable[[], Awaitable[dict[str, Any]]]
MetricsFn = Callable[[], Awaitable[tuple[bytes, str]]]
"""The Prometheus exposition and its content type (:func:`agent.app.metrics.render` over the agent)."""

MAX_REQUEST_LINE = 2048
"""Bytes of ``GET /api/status HTTP/1.1`` at most (aiohttp answers 400 beyond)."""
MAX_FIELD_BYTES = 4096
"""Bytes of one header field at most (400 beyond)."""
MAX_HEADER_FIELDS = 64
"""Header fields at most (400 beyond); curl sends three, a browser about fifteen."""
MAX_CONNECTIONS = 16
"""Connections served at once. A new one beyond it replaces the oldest still sending its request
head; when every one is being answered, the new one is refused."""
HEAD_TIMEOUT_S = 5.0
"""Time to receive the whole request head, however it trickles in (slowloris)."""
RESPONSE_TIMEOUT_S = 10.0
"""Time to compute the answer and to hand it to a client that reads it."""
LINGER_S = 1.0
"""After an answer, unread request bytes are read and dropped for this long at most: closing with
unread input would reset the connection and the client would never see the answer."""

STATIC_FILES = {
    "/": ("index.html", "text/html"),
    "/app.js": ("app.js", "text/javascript"),
    "/style.css": ("style.css", "text/css"),
}
"""The page's files (in ``agent/app/static``, shipped in the wheel), by the path that serves them."""

SECURITY_HEADERS = {
    # The page loads nothing but its own files: no external assets, so it works air-gapped, and
    # a value a device reports cannot pull anything in.
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


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
    mqtt: MqttConfig | None,
    address: ListenAddress,
    devices: dict[str, Any] | None = None,
    agent_warnings: Sequence[str] = (),
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
            *agent_warnings,
            *device_warnings,
        ],
    }


# --------------------------------------------------------------------------- HTTP


def _not_malformed(record: logging.LogRecord) -> bool:
    """aiohttp logs a malformed request as an error with its traceback: that is the client's doing,
    answered with a 400, not a log line per request for a hostile client to fill the journal with.
    Anything else aiohttp logs goes through."""
    exc = record.exc_info[1] if record.exc_info else None
    return not isinstance(exc, HttpProcessingError)


_http_log = logging.getLogger("cleanroom.status.http")
_http_log.addFilter(_not_malformed)


class _Guarded(asyncio.Protocol):
    """aiohttp's protocol for one connection, behind the listener's admission and deadlines."""

    def __init__(self, server: StatusServer, inner: RequestHandler) -> None:
        self._server = server
        self._inner = inner
        self._transport: asyncio.Transport | None = None
        """Set once admitted."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)  # a stream server's
        if not self._server._opened(transport):
            transport.abort()
            return
        self._transport = transport
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._transport is not None:
            self._server._forget(self._transport)
            self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)

    def eof_received(self) -> None:
        self._inner.eof_received()

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()


class StatusServer:
    """The status listener: :meth:`start` binds (a failure is logged, never raised: acquisition runs
    without status), :meth:`stop` closes it and every open connection. It runs no task of its own:
    asyncio's server accepts, aiohttp answers, and a handler's failure is a 500 and a log line."""

    def __init__(
        self,
        listen: str,
        status: StatusFn,
        *,
        trend: TrendRecorder | None = None,
        metrics: MetricsFn | None = None,
        control: ControlEndpoint | None = None,
        clock: Callable[[], int] = time.time_ns,
        max_connections: int = MAX_CONNECTIONS,
        head_timeout: float = HEAD_TIMEOUT_S,
    ) -> None:
        self.address = parse_listen(listen)
        self.port = self.address.port
        self._status = status
        self._trend = trend
        self._metrics = metrics
        self._control = control
        self._clock = clock
        self._max_connections = max_connections
        self._head_timeout = head_timeout
        self._server: asyncio.Server | None = None
        self._runner: web.AppRunner | None = None
        self._files: dict[str, tuple[bytes, str]] = {}
        self._reading_head: dict[asyncio.Transport, float] = {}
        """Open connections still sending their request head, with when they opened."""
        self._busy: set[asyncio.Transport] = set()
        """Open connections being answered."""
        self._deadlines: dict[asyncio.Transport, asyncio.TimerHandle] = {}
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
        self._files = _load_static()
        app = web.Application(middlewares=[self._guard], handler_args={"lingering_time": LINGER_S})
        app.on_response_prepare.append(_harden)
        app.router.add_get("/api/status", self._api_status)
        app.router.add_get("/status", self._api_status)  # the address the docs gave before the page
        app.router.add_get("/api/trend", self._api_trend)
        app.router.add_get("/metrics", self._api_metrics)
        if self._control is not None:
            self._control.register(app.router)
        for path in STATIC_FILES:
            app.router.add_get(path, self._static)
        runner = web.AppRunner(
            app,
            handle_signals=False,
            access_log=None,
            logger=_http_log,
            max_line_size=MAX_REQUEST_LINE,
            max_field_size=MAX_FIELD_BYTES,
            max_headers=MAX_HEADER_FIELDS,
        )
        await runner.setup()
        factory = runner.server
        assert factory is not None  # set by setup()
        try:
            self._server = await asyncio.get_running_loop().create_server(
                lambda: _Guarded(self, factory()), self.address.host, self.address.port, backlog=32
            )
        except OSError as exc:
            # Status is a convenience; acquisition must run without it.
            log.warning("status listener %s unavailable: %s", self.address, exc)
            await runner.cleanup()
            return
        self._runner = runner
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None or self._runner is None:
            return
        self._server.close()
        for transport in [*self._reading_head, *self._busy]:
            transport.abort()
        await self._server.wait_closed()
        await self._runner.cleanup()
        self._server = self._runner = None

    # ------------------------------------------------------------------ connections

    def _opened(self, transport: asyncio.Transport) -> bool:
        """Admit a new connection, making room for it: the oldest one still sending its head goes;
        when every slot is answering a request, the newcomer is refused."""
        if self.open_connections >= self._max_connections:
            if not self._reading_head:
                self.counts["refused"] += 1
                return False
            oldest = min(self._reading_head, key=self._reading_head.__getitem__)
            self._forget(oldest)
            oldest.abort()
            self.counts["evicted"] += 1
        self._reading_head[transport] = time.monotonic()
        self._deadline(transport, self._head_timeout)
        return True

    def _deadline(self, transport: asyncio.Transport, seconds: float) -> None:
        if (old := self._deadlines.pop(transport, None)) is not None:
            old.cancel()
        self._deadlines[transport] = asyncio.get_running_loop().call_later(seconds, self._expire, transport)

    def _expire(self, transport: asyncio.Transport) -> None:
        self.counts["timed_out"] += 1
        self._forget(transport)
        transport.abort()

    def _forget(self, transport: asyncio.Transport) -> None:
        self._reading_head.pop(transport, None)
        self._busy.discard(transport)
        if (handle := self._deadlines.pop(transport, None)) is not None:
            handle.cancel()

    @web.middleware
    async def _guard(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        """The head is in: the connection is answered within :data:`RESPONSE_TIMEOUT_S`, by a
        handler whose failure is a 500 and a log line, never a traceback to the client."""
        transport = request.transport
        if transport is None or self._reading_head.pop(transport, None) is None:
            raise web.HTTPServiceUnavailable(text="connection closed\n")  # evicted meanwhile
        self._busy.add(transport)
        self._deadline(transport, RESPONSE_TIMEOUT_S)
        if self.address.loopback and not _loopback_host_header(request.host):
            self.counts["errors"] += 1
            raise web.HTTPMisdirectedRequest(text="this listener answers only to a loopback host name\n")
        try:
            async with asyncio.timeout(RESPONSE_TIMEOUT_S):
                response = await handler(request)
        except web.HTTPException:
            self.counts["errors"] += 1
            raise
        except TimeoutError:
            self.counts["timed_out"] += 1
            raise web.HTTPServiceUnavailable(text="the status took too long to compute\n") from None
        except Exception:
            self.counts["errors"] += 1
            log.exception("status request %s failed", request.path)
            raise web.HTTPInternalServerError(text="the status could not be computed\n") from None
        self.counts["served"] += 1
        return response

    # ------------------------------------------------------------------ routes

    async def _api_status(self, request: web.Request) -> web.Response:
        doc = await self._status()
        doc["now"] = self._clock()
        if self._trend is not None:
            doc["recent_events"] = self._trend.events()
        return _json(doc)

    async def _api_trend(self, request: web.Request) -> web.Response:
        if self._trend is None:
            raise web.HTTPNotFound(text="no trend is recorded by this listener\n")
        device, tag = request.query.get("device") or None, request.query.get("tag") or None
        return _json(
            {
                "now": self._clock(),
                "window_s": WINDOW_S,
                "bucket_s": BUCKET_S,
                "series": self._trend.series(device, tag),
                "dropped_series": self._trend.dropped_series,
            }
        )

    async def _api_metrics(self, request: web.Request) -> web.Response:
        if self._metrics is None:
            raise web.HTTPNotFound(text="no metrics on this listener\n")
        body, content_type = await self._metrics()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _static(self, request: web.Request) -> web.Response:
        found = self._files.get(request.path)
        if found is None:
            raise web.HTTPNotFound(text="the status page is not installed (agent/app/static)\n")
        body, content_type = found
        return web.Response(body=body, content_type=content_type, charset="utf-8")


async def _harden(request: web.Request, response: web.StreamResponse) -> None:
    """Every answer: one request per connection (a connection's life is the deadlines above), and
    headers that keep a browser from doing more with it than showing it."""
    response.force_close()
    response.headers["Connection"] = "close"
    for name, value in SECURITY_HEADERS.items():
        response.headers.setdefault(name, value)


def _json(doc: dict[str, Any]) -> web.Response:
    return web.Response(text=json.dumps(doc, indent=2, default=str), content_type="application/json")


def _load_static() -> dict[str, tuple[bytes, str]]:
    """The page's files, read once: served from memory, so no request names a path on disk."""
    folder = resources.files("agent.app").joinpath("static")
    files = {}
    for path, (name, content_type) in STATIC_FILES.items():
        try:
            files[path] = (folder.joinpath(name).read_bytes(), content_type)
        except OSError as exc:
            log.warning("status page file %s unavailable: %s", name, exc)
    return files


def _loopback_host_header(host: str) -> bool:
    """Whether a ``Host`` header (``name``, ``name:port``, ``[v6]:port``) names a loopback host."""
    if host.startswith("["):
        name = host[1 : host.find("]")]
    else:
        name, _, port = host.rpartition(":")
        if not name or not port.isdigit():
            name = host
    return is_loopback_host(name)


def fetch_status(listen: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running agent for its status; raises ``ConnectionError`` with a readable message
    (``ValueError`` for an address that is not ``HOST:PORT``)."""
    url = f"http://{parse_listen(listen)}/api/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"no agent answers at {url} ({exc}); is it running with this config?") from None
