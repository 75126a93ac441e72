"""The durable buffer: seqs, atomic state, overflow accounting, retention, migration, crash safety."""

from __future__ import annotations

import asyncio
import json
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
from agent.buffer.rows import StoredRecord
from agent.buffer.schema import SCHEMA_VERSION
from agent.buffer.store import Buffer
from agent.core.events import DataLoss, LossReason
from agent.core.records import Block, Event, Quality
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
    rows = await buf.pending(0, 100)
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
            "CREATE TRIGGER boom BEFORE INSERT ON records WHEN NEW.device = 'bad' "
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
    assert seqs_of(core.pending(0, 10)) == [0, 1, 2]
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
    body, event = (json.loads(r.body) for r in core.pending(0, 2))
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
    rows = await buf.pending(0, 10)
    stats = await buf.stats()
    await buf.close()
    # seqs are the acquisition's: the stand-in loss event takes the next free one, after all three
    assert [(r.kind, r.seq_first, r.n) for r in rows] == [("data", 0, 2), ("event", 5, 1), ("data", 3, 2)]
    loss = json.loads(rows[1].body)
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
            assert seqs_of(core.pending(0, 10_000)) == list(
                range(undelivered_first, committed[-1].seq_first + 50)
            )  # type: ignore[operator]
    stats = core.stats()
    assert stats["size_bytes"] <= 256 * 1024
    delivered_left = core.conn.execute(
        "SELECT count(*) FROM records WHERE delivered_ns IS NOT NULL"
    ).fetchone()[0]
    assert delivered_left == 0

    pending = core.pending(0, 10_000)
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
    core.close()


def test_overflow_spares_events_until_no_reading_is_left(tmp_path: Path) -> None:
    core = Buffer(cfg(tmp_path, max_bytes="128KiB"), "a1")
    core.open()
    alarms: list[Event] = []
    losses: list[Event] = []
    while not losses:
        alarms.append(Event("d1", "excursion", data={"why": "x" * 200}))
        losses = core.commit([block(n=40), alarms[-1]]).events
    kept_events = {r.seq_first for r in core.pending(0, 10_000) if r.kind == "event"}
    assert {e.seq for e in alarms} <= kept_events, "every alarm survives a flood of readings"
    assert losses[0].data["events"] == 0 and losses[0].data["readings"] > 0
    # a flood of events alone: once no reading is left, the oldest events go too, and are counted
    while not any(e.data["events"] for e in losses):
        losses = core.commit([Event("d1", "excursion", data={"why": "y" * 2000})]).events
    assert not core.conn.execute("SELECT 1 FROM records WHERE kind = 'data'").fetchone()
    assert losses[0].data["first_seq"] == alarms[0].seq  # the oldest alarm went first
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
    core.commit([block(), block(), block()])
    ids = [r.id for r in core.pending(0, 10)]
    now = 10_000 * 10**9
    core.mark_delivered(ids[:1], when_ns=now - 2 * 3600 * 10**9)  # delivered 2 h ago
    core.mark_delivered(ids[1:2], when_ns=now - 60 * 10**9)  # a minute ago
    assert core.prune(now) == 1
    left = core.conn.execute("SELECT id, delivered_ns IS NULL FROM records ORDER BY id").fetchall()
    assert left == [(ids[1], 0), (ids[2], 1)]
    core.close()


V1_SCHEMA = """
CREATE TABLE [records] ([id] INTEGER PRIMARY KEY, [kind] TEXT NOT NULL, [device] TEXT NOT NULL,
  [seq_first] INTEGER NOT NULL, [n] INTEGER NOT NULL, [acq_ts_ns] INTEGER NOT NULL, [body] TEXT NOT NULL,
  [delivered_ns] INTEGER);
CREATE INDEX records_undelivered ON records(id) WHERE delivered_ns IS NULL;
CREATE TABLE [kv] ([key] TEXT PRIMARY KEY, [value] TEXT NOT NULL);
CREATE TABLE [meta] ([key] TEXT PRIMARY KEY, [value] TEXT NOT NULL);
INSERT INTO meta VALUES ('next_seq', '7'), ('schema_version', '1');
INSERT INTO kv VALUES ('d1:watermark', '9');
INSERT INTO records(kind, device, seq_first, n, acq_ts_ns, body, delivered_ns) VALUES
  ('data', 'd1', 0, 3, 1, '{"seq":0}', 5), ('data', 'd1', 3, 3, 2, '{"seq":3}', NULL),
  ('event', 'agent', 6, 1, 3, '{"seq":6}', NULL);
"""


