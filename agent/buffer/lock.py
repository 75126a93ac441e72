"""One agent per buffer: an exclusive lock on a file next to the buffer, held for the agent's lifetime.

Two agents on one buffer would hand out the same seqs and fight over the broker's client id (each
connection throws the other off). ``flock`` is released by the kernel when the holder dies, however
it dies, so a crash never leaves a stale lock behind; the pid written into the file only names the
holder in the refusal. Tools (``buffer stats``, ``export``, ``replay``) do not take it: they work
beside a running agent by design.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path


class BufferInUse(RuntimeError):
    """Another process holds the buffer's lock; the message names the buffer and that process."""


class BufferLock:
    """The lock file ``{buffer}.lock``; :meth:`acquire` refuses at once (never waits) when it is held."""

    def __init__(self, buffer_path: Path) -> None:
        self.buffer_path = buffer_path
        self.path = Path(f"{buffer_path}.lock")
        self._fd: int | None = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise BufferInUse(
                f"buffer {self.buffer_path} is in use by another agent (pid {holder})"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def release(self) -> None:
        """Unlock (the file stays: removing it would let a third process lock a different inode)."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            os.close(self._fd)
            self._fd = None
