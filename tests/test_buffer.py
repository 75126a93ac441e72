"""The durable buffer: seqs, atomic state, overflow accounting, retention, migration, crash safety."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.buffer.rows import StoredRecord, StoredSegment
from agent.buffer.schema import SCHEMA_VERSION
from agent.buffer.seqs import SEQ_RESERVE
from agent.buffer.store import Buffer, PreviousRun
from agent.buffer.verify import BufferReport
from agent.core import chain
from agent.core.events import DataLoss, LossReason, Segments
from agent.core.records import Block, Event, Quality, dumps
from tests.support import until


def block(device: str = "d1", n: int = 3, ts: int = 1_000, state: dict[str, str] | None = None) -> Block:
    return Block(
        device=device,
        group="g",
        acq_ts_ns=ts,
        tags=[f"t{i}" for i in range(n)],
        units=["u"] * n,
        values=[float(i) for i in range(n)],
        state=state,
    )


def cfg(tmp_path: Path, **kw: object) -> BufferConfig:
    return BufferConfig.model_validate({"path": tmp_path / "buf.db", "synchronous": "normal", **kw})


def seqs_of(records: Sequence[StoredRecord]) -> list[int]:
    return [s for r in records for s in range(r.seq_first, r.seq_first + r.n)]


def undelivered(core: Buffer) -> list[StoredRecord]:
    """The records of the undelivered segments, in commit order."""
    ids = {s.id for s in core.pending(0, 1_000_000)}
    return [r for r in core.records(kind=None) if r.id in ids]


async def undelivered_of(buf: AsyncBuffer) -> list[StoredRecord]:
    result: list[StoredRecord] = await buf.on_buffer_thread(lambda: undelivered(buf.core))
    return result


async def test_seqs_contiguous_across_reopen_and_listeners_see_them(tmp_path: Path) -> None:
    seen: list[tuple[list[int | None], list[int | None]]] = []
    buf = AsyncBuffer(cfg(tmp_path, commit_interval="20ms"), "a1")
    await buf.open()
    buf.add_listener(lambda bs, es: seen.append(([b.seq_first for b in bs], [e.seq for e in es])))
    buf.submit([block(n=3), block(n=2)], [Event("d1", "note")])
    buf.submit([block(device="d2", n=4)])
    await buf.flush()
    await buf.close()
    # both submissions inside one commit interval: one group commit, seqs in submission order
    assert seen == [([0, 3, 6], [5])]

    buf = AsyncBuffer(cfg(tmp_path), "a1")
    await buf.open()
    buf.submit([block(n=5)])
    await buf.flush()
    rows = await undelivered_of(buf)
    stats = await buf.stats()
    await buf.close()
    assert [r.seq_first for r in rows] == [0, 3, 5, 6, 10]
    assert sorted(seqs_of(rows)) == list(range(15))
    assert stats["next_seq"] == 15 and stats["committed_readings_total"] == 14
    assert stats["depth_records"] == 5 and stats["depth_readings"] == 14
    body = json.loads(rows[0].body)
    assert body["seq"] == 0 and body["tags"] == ["t0", "t1", "t2"] and body["values"] == [0.0, 1.0, 2.0]


async def test_state_survives_restart_only_with_its_block(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path), "a1")
    await buf.open()
    buf.submit([block(state={"d1:watermark": "41"})])
    await buf.flush()
    assert buf.state()["d1:watermark"] == "41"
    await buf.close()

    # A real SQLite failure in the middle of a commit: the second row aborts the transaction.
    with sqlite3.connect(tmp_path / "buf.db") as conn:
        conn.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON segments WHEN NEW.device = 'bad' "
            "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )
    core = Buffer(cfg(tmp_path), "a1")
    assert core.open() == {"d1:watermark": "41"}
    good, bad = block(state={"d1:watermark": "42"}), block(device="bad")
    with pytest.raises(sqlite3.IntegrityError, match="disk on fire"):
        core.commit([good, bad])
    assert good.seq_first is None and bad.seq_first is None
    core.close()
    core = Buffer(cfg(tmp_path), "a1")
    assert core.open() == {"d1:watermark": "41"}  # neither the block nor its watermark
    assert seqs_of(undelivered(core)) == [0, 1, 2]
    ok = block(state={"d1:watermark": "42"})
    core.commit([ok])
    assert ok.seq_first == 3  # the failed commit consumed no seqs
    core.close()


def test_values_that_are_not_json_are_made_plain_or_bad(tmp_path: Path) -> None:
    import numpy as np

    core = Buffer(cfg(tmp_path), "a1")
    core.open()
    b = block(n=5)
    b.values[:] = [np.float32(1.5), float("nan"), np.int64(7), np.float32("inf"), b"\x00"]  # type: ignore[list-item]
    e = Event("d1", "anomaly", data={"score": np.float32(0.25), "top": np.array([1, 2]), "x": float("inf")})
    core.commit([b, e])
    body, event = (json.loads(r.body) for r in undelivered(core))
    core.close()
    assert body["values"] == [1.5, None, 7, None, None]
    assert body["quality"] == ["good", "bad", "good", "bad", "bad"] and body["reasons"][1] == "decode_error"
    assert b.quality_of(1) is Quality.BAD
    assert event["data"] == {"score": 0.25, "top": [1, 2], "x": None}


async def test_an_unencodable_record_is_accounted_and_does_not_stall(tmp_path: Path) -> None:
    seen: list[list[int | None]] = []
    buf = AsyncBuffer(cfg(tmp_path), "a1")
    await buf.open()
    buf.add_listener(lambda bs, es: seen.append([b.seq_first for b in bs]))
    poison = Block("d1", "g", 1, [object()], ["u"], [1.0])  # type: ignore[list-item]
    buf.submit([block(n=2), poison, block(n=2)])
    await buf.flush()
    rows = await undelivered_of(buf)
    stats = await buf.stats()
    await buf.close()
    # seqs are the acquisition's: the stand-in loss event takes the next free one, after all three
    assert [(r.kind, r.seq_first, r.n) for r in rows] == [("data", 0, 2), ("data", 3, 2), ("event", 5, 1)]
    loss = json.loads(rows[2].body)
    assert loss["kind"] == "data_loss" and loss["data"]["reason"] == "unencodable"
    assert loss["data"]["first_seq"] == loss["data"]["last_seq"] == 2 and loss["data"]["readings"] == 1
    assert seen == [[0, 3]] and poison.seq_first is None
    assert (
        stats["lost_readings_total"] == 1
        and stats["committed_readings_total"] == 5
        and stats["next_seq"] == 6
    )


def test_overflow_drops_delivered_first_then_oldest_undelivered_with_loss_event(tmp_path: Path) -> None:
    core = Buffer(cfg(tmp_path, max_bytes="256KiB"), "a1")
    core.open()
    committed: list[Block] = []
    # 40 delivered rows, then undelivered ones until the delivered are all gone
    for i in range(40):
        committed.append(block(n=50, ts=i))
        core.commit([committed[-1]])
    core.mark_delivered([r.id for r in core.pending(0, 1000)])
    events: list[Event] = []
    undelivered_first = len(committed) * 50
    while not events:
        committed.append(block(device="d1" if len(committed) % 2 else "d2", n=50, ts=len(committed)))
        events = core.commit([committed[-1]]).events
        if not events:
            # until the loss, every undelivered row is still there
            assert seqs_of(undelivered(core)) == list(range(undelivered_first, committed[-1].seq_first + 50))  # type: ignore[operator]
    stats = core.stats()
    assert stats["size_bytes"] <= 256 * 1024
    delivered_left = core.conn.execute("SELECT count(*) FROM delivered").fetchone()[0]
    assert delivered_left == 0

    pending = undelivered(core)
    data_rows = [r for r in pending if r.kind == "data"]
    lost_events = [json.loads(r.body) for r in pending if r.kind == "event"]
    assert {e["kind"] for e in lost_events} == {"data_loss"} and len(lost_events) == len(events)
    lost_readings = sum(e["data"]["readings"] for e in lost_events)
    remaining = seqs_of(data_rows)
    all_undelivered = list(range(undelivered_first, len(committed) * 50))
    # the oldest undelivered were dropped, newest kept, and every lost reading is accounted for
    assert remaining == all_undelivered[lost_readings:]
    assert stats["lost_readings_total"] == lost_readings > 0
    for e in lost_events:
        d = e["data"]
        assert d["reason"] == "buffer_full" and d["rows"] * 50 == d["readings"]
        assert d["first_seq"] >= undelivered_first and d["last_seq"] < remaining[0]
        assert e["severity"] == "alarm"
    # the exact seqs and the segments removed: every dropped i is recorded as a gap, nothing else is missing
    lost_seqs = sorted(s for e in lost_events for lo, hi in e["data"]["seqs"] for s in range(lo, hi + 1))
    assert lost_seqs == all_undelivered[:lost_readings]
    dropped = {(g["stream"], i) for e in lost_events for g in e["data"]["segments"]
               for i in range(g["first_i"], g["last_i"] + 1)}  # fmt: skip
    gaps = core.conn.execute("SELECT stream, first_i, last_i, reason FROM chain_gaps").fetchall()
    assert {r for _, _, _, r in gaps} == {"buffer_full"}
    assert dropped <= {(s, i) for s, a, b, _ in gaps for i in range(a, b + 1)}
    report = core.verify()
    assert report.ok and not report.breaks, report.breaks
    core.close()


def test_overflow_spares_events_until_no_reading_is_left(tmp_path: Path) -> None:
    core = Buffer(cfg(tmp_path, max_bytes="128KiB"), "a1")
    core.open()
    alarms: list[Event] = []
    losses: list[Event] = []
    while not losses:
        alarms.append(Event("d1", "excursion", data={"why": "x" * 200}))
        # readings outweigh alarms (as in any real flood): dropping them frees whole pages
        losses = core.commit([*(block(n=40) for _ in range(5)), alarms[-1]]).events
    kept_events = {r.seq_first for r in undelivered(core) if r.kind == "event"}
    assert {e.seq for e in alarms} <= kept_events, "every alarm survives a flood of readings"
    assert losses[0].data["events"] == 0 and losses[0].data["readings"] > 0
    # a flood of events alone: once no reading is left, the oldest events go too, and are counted
    while not any(e.data["events"] for e in losses):
        losses = core.commit([Event("d1", "excursion", data={"why": "y" * 2000})]).events
    assert not core.conn.execute("SELECT 1 FROM segments WHERE kind = 'data'").fetchone()
    first_alarm = alarms[0].seq or 0
    assert any(lo <= first_alarm <= hi for lo, hi in losses[0].data["seqs"])  # the oldest alarm went first
    core.close()


def test_a_dropped_loss_event_of_any_reason_is_folded_into_the_next(tmp_path: Path) -> None:
    """A driver's loss (no seqs of its own, device records) is still accounted after the overflow."""
    core = Buffer(cfg(tmp_path, max_bytes="128KiB"), "a1")
    core.open()
    device_loss = DataLoss(LossReason.DEVICE_QUEUE_FULL, records=5, first_ts=10, last_ts=20, group="g")
    core.commit([device_loss.event("d1")])
    losses: list[Event] = []
    while not losses:
        losses = core.commit([Event("d1", "excursion", data={"why": "y" * 2000})]).events
    core.close()
    folded = DataLoss.from_event(losses[0])
    assert folded.reason is LossReason.BUFFER_FULL and folded.records == 5 and folded.readings == 0
    assert folded.first_seq == 0 and folded.first_ts == 10 and folded.events == folded.rows > 0


