"""``cleanroom-agent buffer stats|export|replay`` on a real buffer file."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import pytest

from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.cli import main
from agent.cli.buffer import iso_ns, parse_time
from agent.core.records import Block, Event, Quality

T0 = 1_767_225_600_000_000_000  # 2026-01-01T00:00:00Z


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "buf.db"
    core = Buffer(BufferConfig(path=path), "gw-7")
    core.open()
    core.commit(
        [
            Block("bio-1", "fast", T0, ["temp", "ph"], ["degC", "pH"], [37.01, 7.2], source_ts_ns=T0 - 5),
            Block(
                "bio-1", "fast", T0 + 60 * 10**9, ["temp", "ph"], ["degC", "pH"], [None, 7.19],
                quality=[Quality.BAD, Quality.GOOD], reasons=["timeout", None], source_ts_ns=[None, T0 + 1],
            ),
            Block("pc-3", "rec", T0 + 120 * 10**9, ["0.5um", "open"], ["counts", None], [12, True]),
            Event("bio-1", "device_state", data={"state": "connected"}),
        ]
    )  # fmt: skip
    core.mark_delivered([1])  # the segment of bio-1's two blocks
    core.close()
    return path


def test_time_helpers_round_trip_nanoseconds() -> None:
    assert iso_ns(T0 + 123_456_789) == "2026-01-01T00:00:00.123456789Z"
    assert parse_time("2026-01-01T00:00:00Z") == T0
    assert parse_time("2026-01-01T01:00:00+01:00") == T0
    assert parse_time("2026-01-01T00:00:00") == T0  # no offset: UTC


def test_stats(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["buffer", "stats", "--db", str(db)]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["agent"] == "gw-7"
    assert stats["depth_records"] == 2 and stats["depth_readings"] == 2
    assert stats["committed_readings_total"] == 6 and stats["delivered_readings_total"] == 4
    assert stats["next_seq"] == 7
    assert stats["segments"] == 3 and stats["depth_segments"] == 2 and stats["quarantined"] == 0


def test_export_csv_one_row_per_reading(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["buffer", "export", "--db", str(db)]) == 0
    out = capsys.readouterr()
    rows = list(csv.DictReader(io.StringIO(out.out)))
    assert "exported 6 readings" in out.err
    assert [(r["device"], r["tag"], r["seq"]) for r in rows] == [
        ("bio-1", "temp", "0"), ("bio-1", "ph", "1"), ("bio-1", "temp", "2"), ("bio-1", "ph", "3"),
        ("pc-3", "0.5um", "4"), ("pc-3", "open", "5"),
    ]  # fmt: skip
    first, bad, flag = rows[0], rows[2], rows[5]
    assert first["agent"] == "gw-7" and first["value"] == "37.01" and first["unit"] == "degC"
    assert first["quality"] == "good" and first["reason"] == ""
    assert first["acq_ts"] == "2026-01-01T00:00:00.000000000Z" and first["acq_ts_ns"] == str(T0)
    assert first["source_ts_ns"] == str(T0 - 5) and first["source_ts"] == "2025-12-31T23:59:59.999999995Z"
    assert bad["value"] == "" and bad["quality"] == "bad" and bad["reason"] == "timeout"
    assert bad["source_ts"] == "" and rows[3]["source_ts_ns"] == str(T0 + 1)
    assert flag["value"] == "true" and flag["unit"] == ""


def test_export_filters_and_jsonl_file(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x.jsonl"
    argv = ["buffer", "export", "--db", str(db), "--format", "jsonl", "--out", str(out), "--device", "bio-1",
            "--tag", "ph", "--since", "2026-01-01T00:00:30Z", "--until", "2026-01-01T00:05:00Z"]  # fmt: skip
    assert main(argv) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {"agent": "gw-7", "device": "bio-1", "group": "fast", "tag": "ph", "seq": 3, "value": 7.19,
         "unit": "pH", "quality": "good", "reason": None, "source_ts": iso_ns(T0 + 1), "source_ts_ns": T0 + 1,
         "acq_ts": "2026-01-01T00:01:00.000000000Z", "acq_ts_ns": T0 + 60 * 10**9}
    ]  # fmt: skip


REPLAY_BY = ["--actor", "jdoe", "--reason", "historian lost a day"]


def test_replay_marks_undelivered_and_audits(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = _payloads(db)
    assert main(["buffer", "replay", "--db", str(db), "--device", "bio-1", *REPLAY_BY]) == 0
    assert "marked 1 delivered segments (4 readings)" in capsys.readouterr().out
    core = Buffer(BufferConfig(path=db), "gw-7")
    core.open()
    pending = core.pending(0, 100)
    report = core.verify()
    core.close()
    assert [(s.stream, s.i, s.seq_first) for s in pending] == [
        ("bio-1/data", 0, 0), ("pc-3/data", 0, 4), ("bio-1/events", 0, 6), ("agent/audit", 0, 7),
    ]  # fmt: skip
    # replay touched no stored segment: it only forgot their delivery
    assert {k: v for k, v in _payloads(db).items() if k in before} == before
    audit = json.loads(pending[-1].payload)["events"][0]
    assert audit["kind"] == "audit" and audit["data"]["action"] == "buffer_replay"
    assert audit["data"]["actor"] == "jdoe" and audit["data"]["reason"] == "historian lost a day"
    assert audit["data"]["new"]["segments"] == 1 and audit["data"]["new"]["device"] == "bio-1"
    assert audit["data"]["segments"] == [{"stream": "bio-1/data", "first_i": 0, "last_i": 0}]
    assert report.ok


def _payloads(db: Path) -> dict[int, bytes]:
    import sqlite3

    with sqlite3.connect(db) as conn:
        return {int(i): bytes(p) for i, p in conn.execute("SELECT id, payload FROM segments")}


def test_replay_requires_an_actor_and_a_reason(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["buffer", "replay", "--db", str(db), "--reason", "x"])
    assert exc.value.code == 2 and "--actor" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["buffer", "replay", "--db", str(db), "--actor", " ", "--reason", "x"])
    assert "must not be blank" in capsys.readouterr().err


def test_replay_of_a_signed_buffer_needs_its_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.core import chain

    path, key_file, other = tmp_path / "buf.db", tmp_path / "hmac.key", tmp_path / "other.key"
    key_file.write_bytes(b"k" * 32 + b"\n")
    other.write_bytes(b"o" * 32)
    key_file.chmod(0o600)
    other.chmod(0o600)
    core = Buffer(BufferConfig(path=path), "gw-7", key=b"k" * 32)
    core.open()
    core.commit([Block("bio-1", "fast", T0, ["temp"], ["degC"], [37.0])])
    core.mark_delivered([1])
    core.close()
    argv = ["buffer", "replay", "--db", str(path), *REPLAY_BY]
    assert main(argv) == 2
    assert "is signed: give its HMAC key" in capsys.readouterr().err
    assert main([*argv, "--key", str(other)]) == 2
    assert "not the one its segments are signed with" in capsys.readouterr().err
    assert main([*argv, "--key", str(key_file)]) == 0
    core = Buffer(BufferConfig(path=path), "gw-7", key=b"k" * 32)
    core.open()
    audit = core.pending(0, 10)[-1]
    report = core.verify()
    core.close()
    assert audit.stream == "agent/audit" and chain.mac_ok(audit.payload, b"k" * 32)
    assert report.ok and report.mac_checked


def test_replay_after_a_key_rotation_needs_the_new_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from agent.core import chain

    path, old_file, new_file = tmp_path / "buf.db", tmp_path / "old.key", tmp_path / "new.key"
    old, new = b"k" * 32, b"n" * 32
    for f, key in ((old_file, old), (new_file, new)):
        f.write_bytes(key)
        f.chmod(0o600)
    core = Buffer(BufferConfig(path=path), "gw-7", key=old)
    core.open()
    core.commit([Block("bio-1", "fast", T0, ["temp"], ["degC"], [37.0]), Event("agent", "audit", data={})])
    core.mark_delivered([1])
    core.close()
    core = Buffer(BufferConfig(path=path), "gw-7", key=new)  # the agent starts with a new key
    core.open()
    assert core.adopt_key() is not None
    core.close()
    argv = ["buffer", "replay", "--db", str(path), *REPLAY_BY]
    assert main([*argv, "--key", str(old_file)]) == 2
    assert "not the one its segments are signed with" in capsys.readouterr().err
    assert main([*argv, "--key", str(new_file)]) == 0
    core = Buffer(BufferConfig(path=path), "gw-7", key=new)
    core.open()
    audit = core.pending(0, 10)[-1]
    report = core.verify()
    core.close()
    assert audit.stream == "agent/audit" and chain.mac_ok(audit.payload, new)
    assert report.ok and {s.stream: s.mac_unchecked for s in report.streams} == {
        "bio-1/data": 1,
        "agent/audit": 1,
    }


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["buffer", "stats", "--db", "/nonexistent/buf.db"], "no buffer database at /nonexistent/buf.db"),
        (["buffer", "export", "--db", "{db}", "--since", "yesterday"], "'yesterday' is not an ISO-8601 time"),
        (["buffer", "export", "--db", "{db}", "--out", "/nonexistent/dir/x.csv"], "cannot write"),
        (["buffer", "stats", "--db", "{garbage}"], "file is not a database"),
        (["buffer", "stats", "-c", "{missing_cfg}"], "nope.yaml: cannot read"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str
) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(b"this is not sqlite" * 100)
    subst = {"db": str(db), "garbage": str(garbage), "missing_cfg": str(tmp_path / "nope.yaml")}
    assert main([a.format(**subst) for a in argv]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_db_or_config_is_required(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["buffer", "stats"])
    assert exc.value.code == 2
    assert "one of the arguments --db -c/--config is required" in capsys.readouterr().err


async def test_replay_while_the_agent_writes_never_reuses_a_seq(
    db: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two writers on one file: the agent's group commit and the CLI's audit record."""
    from agent.buffer.async_buffer import AsyncBuffer

    buf = AsyncBuffer(BufferConfig(path=db), "gw-7")
    await buf.open()
    buf.submit([Block("bio-1", "fast", T0, ["temp"], ["degC"], [37.0])])
    await buf.flush()
    assert main(["buffer", "replay", "--db", str(db), "--device", "pc-3", *REPLAY_BY]) == 0
    later = Block("bio-1", "fast", T0, ["temp"], ["degC"], [37.1])
    buf.submit([later])
    await buf.flush()
    rows = await buf.on_buffer_thread(lambda: list(buf.core.records(kind=None)))
    stats = await buf.stats()
    report = await buf.on_buffer_thread(buf.core.verify)
    await buf.close()
    firsts = [r.seq_first for r in rows]
    # the tool's audit event takes its seq above the agent's reserved window; the agent goes on in it
    assert len(firsts) == len(set(firsts)) and later.seq_first == 8 == stats["next_seq"] - 1
    audit = json.loads(rows[-2].body)
    assert audit["data"]["action"] == "buffer_replay" and audit["seq"] > later.seq_first
    # both writers extended the chains from the stored heads: nothing collides, nothing breaks
    assert report.ok, report.breaks


def test_stats_through_the_agent_config(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "agent.yaml"
    config.write_text(f"agent:\n  id: gw-7\nbuffer:\n  path: {db.name}\n")  # relative to the config file
    assert main(["buffer", "stats", "-c", str(config)]) == 0
    assert json.loads(capsys.readouterr().out)["depth_readings"] == 2
    config.write_text("agent:\n  id: gw-7\nbuffer:\n  max_bytes: lots\n")
    assert main(["buffer", "stats", "-c", str(config)]) == 2
    assert "buffer.max_bytes" in capsys.readouterr().err


def test_export_of_an_altered_segment_is_a_clear_error(db: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import subprocess

    subprocess.run(
        ["sqlite3", str(db), "UPDATE segments SET payload = X'00ff' WHERE id = 2"], check=True, timeout=30
    )
    assert main(["buffer", "export", "--db", str(db)]) == 1
    err = capsys.readouterr().err
    assert "segment 2" in err and "verify --buffer" in err and "Traceback" not in err
