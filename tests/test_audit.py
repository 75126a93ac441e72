"""The audit trail and the agent's record of itself (issue 12): who did what and why, operators
attributed on the CLI, clock steps and restarts after a crash, on a real buffer and a real agent
process."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import time
from pathlib import Path
from typing import Any

import pytest

from agent.app.config import ConfigError, load_config
from agent.app.runtime import Agent
from agent.buffer.audit import Auditor
from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.cli import main
from agent.core.clock import ClockMonitor
from agent.core.driver import DeviceIdentity
from agent.core.records import Event, dumps
from cleanroom_common.net import free_port
from tests.support import AgentProcess, until, wait_for


def committed(db: Path, kind: str = "event") -> list[dict[str, Any]]:
    """Every committed event (or block) body, read the way export reads the buffer (also while an
    agent writes)."""
    core = Buffer(BufferConfig(path=db), agent_id=None)
    core.open(readonly=True)
    try:
        return [json.loads(r.body) for r in core.records(kind=kind)]
    finally:
        core.close()


def committed_events(db: Path) -> list[dict[str, Any]]:
    return committed(db, "event")


def events_so_far(db: Path) -> list[dict[str, Any]]:
    """:func:`committed_events` of a buffer an agent process may still be creating (none yet)."""
    try:
        return committed_events(db) if db.exists() else []
    except (RuntimeError, sqlite3.Error):  # created, its schema not yet committed
        return []


def write_config(tmp_path: Path, device: bool = False, **buffer: Any) -> Path:
    """An agent config; with ``device``, one device nobody answers for: its failed polls are
    committed every 200 ms as bad-quality blocks."""
    cfg = tmp_path / "agent.yaml"
    opts = ", ".join(f"{k}: {v}" for k, v in {"path": "buffer.db", **buffer}.items())
    text = f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}'}}\nbuffer: {{{opts}}}\n"
    if device:
        text += (
            "devices:\n  - id: br1\n    profile: bioreactor-sim\n"
            f"    connection: {{host: 127.0.0.1, port: {free_port()}, timeout: 100ms}}\n"
            "    groups: {process: {interval: 200ms}}\n"
        )
    cfg.write_text(text)
    return cfg


# --------------------------------------------------------------------------- the auditor


def test_the_agent_is_the_actor_of_its_own_actions_and_the_os_user_only_corroborates() -> None:
    sink: list[Event] = []
    auditor = Auditor(sink.append, "gw-7")
    auditor.record("agent_start", "agent", reason="agent process started")
    auditor.record("model_mode", "m@d1", actor="qa.lead", reason="VP-12 passed", old="shadow", new="active")
    own, operator = (e.data for e in sink)
    assert own["actor"] == "agent:gw-7" and own["reason"] == "agent process started"
    assert operator["actor"] == "qa.lead" and (operator["old"], operator["new"]) == ("shadow", "active")
    assert own["os_user"] == operator["os_user"] != ""
    assert all(e.kind == "audit" and e.device == "agent" for e in sink)


def test_an_audit_record_concerning_a_device_names_it_in_its_data() -> None:
    """Every audit record is in the agent's one trail, whose segments and event bodies name no
    device: the device it concerns is in the data, or nobody downstream could tell."""
    sink: list[Event] = []
    auditor = Auditor(sink.append, "gw-7")
    auditor.record("model_refused", "m@br1", device="br1", reason="profile mismatch")
    auditor.record("agent_start", "agent", reason="agent process started")
    device, agent = sink
    device.seq = 0
    assert device.data["device"] == "br1" and json.loads(dumps(device.body()))["data"]["device"] == "br1"
    assert "device" not in agent.data  # the agent's own actions concern no device


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"reason": "  "}, "an actor and a reason are required"),
        ({"reason": "x", "actor": ""}, "an actor and a reason are required"),
        ({"reason": "x", "extra": {"actor": "someone else"}}, "would replace the record's own"),
        ({"reason": "x", "device": "d1", "extra": {"device": "d2"}}, "would replace the record's own"),
    ],
)
def test_an_audit_record_that_would_say_less_than_it_must_is_refused(kwargs: Any, error: str) -> None:
    sink: list[Event] = []
    with pytest.raises(ValueError, match=error):
        Auditor(sink.append, "gw").record("replay", "buffer", **kwargs)
    assert sink == []


# --------------------------------------------------------------------------- operators on the CLI


def test_a_changing_cli_action_without_actor_or_reason_is_refused_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "absent.model.yaml"  # never opened: the refusal comes first
    base = ["models", "evaluate", "--model", str(model), "--csv", str(tmp_path / "x.csv"), "--record"]
    assert main([*base, "--reason", "monthly review"]) == 2
    err = capsys.readouterr().err
    assert "evaluate --record changes data: give --actor (who asks and why" in err
    assert "Traceback" not in err
    assert main(base) == 2
    assert "give --actor and --reason" in capsys.readouterr().err
    with pytest.raises(SystemExit) as blank:  # argparse: a blank actor is no actor
        main([*base, "--actor", " ", "--reason", "monthly review"])
    assert blank.value.code == 2
    assert "--actor: must not be blank" in capsys.readouterr().err
    # attributed, it goes on to the work itself (and meets the missing model)
    assert main([*base, "--actor", "qa.lead", "--reason", "monthly review"]) == 2
    err = capsys.readouterr().err
    assert "--actor" not in err and str(model) in err


# --------------------------------------------------------------------------- clock steps


class SteppableClock:
    """Real monotonic time, and a wall clock a test can step."""

    def __init__(self) -> None:
        self.offset_ns = 0

    def wall_ns(self) -> int:
        return time.time_ns() + self.offset_ns

    def mono_ns(self) -> int:
        return time.monotonic_ns()


async def test_a_clock_step_is_an_event_and_an_audit_record_and_seqs_keep_their_order(
    tmp_path: Path,
) -> None:
    agent = Agent(load_config(write_config(tmp_path)))
    clock = SteppableClock()
    agent.clock_monitor = ClockMonitor(threshold_s=1.0, wall_ns=clock.wall_ns, mono_ns=clock.mono_ns)
    await agent.start()
    try:
        clock.offset_ns = 30 * 10**9  # someone sets the time 30 s ahead
        db = tmp_path / "buffer.db"
        await until(
            lambda: any(e["kind"] == "clock_step" for e in committed_events(db)),
            within_s=10,
            what="clock_step committed",
        )
    finally:
        await agent.stop()

    events = committed_events(tmp_path / "buffer.db")
    (step,) = [e for e in events if e["kind"] == "clock_step"]
    assert step["severity"] == "warning" and 29.9 < step["data"]["step_s"] < 30.1
    before, after = step["data"]["wall_before_ns"], step["data"]["wall_after_ns"]
    assert 29.9e9 < after - before < 30.1e9
    audit = {e["data"]["action"]: e for e in events if e["kind"] == "audit"}
    assert audit["clock_step"]["data"]["old"] == {"wall_ns": before}
    assert audit["clock_step"]["data"]["new"] == {"wall_ns": after}
    assert audit["clock_step"]["data"]["actor"] == "agent:gw"
    # The stepped event is stamped 30 s ahead of the stop that followed it; its seq still puts
    # it between the start and the stop, and no seq is used twice.
    seqs = [e["seq"] for e in events]
    assert len(set(seqs)) == len(seqs)
    start, stop = audit["agent_start"], audit["agent_stop"]
    assert start["seq"] < step["seq"] < audit["clock_step"]["seq"] < stop["seq"]
    assert step["ts"] > stop["ts"]


# --------------------------------------------------------------------------- restarts


def test_a_restart_after_kill_9_records_the_interval_no_record_covers(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, device=True, synchronous="normal", commit_interval="50ms")
    db = tmp_path / "buffer.db"
    log = tmp_path / "agent.log"

    agent = AgentProcess(cfg, log).start()
    try:
        wait_for(
            lambda: agent.running() and len(events_so_far(db)) and len(committed(db, "data")) >= 3,
            timeout=30,
            what="the first run's readings committed",
        )
        killed_at = time.time_ns()
        agent.kill()  # SIGKILL: no agent_stop, no clean close
        assert agent.proc is None

        agent.start()
        wait_for(
            lambda: agent.running() and any(e["kind"] == "agent_restart" for e in committed_events(db)),
            timeout=30,
            what="agent_restart committed",
        )
        assert agent.terminate() == 0
        agent.start()  # after a clean stop: no restart event
        wait_for(
            lambda: (
                agent.running()
                and sum(e["data"].get("action") == "agent_start" for e in committed_events(db)) == 3
            ),
            timeout=30,
            what="third agent_start committed",
        )
        assert agent.terminate() == 0
    finally:
        agent.close()

    events, blocks = committed_events(db), committed(db, "data")
    (restart,) = [e for e in events if e["kind"] == "agent_restart"]
    data = restart["data"]
    assert restart["severity"] == "warning" and data["unclean"] is True
    assert data["from_ts"] < killed_at < data["until_ts"]
    # The interval is exactly the hole: the first run's last committed reading opens it, and no
    # record of either run falls inside it.
    first_run = [b for b in blocks if b["seq"] <= data["last_seq"]]
    assert first_run and max(b["ts"] for b in first_run) == data["from_ts"]
    last_seqs = [r["seq"] + r.get("n", 1) - 1 for r in [*blocks, *events] if r["seq"] <= data["last_seq"]]
    assert max(last_seqs) == data["last_seq"]
    later = [r for r in [*blocks, *events] if r["seq"] > data["last_seq"]]
    assert later and all(r["ts"] >= data["until_ts"] for r in later)
    assert all(r["ts"] <= data["from_ts"] for r in blocks if r["seq"] <= data["last_seq"])
    starts = [e for e in events if e["kind"] == "audit" and e["data"]["action"] == "agent_start"]
    assert [s["data"]["new"]["after_unclean_stop"] for s in starts] == [False, True, False]


# --------------------------------------------------------------------------- the integrity section


def test_an_unusable_hmac_key_file_is_a_config_error_that_never_quotes_the_key(tmp_path: Path) -> None:
    key = tmp_path / "hmac.key"
    key.write_text("short-key-XYZ\n")
    cfg = write_config(tmp_path)
    cfg.write_text(
        cfg.read_text() + f"integrity: {{hmac_key_file: {key.name}, clock_step_threshold: 250ms}}\n"
    )
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    (problem,) = exc.value.problems
    assert problem.line == 3 and "at least 32 bytes, it has 13" in str(problem)
    assert "short-key-XYZ" not in str(problem)
    key.unlink()
    with pytest.raises(ConfigError, match=r"hmac\.key: cannot read"):
        load_config(cfg)


def test_a_key_others_can_read_is_used_with_a_warning_that_never_quotes_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    key = tmp_path / "hmac.key"
    key.write_bytes(b"k" * 40 + b"\n")
    key.chmod(0o644)
    cfg = write_config(tmp_path)
    cfg.write_text(cfg.read_text() + "integrity: {hmac_key_file: hmac.key, clock_step_threshold: 250ms}\n")
    loaded = load_config(cfg)
    assert loaded.config.integrity.clock_step_threshold == 0.25
    assert loaded.hmac_key() == b"k" * 40
    assert "can be read by other accounts (mode 644): chmod 600 it" in caplog.text
    assert "kkkk" not in caplog.text
    caplog.clear()
    key.chmod(0o600)
    assert loaded.hmac_key() == b"k" * 40 and "other accounts" not in caplog.text


# --------------------------------------------------------------------------- attribution


def segments_of(db: Path) -> list[dict[str, Any]]:
    """Every stored segment payload (undelivered: no broker in these tests), in commit order."""
    core = Buffer(BufferConfig(path=db), agent_id=None)
    core.open(readonly=True)
    try:
        return [json.loads(s.payload) for s in core.pending(0, 100_000)]
    finally:
        core.close()


async def test_every_segment_names_its_source_and_clock_and_a_device_identity_replaces_the_last(
    tmp_path: Path,
) -> None:
    (tmp_path / "hmac.key").write_bytes(b"0123456789abcdef" * 3)
    (tmp_path / "hmac.key").chmod(0o600)
    cfg = write_config(tmp_path, device=True, commit_interval="20ms")
    cfg.write_text(cfg.read_text() + "integrity: {hmac_key_file: hmac.key}\n")
    loaded = load_config(cfg)
    agent = Agent(loaded)
    db = tmp_path / "buffer.db"
    await agent.start()
    try:
        assert agent.scheduler is not None
        ctx = agent.scheduler.runners[0].ctx

        def serials() -> set[Any]:
            return {s["source"].get("serial") for s in segments_of(db) if s["chain"]["stream"] == "br1/data"}

        await until(lambda: None in serials(), what="a segment before the device said who it is")
        ctx.identify(DeviceIdentity(serial="SN-1", firmware="2.1"))
        await until(lambda: "SN-1" in serials(), what="a segment naming the serial number")
        ctx.identify(DeviceIdentity(firmware="3.0"))  # another instrument, which gives no serial
        await until(
            lambda: any(
                s["source"].get("firmware") == "3.0" and "serial" not in s["source"] for s in segments_of(db)
            ),
            what="a segment of the new instrument",
        )
    finally:
        await agent.stop()

    segments = segments_of(db)
    profile_sha = hashlib.sha256(loaded.devices[0].profile_path.read_bytes()).hexdigest()
    base = {"profile": "bioreactor-sim", "profile_sha256": profile_sha, "config_sha256": loaded.sha256}
    by_stream = {s["chain"]["stream"] for s in segments}
    assert {"br1/data", "agent/audit"} <= by_stream
    for s in segments:
        assert set(s["clock"]) == {"synced", "offset_s", "max_error_s"}
        assert len(s["mac"]) == 64  # the key reached the buffer
        if s["device"] == "agent":
            assert s["source"] == {"config_sha256": loaded.sha256, "version": agent.identity.version}
        else:
            extra = {k: v for k, v in s["source"].items() if k not in base}
            assert {k: s["source"][k] for k in base} == base
            assert extra in ({}, {"serial": "SN-1", "firmware": "2.1"}, {"firmware": "3.0"})
    data = [s["source"] for s in segments if s["chain"]["stream"] == "br1/data"]
    sn1 = [i for i, src in enumerate(data) if src.get("serial") == "SN-1"]
    fw3 = [i for i, src in enumerate(data) if src.get("firmware") == "3.0"]
    assert sn1 and fw3 and max(sn1) < min(fw3)  # once replaced, never named again