def test_retention_prunes_only_old_delivered_rows(tmp_path: Path) -> None:
    core = Buffer(cfg(tmp_path, retention="1h"), "a1")
    core.open()
    for _ in range(3):
        core.commit([block()])
    ids = [r.id for r in core.pending(0, 10)]
    now = 10_000 * 10**9
    core.mark_delivered(ids[:1], when_ns=now - 2 * 3600 * 10**9)  # delivered 2 h ago
    core.mark_delivered(ids[1:2], when_ns=now - 60 * 10**9)  # a minute ago
    pruned = core.prune(now)
    assert (pruned.segments, pruned.readings) == (1, 3)
    assert [s.data() for s in pruned.intervals] == [{"stream": "d1/data", "first_i": 0, "last_i": 0}]
    left = core.conn.execute(
        "SELECT s.id, d.id IS NULL FROM segments s LEFT JOIN delivered d ON d.id = s.id ORDER BY s.id"
    ).fetchall()
    assert left == [(ids[1], 0), (ids[2], 1)]
    gaps = core.conn.execute("SELECT stream, first_i, last_i, reason FROM chain_gaps").fetchall()
    assert gaps == [("d1/data", 0, 0, "retention")]
    assert core.verify().ok  # a pruned segment is a recorded removal, not a break
    core.close()


