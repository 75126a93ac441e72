"""The control endpoint: ``POST /api/batch`` (a batch command) and ``GET /api/batch`` (what each
device holds) on the status listener, for ``cleanroom-agent batch``; and, behind the same token,
the commands other parts add (:meth:`ControlEndpoint.add_post`: ``POST /api/reference``, a
reference sample for ``cleanroom-agent sample``).

Everything else on that listener reads; this changes assignments, so it is the one part that
asks who is calling. At every start the agent writes a fresh random token (32 bytes, hex) to
``control.token`` next to the buffer, readable by the agent's own account only (mode 0600), and
removes it at a clean stop; a request must carry it as ``Authorization: Bearer <token>``. Whoever
can read the file (the agent's account, root) can assign batches; nobody else can, wherever the
listener binds. A missing or wrong token is a 401 that never echoes what was sent. The command is
then parsed and applied exactly as an MQTT command is (:mod:`agent.app.batchcommands`), with
source ``cli``; ``--actor`` and ``--reason`` are the registry's to require (refused and audited).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import os
import secrets
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web

from agent.app.batchcommands import (
    MALFORMED,
    BatchCommand,
    CommandError,
    CommandRefusals,
    Outcome,
    parse_command,
)
from agent.core.batch import BatchSource

log = logging.getLogger("cleanroom.control")

TOKEN_FILE = "control.token"
"""The token's file name, in the buffer's folder."""
TOKEN_BYTES = 32
PATH = "/api/batch"


def token_path(buffer_path: Path) -> Path:
    """Where the agent using ``buffer_path`` keeps its control token (what the CLI reads)."""
    return buffer_path.parent / TOKEN_FILE


def write_token(path: Path) -> str:
    """A new random token in ``path``, mode 0600 from its creation (never readable by others, not
    even for a moment), replacing the previous one atomically."""
    token = secrets.token_hex(TOKEN_BYTES)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()  # left by a crash; never opened through (O_EXCL: not even a planted symlink)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        try:
            os.fchmod(fd, 0o600)  # O_CREAT's mode is masked by umask, and an old file keeps its own
            os.write(fd, f"{token}\n".encode())
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    return token


def read_token(path: Path) -> str:
    """The token in ``path`` (OSError when it cannot be read; ValueError when it holds no token)."""
    text = path.read_text(encoding="ascii", errors="replace").strip()
    if len(text) != 2 * TOKEN_BYTES or any(c not in "0123456789abcdef" for c in text):
        raise ValueError(f"{path} holds no control token")
    return text


class ControlEndpoint:
    """The batch routes of the status listener (see the module docstring)."""

    def __init__(
        self,
        token_file: Path,
        apply: Callable[[BatchCommand], Outcome],
        snapshot: Callable[[], dict[str, Any]],
        refusals: CommandRefusals,
    ) -> None:
        """``apply``: a parsed command applied with source ``cli``; ``snapshot``: what each device
        holds; ``refusals``: where commands that do not parse are audited."""
        self.token_file = token_file
        self._apply = apply
        self._snapshot = snapshot
        self._refusals = refusals
        self._token: str | None = None
        self.counts = dict.fromkeys(("applied", "refused", "unauthorized"), 0)
        self._posts: dict[str, Callable[[bytes], Awaitable[tuple[dict[str, Any], int]]]] = {}

    def add_post(self, path: str, handle: Callable[[bytes], Awaitable[tuple[dict[str, Any], int]]]) -> None:
        """Another command behind the same token (``cleanroom-agent sample``): ``handle`` takes the
        request body and answers a JSON document and its HTTP status. Added before the listener starts."""
        self._posts[path] = handle

    async def start(self) -> None:
        """Write a fresh token. A folder it cannot be written to leaves the endpoint answering 503
        (batches can still come from the MES or the device): logged, never fatal."""
        try:
            self._token = await asyncio.to_thread(write_token, self.token_file)
        except OSError as exc:
            log.error("control token %s cannot be written (%s): batch commands from the CLI are "
                      "refused until a restart", self.token_file, exc.strerror or exc)  # fmt: skip

    async def stop(self) -> None:
        """Remove the token: nobody holds a key to an agent that is not running."""
        if self._token is not None:
            self._token = None
            with contextlib.suppress(OSError):
                await asyncio.to_thread(self.token_file.unlink)

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post(PATH, self._post)
        router.add_get(PATH, self._get)
        for path in self._posts:
            router.add_post(path, self._other_post)

    def _authorized(self, request: web.Request) -> None:
        if self._token is None:
            raise web.HTTPServiceUnavailable(
                text="the control token could not be written: see the agent's log\n"
            )
        scheme, _, sent = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(sent.strip().encode(), self._token.encode()):
            self.counts["unauthorized"] += 1
            if self.counts["unauthorized"] % 100 == 1:  # the first, then every 100th: no log flood
                log.warning("control request without a valid token refused (%d so far)",
                            self.counts["unauthorized"])  # fmt: skip
            raise web.HTTPUnauthorized(
                text=f"a valid control token is required (Authorization: Bearer, from {TOKEN_FILE} "
                "next to the agent's buffer)\n",
                headers={"WWW-Authenticate": "Bearer"},
            )

    async def _get(self, request: web.Request) -> web.Response:
        self._authorized(request)
        return _json({"devices": self._snapshot()})

    async def _post(self, request: web.Request) -> web.Response:
        self._authorized(request)
        body = await request.read()
        try:
            command = parse_command(body)
        except CommandError as exc:
            self.counts["refused"] += 1
            detail = f"malformed batch command: {exc}"
            self._refusals.refuse(BatchSource.CLI, PATH, body, detail)
            return _json(Outcome(False, MALFORMED, detail).as_dict(), status=400)
        outcome = self._apply(command)
        self.counts["applied" if outcome.ok else "refused"] += 1
        return _json(outcome.as_dict(), status=200 if outcome.ok else 409)

    async def _other_post(self, request: web.Request) -> web.Response:
        self._authorized(request)
        doc, status = await self._posts[request.path](await request.read())
        return _json(doc, status=status)


def _json(doc: dict[str, Any], status: int = 200) -> web.Response:
    return web.Response(text=json.dumps(doc, indent=2), status=status, content_type="application/json")
