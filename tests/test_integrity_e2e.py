"""Simulator → agent (a real child process) → mosquitto → ``cleanroom-agent capture`` (another real
process) → ``verify --capture``: a clean run verifies clean, every tampering of the capture is
found precisely, and restarts and broker outages are explained from the capture alone."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from paho.mqtt import publish

from agent.app.config import load_config
from agent.app.runtime import Agent
from agent.cli import main
from agent.core import chain
from agent.integrity.capture import encode_line, read_capture
from cleanroom_common.net import free_port
from simulators.servers.modbus import serve_bioreactor_modbus
from tests.support import AgentProcess, Mosquitto, ThreadedSim, refused_port, until, wait_for
from tests.test_failsafe_storage import disk_full

AGENT = "gw-integrity"
KEY = b"0123456789abcdef0123456789abcdef-integrity-e2e"


def write_config(tmp: Path, broker_port: int, sim_port: int, buffer_extra: str = "") -> Path:
    """``buffer_extra``: more ``buffer:`` settings, one per line, indented by two spaces."""
    key = tmp / "hmac.key"
    key.write_bytes(KEY + b"\n")
    key.chmod(0o600)
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        f"""
agent:
  id: {AGENT}
  status_listen: 127.0.0.1:{free_port()}
  shutdown_grace: 5s
integrity:
  hmac_key_file: hmac.key
buffer:
  path: buffer.db
  commit_interval: 50ms
{buffer_extra}mqtt:
  host: 127.0.0.1
  port: {broker_port}
  reconnect_min: 100ms
  reconnect_max: 500ms
devices:
  - id: br1
    profile: bioreactor-sim
    connection: {{host: 127.0.0.1, port: {sim_port}, timeout: 1s, backoff_min: 100ms, backoff_max: 500ms}}
    groups:
      process: {{interval: 200ms}}
      status: {{interval: 200ms}}
      setpoints: {{interval: 1s}}
"""
    )
    return cfg


class CaptureProcess:
    """``cleanroom-agent capture`` as a child process, stopped by SIGTERM as an operator would."""

    def __init__(self, cfg: Path, out: Path) -> None:
        self.out = out
        self.log = out.with_suffix(".log")
        with self.log.open("wb") as log:
            self.proc: subprocess.Popen[bytes] | None = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "capture", "-c", str(cfg), "--out", str(out)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_for(
            lambda: self.running() and "capturing" in self.log.read_text(), timeout=30, what="capture up"
        )

    def running(self) -> bool:
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"capture exited:\n{self.log.read_text()[-2000:]}")
        return True

    def segments(self, stream: str) -> int:
        """Segments of ``stream`` captured so far (distinct chain positions)."""
        positions = set()
        for line in self.out.read_text().splitlines():
            if line.endswith("}") and f"/{stream}" in line:
                with_chain = json.loads(line)["payload"]
                if isinstance(with_chain, str) and '"chain"' in with_chain:
                    positions.add(json.loads(with_chain)["chain"]["i"])
        return len(positions)

    def stop(self) -> int:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(20)
        self.proc = None
        return rc

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


@pytest.fixture
def broker() -> Iterator[Mosquitto]:
    """Sessions survive a broker restart: the capture's queue too, as on a production broker."""
    b = Mosquitto(persistence=True).start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def sim() -> Iterator[ThreadedSim]:
    ts = ThreadedSim(lambda: serve_bioreactor_modbus(port=0, speed=60.0, seed=7))
    with ts:
        yield ts


@pytest.fixture
def procs() -> Iterator[list[AgentProcess | CaptureProcess]]:
    """Every process a test starts, killed at teardown whatever happened."""
    started: list[AgentProcess | CaptureProcess] = []
    yield started
    for p in started:
        p.close()


@pytest.fixture
def run_verify(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, dict[str, Any]]]:
    def verify(*args: str) -> tuple[int, dict[str, Any]]:
        capsys.readouterr()
        rc = main(["verify", *args, "--json"])
        out = capsys.readouterr().out
        return rc, json.loads(out) if out else {}

    return verify


