"""Storage faults (issue 11): a full disk, a damaged buffer file, a second agent on the same buffer,
and loss counts checked against what a broker-side subscriber actually received."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from pydantic import ValidationError

from agent.app.config import load_config
from agent.app.runtime import Agent
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.buffer.rows import StoredRecord
from agent.buffer.store import Buffer
from agent.core.events import DataLoss, LossReason
from agent.core.records import Block
from agent.sinks.forwarder import AgentIdentity, Forwarder, MqttConfig
from cleanroom_common.net import free_port
from tests.support import AgentProcess, Collector, Mosquitto, until, wait_for


def block(device: str = "d1", n: int = 50, ts: int = 1_000) -> Block:
    """Fifty readings: a block is larger than a page's worth of free space, so a full disk refuses it."""
    return Block(device, "g", ts, [f"t{i}" for i in range(n)], ["u"] * n, [float(i) for i in range(n)])


def cfg(tmp_path: Path, **kw: object) -> BufferConfig:
    return BufferConfig.model_validate(
        {"path": tmp_path / "buffer.db", "synchronous": "normal", "commit_interval": "5ms", **kw}
    )


async def disk_full(buf: AsyncBuffer, full: bool) -> None:
    """SQLITE_FULL on demand: cap the buffer connection's page count at what the file has now (the
    next commit that needs a page fails exactly as on a full disk), or lift the cap."""

    def cap() -> None:
        conn = buf.core.conn
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages if full else 1 << 30}")

    await buf.on_buffer_thread(cap)


def stored(path: Path, agent_id: str = "a1") -> list[StoredRecord]:
    core = Buffer(BufferConfig(path=path), agent_id)
    core.open(readonly=True)
    try:
        return list(core.records(kind=None))
    finally:
        core.close()


def reading_seqs(rows: Sequence[StoredRecord]) -> list[int]:
    return [s for r in rows if r.kind == "data" for s in range(r.seq_first, r.seq_first + r.n)]


def losses(rows: Sequence[StoredRecord]) -> list[DataLoss]:
    return [
        DataLoss.from_body(json.loads(r.body))
        for r in rows
        if r.kind == "event" and json.loads(r.body)["kind"] == "data_loss"
    ]


# ---------------------------------------------------------------------------------------------- disk full


async def test_disk_full_readings_get_seqs_at_acquisition_and_commit_later(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path), "a1")
    await buf.open()
    first = block()
    buf.submit([first])
    await buf.flush()
    await disk_full(buf, True)
    held = [block(ts=i) for i in range(5)]
    for b in held:
        buf.submit([b])
    # the seq is the acquisition's, not the commit's: known now, while the disk refuses every commit
    assert [b.seq_first for b in held] == [50, 100, 150, 200, 250]
    await until(lambda: buf.commit_errors >= 2, what="commits refused by the full disk")
    assert (await buf.stats())["queued_records"] == 5
    await disk_full(buf, False)
    assert await buf.flush(within_s=10)
    await buf.close()
    rows = stored(tmp_path / "buffer.db")
    assert reading_seqs(rows) == list(range(300)), "held readings committed, seqs contiguous"
    assert not losses(rows)


async def test_disk_full_beyond_the_hold_bound_is_data_loss_with_exact_seqs(tmp_path: Path) -> None:
    buf = AsyncBuffer(cfg(tmp_path, hold_max_records=4), "a1")
    await buf.open()
    await disk_full(buf, True)
    for i in range(6):
        buf.submit([block(ts=i)])
    await until(lambda: buf.commit_errors >= 1, what="a refused commit")
    for i in range(6, 10):
        buf.submit([block(ts=i)])
    assert (await buf.stats())["queued_records"] == 4, "held up to the bound, no further"
    await disk_full(buf, False)
    assert await buf.flush(within_s=10)
    assert await buf.flush(within_s=10)  # the data_loss event submitted once the disk took data again
    await buf.close()
    rows = stored(tmp_path / "buffer.db")
    kept = reading_seqs(rows)
    (loss,) = losses(rows)
    assert loss.reason is LossReason.NOT_COMMITTED
    assert loss.first_seq is not None and loss.last_seq is not None
    gone = set(range(loss.first_seq, loss.last_seq + 1))
    assert loss.readings == len(gone) == 500 - len(kept) and loss.rows == len(gone) // 50
    assert not gone & set(kept), "a seq is either stored or inside the loss range, never both"
    assert sorted(gone | set(kept)) == list(range(500)), "every acquired seq is accounted for"
    assert (loss.first_ts, loss.last_ts) == (0, loss.rows - 1)  # the oldest were given up


