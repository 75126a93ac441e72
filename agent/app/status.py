"""``cleanroom-agent status``: the running agent answers over HTTP.

HTTP rather than a bespoke socket protocol so that ``curl 127.0.0.1:8765/status``
works for an engineer at the gateway, and a Prometheus endpoint can be added on the
same listener later. It binds whatever ``agent.status_listen`` names (loopback by
default, since status is local information) and has no authentication.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import urllib.error
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

log = logging.getLogger("cleanroom.status")

StatusFn = Callable[[], Awaitable[dict[str, Any]]]


def parse_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    return host or "127.0.0.1", int(port)


class StatusServer:
    def __init__(self, listen: str, status: StatusFn) -> None:
        self.host, self.port = parse_listen(listen)
        self._status = status
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            # Status is a convenience; acquisition must run without it.
            log.warning("status endpoint %s:%d unavailable: %s", self.host, self.port, exc)
            return
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            parts = request.decode("latin-1").split()
            path = parts[1] if len(parts) > 1 else "/"
            if path.rstrip("/") in ("", "/status"):
                body = json.dumps(await self._status(), indent=2, default=str).encode()
                head = b"HTTP/1.0 200 OK\r\nContent-Type: application/json\r\n"
            else:
                body, head = b"not found\n", b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n"
            writer.write(head + f"Content-Length: {len(body)}\r\n\r\n".encode() + body)
            await writer.drain()
        except (TimeoutError, ConnectionError, UnicodeDecodeError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


def fetch_status(listen: str, timeout: float = 5.0) -> dict[str, Any]:
    """Ask a running agent for its status; raises ``ConnectionError`` with a readable message."""
    host, port = parse_listen(listen)
    url = f"http://{host}:{port}/status"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data
    except (urllib.error.URLError, OSError) as exc:
        raise ConnectionError(f"no agent answers at {url} ({exc}); is it running with this config?") from None