def unexplained(doc: dict[str, Any]) -> list[str]:
    out = [f"{b['kind']} {b['stream']} {b['i']}" for b in doc["breaks"]]
    out += [
        f"gap {g['kind']} {g['where']} {g['first']}..{g['last']}" for g in doc["gaps"] if g["cause"] is None
    ]
    out += [f"replay {d['stream']} {d['i']}" for d in doc["duplicates"] if d["cause"] is None]
    return out


def session(
    tmp_path: Path,
    broker: Mosquitto,
    sim: ThreadedSim,
    procs: list[AgentProcess | CaptureProcess],
    buffer_extra: str = "",
) -> tuple[Path, CaptureProcess, Callable[[], AgentProcess]]:
    cfg = write_config(tmp_path, broker.port, sim.sim.port, buffer_extra)
    capture = CaptureProcess(cfg, tmp_path / "capture.jsonl")
    procs.append(capture)

    def start_agent() -> AgentProcess:
        agent = AgentProcess(cfg, tmp_path / "agent.log").start()
        procs.append(agent)
        return agent

    return cfg, capture, start_agent


def wait_segments(capture: CaptureProcess, agent: AgentProcess, more_than: int) -> int:
    return int(
        wait_for(
            lambda: agent.running() and (n := capture.segments("br1/data")) > more_than and n,
            timeout=60,
            what=f"more than {more_than} br1/data segments captured",
        )
    )


# --------------------------------------------------------------------------- clean run and tampering


def rewrite(src: Path, dst: Path, edit: Callable[[list[str]], None]) -> Path:
    lines = src.read_text().splitlines(keepends=True)
    edit(lines)
    dst.write_text("".join(lines))
    return dst


def data_lines(lines: list[str], stream: str = "br1/data") -> list[int]:
    """Indexes of the lines carrying segments of ``stream``, in capture order."""
    return [n for n, line in enumerate(lines) if json.loads(line)["topic"].endswith("/" + stream)]


def payload(line: str) -> bytes:
    body = json.loads(line)["payload"]
    assert isinstance(body, str)
    return body.encode()


def with_payload(line: str, new: bytes) -> str:
    obj = json.loads(line)
    return encode_line(obj["topic"], new, obj["qos"], obj["retain"], obj["time"])