async def test_migration_from_v1_keeps_backlog_and_sequence(tmp_path: Path) -> None:
    path = tmp_path / "buf.db"
    with sqlite3.connect(path) as conn:
        conn.executescript(V1_SCHEMA)
    buf = AsyncBuffer(cfg(tmp_path), "a1")
    await buf.open()
    assert buf.state() == {"d1:watermark": "9"}
    pending = await buf.pending(0, 10)
    assert [(r.seq_first, r.body) for r in pending] == [(3, '{"seq":3}'), (6, '{"seq":6}')]
    b = block()
    buf.submit([b])
    await buf.flush()
    stats = await buf.stats()
    await buf.close()
    assert b.seq_first == 7
    assert stats["schema_version"] == SCHEMA_VERSION
    assert stats["committed_readings_total"] == 9 and stats["delivered_readings_total"] == 3
    assert stats["depth_records"] == 3


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
    stored = [r.seq_first for r in core.pending(0, 100_000)]
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
            if loss.first_seq is not None and loss.last_seq is not None:  # None: only empty blocks were lost
                self.loss_ranges.setdefault(e.device, []).append(range(loss.first_seq, loss.last_seq + 1))
        if result.events:  # undelivered rows go only once no delivered row is left
            conn = self.core.conn
            assert not conn.execute("SELECT 1 FROM records WHERE delivered_ns IS NOT NULL").fetchone()
            if any(e.data["events"] for e in result.events):  # and events only once no reading is left
                older = "SELECT 1 FROM records WHERE kind = 'data' AND seq_first < ?"
                assert not conn.execute(older, (result.events[0].seq,)).fetchone()
        stats = self.core.stats()
        assert stats["lost_readings_total"] >= self.lost_counter
        self.lost_counter = stats["lost_readings_total"]

    @rule(count=st.integers(1, 20))
    def deliver(self, count: int) -> None:
        rows = self.core.pending(0, count)
        self.core.mark_delivered([r.id for r in rows])
        self.delivered.update(seqs_of([r for r in rows if r.kind == "data"]))

    @rule()
    def reopen(self) -> None:
        self.core.close()
        self.core = Buffer(self.cfg, "a1")
        self.core.open()

    def in_loss(self, seq: int) -> bool:
        return any(seq in r for r in self.loss_ranges.get(self.device_of[seq], []))

    @invariant()
    def accounted(self) -> None:
        pending = self.core.pending(0, 100_000)
        ids = [r.id for r in pending]
        assert ids == sorted(ids)
        firsts = [r.seq_first for r in pending]
        assert firsts == sorted(firsts)
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
    rows = core.pending(0, 10)
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
    other.execute("CREATE TRIGGER full BEFORE INSERT ON records BEGIN SELECT RAISE(ABORT, 'disk full'); END")
    b = block()
    buf.submit([b])
    await until(lambda: buf.commit_errors >= 1, what="a failed commit")
    assert (await buf.stats())["queued_records"] == 1 and b.seq_first == 0  # its seq is the acquisition's
    other.execute("DROP TRIGGER full")
    other.close()
    await asyncio.wait_for(buf.flush(), 10)
    rows = await buf.pending(0, 10)
    await buf.close()
    assert [r.seq_first for r in rows] == [0] and b.seq_first == 0


async def test_memory_is_bounded_while_commits_fail_and_the_shedding_is_reported(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path, commit_interval="5ms", commit_max_records=2, hold_max_records=20), "a1")
    await buf.open()
    other = sqlite3.connect(tmp_path / "buf.db", isolation_level=None)
    other.execute("CREATE TRIGGER full BEFORE INSERT ON records BEGIN SELECT RAISE(ABORT, 'disk full'); END")
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
    rows = await buf.pending(0, 100)
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
