"""``verify --capture`` on synthetic captures: segments built with ``chain.build_payload`` exactly as
the agent builds them, then tampered with the way an attacker (or a broken pipeline) would."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from agent.cli import main
from agent.core import chain
from agent.core.records import dumps
from agent.integrity.capture import Captured, CaptureError, encode_line, read_capture
from agent.integrity.verify import CaptureReport, verify_capture

PREFIX = "plant"
AGENT = "gw-1"
KEY = b"k" * 32
T0 = 1_780_000_000_000_000_000
SECOND = 1_000_000_000


@dataclass
class FakeAgent:
    """Publishes segments the way the agent does: per stream chain, agent-wide seqs."""

    key: bytes | None = None
    seq: int = 0
    ts: int = T0
    heads: dict[str, tuple[int, str]] = field(default_factory=dict)
    out: list[tuple[str, bytes, bool]] = field(default_factory=list)

    def segment(self, stream: str, device: str, kind: chain.Kind, bodies: list[str]) -> bytes:
        i, prev = self.heads.get(stream, (0, chain.GENESIS))
        payload = chain.build_payload(
            kind=kind, agent=AGENT, device=device, stream=stream, i=i, prev=prev,
            source={"config_sha256": "c" * 64}, clock={"synced": True, "offset_s": 0.0, "max_error_s": 0.01},
            bodies=bodies, key=self.key,
        )  # fmt: skip
        self.heads[stream] = (i + 1, chain.digest(payload))
        self.out.append((f"{PREFIX}/{stream}", payload, False))
        return payload

    def data(self, device: str = "br1", groups: tuple[str, ...] = ("process",), step_s: float = 1.0) -> bytes:
        """One poll of each group (3 readings each), ``step_s`` after the previous poll."""
        self.ts += int(step_s * SECOND)
        bodies = []
        for g in groups:
            bodies.append(dumps({"seq": self.seq, "n": 3, "group": g, "ts": self.ts, "tags": ["a", "b", "c"],
                                 "units": [None, None, None], "values": [1.0, 2.0, 3.0]}))  # fmt: skip
            self.seq += 3
        return self.segment(f"{device}/data", device, "data", bodies)

    def event(self, kind: str, data: dict[str, Any], device: str = "agent", *, audit: bool = False) -> bytes:
        body = dumps({"seq": self.seq, "ts": self.ts, "kind": kind, "severity": "info", "data": data})
        self.seq += 1
        if audit:
            return self.segment("agent/audit", device, "audit", [body])
        return self.segment(f"{device}/events", device, "events", [body])

    def status(self, status: str, session: str, retain: bool = True, key: bytes | None = None) -> None:
        """Signed with ``key``, by default the agent's own, as the forwarder does."""
        doc = {"schema": "cleanroom-edge/status/2", "status": status, "agent": AGENT, "session": session}
        text, key = dumps(doc).encode(), key or self.key
        signed = text if key is None else chain.sign(text, key)
        self.out.append((f"{PREFIX}/agent/status/{AGENT}", signed, retain))

    def messages(self) -> list[Captured]:
        return [Captured(n, t, p, 1, r, 1.0 + n) for n, (t, p, r) in enumerate(self.out, start=1)]

    def write(self, path: Path) -> Path:
        path.write_text("".join(encode_line(t, p, 1, r, 1.0 + n) for n, (t, p, r) in enumerate(self.out)))
        return path


def run(agent: FakeAgent, key: bytes | None = None) -> CaptureReport:
    return verify_capture(agent.messages(), key)


def clean_run(key: bytes | None = None, polls: int = 10) -> FakeAgent:
    a = FakeAgent(key=key)
    a.status("online", "100.1")
    a.event("audit", {"action": "agent_start", "target": "agent"}, audit=True)
    for _ in range(polls):
        a.data("br1")
        a.data("br2", groups=("process", "status"))
    a.event("device_state", {"state": "connected"}, device="br1")
    a.data("br1")
    a.data("br2", groups=("process", "status"))
    return a


