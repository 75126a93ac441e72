"""A pseudo-terminal standing in for a serial port: the simulator serves the master
side, a client opens the slave path exactly like ``/dev/ttyUSB0``.

The slave side is put in raw mode (no echo, no line editing) and kept open by the
simulator, so a client closing and reopening the port never leaves the master reading
EOF/EIO: the "cable" stays plugged in between client sessions.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import tty
from collections.abc import Callable
from pathlib import Path


class PtyPort:
    def __init__(self, on_data: Callable[[bytes], None], link: Path | None = None) -> None:
        self._master, self._slave = os.openpty()
        tty.setraw(self._slave)
        os.set_blocking(self._master, False)
        self.path = os.ttyname(self._slave)
        self.link = link
        if link is not None:
            link.unlink(missing_ok=True)
            link.symlink_to(self.path)
        self._on_data = on_data
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._master, self._readable)
        self._open = True

    def _readable(self) -> None:
        try:
            data = os.read(self._master, 4096)
        except OSError:
            return
        if data:
            self._on_data(data)

    def write(self, data: bytes) -> None:
        """Send to the client; a client that stopped reading loses data, as on a real line."""
        if self._open:
            with contextlib.suppress(BlockingIOError):
                os.write(self._master, data)

    def discard_input(self) -> None:
        """Drop whatever the client sent that the server has not read yet."""
        with contextlib.suppress(OSError):
            while os.read(self._master, 4096):
                pass

    def close(self) -> None:
        if self._open:
            self._open = False
            self._loop.remove_reader(self._master)
            os.close(self._master)
            os.close(self._slave)
            if self.link is not None:
                self.link.unlink(missing_ok=True)