def test_a_clean_run_verifies_and_every_tampering_is_found(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    broker: Mosquitto,
    sim: ThreadedSim,
    procs: list[AgentProcess | CaptureProcess],
    run_verify: Callable[..., tuple[int, dict[str, Any]]],
) -> None:
    _, capture, start_agent = session(tmp_path, broker, sim, procs)
    agent = start_agent()
    wait_segments(capture, agent, 15)
    assert agent.terminate() == 0
    time.sleep(0.5)  # the last publishes reach the capture
    assert capture.stop() == 0
    good = capture.out
    key = str(tmp_path / "hmac.key")

    rc, doc = run_verify("--capture", str(good), "--key", key)
    assert rc == 0, unexplained(doc)
    assert doc["agent"] == AGENT and doc["mac_checked"] and len(doc["sessions"]) == 1
    assert {"br1/data", "br1/events", "agent/audit"} <= {s["stream"] for s in doc["streams"]}
    rc, buf = run_verify("--buffer", str(tmp_path / "buffer.db"), "--key", key)
    assert rc == 0 and buf["ok"], buf
    with contextlib.closing(sqlite3.connect(tmp_path / "buffer.db")) as db, db:
        db.execute("DELETE FROM segments WHERE stream = 'br1/data' AND i = 3")  # behind the agent's back
    assert main(["verify", "--buffer", str(tmp_path / "buffer.db")]) == 1
    assert "MISSING br1/data i 3: segments removed without a record" in capsys.readouterr().out

    lines = good.read_text().splitlines(keepends=True)
    br1 = data_lines(lines)
    digit = re.compile(r'("values":\[[^\]]*?)(\d)')
    # a segment in the middle with a number among its values (the status group's are booleans)
    mid = next(n for n in br1[len(br1) // 2 : -1] if digit.search(payload(lines[n]).decode()))
    mid_seg = chain.parse(payload(lines[mid]))
    i = mid_seg.link.i

    def delete(ls: list[str]) -> None:
        del ls[mid]

    rc, doc = run_verify("--capture", str(rewrite(good, tmp_path / "deleted.jsonl", delete)), "--key", key)
    first_seq = mid_seg.items[0]["seq"]
    assert rc == 1
    found = unexplained(doc)
    assert found[0] == f"gap segments br1/data {i}..{i}", found
    assert [f for f in found[1:] if f.startswith("gap seqs")], found
    assert any(g["first"] <= first_seq <= g["last"] for g in doc["gaps"] if g["kind"] == "seqs")

    def swap(ls: list[str]) -> None:
        ls[mid], ls[br1[br1.index(mid) + 1]] = ls[br1[br1.index(mid) + 1]], ls[mid]

    rc, doc = run_verify("--capture", str(rewrite(good, tmp_path / "swapped.jsonl", swap)), "--key", key)
    assert rc == 1 and unexplained(doc) == [f"reorder br1/data {i}"]

    def alter(ls: list[str]) -> None:
        text = payload(ls[mid]).decode()
        changed = digit.sub(lambda m: m.group(1) + str((int(m.group(2)) + 1) % 10), text, count=1)
        assert changed != text
        ls[mid] = with_payload(ls[mid], changed.encode())

    altered = rewrite(good, tmp_path / "altered.jsonl", alter)
    rc, doc = run_verify("--capture", str(altered))
    assert rc == 1 and unexplained(doc) == [f"altered br1/data {i}"]
    rc, doc = run_verify("--capture", str(altered), "--key", key)
    assert rc == 1 and unexplained(doc) == [f"bad_mac br1/data {i}", f"altered br1/data {i}"]

    def replay(ls: list[str]) -> None:
        ls.append(ls[mid])

    rc, doc = run_verify("--capture", str(rewrite(good, tmp_path / "replayed.jsonl", replay)), "--key", key)
    assert rc == 1 and unexplained(doc) == [f"replay br1/data {i}"]

    last = chain.parse(payload(lines[br1[-1]]))
    forged = chain.build_payload(
        kind="data", agent=AGENT, device="br1", stream="br1/data", i=last.link.i + 1, prev=last.hash,
        source=last.doc["source"], clock=last.doc["clock"],
        bodies=[json.dumps({**last.items[0], "seq": 10**9, "values": [0] * last.items[0]["n"]})],
    )  # fmt: skip

    def insert(ls: list[str]) -> None:
        ls.append(with_payload(ls[br1[-1]], forged))

    rc, doc = run_verify("--capture", str(rewrite(good, tmp_path / "forged.jsonl", insert)), "--key", key)
    assert rc == 1 and unexplained(doc) == [f"missing_mac br1/data {last.link.i + 1}"]


# --------------------------------------------------------------------------- explained gaps


def time_gap_causes(doc: dict[str, Any]) -> list[str]:
    return [str(g["cause"]) for g in doc["gaps"] if g["kind"] == "time" and g["where"] == "br1/process"]


def test_restarts_sigterm_and_kill_are_explained_from_the_capture(
    tmp_path: Path,
    broker: Mosquitto,
    sim: ThreadedSim,
    procs: list[AgentProcess | CaptureProcess],
    run_verify: Callable[..., tuple[int, dict[str, Any]]],
) -> None:
    _, capture, start_agent = session(tmp_path, broker, sim, procs)
    agent = start_agent()
    n = wait_segments(capture, agent, 5)
    assert agent.terminate() == 0
    time.sleep(3)  # a pause longer than the 2 s floor and 3x the poll interval
    agent = start_agent()
    n = wait_segments(capture, agent, n + 5)
    agent.kill()  # SIGKILL: no agent_stop, committed segments may be unsent
    time.sleep(3)
    agent = start_agent()
    wait_segments(capture, agent, n + 5)
    assert agent.terminate() == 0
    time.sleep(0.5)
    assert capture.stop() == 0

    rc, doc = run_verify("--capture", str(capture.out), "--key", str(tmp_path / "hmac.key"))
    assert rc == 0, unexplained(doc)
    causes = time_gap_causes(doc)
    assert len(causes) == 2, doc["gaps"]
    assert "agent_stop" in causes[0] and "agent_start" in causes[0]
    assert "agent_restart" in causes[1]
    assert len(doc["sessions"]) == 3


def test_a_broker_outage_is_explained_from_the_capture(
    tmp_path: Path,
    broker: Mosquitto,
    sim: ThreadedSim,
    procs: list[AgentProcess | CaptureProcess],
    run_verify: Callable[..., tuple[int, dict[str, Any]]],
) -> None:
    _, capture, start_agent = session(tmp_path, broker, sim, procs)
    agent = start_agent()
    n = wait_segments(capture, agent, 5)
    broker.stop()
    time.sleep(3)  # the agent keeps acquiring; the capture keeps retrying
    broker.start()
    wait_segments(capture, agent, n + 20)
    assert agent.terminate() == 0
    time.sleep(0.5)
    assert capture.stop() == 0
    assert "reconnected" in capture.log.read_text()

    rc, doc = run_verify("--capture", str(capture.out), "--key", str(tmp_path / "hmac.key"))
    assert rc == 0, unexplained(doc)
    assert len(doc["sessions"]) == 2
    assert all(d["cause"] and "re-sent after reconnect" in d["cause"] for d in doc["duplicates"])
    assert not [g for g in doc["gaps"] if g["kind"] == "time"], "the agent kept acquiring"


def causes_of(doc: dict[str, Any], kind: str) -> list[str]:
    return [str(g["cause"]) for g in doc["gaps"] if g["kind"] == kind]


def test_a_buffer_overflow_during_a_broker_outage_is_explained_from_the_capture(
    tmp_path: Path,
    broker: Mosquitto,
    sim: ThreadedSim,
    procs: list[AgentProcess | CaptureProcess],
    run_verify: Callable[..., tuple[int, dict[str, Any]]],
) -> None:
    # a buffer that a few seconds of this device's readings fill
    _, capture, start_agent = session(tmp_path, broker, sim, procs, "  max_bytes: 128KiB\n")
    agent = start_agent()
    n = wait_segments(capture, agent, 5)
    broker.stop()
    log = tmp_path / "agent.log"
    wait_for(lambda: agent.running() and "buffer full" in log.read_text(), timeout=20, what="overflow")
    broker.start()
    wait_for(
        lambda: agent.running() and "buffer_full" in capture.out.read_text(),
        timeout=20,
        what="the buffer_full loss captured",
    )
    wait_segments(capture, agent, n + 5)
    assert agent.terminate() == 0
    time.sleep(0.5)
    assert capture.stop() == 0

    key = str(tmp_path / "hmac.key")
    rc, doc = run_verify("--capture", str(capture.out), "--key", key)
    assert rc == 0, unexplained(doc)
    segment_gaps = [g for g in doc["gaps"] if g["kind"] == "segments" and g["where"] == "br1/data"]
    assert segment_gaps and all("data_loss buffer_full" in g["cause"] for g in segment_gaps), doc["gaps"]
    seq_causes = causes_of(doc, "seqs")
    assert seq_causes and all("data_loss buffer_full" in c for c in seq_causes), doc["gaps"]
    rc, buf = run_verify("--buffer", str(tmp_path / "buffer.db"), "--key", key)
    assert rc == 0 and "buffer_full" in {g["reason"] for g in buf["gaps"]}, buf


@pytest.mark.parametrize("hold_max_records", [20_000, 5], ids=["held", "given-up"])
async def test_a_full_disk_is_explained_from_the_capture(
    tmp_path: Path,
    broker: Mosquitto,
    sim: ThreadedSim,
    procs: list[AgentProcess | CaptureProcess],
    run_verify: Callable[..., tuple[int, dict[str, Any]]],
    hold_max_records: int,
) -> None:
    """The agent in this process, so the test can make its buffer's disk refuse writes (as
    tests/test_failsafe_storage.py does): readings are held, and committed once the disk takes data
    again, or, beyond the hold bound, given up as a ``not_committed`` loss with exact seqs."""
    extra = f"  hold_max_records: {hold_max_records}\n"
    cfg, capture, _ = session(tmp_path, broker, sim, procs, extra)
    agent = Agent(load_config(cfg))
    await agent.start()
    try:
        await until(lambda: capture.segments("br1/data") > 5, within_s=30, what="segments captured")
        await disk_full(agent.buffer, True)
        await until(lambda: agent.buffer.commit_errors >= 3, what="commits refused by the full disk")
        if hold_max_records < 20_000:
            await until(lambda: agent.buffer.shed_readings > 0, what="readings given up")
        else:
            assert (await agent.buffer.stats())["queued_records"] > 0, "held, not lost"
        await disk_full(agent.buffer, False)
        n = capture.segments("br1/data")
        await until(lambda: capture.segments("br1/data") > n + 5, within_s=30, what="segments after")
    finally:
        await agent.stop()
    await asyncio.sleep(0.5)
    assert capture.stop() == 0

    rc, doc = run_verify("--capture", str(capture.out), "--key", str(tmp_path / "hmac.key"))
    assert rc == 0, unexplained(doc)
    seq_causes = causes_of(doc, "seqs")
    if hold_max_records < 20_000:
        assert agent.buffer.shed_readings > 0
        assert seq_causes and all("data_loss not_committed" in c for c in seq_causes), doc["gaps"]
    else:
        assert agent.buffer.shed_readings == 0 and not doc["gaps"], "held readings all committed later"


def test_enabling_the_key_neither_quarantines_nor_fails_the_unsigned_backlog(
    tmp_path: Path,
    broker: Mosquitto,
    sim: ThreadedSim,
    procs: list[AgentProcess | CaptureProcess],
    run_verify: Callable[..., tuple[int, dict[str, Any]]],
) -> None:
    cfg, capture, start_agent = session(tmp_path, broker, sim, procs)
    keyed = cfg.read_text()
    cfg.write_text(keyed.replace("integrity:\n  hmac_key_file: hmac.key\n", ""))
    agent = start_agent()
    n = wait_segments(capture, agent, 5)
    broker.stop()
    time.sleep(1)  # a backlog committed unsigned, and not delivered
    assert agent.terminate() == 0
    cfg.write_text(keyed)
    broker.start()
    agent = start_agent()
    wait_segments(capture, agent, n + 10)
    assert agent.terminate() == 0
    time.sleep(0.5)
    assert capture.stop() == 0

    rc, buf = run_verify("--buffer", str(tmp_path / "buffer.db"), "--key", str(tmp_path / "hmac.key"))
    assert rc == 0 and not buf["quarantined"], buf
    rc, doc = run_verify("--capture", str(capture.out), "--key", str(tmp_path / "hmac.key"))
    unchecked = {s["stream"]: s["mac_unchecked"] for s in doc["streams"]}
    assert unchecked["br1/data"] > n and unchecked["agent/audit"] >= 1, unchecked
    # The first run's status messages are unsigned, but they came before the signed record of the
    # key being configured: no finding (they explain nothing either).
    assert rc == 0, unexplained(doc)
    assert len(doc["sessions"]) == 1


# --------------------------------------------------------------------------- capture's own errors


def capture_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", "capture", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_capture_records_the_five_fields_and_fails_clearly(tmp_path: Path, broker: Mosquitto) -> None:
    cfg = write_config(tmp_path, broker.port, free_port())
    publish.single(
        "cleanroom/x/data", b"\xff\xfe", qos=1, retain=True, hostname="127.0.0.1", port=broker.port
    )
    r = capture_cli("-c", str(cfg), "--out", str(tmp_path / "c.jsonl"), "--duration", "1")
    assert r.returncode == 0, r.stderr
    (msg,) = read_capture(tmp_path / "c.jsonl")
    assert (msg.topic, msg.payload, msg.qos, msg.retain) == ("cleanroom/x/data", b"\xff\xfe", 1, True)
    assert abs(msg.time - time.time()) < 30

    with refused_port() as nothing_there:
        unreachable = write_config(tmp_path, nothing_there, free_port())
        r = capture_cli("-c", str(unreachable), "--out", str(tmp_path / "d.jsonl"), "--duration", "1")
    assert (
        r.returncode == 2
        and "cannot connect to broker 127.0.0.1:" in r.stderr
        and "Traceback" not in r.stderr
    )

    r = capture_cli("-c", str(cfg), "--out", str(tmp_path / "no" / "such" / "dir.jsonl"), "--duration", "1")
    assert r.returncode == 2 and "--out" in r.stderr and "Traceback" not in r.stderr

    nomqtt = tmp_path / "nomqtt.yaml"
    nomqtt.write_text("agent: {id: x}\n")
    r = capture_cli("-c", str(nomqtt), "--out", str(tmp_path / "e.jsonl"))
    assert r.returncode == 2 and "no mqtt section" in r.stderr