def unexplained(report: CaptureReport) -> list[str]:
    """Every unexplained finding, as ``kind stream i`` strings: what the assertions pin."""
    out = [f"{b.kind} {b.stream} {b.i}" for b in report.breaks]
    out += [f"gap {g.kind} {g.where} {g.first}..{g.last}" for g in report.gaps if g.cause is None]
    out += [f"replay {d.stream} {d.i}" for d in report.duplicates if d.cause is None]
    return out


# --------------------------------------------------------------------------- clean


def test_a_clean_capture_verifies_clean() -> None:
    a = clean_run(key=KEY)
    report = run(a, KEY)
    assert report.ok, unexplained(report)
    assert report.agent == AGENT and report.prefix == PREFIX and report.mac_checked
    assert report.sessions == ("100.1",)
    streams = {s.stream: s for s in report.streams}
    assert set(streams) == {"br1/data", "br2/data", "agent/audit", "br1/events"}
    assert (streams["br1/data"].first_i, streams["br1/data"].last_i, streams["br1/data"].segments) == (
        0,
        10,
        11,
    )
    assert streams["br2/data"].readings == 11 * 6
    assert report.readings == 11 * 3 + 11 * 6 and report.records == 11 + 22 + 2
    last_br1 = json.loads(a.out[-2][1])["blocks"][0]["seq"] + 2
    assert report.seq_window == (4, last_br1)  # from br2's first seq to br1's last


def test_a_capture_started_late_is_not_a_gap() -> None:
    a = clean_run()
    del a.out[:9]  # the capture started when the agent had published a while
    report = run(a)
    assert report.ok, unexplained(report)
    assert {s.stream: s.first_i for s in report.streams}["br1/data"] == 4


# --------------------------------------------------------------------------- tampering


def test_a_deleted_message_is_a_segment_gap_and_a_seq_gap() -> None:
    a = clean_run()
    victim = next(n for n, (t, p, _) in enumerate(a.out) if json.loads(p).get("chain", {}).get("i") == 4
                  and t.endswith("br1/data"))  # fmt: skip
    seqs = json.loads(a.out[victim][1])["blocks"][0]["seq"]
    del a.out[victim]
    report = run(a)
    assert not report.ok
    assert unexplained(report) == ["gap segments br1/data 4..4", f"gap seqs agent {seqs}..{seqs + 2}"]


def test_two_swapped_messages_are_a_reorder() -> None:
    a = clean_run()
    br1 = [n for n, (t, _, _) in enumerate(a.out) if t.endswith("br1/data")]
    a.out[br1[3]], a.out[br1[4]] = a.out[br1[4]], a.out[br1[3]]
    report = run(a)
    assert unexplained(report) == ["reorder br1/data 3"]
    assert "segment 3 arrived after segment 4" in report.breaks[0].detail


def test_an_altered_value_breaks_the_link_to_the_next_segment() -> None:
    a = clean_run()
    n = [n for n, (t, _, _) in enumerate(a.out) if t.endswith("br2/data")][5]
    topic, payload, retain = a.out[n]
    a.out[n] = (topic, payload.replace(b'"values":[1.0,', b'"values":[9.0,', 1), retain)
    report = run(a)
    assert unexplained(report) == ["altered br2/data 5"]
    assert report.breaks[0].lines == (n + 1, n + 3)  # the altered line and its successor (lines are 1-based)


def test_an_altered_last_segment_is_caught_by_the_mac() -> None:
    a = clean_run(key=KEY)
    n = max(n for n, (t, _, _) in enumerate(a.out) if t.endswith("br1/data"))
    topic, payload, retain = a.out[n]
    a.out[n] = (topic, payload.replace(b'"values":[1.0,', b'"values":[9.0,', 1), retain)
    assert run(a).ok, "without the key nothing follows the last segment to give it away"
    assert unexplained(run(a, KEY)) == ["bad_mac br1/data 10"]


