"""``report batch``: the exception report over a real buffer file (written through the store, as the
agent commits) and over a capture of the same segments: it lists exactly the injected exceptions,
a clean batch says "none" everywhere, and every bad input is one line and exit code 2."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import TypeAdapter

from agent.app.batches import BatchRegistry
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.audit import Auditor
from agent.buffer.config import BufferConfig
from agent.cli import main
from agent.core.batch import BatchSource
from agent.core.events import DeviceConnected, DeviceDisconnected
from agent.core.records import Block, Event, Quality, Severity
from agent.integrity.capture import encode_line
from agent.review.exceptions import BatchReport
from agent.review.render_json import as_dict

AGENT = "gw-report"
MIN = 60 * 1_000_000_000
T0 = 1_780_000_000_000_000_000
TAGS = ("temp", "ph")
DEVICES = ("br1", "inc1", "pc1", "br2")


def block(device: str, ts: int, temp: float | None) -> Block:
    if device == "pc1":
        return Block(device, "records", ts, ("count_0_5um",), ("count",), [temp])
    bad = temp is None
    return Block(
        device, "process", ts, TAGS, ("degC", "pH"), [temp, None if bad else 7.2],
        quality=[Quality.BAD] * 2 if bad else None, reasons=["not_connected"] * 2 if bad else None,
    )  # fmt: skip


def excursion(device: str, start: int, end: int, tag: str = "temp", kind: str = "high") -> list[Event]:
    common = {"tag": tag, "limit_kind": kind, "level": "action", "limit": 37.5, "start_ts": start}
    if kind.startswith("particles"):
        common["state"] = "in_operation"
    return [
        Event(device, "excursion", Severity.ALARM, {**common, "phase": "start", "value": 38.2, "peak": 38.2},
              ts_ns=start),
        Event(device, "excursion", Severity.INFO, {**common, "phase": "end", "value": 37.0, "peak": 38.9,
                                                   "end_ts": end, "duration_s": (end - start) / 1e9},
              ts_ns=end),
    ]  # fmt: skip


class Plant:
    """A minute-by-minute timeline through the agent's own parts: the batch changes made by its
    :class:`BatchRegistry`, audited by its :class:`Auditor`, every record submitted to a real
    :class:`AsyncBuffer` that stamps it with the registry's ref, as the agent is wired."""

    def __init__(self, buf: AsyncBuffer) -> None:
        self.buf = buf
        self.now = T0
        self.auditor = Auditor(self.submit, AGENT)
        self.registry = BatchRegistry(DEVICES, {"line": ["br1", "inc1", "pc1"]}, self.submit, self.auditor,
                                      clock=lambda: self.now)  # fmt: skip
        buf.set_batch_resolver(self.registry.resolve)

    def submit(self, e: Event) -> None:
        """Audit records and conflicts take the timeline's time (they are stamped with the wall clock)."""
        if e.kind in ("audit", "batch_conflict"):
            e.ts_ns = self.now
        self.buf.submit(events=[e])