async def test_close_is_bounded_on_a_full_disk_and_the_loss_is_recorded_on_the_next_start(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    buf = AsyncBuffer(cfg(tmp_path, close_timeout="1s"), "a1")
    await buf.open()
    buf.submit([block()])
    assert await buf.flush(within_s=5)
    await disk_full(buf, True)
    for i in range(6):
        buf.submit([block(ts=i)])
    assert not await buf.flush(within_s=0.3), "a flush that cannot finish says so"
    began = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="cleanroom.buffer"):
        await asyncio.wait_for(buf.close(), 5)
    # close_timeout (1 s) with room for a loaded machine; before the bound the close never ended
    assert time.monotonic() - began < 4
    assert "6 records (300 readings, seq 50..349) could not be committed" in caplog.text

    again = AsyncBuffer(cfg(tmp_path), "a1")
    await again.open()
    assert await again.flush(within_s=5)
    b = block()
    again.submit([b])
    await again.close()
    rows = stored(tmp_path / "buffer.db")
    (loss,) = losses(rows)
    assert (loss.reason, loss.readings, loss.rows, loss.first_seq, loss.last_seq) == (
        LossReason.NOT_COMMITTED,
        300,
        6,
        50,
        349,
    )
    assert b.seq_first is not None and b.seq_first > 349, "no seq reused after the restart"


def _agent_config(tmp_path: Path, agent_id: str = "gw-fs", extra: str = "") -> Path:
    path = tmp_path / "agent.yaml"
    path.write_text(
        f"agent:\n  id: {agent_id}\n  status_listen: 127.0.0.1:{free_port()}\n"
        f"buffer:\n  path: buffer.db\n  synchronous: normal\n  commit_interval: 5ms\n{extra}"
    )
    return path


async def test_agent_stop_ends_in_bounded_time_while_the_disk_is_full(tmp_path: Path) -> None:
    agent = Agent(load_config(_agent_config(tmp_path, extra="  close_timeout: 1s\n")))
    await agent.start()
    assert await agent.buffer.flush(within_s=5)
    await disk_full(agent.buffer, True)
    agent.buffer.submit([block()])
    began = time.monotonic()
    await asyncio.wait_for(agent.stop(), 10)
    # close_timeout (1 s) plus the close's slack for a stuck commit (2 s) and the rest of the stop
    assert time.monotonic() - began < 5


def test_hold_and_close_bounds_refuse_bad_values() -> None:
    for bad in ({"hold_max_records": 0}, {"close_timeout": "0s"}, {"close_timeout": "soon"}):
        with pytest.raises(ValidationError):
            BufferConfig.model_validate(bad)


# ---------------------------------------------------------------------------------------------- corrupt file


def _damage(path: Path, header_too: bool = False) -> int:
    """Garbage over a real page of the records b-tree (and the header, if asked): a damage SQLite
    only notices when it reads that page. Returns where the garbage is."""
    offset = (path.stat().st_size // 4096 - 2) * 4096 + 100
    with path.open("r+b") as f:
        f.seek(offset)
        f.write(b"\xde\xad\xbe\xef" * 200)
        if header_too:
            f.seek(0)
            f.write(b"not a database at all" * 10)
    return offset


@pytest.mark.parametrize("header_too", [False, True], ids=["pages", "header"])
async def test_a_damaged_buffer_is_moved_aside_and_acquisition_continues(
    tmp_path: Path, header_too: bool
) -> None:
    path = tmp_path / "buffer.db"
    core = Buffer(cfg(tmp_path), "gw-fs")
    core.open()
    for _ in range(40):
        core.commit([block()])
    core.close()
    where = _damage(path, header_too)

    agent = Agent(load_config(_agent_config(tmp_path)))
    await agent.start()
    b = block()
    agent.buffer.submit([b])
    assert await agent.buffer.flush(within_s=5)
    await agent.stop()

    (aside,) = list(tmp_path.glob("buffer.db.corrupt-*Z"))  # noqa: ASYNC240
    assert len(aside.name) == len("buffer.db.corrupt-20250101T000000Z")
    assert aside.read_bytes()[where : where + 4] == b"\xde\xad\xbe\xef", "the damaged file is kept as it was"
    rows = stored(path, "gw-fs")
    (loss,) = losses(rows)
    assert loss.reason is LossReason.BUFFER_CORRUPT and aside.name in (loss.detail or "")
    # open below: every seq under the fresh buffer's first is explained by it, none above
    (loss_seq,) = [
        r.seq_first for r in rows if r.kind == "event" and json.loads(r.body)["kind"] == "data_loss"
    ]
    assert loss.first_seq is None and loss.last_seq == loss_seq - 1 == min(r.seq_first for r in rows) - 1
    audit = [json.loads(r.body)["data"] for r in rows if r.kind == "event"]
    assert any(a.get("action") == "buffer_replaced" and a.get("new") == str(aside) for a in audit)
    assert b.seq_first is not None
    if not header_too:  # what the damaged file still said about its seqs is honoured: none reused
        assert b.seq_first >= 40 * 50


def test_quick_check_finds_a_damaged_file_that_opens(tmp_path: Path) -> None:
    """Damage SQLite only notices when it reads the damaged page is found at open, not mid-run."""
    core = Buffer(cfg(tmp_path), "a1")
    core.open()
    for _ in range(40):
        core.commit([block()])
    core.close()
    _damage(tmp_path / "buffer.db")
    core = Buffer(cfg(tmp_path), "a1")
    core.open()  # without the check the damage goes unnoticed, until a read or write reaches the page
    core.close()
    core.open(repair=True)
    try:
        assert core.replaced is not None and "quick_check" in core.replaced.problem
        assert core.pending(0, 10) == []
    finally:
        core.close()


# ---------------------------------------------------------------------------------------------- second agent


def test_a_second_agent_on_the_same_buffer_refuses_to_start(tmp_path: Path) -> None:
    config = _agent_config(tmp_path)
    first = AgentProcess(config, tmp_path / "first.log").start()
    try:
        wait_for(lambda: first.running() and "started" in (tmp_path / "first.log").read_text(), timeout=15)
        second = subprocess.run(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(config)],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
        )
        assert second.returncode == 1
        assert first.proc is not None
        expected = f"buffer {tmp_path / 'buffer.db'} is in use by another agent (pid {first.proc.pid})"
        assert expected in second.stderr
        assert "Traceback" not in second.stderr
        assert first.running()
        assert first.terminate() == 0
    finally:
        first.close()
    # the lock ends with its holder: the next agent starts
    again = AgentProcess(config, tmp_path / "again.log").start()
    try:
        wait_for(lambda: again.running() and "started" in (tmp_path / "again.log").read_text(), timeout=15)
        assert again.terminate() == 0
    finally:
        again.close()