V1_SCHEMA = """
CREATE TABLE [records] ([id] INTEGER PRIMARY KEY, [kind] TEXT NOT NULL, [device] TEXT NOT NULL,
  [seq_first] INTEGER NOT NULL, [n] INTEGER NOT NULL, [acq_ts_ns] INTEGER NOT NULL, [body] TEXT NOT NULL,
  [delivered_ns] INTEGER);
CREATE INDEX records_undelivered ON records(id) WHERE delivered_ns IS NULL;
CREATE TABLE [kv] ([key] TEXT PRIMARY KEY, [value] TEXT NOT NULL);
CREATE TABLE [meta] ([key] TEXT PRIMARY KEY, [value] TEXT NOT NULL);
INSERT INTO meta VALUES ('next_seq', '8'), ('schema_version', '1');
INSERT INTO kv VALUES ('d1:watermark', '9');
INSERT INTO records(kind, device, seq_first, n, acq_ts_ns, body, delivered_ns) VALUES
  ('data', 'd1', 0, 3, 1, '{"seq":0,"n":3,"ts":1}', 5),
  ('data', 'd1', 3, 3, 2, '{"seq":3,"n":3,"ts":2}', NULL),
  ('event', 'agent', 6, 1, 3, '{"seq":6,"ts":3,"kind":"note"}', NULL),
  ('event', 'd1', 7, 1, 4, '{"seq":7,"ts":4,"kind":"audit"}', NULL);
"""


async def test_migration_from_v1_keeps_backlog_and_sequence(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
    buf = AsyncBuffer(cfg(tmp_path), "a1")
    await buf.open()
    assert buf.state() == {"d1:watermark": "9"}
    pending = await undelivered_of(buf)
    assert [(r.seq_first, r.body) for r in pending] == [
        (3, '{"seq":3,"n":3,"ts":2}'),
        (6, '{"seq":6,"ts":3,"kind":"note"}'),
        (7, '{"seq":7,"ts":4,"kind":"audit"}'),
    ]
    segments = await buf.pending(0, 10)
    assert [(s.stream, s.i) for s in segments] == [("d1/data", 0), ("agent/events", 0), ("agent/audit", 0)]
    assert all(chain.parse(s.payload).doc["agent"] == "a1" for s in segments)
    b = block()
    buf.submit([b])
    await buf.flush()
    stats = await buf.stats()
    report = await buf.on_buffer_thread(buf.core.verify)
    await buf.close()
    assert b.seq_first == 8
    assert stats["schema_version"] == SCHEMA_VERSION
    assert stats["committed_readings_total"] == 9 and stats["delivered_readings_total"] == 3
    assert stats["depth_records"] == 4
    assert report.ok and [(s.stream, s.first_i, s.last_i) for s in report.streams] == [
        ("agent/audit", 0, 0), ("agent/events", 0, 0), ("d1/data", 0, 1)
    ]  # fmt: skip


def test_newer_schema_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA.replace("('schema_version', '1')", "('schema_version', '99')"))
    with pytest.raises(RuntimeError, match="newer than this agent"):
        Buffer(cfg(tmp_path), "a1").open()


async def test_config_change_keeps_backlog(tmp_path: Path) -> None:
    """Reopening with other settings (durability, commit timing, a smaller cap) deletes nothing."""
    core = Buffer(cfg(tmp_path, max_bytes="4MiB"), "a1")
    core.open()
    core.commit([block(n=50) for _ in range(400)])
    before = core.pending(0, 10_000)
    core.close()
    buf = AsyncBuffer(cfg(tmp_path, max_bytes="1MiB", synchronous="full", commit_interval="5ms"), "a1")
    await buf.open()
    assert await buf.pending(0, 10_000) == before
    await buf.close()


CHILD = """
import asyncio, sys
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.core.records import Block

async def main():
    buf = AsyncBuffer(BufferConfig(path=sys.argv[1], synchronous=sys.argv[2], commit_interval="5ms"), "a1")
    await buf.open()
    i = 0
    while True:
        b = Block("d1", "g", i, ["a", "b"], ["u", "u"], [i, i], state={"d1:last": str(i)})
        buf.submit([b])
        await buf.flush()
        print(b.seq_first, flush=True)   # reported only after commit said so
        i += 1

asyncio.run(main())
"""


@pytest.mark.parametrize("synchronous", ["normal", "full"])
def test_kill_9_loses_nothing_reported_committed(tmp_path: Path, synchronous: str) -> None:
    db = tmp_path / "buf.db"
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(CHILD), str(db), synchronous],
        stdout=subprocess.PIPE,
        cwd=Path(__file__).parent.parent,
    )
    assert proc.stdout is not None
    reported = [int(proc.stdout.readline()) for _ in range(60)]
    proc.send_signal(signal.SIGKILL)
    proc.wait(10)
    reported += [int(x) for x in proc.stdout.read().split()]
    proc.stdout.close()

    core = Buffer(BufferConfig(path=db), "a1")
    state = core.open()
    stored = [r.seq_first for r in undelivered(core)]
    core.close()
    assert set(reported) <= set(stored)
    assert stored == list(range(0, 2 * len(stored), 2))  # no holes, no reuse
    assert int(state["d1:last"]) == len(stored) - 1  # watermark exactly matches committed data