def test_a_replayed_message_is_a_replay() -> None:
    a = clean_run()
    a.out.append(a.out[5])
    report = run(a)
    i = json.loads(a.out[5][1])["chain"]["i"]
    assert unexplained(report) == [f"replay {chain.parse(a.out[5][1]).link.stream} {i}"]
    assert report.duplicates[0].lines == (6, len(a.out))


def test_a_resend_after_a_reconnect_is_explained() -> None:
    a = clean_run()
    a.status("offline", "100.1")
    a.status("online", "100.2")
    a.out.append(a.out[-4])  # paho re-sends an unacknowledged message after the new online status
    report = run(a)
    assert report.ok, unexplained(report)
    assert "re-sent after reconnect, session 100.2" in str(report.duplicates[0].cause)


def test_a_copy_before_the_new_session_or_within_one_session_is_a_replay() -> None:
    a = clean_run()
    a.out.append(a.out[-2])  # a copy before the reconnect
    a.status("online", "100.1")  # the same session announced again: not a reconnect
    a.out.append(a.out[-3])
    report = run(a)
    assert [d.cause for d in report.duplicates] == [None, None]


def test_a_duplicate_covered_by_a_recorded_buffer_replay_is_explained() -> None:
    a = clean_run()
    a.out.append(a.out[3])
    seg = chain.parse(a.out[3][1])
    replayed = {"segments": [{"stream": seg.link.stream, "first_i": 0, "last_i": 5}]}
    audit = {"action": "buffer_replay", "target": "buffer.db", "actor": "alice", "reason": "lost at MES"}
    a.event("audit", {**audit, "extra": replayed}, audit=True)
    report = run(a)
    assert report.ok, unexplained(report)
    assert "buffer replay" in str(report.duplicates[0].cause)


def test_a_forged_insert_at_an_existing_i_is_found() -> None:
    a = clean_run()
    forger = FakeAgent(seq=10_000, heads={"br1/data": (3, "f" * 64)})  # no way to know the real prev
    forger.data("br1")
    a.out.insert(len(a.out) - 3, forger.out[0])
    report = run(a)
    assert unexplained(report) == ["inserted br1/data 3"]


def test_a_forged_insert_at_the_end_reusing_seqs_is_a_seq_conflict() -> None:
    a = clean_run()
    forger = FakeAgent(seq=30, ts=T0 + 40 * SECOND, heads=dict(a.heads))  # copies the head it saw
    forger.data("br1")
    a.out.extend(forger.out)
    report = run(a)
    assert unexplained(report) == ["seq_conflict None None"]
    assert report.breaks[0].lines[0] == len(a.out) and "seqs 30..32 of line" in report.breaks[0].detail


def test_a_forged_insert_without_the_key_has_no_valid_mac() -> None:
    a = clean_run(key=KEY)
    forger = FakeAgent(seq=a.seq, ts=a.ts, heads=dict(a.heads))
    forger.data("br1")
    a.out.extend(forger.out)
    assert run(a).ok, "a forger who saw the chain can extend it: only the MAC stops him"
    assert unexplained(run(a, KEY)) == ["missing_mac br1/data 11"]
    forger = FakeAgent(key=b"x" * 32, seq=a.seq + 3, ts=a.ts, heads=dict(a.heads))
    a.out[-1] = forger.out[0] if forger.data("br1") else a.out[-1]
    assert unexplained(run(a, KEY)) == ["bad_mac br1/data 11"]


