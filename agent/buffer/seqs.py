"""Sequence numbers handed out at acquisition, reserved in the buffer file ahead of use.

A reading gets its seq when it is submitted, not when it is committed: a reading the disk refuses
still owns its seq, so giving it up leaves a gap that a ``data_loss`` event explains, instead of its
seq silently going to the next reading. Handing out must never wait on the disk, so the agent
reserves a window of seqs in the file (``meta.next_seq`` is the top of everything reserved) and
hands them out from memory; each commit moves the top ahead again in the same transaction.

What this guarantees after a crash: every committed seq lies below the stored top (the commit that
stores a row also raises the top past it), and the next start hands out from the top. So a seq is
never committed twice, and only committed rows are forwarded: a seq cannot reach the broker for two
different readings. What was handed out but not yet committed when the process died is lost with
the process; its seqs, and the unused rest of the window (at most :data:`SEQ_RESERVE`), stay unused.

A tool writing to the file of a running agent (``buffer replay`` records an audit event) takes its
seq at the top, above the agent's window; the agent then continues in a new window above it, and the
last few seqs of the old window that a block did not fit in stay unused. Only while the disk refuses
commits for more than half a window does the agent hand out seqs above the stored top; a tool's
commit in that moment could take one of them (it would most likely fail on the same full disk).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable

from agent.core.records import Block, Event

log = logging.getLogger("cleanroom.buffer")

SEQ_RESERVE = 100_000
"""Seqs reserved ahead of use: many commit intervals of readings, few enough that the gap an
unclean stop leaves is small."""


class Sequencer:
    """The agent's seq source: ``take`` on the event loop, ``reserve`` and ``release`` inside the
    buffer thread's transactions (so a lock, not the loop, keeps them consistent)."""

    def __init__(self, start: int, top: int) -> None:
        """``start``..``top``: the window reserved in the file (empty when the disk refused even that)."""
        self._lock = threading.Lock()
        self._next = start
        self._end = top
        """End of the window being handed out; handing out past it is allowed (see the module doc)."""
        self._later: int | None = None
        """Start of the next window, when a tool took seqs at the top of ours."""
        self._top = top
        """The top this agent last stored in ``meta.next_seq``."""
        self.skipped: list[tuple[int, int]] = []
        """Seq ranges left unused because a tool wrote above the window (for ``seq_skip`` events:
        the buffer takes them out after handing out)."""

    @property
    def next(self) -> int:
        return self._next

    def take(self, n: int) -> int:
        """The first of ``n`` consecutive seqs (a block's readings are ``first + i``)."""
        with self._lock:
            return self._take(n)

    def assign(self, items: Iterable[Block | Event]) -> None:
        """Give each record its seqs, in order, under one lock: this runs on the event loop for every
        poll, where a lock round trip and a method call per record were most of what seqs cost."""
        with self._lock:
            if self._later is None:  # the common case, where _take only counts up: inlined
                nxt = self._next
                for item in items:
                    if isinstance(item, Block):
                        item.seq_first = nxt
                        nxt += len(item.values)
                    else:
                        item.seq = nxt
                        nxt += 1
                self._next = nxt
                return
            for item in items:
                if isinstance(item, Block):
                    item.seq_first = self._take(len(item.values))
                else:
                    item.seq = self._take(1)

    def _take(self, n: int) -> int:
        if self._later is not None and self._next + n > self._end:
            if self._next < self._end:
                log.info("seqs %d..%d left unused: a tool wrote to the buffer", self._next, self._end - 1)
                self.skipped.append((self._next, self._end - 1))
            self._next, self._end, self._later = self._later, self._top, None
        first = self._next
        self._next += n
        return first

    def reserve(self, stored_top: int) -> int:
        """Inside a commit: the new ``meta.next_seq``, given the stored one. Extends the window once
        less than half of it is left; the result is never below a seq already handed out."""
        with self._lock:
            if stored_top > self._top:  # a tool committed at our top: our next window starts above it
                self._later = stored_top
                self._top = stored_top + SEQ_RESERVE
            elif self._later is None and self._end - self._next < SEQ_RESERVE // 2:
                self._top = self._end = max(self._end, self._next) + SEQ_RESERVE
            return max(self._top, self._next)

    def release(self, stored_top: int) -> int | None:
        """On a clean close: the ``meta.next_seq`` that gives back the unused window (None: keep the
        stored one, a tool wrote above it). Nothing is handed out after this."""
        with self._lock:
            if stored_top != self._top:
                return None
            return self._later if self._later is not None and self._next <= self._end else self._next