class BufferMachine(RuleBasedStateMachine):
    """Model: every reading ever committed is stored undelivered, was delivered, or lies in the seq
    range of a data_loss event of its device (an event that is itself dropped is folded into the
    next one); the sequence never goes back and the counters always add up."""

    def __init__(self) -> None:
        super().__init__()
        import tempfile

        self.dir = Path(tempfile.mkdtemp(prefix="bufsm-"))
        self.cfg = BufferConfig(path=self.dir / "b.db", synchronous="off", max_bytes="64KiB")
        self.core = Buffer(self.cfg, "a1")
        self.core.open()
        self.next_seq = 0
        self.device_of: dict[int, str] = {}  # every committed reading seq -> its device
        self.delivered: set[int] = set()  # reading seqs acknowledged
        self.loss_ranges: dict[str, list[range]] = {}
        self.lost_counter = 0

    def teardown(self) -> None:
        self.core.close()
        import shutil

        shutil.rmtree(self.dir, ignore_errors=True)

    @rule(sizes=st.lists(st.integers(0, 40), min_size=1, max_size=5), events=st.integers(0, 2))
    def commit(self, sizes: list[int], events: int) -> None:
        items: list[Block | Event] = [block(device=f"d{n % 3}", n=n) for n in sizes]
        items += [Event("agent", "note") for _ in range(events)]
        result = self.core.commit(items)
        for item in items:
            first = item.seq_first if isinstance(item, Block) else item.seq
            assert first == self.next_seq
            if isinstance(item, Block):
                self.device_of.update(dict.fromkeys(range(first, first + len(item)), item.device))
                self.next_seq += len(item)
            else:
                self.next_seq += 1
        for e in result.events:
            assert e.kind == "data_loss" and e.seq == self.next_seq
            self.next_seq += 1
            loss = DataLoss.from_event(e)
            # the exact ranges: first_seq..last_seq of one device may span a segment that was delivered
            if loss.seqs is not None:
                ranges = [range(first, last + 1) for first, last in loss.seqs]
                self.loss_ranges.setdefault(e.device, []).extend(ranges)
            else:
                assert loss.first_seq is None and loss.last_seq is None  # only empty blocks were lost
        if result.events:  # undelivered rows go only once no delivered row is left
            conn = self.core.conn
            assert not conn.execute("SELECT 1 FROM delivered").fetchone()
            if any(e.data["events"] for e in result.events):  # and events only once no reading is left
                older = "SELECT 1 FROM segments WHERE kind = 'data' AND seq_first < ?"
                assert not conn.execute(older, (result.events[0].seq,)).fetchone()
        stats = self.core.stats()
        assert stats["lost_readings_total"] >= self.lost_counter
        self.lost_counter = stats["lost_readings_total"]

    @rule(count=st.integers(1, 20))
    def deliver(self, count: int) -> None:
        ids = {r.id for r in self.core.pending(0, count)}
        self.core.mark_delivered(sorted(ids))
        self.delivered.update(seqs_of([r for r in self.core.records() if r.id in ids]))

    @rule()
    def reopen(self) -> None:
        self.core.close()
        self.core = Buffer(self.cfg, "a1")
        self.core.open()

    def in_loss(self, seq: int) -> bool:
        return any(seq in r for r in self.loss_ranges.get(self.device_of[seq], []))

    @invariant()
    def accounted(self) -> None:
        pending = undelivered(self.core)
        ids = [r.id for r in pending]
        assert ids == sorted(ids)
        assert self.core.verify().ok  # every removal (overflow) is recorded: the chains still hold
        stats = self.core.stats()
        assert stats["next_seq"] == self.next_seq
        stored = set(seqs_of([r for r in pending if r.kind == "data"]))
        assert not stored & self.delivered
        for seq in self.device_of:
            assert (seq in stored) + (seq in self.delivered) + self.in_loss(seq) == 1, seq
        assert stats["depth_readings"] == len(stored)
        assert (
            stats["committed_readings_total"]
            == stats["depth_readings"] + stats["delivered_readings_total"] + stats["lost_readings_total"]
            == len(self.device_of)
        )
        assert stats["size_bytes"] <= self.cfg.max_bytes


TestBufferMachine = BufferMachine.TestCase
TestBufferMachine.settings = settings(
    max_examples=15, stateful_step_count=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)


async def test_events_submitted_by_listeners_during_close_are_committed(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path), "a1")
    await buf.open()

    def react(blocks: Sequence[Block], events: Sequence[Event]) -> None:
        for b in blocks:
            buf.submit((), [Event(b.device, "excursion", data={"seq": b.seq_first})])

    buf.add_listener(react)
    buf.submit([block()])
    await buf.close()
    with pytest.raises(RuntimeError, match="not open"):
        buf.submit([block()])
    core = Buffer(cfg(tmp_path), "a1")
    core.open()
    rows = undelivered(core)
    core.close()
    assert [(r.kind, json.loads(r.body).get("kind")) for r in rows] == [
        ("data", None),
        ("event", "excursion"),
    ]


def test_buffer_of_another_agent_is_refused(tmp_path: Path) -> None:
    core = Buffer(cfg(tmp_path), "gw-1")
    core.open()
    core.commit([block()])
    core.close()
    with pytest.raises(RuntimeError, match="buffer of agent 'gw-1', not 'gw-2'"):
        Buffer(cfg(tmp_path), "gw-2").open()
    tool = Buffer(cfg(tmp_path), None)  # tools adopt the owner
    tool.open(readonly=True)
    assert tool.agent_id == "gw-1"
    tool.close()