async def fill(path: Path, dirty: bool) -> None:
    """br1, inc1 and pc1 (one group) in batch B-1 from T0 to T0+40 min, a step at T0+20 min, br2
    in B-2 from T0+45 min on; readings every minute from 10 min before to 10 min after. ``dirty``
    injects exactly: an excursion of br1 and one of pc1, an alarm of inc1, an outage of br1, a
    refused start and a device's conflicting claim on br1, an operator's replay, a model load for
    br1; and outside the batch (before it, after it, on br2) exceptions that must not be listed."""
    buf = AsyncBuffer(BufferConfig(path=path, synchronous="off", commit_interval=0.001), AGENT)
    await buf.open()
    plant = Plant(buf)
    reg, audit, cli = plant.registry, plant.auditor, BatchSource.CLI
    plant.now = T0 - 30 * MIN
    audit.record("config_change", "agent", reason="configuration changed since the last start")
    for m in range(-10, 51):
        ts = plant.now = T0 + m * MIN
        if m == 0:
            assert reg.start(["br1"], "B-1", coi_id="COI-7", product="CAR-T", source=cli, actor="alice",
                             reason="start per MBR").ok  # fmt: skip
        if m == 20:
            assert reg.step("inc1", "expansion", source=cli, actor="alice", reason="step per MBR").ok
        if m == 40:
            assert reg.end("br1", source=cli, actor="alice", reason="harvested").ok
        if m == 45:  # still running when the input ends
            assert reg.start(["br2"], "B-2", source=cli, actor="carol", reason="next lot").ok
        outage = dirty and 25 <= m <= 27
        temp = 38.5 if dirty and 5 <= m <= 8 else 37.0
        blocks = [block("br1", ts, None if outage else temp), block("inc1", ts, 37.0),
                  block("pc1", ts, 5000.0 if dirty and m == 30 else 100.0),
                  block("br2", ts, 39.0 if dirty and 10 <= m <= 12 else 37.0)]  # fmt: skip
        events: list[Event] = []
        if dirty and m == -8:
            events += excursion("br1", ts - MIN, ts)
        if dirty and m == 9:
            events += excursion("br1", T0 + 5 * MIN, ts)
        if dirty and m == 31:
            events += excursion("pc1", T0 + 30 * MIN, ts, "count_0_5um", "particles_0.5um")
        if dirty and m == 13:
            events += excursion("br2", T0 + 10 * MIN, ts)
            events.append(
                Event("br2", "alarm", Severity.ALARM, {"event_id": "b2", "condition": "Door"}, ts_ns=ts)
            )
        if dirty and m == 10:
            alarm = {"event_id": "a1", "condition": "TemperatureLow", "source": "Incubator", "message": "low",
                     "severity_ua": 700, "active": True, "acked": False}  # fmt: skip
            events += [
                Event("inc1", "alarm", Severity.ALARM, alarm, ts_ns=ts) for _ in "ab"
            ]  # a refresh repeats it
        if dirty and m == 25:
            events.append(DeviceDisconnected("timeout", "no answer").event("br1"))
        if dirty and m == 28:
            events.append(DeviceConnected("timeout").event("br1"))
        for e in events:
            if e.kind == "device_state":
                e.ts_ns = ts
        buf.submit(blocks, events)
        if dirty and m == 15:
            assert not reg.start(["br1"], "B-2", source=BatchSource.MQTT, actor="mes", reason="next lot").ok
        if dirty and m == 16:
            reg.conflict("br1", source=BatchSource.DEVICE, claimed={"batch_id": "X-1"},
                         detail="the device reports batch X-1")  # fmt: skip
        if dirty and m == 30:
            audit.record("buffer_replay", "buffer", actor="bob", reason="the historian lost an hour")
        if dirty and m == 32:
            audit.record("model_load", "bioreactor-pca", reason="reload", device="br1")
            audit.record("model_load", "bioreactor-pca", reason="reload", device="br2")
        await buf.flush()
    await buf.close()


def write_buffer(path: Path, dirty: bool) -> Path:
    asyncio.run(fill(path, dirty))
    return path


@pytest.fixture(scope="module")
def buffers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("report")
    return {"dirty": write_buffer(d / "dirty.db", True), "clean": write_buffer(d / "clean.db", False)}


