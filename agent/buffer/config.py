"""The ``buffer:`` section of the configuration."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from cleanroom_common.fields import ByteSize, ConfigPath, Duration, Strict


class BufferConfig(Strict):
    """The ``buffer:`` section: where and how readings are kept until the broker has them."""

    path: ConfigPath = Path("/var/lib/cleanroom-edge/buffer.db")
    """SQLite database file. Created (with its directory) on first start; an existing file is migrated
    in place, never discarded, so an upgrade keeps the undelivered backlog."""
    max_bytes: ByteSize = Field(default=2 * 1024**3, ge=64 * 1024)
    """Upper bound of the live data (used database pages, including the WAL, which is checkpointed
    to stay within an eighth of it). When full, whole segments are dropped: the oldest delivered
    first, then the oldest undelivered readings (events last); the loss is recorded as a
    ``data_loss`` event (exact seqs, segments) and the removed segments in ``chain_gaps``. Lowering it
    deletes nothing at start; the following commits enforce it by the same rule."""
    synchronous: Literal["off", "normal", "full", "extra"] = "full"
    """SQLite durability of a commit. ``full`` (default): a committed record survives a power loss,
    at the price of one fsync per group commit (about ten per second with the default interval).
    ``normal``: in WAL mode a process crash (kill -9) loses nothing, but a power loss can lose the
    last commits. ``extra`` also syncs the directory; ``off`` leaves durability to the OS (tests
    only: a power loss can corrupt the file)."""
    retention: Duration = 7 * 86400.0
    """How long delivered segments are kept after delivery (for ``buffer export`` and ``buffer
    replay``) before they are pruned; each prune is recorded in ``chain_gaps`` and audited."""
    commit_interval: Duration = Field(default=0.1, gt=0)
    """Group-commit period: submitted records are committed together at most this long after the first
    of them was submitted, and at most one commit of records per interval. It bounds the latency
    added by the buffer and sets the fsync rate."""
    commit_pause: Duration = Field(default=0.02, ge=0)
    """A commit waits until submits have paused this long (within ``commit_interval`` of the first
    record waiting), so the polls of one scheduler grid instant, which finish a few milliseconds
    apart, go in one transaction instead of the first alone and the rest an interval later. ``0``
    commits at once after a quiet spell."""
    mark_interval: Duration = Field(default=1.0, gt=0)
    """Delivery marks (the broker's acknowledgements) ride along with the next commit of records; with
    no records coming they are committed alone this long after the first of them. Until marked, a
    segment is sent again after a crash (a duplicate, never a loss)."""
    commit_max_records: int = Field(default=2000, gt=0)
    """Commit early once this many records (blocks plus events) are waiting, bounding memory and
    transaction size under bursts."""
    prune_interval: Duration = Field(default=60.0, gt=0)
    """How often delivered segments older than ``retention`` are pruned."""
    hold_max_records: int = Field(default=20_000, gt=0)
    """Records (blocks plus events) held in memory while the disk refuses commits (full, I/O error).
    They keep the seqs they got at acquisition and are committed when the disk takes data again;
    beyond this bound the oldest held readings are given up and recorded as one ``data_loss`` event
    per device (reason ``not_committed``) with their exact count and seqs."""
    close_timeout: Duration = Field(default=10.0, gt=0)
    """Time a stop may spend committing what is held in memory. What the disk still refuses then is
    logged with its counts and recorded as ``data_loss`` (``not_committed``) at the next start, so a
    full disk never makes SIGTERM hang."""
    segment_max_readings: int = Field(default=5000, gt=0)
    """Readings per segment at most: a commit's readings of one device are stored, sent and chained
    as segments of up to this many readings (one MQTT message each). Events are never split."""