async def test_a_failing_commit_is_retried_not_dropped(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path, commit_interval="5ms"), "a1")
    await buf.open()
    other = sqlite3.connect(tmp_path / "buf.db", isolation_level=None)
    other.execute("CREATE TRIGGER full BEFORE INSERT ON segments BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    b = block()
    buf.submit([b])
    await until(lambda: buf.commit_errors >= 1, what="a failed commit")
    assert (await buf.stats())["queued_records"] == 1 and b.seq_first == 0  # its seq is the acquisition's
    other.execute("DROP TRIGGER full")
    other.close()
    await asyncio.wait_for(buf.flush(), 10)
    rows = await undelivered_of(buf)
    await buf.close()
    assert [r.seq_first for r in rows] == [0] and b.seq_first == 0


async def test_memory_is_bounded_while_commits_fail_and_the_shedding_is_reported(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path, commit_interval="5ms", commit_max_records=2, hold_max_records=20), "a1")
    await buf.open()
    other = sqlite3.connect(tmp_path / "buf.db", isolation_level=None)
    other.execute("CREATE TRIGGER full BEFORE INSERT ON segments BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    buf.submit([block(ts=0)])
    await until(lambda: buf.commit_errors >= 1, what="a failed commit")
    for i in range(1, 50):
        buf.submit([block(device="d2", ts=i)])
    stats = await buf.stats()
    assert stats["queued_records"] == 20 and stats["shed_readings"] == 30 * 3
    other.execute("DROP TRIGGER full")
    other.close()
    await asyncio.wait_for(buf.flush(), 10)
    await asyncio.wait_for(buf.flush(), 10)  # the data_loss event queued by the recovery
    rows = await undelivered_of(buf)
    await buf.close()
    data = [r for r in rows if r.kind == "data"]
    assert [r.acq_ts_ns for r in data] == list(range(30, 50))  # the oldest were shed
    losses = {r.device: json.loads(r.body) for r in rows if r.kind == "event"}
    assert {d: e["kind"] for d, e in losses.items()} == {"d1": "data_loss", "d2": "data_loss"}
    shed = LossReason.NOT_COMMITTED
    assert DataLoss.from_body(losses["d1"]) == DataLoss(
        shed, readings=3, rows=1, first_seq=0, last_seq=2, first_ts=0, last_ts=0
    )
    assert DataLoss.from_body(losses["d2"]) == DataLoss(
        shed, readings=87, rows=29, first_seq=3, last_seq=89, first_ts=1, last_ts=29
    )


# ---------------------------------------------------------------------------------------------- segments

KEY = b"k" * 32


def test_commit_stores_chained_signed_segments_per_stream(tmp_path: Path) -> None:
    core = Buffer(cfg(tmp_path, segment_max_readings=5), "a1", key=KEY)
    core.open()
    core.set_source("d1", {"profile": "p", "serial": "S1"})
    core.clock = lambda: {"synced": True, "offset_s": 0.001, "max_error_s": 0.01}
    audit = Event("d1", "audit", data={"action": "x"})
    core.commit([block(n=3), Event("d1", "note"), block(n=3), block(device="d2", n=2), audit, block(n=1)])
    core.close()
    core = Buffer(cfg(tmp_path, segment_max_readings=5), "a1", key=KEY)
    core.open()
    core.commit([block(n=2)])  # after a restart the stream goes on from its stored head
    segments = core.pending(0, 100)
    report = core.verify()
    core.close()
    assert [(s.stream, s.i, s.n_readings, s.n_records) for s in segments] == [
        ("d1/data", 0, 3, 1), ("d1/data", 1, 4, 2), ("d1/events", 0, 0, 1), ("d2/data", 0, 2, 1),
        ("agent/audit", 0, 0, 1), ("d1/data", 2, 2, 1),
    ]  # fmt: skip
    by = {(s.stream, s.i): s for s in segments}
    for s in segments:
        parsed = chain.parse(s.payload)
        assert parsed.hash == s.hash == chain.digest(s.payload) and chain.mac_ok(s.payload, KEY)
        prev = by.get((s.stream, s.i - 1))
        assert parsed.link.prev == (chain.GENESIS if prev is None else prev.hash)
        assert parsed.doc["agent"] == "a1" and parsed.doc["device"] == s.device
    d1 = chain.parse(by[("d1/data", 1)].payload).doc
    assert d1["schema"] == "cleanroom-edge/data/2" and d1["source"] == {"profile": "p", "serial": "S1"}
    assert d1["clock"] == {"synced": True, "offset_s": 0.001, "max_error_s": 0.01}
    assert [(b["seq"], b["n"]) for b in d1["blocks"]] == [(4, 3), (10, 1)]  # records in commit order
    assert (by[("d1/data", 1)].seq_first, by[("d1/data", 1)].seq_last) == (4, 10)
    assert by[("agent/audit", 0)].device == "agent"  # every audit record, whatever device, in one trail
    assert chain.parse(by[("agent/audit", 0)].payload).doc["schema"] == "cleanroom-edge/events/2"
    assert report.ok and report.mac_checked and report.records == 7


def _sqlite3(path: Path, sql: str) -> None:
    """Edit the file behind the agent's back, with the stock sqlite3 shell."""
    subprocess.run(["sqlite3", str(path), sql], check=True, capture_output=True, timeout=30)


def _forge(path: Path, stream: str, i: int, head_too: bool) -> None:
    """A consistent forgery by someone without the key: payload, hash (and head) rewritten."""
    with sqlite3.connect(path) as conn:
        (payload,) = conn.execute(
            "SELECT payload FROM segments WHERE stream = ? AND i = ?", (stream, i)
        ).fetchone()
        forged = bytes(payload).replace(b'"values":[0.0', b'"values":[5.0')
        digest = chain.digest(forged)
        conn.execute(
            "UPDATE segments SET payload = ?, hash = ? WHERE stream = ? AND i = ?",
            (forged, digest, stream, i),
        )
        if head_too:
            conn.execute("UPDATE chain SET head = ? WHERE stream = ?", (digest, stream))


def test_a_payload_edited_into_text_is_a_hash_mismatch_not_a_crash(tmp_path: Path) -> None:
    """The sqlite3 shell's ``replace(payload, ...)`` stores TEXT: the check reports the edit."""
    from agent.buffer.verify import BreakKind, check_buffer

    path = tmp_path / "buf.db"
    core = Buffer(cfg(tmp_path), "a1")
    core.open()
    for _ in range(3):
        core.commit([block(n=2)])
    core.close()
    _sqlite3(path, "UPDATE segments SET payload = replace(payload, '[0.0,1.0]', '[0.0,1.5]') "
                   "WHERE stream = 'd1/data' AND i = 1")  # fmt: skip
    found = check_buffer(path)
    assert {(b.stream, b.first_i, b.kind) for b in found.breaks} == {("d1/data", 1, BreakKind.HASH_MISMATCH)}


async def test_rows_edited_deleted_or_forged_are_found_and_quarantined(tmp_path: Path) -> None:
    from agent.buffer.verify import BreakKind, check_buffer

    path = tmp_path / "buf.db"
    core = Buffer(cfg(tmp_path), "a1", key=KEY)
    core.open()
    for _ in range(5):
        core.commit([block(n=2), block(device="d2", n=2)])
    core.commit([block(device="d3", n=2)])
    core.close()
    assert check_buffer(path, KEY).ok
    _sqlite3(path, "UPDATE segments SET payload = CAST(replace(CAST(payload AS TEXT), '[0.0,1.0]', "
                   "'[0.0,1.5]') AS BLOB) WHERE stream = 'd1/data' AND i = 1")  # fmt: skip
    _sqlite3(path, "DELETE FROM segments WHERE stream = 'd1/data' AND i = 3")
    _forge(path, "d2/data", 2, head_too=False)
    _forge(path, "d3/data", 0, head_too=True)  # undetectable without the key

    unkeyed = check_buffer(path)
    assert {(b.stream, b.first_i, b.kind) for b in unkeyed.breaks} == {
        ("d1/data", 1, BreakKind.HASH_MISMATCH), ("d1/data", 3, BreakKind.MISSING),
        ("d2/data", 2, BreakKind.PREV_MISMATCH),
    }  # fmt: skip
    keyed = check_buffer(path, KEY)
    assert {(b.stream, b.first_i, b.kind) for b in keyed.breaks} == {
        ("d1/data", 1, BreakKind.HASH_MISMATCH), ("d1/data", 3, BreakKind.MISSING),
        ("d2/data", 2, BreakKind.PREV_MISMATCH), ("d2/data", 2, BreakKind.MAC_BAD),
        ("d3/data", 0, BreakKind.MAC_BAD),
    }  # fmt: skip

    buf = AsyncBuffer(cfg(tmp_path), "a1", key=KEY)
    await buf.open()  # the check at start sets the suspect segments aside and says so
    await buf.flush()
    sent = await buf.take_for_sending(0, 100)
    stats = await buf.stats()
    await buf.close()
    assert not {("d1/data", 1), ("d2/data", 2), ("d3/data", 0)} & {(s.stream, s.i) for s in sent}
    assert stats["quarantined"] == 3
    rows = stored_records(path)
    quarantined = {
        (g["stream"], g["first_i"]): e["data"]
        for e in (json.loads(r.body) for r in rows if r.kind == "event")
        if e["kind"] == "data_loss"
        for g in e["data"]["segments"]
    }
    assert set(quarantined) == {("d1/data", 1), ("d2/data", 2), ("d3/data", 0)}
    d1 = quarantined[("d1/data", 1)]
    assert d1["reason"] == "quarantined" and d1["seqs"] == [[4, 5]] and d1["readings"] == 2
    after = check_buffer(path, KEY)
    # quarantine is a recorded removal; the deleted row is still unexplained, and the quarantine shows
    assert [(b.stream, b.first_i, b.kind) for b in after.breaks] == [("d1/data", 3, BreakKind.MISSING)]
    assert {(q.stream, q.i) for q in after.quarantined} == set(quarantined) and not after.ok


def stored_records(path: Path) -> list[StoredRecord]:
    core = Buffer(BufferConfig(path=path), None)
    core.open(readonly=True)
    try:
        return list(core.records(kind=None))
    finally:
        core.close()


async def test_a_segment_altered_while_waiting_is_never_sent(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path, commit_interval="5ms"), "a1")
    await buf.open()
    buf.submit([block(n=2)])
    await buf.flush()
    buf.submit([block(n=2)])
    await buf.flush()
    _sqlite3(tmp_path / "buf.db", "UPDATE segments SET payload = CAST(replace(CAST(payload AS TEXT), "
                                  "'1.0]', '2.0]') AS BLOB) WHERE i = 0")  # fmt: skip
    sent = await buf.take_for_sending(0, 10)
    await buf.flush()  # the quarantine's data_loss
    later = await buf.take_for_sending(sent[-1].id, 10)
    await buf.close()
    assert [(s.stream, s.i) for s in sent] == [("d1/data", 1)]
    (loss,) = [json.loads(r.body) for r in stored_records(tmp_path / "buf.db") if r.kind == "event"]
    assert loss["data"]["reason"] == "quarantined" and loss["data"]["seqs"] == [[0, 1]]
    assert [s.stream for s in later] == ["d1/events"]