# ---------------------------------------------------------------------------------------------- honest counts


def _broker_capture(collector: Collector, device: str) -> tuple[set[int], list[DataLoss]]:
    seqs: set[int] = set()
    lost: list[DataLoss] = []
    for topic, payload, _ in list(collector.messages):
        if topic == f"cleanroom/{device}/data":
            for b in json.loads(payload)["blocks"]:
                seqs.update(range(b["seq"], b["seq"] + b["n"]))
        elif topic == f"cleanroom/{device}/events":
            lost += [DataLoss.from_body(e) for e in json.loads(payload)["events"] if e["kind"] == "data_loss"]
    return seqs, lost


async def test_loss_counts_equal_what_never_reached_the_broker(
    mosquitto: Mosquitto, collector: Collector, tmp_path: Path
) -> None:
    buf = AsyncBuffer(cfg(tmp_path, max_bytes="64KiB", segment_max_readings=100), "gw")
    await buf.open()
    mqtt = MqttConfig.model_validate(
        {"host": "127.0.0.1", "port": mosquitto.port, "inflight_window": 4,
         "reconnect_min": "50ms", "reconnect_max": "300ms"}
    )  # fmt: skip
    fw = Forwarder(mqtt, buf, AgentIdentity("gw", "test", "0" * 64))
    await fw.start()
    acquired: list[Block] = []
    try:
        await until(lambda: fw.stats()["connected"], what="connected")
        assert mosquitto.proc is not None
        mosquitto.proc.send_signal(signal.SIGSTOP)  # the broker takes publishes but acknowledges none
        try:
            for i in range(8):
                acquired.append(block(ts=i))
                buf.submit([acquired[-1]])
            await until(lambda: fw.stats()["inflight"] == 4, what="a full in-flight window")
            for i in range(8, 120):
                acquired.append(block(ts=i))
                buf.submit([acquired[-1]])
                await asyncio.sleep(0.001)
            assert await buf.flush(within_s=10)
            assert (await buf.stats())["lost_readings_total"] > 0, "the buffer overflowed"
        finally:
            mosquitto.proc.send_signal(signal.SIGCONT)

        async def drained() -> bool:
            stats = await buf.stats()
            return stats["depth_records"] == 0 and fw.stats()["inflight"] == 0

        await until(drained, within_s=15, what="everything committed delivered")
    finally:
        await fw.stop(grace_s=1)
        await buf.close()

    acquired_seqs = {b.seq_first + i for b in acquired if b.seq_first is not None for i in range(len(b))}

    def capture() -> tuple[set[int], list[DataLoss], set[int]]:
        received, lost = _broker_capture(collector, "d1")
        in_loss = {
            s for x in lost if x.first_seq is not None for s in range(x.first_seq, (x.last_seq or 0) + 1)
        }
        return received, lost, in_loss

    def covered() -> bool:
        received, _, in_loss = capture()
        return acquired_seqs <= received | in_loss

    wait_for(covered, timeout=5, what="every acquired seq received or inside a data_loss range at the broker")
    received, lost, in_loss = capture()
    assert lost, "the overflow was reported to the broker"
    assert len(acquired_seqs) == 120 * 50
    assert not received & in_loss, f"{len(received & in_loss)} seqs reached the broker yet are counted lost"
    assert sum(loss.readings for loss in lost) == len(acquired_seqs - received)