@pytest.mark.parametrize("forger_key", [None, b"x" * 32])
def test_with_the_key_a_status_not_signed_with_it_explains_no_resend(forger_key: bytes | None) -> None:
    a = clean_run(key=KEY)
    forger = FakeAgent(key=forger_key)
    forger.status("online", "100.2")  # a forged reconnect, to pass off the copy below as a re-send
    a.out.extend(forger.out)
    a.out.append(a.out[-3])
    assert run(a).ok, "without the key nothing tells the forged status apart"
    report = run(a, KEY)
    assert unexplained(report) == ["status_bad_mac None None", "replay br1/data 10"]
    assert report.breaks[0].lines == (len(a.out) - 1,) and report.sessions == ("100.1",)
    assert ("unsigned" if forger_key is None else "not the key's") in report.breaks[0].detail


def test_an_older_session_announced_again_explains_no_copy() -> None:
    a = clean_run()
    a.status("online", "100.2")
    a.out.append(a.out[-2])  # a re-send after the reconnect to session 100.2: explained
    a.status("online", "100.1")  # an old online re-published (a replayed status): not a reconnect
    a.out.append(a.out[-2])
    report = run(a)
    assert [d.cause is None for d in report.duplicates] == [False, True]


def test_with_the_key_a_signed_status_explains_a_resend() -> None:
    a = clean_run(key=KEY)
    a.status("offline", "100.1")
    a.status("online", "100.2")
    a.out.append(a.out[-4])
    report = run(a, KEY)
    assert report.ok, unexplained(report)
    assert report.sessions == ("100.1", "100.2") and "session 100.2" in str(report.duplicates[0].cause)


def key_change_run(audit_key: bytes = KEY) -> FakeAgent:
    """A backlog stored before the key was configured, sent after the restart that enabled it: the
    buffer recorded from which i each stream is signed (``integrity_key_change``, signed itself)."""
    a = FakeAgent()
    a.event("audit", {"action": "agent_start", "target": "agent"}, audit=True)
    for _ in range(4):
        a.data("br1")
        a.data("br2")
    signed_from = {stream: i for stream, (i, _) in a.heads.items()}
    a.key = audit_key
    change = {"action": "integrity_key_change", "target": "buffer", "actor": "agent:gw-1", "old": None,
              "new": chain.key_id(KEY), "signed_from": signed_from}  # fmt: skip
    a.event("audit", change, audit=True)
    a.key = KEY
    for _ in range(3):
        a.data("br1")
        a.data("br2")
    a.status("online", "200.1")
    a.out.insert(0, a.out.pop())  # the new run's online came first
    return a


def test_a_backlog_from_before_the_key_is_unchecked_not_a_failure() -> None:
    a = key_change_run()
    report = run(a, KEY)
    assert report.ok, unexplained(report)
    assert {s.stream: s.mac_unchecked for s in report.streams} == {
        "br1/data": 4,
        "br2/data": 4,
        "agent/audit": 1,
    }
    assert report.mac_unchecked == 9
    forger = FakeAgent(seq=a.seq, ts=a.ts, heads=dict(a.heads))
    forger.data("br1")
    a.out.extend(forger.out)
    assert unexplained(run(a, KEY)) == ["missing_mac br1/data 7"], "from signed_from on, a MAC is required"


def test_an_altered_backlog_segment_still_breaks_the_chain() -> None:
    a = key_change_run()
    n = [n for n, (t, _, _) in enumerate(a.out) if t.endswith("br1/data")][1]
    topic, payload, retain = a.out[n]
    a.out[n] = (topic, payload.replace(b'"values":[1.0,', b'"values":[9.0,', 1), retain)
    assert unexplained(run(a, KEY)) == ["altered br1/data 1"]


def test_a_key_change_not_signed_with_the_key_exempts_nothing() -> None:
    report = run(key_change_run(audit_key=b"x" * 32), KEY)
    found = unexplained(report)
    assert found.count("bad_mac agent/audit 1") == 1 and len(found) == 10, found
    assert {f.split()[0] for f in found} == {"missing_mac", "bad_mac"} and report.mac_unchecked == 0