async def test_an_unclean_stop_is_reported_at_the_next_start(tmp_path: Path) -> None:
    core = Buffer(cfg(tmp_path), "a1")
    core.open()
    assert core.begin_run() is None  # a new file has no previous run
    core.commit([block(n=3, ts=7_000), Event("d1", "note", ts_ns=9_000)])
    core.close()  # no end_run: the process died

    buf = AsyncBuffer(cfg(tmp_path), "a1")
    await buf.open()
    assert buf.previous_run == PreviousRun(last_ts_ns=7_000, last_seq=3)
    await buf.close()  # a clean stop
    buf = AsyncBuffer(cfg(tmp_path), "a1")
    await buf.open()
    assert buf.previous_run is None
    await buf.close()


async def test_a_window_skipped_for_a_tool_is_a_seq_skip_event(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path, commit_interval="5ms"), "a1")
    await buf.open()
    buf.submit([block(n=10)])
    await buf.flush()
    tool = Buffer(cfg(tmp_path), None)
    tool.open()
    tool.commit([Event("agent", "note")])  # takes its seq at the stored top, above the agent's window
    tool.close()
    buf.submit([block(n=10)])
    await buf.flush()  # this commit learns of the tool's write
    big = block(n=SEQ_RESERVE - 10)  # does not fit in what is left of the window
    buf.submit([big])
    await buf.flush()
    await buf.flush()
    await buf.close()
    events = [json.loads(r.body) for r in stored_records(tmp_path / "buf.db") if r.kind == "event"]
    (skip,) = [e for e in events if e["kind"] == "seq_skip"]
    assert skip["data"] == {"first_seq": 20, "last_seq": SEQ_RESERVE - 1, "reason": "window_skipped"}
    assert big.seq_first == SEQ_RESERVE + 1