def report(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main(["report", "batch", *args])
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.fixture(scope="module")
def dirty_json(buffers: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("json") / "r.json"
    assert main(["report", "batch", "B-1", "--buffer", str(buffers["dirty"]), "--format", "json",
                 "--out", str(out)]) == 0  # fmt: skip
    doc: dict[str, Any] = json.loads(out.read_text())
    return doc


EXCEPTION_SECTIONS = ("excursions", "alarms", "anomalies", "gaps", "changes", "operator_actions", "conflicts")


def test_a_batch_with_injected_faults_lists_exactly_those(dirty_json: dict[str, Any]) -> None:
    r = dirty_json
    h = r["header"]
    assert (h["batch_id"], h["coi_id"], h["product"]) == ("B-1", "COI-7", "CAR-T")
    assert (h["devices"], h["start_ts"], h["end_ts"]) == (["br1", "inc1", "pc1"], T0, T0 + 40 * MIN)
    br1 = [c for c in h["changes"] if c["device"] == "br1"]
    assert [(c["phase"], c["step"], c["ts"], c["actor"], c["reason"]) for c in br1] == [
        ("start", None, T0, "alice", "start per MBR"),
        ("step", "expansion", T0 + 20 * MIN, "alice", "step per MBR"),
        ("end", "expansion", T0 + 40 * MIN, "alice", "harvested"),
    ]  # fmt: skip
    assert [(x["device"], x["tag"], x["start_ts"], x["end_ts"], x["peak"]) for x in r["excursions"]] == [
        ("br1", "temp", T0 + 5 * MIN, T0 + 9 * MIN, 38.9),
        ("pc1", "count_0_5um", T0 + 30 * MIN, T0 + 31 * MIN, 38.9),
    ]
    assert [x["classification"] for x in r["excursions"]] == [None, None]  # no limits configuration given
    assert [(a["device"], a["condition"]) for a in r["alarms"]] == [("inc1", "TemperatureLow")]
    assert [(g["kind"], g["device"], g["from_ts"], g["to_ts"], g["cause"]) for g in r["gaps"]] == [
        ("device_outage", "br1", T0 + 25 * MIN, T0 + 28 * MIN, "device disconnected (timeout)")
    ]
    assert [(c["kind"], c["device"], c["ts"]) for c in r["changes"]] == [("model_load", "br1", T0 + 32 * MIN)]
    assert [(a["action"], a["actor"]) for a in r["operator_actions"]] == [("buffer_replay", "bob")]
    assert [(c["kind"], c["device"], c["source"], c["actor"]) for c in r["conflicts"]] == [
        ("batch_refused", "br1", "mqtt", "mes"),
        ("batch_conflict", "br1", "device", None),  # the device's claim, the assignment kept
    ]
    assert r["anomalies"] == []
    assert r["reference_samples"]["recorded"] is False
    assert "none recorded" in r["reference_samples"]["note"]
    assert r["integrity"]["ok"] and r["integrity"]["findings"] == []
    plot = r["plots"][0]
    assert plot["limit"] == 37.5 and max(plot["values"]) == 38.5 and plot["unit"] == "degC"


def test_records_outside_the_batch_are_not_counted(dirty_json: dict[str, Any]) -> None:
    """40 polls each in the batch (before the start, after the end and br2 are not the batch's);
    br1's 3 polls during the outage are its bad readings."""
    counts = {c["device"]: (c["readings"], c["bad"], c["events"]) for c in dirty_json["records"]}
    # events: the start and the step (the end is stamped null), and what happened in the batch
    assert counts == {"br1": (80, 6, 7), "inc1": (80, 0, 4), "pc1": (40, 0, 4)}


def test_json_has_its_documented_shape(dirty_json: dict[str, Any]) -> None:
    """Read back into the report's types and written again, nothing is lost or added."""
    parsed = TypeAdapter(BatchReport).validate_python(dirty_json)
    assert json.loads(json.dumps(as_dict(parsed))) == dirty_json


def test_a_clean_batch_says_none_in_every_exception_section(
    buffers: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, _ = report(capsys, "B-1", "--buffer", str(buffers["clean"]), "--format", "json")
    doc = json.loads(out)
    assert rc == 0 and all(doc[s] == [] for s in EXCEPTION_SECTIONS) and doc["integrity"]["ok"]
    rc, out, _ = report(capsys, "B-1", "--buffer", str(buffers["clean"]))
    assert rc == 0
    for title in ("Limit excursions", "Excursion plots", "Device alarms", "Anomalies", "Data gaps",
                  "Configuration, model and limits changes", "Operator actions",
                  "Batch conflicts and refused commands"):  # fmt: skip
        assert f'<h2>{title}</h2><p class="none">none</p>' in out.replace("&#x27;", "'"), title
    assert "none recorded" in out and "chain intact" in out and "Sign-off" in out


def test_html_is_self_contained_and_pdf_is_a_pdf(
    buffers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc, html, _ = report(capsys, "B-1", "--buffer", str(buffers["dirty"]), "--format", "html")
    assert rc == 0
    assert "http://" not in html and "https://" not in html and "<script" not in html
    assert html.count('src="data:image/png;base64,') == 2  # one plot per excursion
    pdf = tmp_path / "r.pdf"
    assert main(["report", "batch", "B-1", "--buffer", str(buffers["dirty"]), "--format", "pdf",
                 "--out", str(pdf)]) == 0  # fmt: skip
    assert pdf.read_bytes().startswith(b"%PDF")


def test_from_a_capture_the_report_is_the_same(
    buffers: dict[str, Path], dirty_json: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with sqlite3.connect(buffers["dirty"]) as conn:
        rows = conn.execute("SELECT stream, payload FROM segments ORDER BY id").fetchall()
    cap = tmp_path / "cap.jsonl"
    cap.write_text(
        "".join(encode_line(f"plant/{s}", bytes(p), 1, False, 1.0 + n) for n, (s, p) in enumerate(rows))
    )
    rc, out, err = report(capsys, "B-1", "--capture", str(cap), "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    for section in ("header", "records", "excursions", "alarms", "gaps", "changes", "operator_actions"):
        assert doc[section] == dirty_json[section], section
    assert doc["integrity"]["verifier"] == "capture" and doc["integrity"]["ok"]


def test_through_the_config_while_a_writer_holds_the_buffer(
    buffers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``-c``: the configured buffer, read beside a writer in the middle of a transaction (the
    running agent), never changed; the limits configuration gives the counter's room its grade."""
    db = tmp_path / "buffer.db"
    db.write_bytes(buffers["dirty"].read_bytes())
    config = tmp_path / "agent.yaml"
    config.write_text(
        f"""agent: {{id: {AGENT}}}
buffer: {{path: buffer.db}}
devices:
  - {{id: pc1, profile: particle-counter-sim-modbus, connection: {{host: 127.0.0.1, port: 1502}}}}
limits:
  particles:
    - {{device: pc1, grade: A, tag_0_5: count_0_5um, tag_5_0: count_5_0um, state: in_operation}}
"""
    )
    before = db.read_bytes()
    writer = sqlite3.connect(db, isolation_level=None)
    try:
        writer.execute("BEGIN IMMEDIATE")
        writer.execute("INSERT INTO meta(key, value) VALUES ('uncommitted', 'x')")
        rc, out, err = report(capsys, "B-1", "-c", str(config), "--format", "json")
        writer.execute("ROLLBACK")
    finally:
        writer.close()
    assert rc == 0, err
    classes = [(x["device"], x["classification"]) for x in json.loads(out)["excursions"]]
    assert classes == [("br1", None), ("pc1", "Annex 1 grade A (in operation)")]
    assert db.read_bytes() == before


@pytest.mark.parametrize(("stream", "concerns"), [("br1/data", True), ("br2/data", False)])
def test_integrity_findings_are_those_of_the_batchs_records(
    buffers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], stream: str, concerns: bool
) -> None:
    """A stored segment altered with the sqlite3 CLI: found by the buffer verifier, and a finding of
    this batch only when the segment holds its records."""
    db = tmp_path / "buffer.db"
    db.write_bytes(buffers["dirty"].read_bytes())
    with sqlite3.connect(db) as conn:
        alter = "UPDATE segments SET payload = CAST(replace(payload, '37.0', '37.1') AS BLOB)"
        conn.execute(f"{alter} WHERE stream = ? AND i = 30", (stream,))
    rc, out, _ = report(capsys, "B-1", "--buffer", str(db), "--format", "json")
    integrity = json.loads(out)["integrity"]
    assert rc == 0 and integrity["input_ok"] is False
    found = [(f["kind"], f["where"], f["first"]) for f in integrity["findings"]]
    assert (integrity["ok"], found) == ((False, [("hash_mismatch", stream, 30)]) if concerns else (True, []))


def test_a_capture_that_begins_inside_the_batch(
    buffers: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The start is not in the capture: the batch is reported from the capture's beginning."""
    with sqlite3.connect(buffers["clean"]) as conn:
        rows = conn.execute(
            "SELECT stream, payload FROM segments WHERE first_ts > ? ORDER BY id", (T0 + 30 * MIN,)
        ).fetchall()
    cap = tmp_path / "cap.jsonl"
    cap.write_text("".join(encode_line(f"plant/{s}", bytes(p), 1, False, 1.0) for s, p in rows))
    rc, out, err = report(capsys, "B-1", "--capture", str(cap), "--format", "json")
    assert rc == 0, err
    doc = json.loads(out)
    assert (doc["header"]["start_ts"], doc["header"]["end_ts"]) == (T0 + 31 * MIN, T0 + 40 * MIN)
    assert [c["phase"] for c in doc["header"]["changes"]] == ["end"] * 3
    assert {c["device"]: c["readings"] for c in doc["records"]} == {"br1": 18, "inc1": 18, "pc1": 9}


def test_an_unknown_batch_lists_the_known_ones(
    buffers: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    rc, out, err = report(capsys, "B-9", "--buffer", str(buffers["clean"]), "--format", "json")
    assert (rc, out) == (2, "")
    assert "batch 'B-9' is not in this input; batches it holds: B-1, B-2" in err


def test_a_batch_still_running_is_open(buffers: dict[str, Path], capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, _ = report(capsys, "B-2", "--buffer", str(buffers["clean"]), "--format", "json")
    doc = json.loads(out)
    assert rc == 0 and (doc["header"]["start_ts"], doc["header"]["end_ts"]) == (T0 + 45 * MIN, None)
    assert [(c["device"], c["readings"]) for c in doc["records"]] == [("br2", 12)]  # 6 polls so far
    rc, out, _ = report(capsys, "B-2", "--buffer", str(buffers["clean"]))
    assert rc == 0 and "open (no end recorded)" in out


def test_without_matplotlib_html_and_pdf_name_the_extra(
    buffers: dict[str, Path], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    for fmt in ("html", "pdf"):
        rc, out, err = report(capsys, "B-1", "--buffer", str(buffers["clean"]), "--format", fmt)
        assert (rc, out) == (2, "") and "pip install 'cleanroom-edge[report]'" in err
        assert "Traceback" not in err
    rc, _, _ = report(capsys, "B-1", "--buffer", str(buffers["clean"]), "--format", "json")
    assert rc == 0


@pytest.mark.parametrize(
    ("name", "content", "flag", "message"),
    [
        ("missing.db", None, "--buffer", "no buffer database at"),
        ("junk.db", b"this is not sqlite" * 100, "--buffer", "is not a readable cleanroom-edge buffer"),
        ("empty.db", b"", "--buffer", "is not a readable cleanroom-edge buffer"),
        ("bad.jsonl", b'{"topic": "x"}\n', "--capture", "line 1: missing payload"),
        ("bin.jsonl", b"\xff\xfe\x00garbage\n", "--capture", "line 1:"),
        ("missing.jsonl", None, "--capture", "No such file"),
        (
            "agent.yaml",
            b"agent: {id: x}\nbuffer: {max_bytes: lots}\n",
            "-c",
            "agent.yaml:2: buffer.max_bytes",
        ),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    content: bytes | None,
    flag: str,
    message: str,
) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    rc, out, err = report(capsys, "B-1", flag, str(path), "--format", "json")
    assert (rc, out) == (2, "") and message in err and "Traceback" not in err, err


@pytest.fixture(scope="module")
def capture_lines(buffers: dict[str, Path]) -> list[str]:
    with sqlite3.connect(buffers["clean"]) as conn:
        rows = conn.execute("SELECT stream, payload FROM segments ORDER BY id LIMIT 40").fetchall()
    return [encode_line(f"plant/{s}", bytes(p), 1, False, 1.0) for s, p in rows]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_damaged_capture_never_raises(
    data: st.DataObject, capture_lines: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lines dropped, duplicated or with bytes changed: a report or a clear error, never a traceback."""
    lines = data.draw(st.lists(st.sampled_from(capture_lines), max_size=12))
    text = "".join(lines)
    if text:
        at = data.draw(st.integers(0, len(text) - 1))
        text = text[:at] + data.draw(st.sampled_from(["", "1", '"', "}", "x", "\\"])) + text[at + 1 :]
    path = tmp_path / "fuzz.jsonl"
    path.write_text(text)
    rc, _, err = report(capsys, "B-1", "--capture", str(path), "--format", "json")
    assert rc in (0, 2) and "Traceback" not in err