def test_a_message_moved_to_another_topic_is_found() -> None:
    a = clean_run()
    _, payload, retain = a.out[4]
    a.out[4] = (f"{PREFIX}/br9/data", payload, retain)
    report = run(a)
    assert unexplained(report) == [f"moved {chain.parse(payload).link.stream} {chain.parse(payload).link.i}"]


def test_an_explicit_prefix_finds_segments_published_elsewhere() -> None:
    a = clean_run()
    assert verify_capture(a.messages(), prefix=PREFIX).ok
    report = verify_capture(a.messages(), prefix="site/plant")
    assert {b.kind for b in report.breaks} == {"moved"}
    assert len(report.breaks) == sum(1 for t, _, _ in a.out if "/agent/status/" not in t)


def test_garbage_and_another_agents_segments_are_breaks() -> None:
    a = clean_run()
    a.out.append((f"{PREFIX}/br1/data", b'{"values": [1]}', False))
    other = FakeAgent(seq=5000)
    other.data("br1")
    a.out.append((other.out[0][0], other.out[0][1].replace(b'"gw-1"', b'"gw-2"'), False))
    report = run(a)
    assert unexplained(report) == ["malformed None None", "foreign_agent br1/data 0"]


def test_an_empty_capture_fails() -> None:
    assert unexplained(verify_capture([])) == ["empty None None"]


# --------------------------------------------------------------------------- explained gaps


def test_an_overflow_loss_explains_its_segments_and_seqs() -> None:
    a = clean_run(polls=3)
    lost_from = a.seq
    a.data("br1")
    a.data("br1")
    del a.out[-2:]  # dropped by the buffer before they were sent
    segments = [{"stream": "br1/data", "first_i": 4, "last_i": 5}]
    loss = {"reason": "buffer_full", "readings": 6, "rows": 2, "events": 0, "records": None,
            "first_seq": lost_from, "last_seq": a.seq - 1, "first_ts": None, "last_ts": None,
            "seqs": [[lost_from, a.seq - 1]], "segments": segments}  # fmt: skip
    a.event("data_loss", loss)
    for _ in range(3):
        a.data("br1")
        a.data("br2", groups=("process", "status"))
    report = run(a)
    assert report.ok, unexplained(report)
    causes = {(g.kind, g.first, g.last): g.cause for g in report.gaps}
    assert causes[("segments", 4, 5)] is not None and "buffer_full" in causes[("segments", 4, 5)]
    assert "buffer_full" in str(causes[("seqs", lost_from, lost_from + 5)])


def test_a_loss_explains_only_the_seqs_it_names() -> None:
    a = clean_run(polls=3)
    first = a.seq
    a.data("br1")
    a.data("br1")
    del a.out[-2:]
    a.event("data_loss", {"reason": "not_committed", "first_seq": first, "last_seq": first + 2})
    for _ in range(2):
        a.data("br1")
        a.data("br2")
    report = run(a)
    assert unexplained(report) == ["gap segments br1/data 4..5", f"gap seqs agent {first + 3}..{first + 5}"]


def test_a_seq_skip_explains_unused_seqs() -> None:
    a = clean_run(polls=3)
    a.event("seq_skip", {"first_seq": a.seq + 1, "last_seq": a.seq + 100, "reason": "window_skipped"})
    a.seq += 100
    for _ in range(3):
        a.data("br1")
        a.data("br2")
    assert run(a).ok