async def test_retention_prune_is_audited(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path, retention="0s", prune_interval="20ms", commit_interval="5ms"), "a1")
    await buf.open()
    buf.submit([block(n=4)])
    await buf.flush()
    await buf.mark_delivered([s.id for s in await buf.take_for_sending(0, 10)])

    async def audited() -> bool:
        rows = await undelivered_of(buf)
        return any(json.loads(r.body)["kind"] == "audit" for r in rows)

    await until(audited, what="the prune's audit record")
    report = await buf.on_buffer_thread(buf.core.verify)
    await buf.close()
    (audit,) = [json.loads(r.body)["data"] for r in stored_records(tmp_path / "buf.db") if r.kind == "event"]
    assert audit["action"] == "buffer_prune" and audit["actor"] == "agent:a1"
    assert audit["new"] == {"segments": 1, "readings": 4}
    assert audit["segments"] == [{"stream": "d1/data", "first_i": 0, "last_i": 0}]
    assert report.ok and report.gaps[0].reason == "retention"


def test_check_buffer_refuses_what_it_cannot_check(tmp_path: Path) -> None:
    from agent.buffer.verify import BufferUnreadable, check_buffer

    with pytest.raises(BufferUnreadable, match="no buffer database"):
        check_buffer(tmp_path / "nope.db")
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"not sqlite" * 200)
    with pytest.raises(BufferUnreadable, match="not a database"):
        check_buffer(garbage)
    old = tmp_path / "v1.db"
    with sqlite3.connect(old) as conn:
        conn.executescript(V1_SCHEMA)
    with pytest.raises(BufferUnreadable, match="schema 1, verify needs 4"):
        check_buffer(old)


def test_data_loss_exact_seqs_and_segments_round_trip_and_merge() -> None:
    a = DataLoss(LossReason.BUFFER_FULL, readings=3, rows=1, first_seq=0, last_seq=9, seqs=((0, 1), (9, 9)),
                 segments=(Segments("d1/data", 0, 0),))  # fmt: skip
    b = DataLoss(LossReason.BUFFER_FULL, readings=2, rows=1, first_seq=2, last_seq=3, seqs=((2, 3),),
                 segments=(Segments("d1/data", 1, 1), Segments("d1/events", 4, 4)))  # fmt: skip
    merged = a.merged(b)
    assert merged.seqs == ((0, 3), (9, 9)) and merged.readings == 5
    assert merged.segments == (Segments("d1/data", 0, 1), Segments("d1/events", 4, 4))
    assert DataLoss.from_event(merged.event("d1")) == merged
    assert "seqs" not in DataLoss(LossReason.NOT_COMMITTED).data()  # absent, not null, where unknown
    with pytest.raises(ValueError, match="seqs must be a list"):
        DataLoss.from_body({"kind": "data_loss", "data": {"reason": "buffer_full", "seqs": [1, 2]}})
    # a damaged file moved aside: every seq below the fresh buffer's first, even once folded in
    corrupt = DataLoss(LossReason.BUFFER_CORRUPT, last_seq=99)
    assert corrupt.open_below and DataLoss.from_event(corrupt.event("agent")) == corrupt
    folded = DataLoss(LossReason.BUFFER_FULL, first_seq=200, last_seq=210).merged(corrupt)
    assert (folded.first_seq, folded.last_seq, folded.open_below) == (None, 210, True)
    with pytest.raises(ValueError, match="needs an end"):
        DataLoss(LossReason.BUFFER_FULL, first_seq=3)


# ---------------------------------------------------------------------------------------------- key change

KEY2 = b"r" * 32


async def _backlog(tmp_path: Path, key: bytes | None) -> dict[str, int]:
    """An agent run that leaves undelivered segments in three streams (data, events, audit); returns
    each stream's next ``i``."""
    buf = AsyncBuffer(cfg(tmp_path, commit_interval="5ms"), "a1", key=key)
    await buf.open()
    for _ in range(3):
        buf.submit([block(n=2)], [Event("d1", "note"), Event("agent", "audit", data={"action": "x"})])
        await buf.flush()
    await buf.close()
    report = check_buffer_at(tmp_path, key)
    assert report.ok and all(s.mac_unchecked == 0 for s in report.streams)
    return {s.stream: (s.next_i or 0) for s in report.streams}


def check_buffer_at(tmp_path: Path, key: bytes | None) -> BufferReport:
    from agent.buffer.verify import check_buffer

    return check_buffer(tmp_path / "buf.db", key)