@pytest.mark.parametrize(
    "explanation",
    ["none", "agent_restart", "stop_start", "device_state", "clock_step"],
)
def test_a_time_gap_needs_a_recorded_cause(explanation: str) -> None:
    a = clean_run(polls=5)
    gap_from = a.ts
    a.ts += 30 * SECOND
    if explanation == "agent_restart":
        a.event(
            "agent_restart", {"unclean": True, "from_ts": gap_from, "until_ts": a.ts - SECOND, "last_seq": 1}
        )
    elif explanation == "stop_start":
        a.event("audit", {"action": "agent_stop", "target": "agent"}, audit=True)
        a.event("audit", {"action": "agent_start", "target": "agent"}, audit=True)
    elif explanation == "device_state":
        a.ts -= 20 * SECOND
        a.event("device_state", {"state": "disconnected", "reason": "timeout"}, device="br1")
        a.event("device_state", {"state": "disconnected", "reason": "timeout"}, device="br2")
        a.ts += 20 * SECOND
    elif explanation == "clock_step":
        a.event("clock_step", {"step_s": 30.0, "wall_before_ns": gap_from, "wall_after_ns": a.ts})
    for _ in range(3):
        a.data("br1")
        a.data("br2", groups=("process", "status"))
    report = run(a)
    time_gaps = [g for g in report.gaps if g.kind == "time"]
    assert [g.where for g in time_gaps] == ["br1/process", "br2/process", "br2/status"]
    if explanation == "none":
        assert all(g.cause is None for g in time_gaps) and not report.ok
    else:
        assert report.ok, unexplained(report)


def test_jitter_below_the_threshold_is_no_gap() -> None:
    a = clean_run(polls=5)
    a.data("br1", step_s=1.9)  # above 3x? no: the median is 1 s, and 2 s is the floor
    a.data("br1")
    assert not [g for g in run(a).gaps if g.kind == "time"]


def test_a_chain_restart_needs_a_buffer_corrupt_loss() -> None:
    a = clean_run(polls=3)
    a.heads.clear()  # the damaged buffer was moved aside: every stream starts afresh
    a.data("br1")
    a.data("br2")
    a.data("br1")
    report = run(a)
    assert "gap restart br1/data 3..0" in unexplained(report)
    a.event("data_loss", {"reason": "buffer_corrupt", "detail": "buffer.db.corrupt-x"})
    report = run(a)
    assert report.ok, unexplained(report)


@pytest.mark.parametrize("last_seq_known", [True, False])
def test_a_buffer_corrupt_loss_explains_the_seqs_below_the_fresh_buffer(last_seq_known: bool) -> None:
    a = clean_run(polls=3)
    lost = a.seq
    a.data("br1")
    a.data("br2")
    del a.out[-2:]  # in the damaged file, never sent
    a.heads.clear()
    last_seq = a.seq - 1 if last_seq_known else None  # the fresh buffer's first seq - 1
    a.event("data_loss", {"reason": "buffer_corrupt", "detail": "buffer.db.corrupt-x", "first_seq": None,
                          "last_seq": last_seq})  # fmt: skip
    for _ in range(3):
        a.data("br1")
        a.data("br2")
    report = run(a)
    seq_gaps = [(g.first, g.last, g.cause) for g in report.gaps if g.kind == "seqs"]
    if last_seq_known:
        assert report.ok, unexplained(report)
        assert seq_gaps == [(lost, lost + 5, "data_loss buffer_corrupt (line 12)")]
    else:
        assert unexplained(report) == [f"gap seqs agent {lost}..{lost + 5}"]


def test_a_recorded_quarantine_explains_its_gap_and_still_fails() -> None:
    a = clean_run(polls=3)
    s = a.seq
    a.data("br1")
    del a.out[-1]
    a.event("data_loss", {"reason": "quarantined", "seqs": [[s, s + 2]],
                          "segments": [{"stream": "br1/data", "first_i": 4, "last_i": 4}]})  # fmt: skip
    a.data("br1")
    a.data("br2")
    report = run(a)
    assert unexplained(report) == ["quarantined br1/data 4"], "a quarantine is a loss: verify fails"
    assert [g.cause for g in report.gaps if g.kind == "segments"] == ["data_loss quarantined (line 12)"]
    assert [g.cause for g in report.gaps if g.kind == "seqs"] == ["data_loss quarantined (line 12)"]


# --------------------------------------------------------------------------- the capture file


def test_capture_lines_round_trip_text_and_binary(tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(
        encode_line("a/b", "é".encode(), 1, True, 12.5) + "\n" + encode_line("a/c", b"\xff\x00", 0, False, 13)
    )
    msgs = read_capture(path)
    assert [(m.line, m.topic, m.payload, m.qos, m.retain, m.time) for m in msgs] == [
        (1, "a/b", "é".encode(), 1, True, 12.5),
        (3, "a/c", b"\xff\x00", 0, False, 13.0),
    ]
    assert '"payload":{"base64":"/wA="}' in path.read_text()


@pytest.mark.parametrize(
    ("line", "error"),
    [
        ("not json", "line 1: Expecting value"),
        ("[]", "line 1: not a JSON object"),
        ('{"topic": "a"}', "line 1: missing payload, qos, retain, time"),
        ('{"topic": "a", "payload": 3, "qos": 1, "retain": false, "time": 1}', "payload must be text"),
        ('{"topic": "a", "payload": {"base64": "@@"}, "qos": 1, "retain": false, "time": 1}', "not base64"),
        ('{"topic": "a", "payload": "", "qos": 3, "retain": false, "time": 1}', "qos must be 0, 1 or 2"),
        ('{"topic": "a", "payload": "", "qos": 1, "retain": 1, "time": 1}', "retain must be true or false"),
        ('{"topic": "a", "payload": "", "qos": 1, "retain": true, "time": "x"}', "time must be a number"),
    ],
)
def test_a_bad_capture_line_is_named(tmp_path: Path, line: str, error: str) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text(line + "\n")
    with pytest.raises(CaptureError, match=error):
        read_capture(path)


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """``cleanroom-agent verify ARGS`` in this process: exit code and output."""

    def run_cli(*args: str) -> Result:
        code = main(["verify", *args])
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run_cli


def test_cli_exit_codes_text_and_json(tmp_path: Path, cli: Callable[..., Result]) -> None:
    keyfile = tmp_path / "key"
    keyfile.write_bytes(KEY + b"\n")
    a = clean_run(key=KEY)
    good = a.write(tmp_path / "good.jsonl")
    ok = cli("--capture", str(good), "--key", str(keyfile))
    assert ok.returncode == 0, ok.stderr
    assert "OK: complete, unaltered" in ok.stdout and "br2/data" in ok.stdout
    a.out.append(a.out[4])
    bad = a.write(tmp_path / "bad.jsonl")
    failed = cli("--capture", str(bad), "--json")
    assert failed.returncode == 1
    doc = json.loads(failed.stdout)
    assert doc["ok"] is False and doc["problems"] == 1
    assert doc["duplicates"][0]["cause"] is None and doc["duplicates"][0]["lines"] == [5, len(a.out)]
    text = cli("--capture", str(bad))
    assert text.returncode == 1 and "REPLAYED" in text.stdout and "FAILED: 1 unexplained" in text.stdout


def test_cli_bad_input_is_exit_2_and_never_quotes_the_key(tmp_path: Path, cli: Callable[..., Result]) -> None:
    short = tmp_path / "key"
    short.write_bytes(b"secret-but-short")
    good = clean_run().write(tmp_path / "c.jsonl")
    r = cli("--capture", str(good), "--key", str(short))
    assert (
        r.returncode == 2
        and "at least 32 bytes" in r.stderr
        and "secret-but-short" not in r.stderr + r.stdout
    )
    r = cli("--capture", str(tmp_path / "missing.jsonl"))
    assert r.returncode == 2 and "missing.jsonl" in r.stderr and "Traceback" not in r.stderr
    (tmp_path / "bad.jsonl").write_text("{\n")
    r = cli("--capture", str(tmp_path / "bad.jsonl"))
    assert r.returncode == 2 and "line 1" in r.stderr
    r = cli("--buffer", str(tmp_path / "c.jsonl"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