def key_changes(path: Path) -> list[dict[str, object]]:
    events = [json.loads(r.body) for r in stored_records(path) if r.kind == "event"]
    return [
        e["data"] for e in events if e["kind"] == "audit" and e["data"]["action"] == "integrity_key_change"
    ]


async def _deliver_all(tmp_path: Path, key: bytes) -> tuple[AsyncBuffer, list[StoredSegment]]:
    """Start an agent with ``key`` and send everything (as the forwarder would): what was sent."""
    buf = AsyncBuffer(cfg(tmp_path, commit_interval="5ms"), "a1", key=key)
    await buf.open()
    await buf.flush()
    sent = await buf.take_for_sending(0, 1000)
    await buf.mark_delivered([s.id for s in sent])
    return buf, sent


@pytest.mark.parametrize("old_key", [None, KEY], ids=["enable", "rotate"])
async def test_a_key_change_quarantines_no_backlog_and_is_audited(
    tmp_path: Path, old_key: bytes | None
) -> None:
    from agent.buffer.store import KeyChange

    path = tmp_path / "buf.db"
    before = await _backlog(tmp_path, old_key)
    buf, sent = await _deliver_all(tmp_path, KEY2)
    change, stats = buf.key_change, await buf.stats()
    await buf.close()
    old_id = None if old_key is None else chain.key_id(old_key)
    assert change == KeyChange(old=old_id, new=chain.key_id(KEY2), signed_from=before)
    # everything of the backlog went out, nothing was set aside; then the audit record, signed
    backlog = {(stream, i) for stream, n in before.items() for i in range(n)}
    assert {(s.stream, s.i) for s in sent} == backlog | {("agent/audit", before["agent/audit"])}
    assert stats["quarantined"] == 0 and stats["depth_segments"] == 0
    (audit_seg,) = [s for s in sent if (s.stream, s.i) == ("agent/audit", before["agent/audit"])]
    assert chain.mac_ok(audit_seg.payload, KEY2)
    (audit,) = key_changes(path)
    assert audit["target"] == "buffer" and audit["actor"] == "agent:a1"
    assert (audit["old"], audit["new"], audit["signed_from"]) == (old_id, chain.key_id(KEY2), before)
    assert KEY2.decode() not in path.read_bytes().decode("latin-1")  # only the public id is stored
    # downstream of the agent: the backlog is not MAC-checked (and counted), all else is
    report = check_buffer_at(tmp_path, KEY2)
    assert report.ok, report.breaks
    assert {s.stream: (s.mac_unchecked, s.signed_from, s.key_id) for s in report.streams} == {
        stream: (n, n, chain.key_id(KEY2)) for stream, n in before.items()
    }
    # the same key again is no change
    again = AsyncBuffer(cfg(tmp_path), "a1", key=KEY2)
    await again.open()
    await again.close()
    assert again.key_change is None and len(key_changes(path)) == 1


def _append_unsigned(path: Path, stream: str) -> None:
    """A forger without the key appends a consistent, unsigned segment to the head of ``stream``."""
    with sqlite3.connect(path) as conn:
        next_i, head = conn.execute("SELECT next_i, head FROM chain WHERE stream = ?", (stream,)).fetchone()
        forged = block(n=1)
        forged.seq_first = 900
        body = dumps(forged.body())
        payload = chain.build_payload(
            kind="data", agent="a1", device="d1", stream=stream, i=next_i, prev=head, source=None,
            clock=None, bodies=[body],
        )  # fmt: skip
        digest = chain.digest(payload)
        conn.execute(
            "INSERT INTO segments(stream, i, device, kind, n_readings, n_records, seq_first, seq_last, "
            "seqs, first_ts, last_ts, prev, hash, payload) "
            "VALUES (?, ?, 'd1', 'data', 1, 1, 900, 900, '[[900,900]]', 1000, 1000, ?, ?, ?)",
            (stream, next_i, head, digest, payload),
        )
        conn.execute("UPDATE chain SET next_i = ?, head = ? WHERE stream = ?", (next_i + 1, digest, stream))


async def test_an_unsigned_segment_after_signed_from_is_still_quarantined(tmp_path: Path) -> None:
    from agent.buffer.verify import BreakKind

    path = tmp_path / "buf.db"
    before = await _backlog(tmp_path, None)
    buf, _ = await _deliver_all(tmp_path, KEY)  # the key is enabled
    buf.submit([block(n=2)])
    await buf.flush()
    await buf.close()
    _append_unsigned(path, "d1/data")  # after signed_from: must carry the key's MAC
    _forge(path, "d1/data", 0, head_too=False)  # before it: not MAC-checked, but its link still is
    report = check_buffer_at(tmp_path, KEY)
    assert {(b.stream, b.first_i, b.kind) for b in report.breaks} == {
        ("d1/data", before["d1/data"] + 1, BreakKind.MAC_MISSING),
        ("d1/data", 0, BreakKind.PREV_MISMATCH),
    }

    buf = AsyncBuffer(cfg(tmp_path, commit_interval="5ms"), "a1", key=KEY)
    await buf.open()
    await buf.flush()
    sent = await buf.take_for_sending(0, 1000)
    stats = await buf.stats()
    await buf.close()
    assert buf.key_change is None
    assert stats["quarantined"] == 2
    assert not {("d1/data", 0), ("d1/data", before["d1/data"] + 1)} & {(s.stream, s.i) for s in sent}
    after = check_buffer_at(tmp_path, KEY)
    assert not after.breaks and {(q.stream, q.i) for q in after.quarantined} == {
        ("d1/data", 0),
        ("d1/data", before["d1/data"] + 1),
    }


def test_the_buffer_file_is_readable_by_its_owner_only_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        core = Buffer(BufferConfig(path=tmp_path / "b.db"), "a1")
        core.open()
        core.commit([Block("d", "g", 1, ("t",), (None,), [1.0])])
        core.close()
    finally:
        os.umask(old)
    modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
    assert modes["b.db"] == 0o600 and all(m == 0o600 for m in modes.values()), modes
