"""The agent as a systemd service: the notify protocol on a real datagram socket, a real agent process
that reports READY, pings the watchdog and says STOPPING, a stalled buffer thread that silences the
pings, and the unit file as systemd itself judges it (``systemd-analyze verify`` and ``security``)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.app.config import load_config
from agent.app.notify import Notifier, NotifyEnv, NotifySetupError, Watchdog
from agent.app.runtime import Agent
from cleanroom_common.net import free_port
from tests.support import AgentProcess, Mosquitto, ThreadedSim, until, wait_for
from tests.test_e2e import write_config

ROOT = Path(__file__).resolve().parent.parent
UNIT = ROOT / "deploy" / "systemd" / "cleanroom-agent.service"
OPERATIONS = ROOT / "docs" / "operations.md"
MAX_EXPOSURE = 2.0


class NotifySocket:
    """What systemd listens on: a datagram socket; every message is kept, split into its lines."""

    def __init__(self, address: str | bytes) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.sock.setblocking(False)
        self.messages: list[tuple[float, list[str]]] = []

    def drain(self) -> list[list[str]]:
        """Read what arrived since the last call (kept in :attr:`messages` too)."""
        new: list[list[str]] = []
        while True:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            new.append(data.decode().split("\n"))
        self.messages.extend((time.monotonic(), m) for m in new)
        return new

    def count(self, line: str) -> int:
        self.drain()
        return sum(line in m for _, m in self.messages)

    def when(self, line: str) -> list[float]:
        self.drain()
        return [t for t, m in self.messages if line in m]

    def statuses(self) -> list[str]:
        self.drain()
        return [x.removeprefix("STATUS=") for _, m in self.messages for x in m if x.startswith("STATUS=")]

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[tuple[str, NotifySocket]]:
    path = str(tmp_path / "notify.sock")
    listener = NotifySocket(path)
    try:
        yield path, listener
    finally:
        listener.close()


# --------------------------------------------------------------------------- the protocol


def test_environment_is_read_as_systemd_writes_it() -> None:
    env = NotifyEnv.parse({"NOTIFY_SOCKET": "/run/systemd/notify", "WATCHDOG_USEC": "30000000"}, pid=42)
    assert env == NotifyEnv(b"/run/systemd/notify", 30.0)
    assert NotifyEnv.parse({"NOTIFY_SOCKET": "@sd-notify"}, pid=42).address == b"\0sd-notify"
    # a watchdog meant for another process (inherited from a parent) is not ours to ping
    env = NotifyEnv.parse({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "7"}, pid=42)
    assert env.watchdog_s is None
    env = NotifyEnv.parse({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "1000", "WATCHDOG_PID": "42"}, pid=42)
    assert env.watchdog_s == 0.001
    assert NotifyEnv.parse({}, pid=42) == NotifyEnv(None, None)


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"NOTIFY_SOCKET": "relative/path"}, "not an absolute path"),
        ({"NOTIFY_SOCKET": "vsock:2:1234"}, "not an absolute path"),
        ({"NOTIFY_SOCKET": "@"}, "not an absolute path"),
        ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "soon"}, "WATCHDOG_USEC='soon'"),
        ({"NOTIFY_SOCKET": "/x", "WATCHDOG_USEC": "0"}, "WATCHDOG_USEC='0'"),
    ],
)
def test_a_bad_environment_is_a_clear_warning_and_notification_off(
    environ: dict[str, str], message: str, caplog: pytest.LogCaptureFixture
) -> None:
    with pytest.raises(NotifySetupError, match=re.escape(message)):
        NotifyEnv.parse(environ, pid=1)
    with caplog.at_level(logging.WARNING, logger="cleanroom.agent.notify"):
        notifier = Notifier.from_environ(environ)
    assert not notifier.enabled and notifier.watchdog_s is None
    assert message in caplog.text
    assert notifier.ready("running") is False


def test_without_notify_socket_everything_is_a_no_op() -> None:
    notifier = Notifier.from_environ({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.watchdog_s is None, "no socket, no watchdog: nobody would hear the pings"
    assert not any((notifier.ready("x"), notifier.watchdog(), notifier.stopping(), notifier.status("y")))


def test_messages_reach_a_path_and_an_abstract_socket(notify_socket: tuple[str, NotifySocket]) -> None:
    path, listener = notify_socket
    notifier = Notifier(NotifyEnv.parse({"NOTIFY_SOCKET": path}, os.getpid()))
    assert notifier.ready("running:\n3 devices")
    assert listener.drain() == [["READY=1", "STATUS=running: 3 devices"]], "a status stays one line"

    name = f"cleanroom-test-{uuid.uuid4().hex}"
    abstract = NotifySocket(b"\0" + name.encode())
    try:
        notifier = Notifier(NotifyEnv.parse({"NOTIFY_SOCKET": f"@{name}"}, os.getpid()))
        assert notifier.watchdog() and notifier.stopping()
        assert abstract.drain() == [
            ["WATCHDOG=1"],
            ["STOPPING=1", "STATUS=" + "stopping: committing, delivering what the broker takes"],
        ]
    finally:
        abstract.close()


def test_a_gone_socket_is_logged_once_and_never_raised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier(NotifyEnv(os.fsencode(tmp_path / "nobody-listens"), 1.0))
    with caplog.at_level(logging.WARNING, logger="cleanroom.agent.notify"):
        results = [notifier.watchdog() for _ in range(5)]
    assert results == [False] * 5
    assert caplog.text.count("cannot notify systemd") == 1


def test_a_manager_that_does_not_read_never_blocks_the_agent(
    notify_socket: tuple[str, NotifySocket], caplog: pytest.LogCaptureFixture
) -> None:
    """Nobody reads the socket: its queue fills, and a send fails at once instead of waiting."""
    path, _ = notify_socket
    notifier = Notifier(NotifyEnv(os.fsencode(path), 1.0))
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="cleanroom.agent.notify"):
        results = [notifier.watchdog() for _ in range(5000)]
    assert time.monotonic() - started < 5
    assert results[0] and not results[-1], "the first messages queue, later ones are refused"
    assert caplog.text.count("cannot notify systemd") == 1


# --------------------------------------------------------------------------- the watchdog


async def test_a_stalled_buffer_thread_stops_the_pings(
    tmp_path: Path, notify_socket: tuple[str, NotifySocket]
) -> None:
    """The event loop keeps running; only the buffer's commit thread is stuck. The pings stop while
    it is, so systemd would restart the agent, and resume by themselves when it answers again."""
    path, listener = notify_socket
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"buffer: {{path: buffer.db}}\nagent: {{id: gw, status_listen: '127.0.0.1:{free_port()}'}}\n"
    )
    agent = Agent(load_config(cfg))
    notifier = Notifier(NotifyEnv(os.fsencode(path), 0.4))
    watchdog = Watchdog.for_agent(notifier, agent)
    assert watchdog is not None and watchdog.interval_s == pytest.approx(0.2), "pings at half WATCHDOG_USEC"
    await agent.buffer.open()
    release = threading.Event()
    task = asyncio.create_task(watchdog.run())
    try:
        await until(lambda: listener.count("WATCHDOG=1") >= 3, 5, "pings while the buffer thread answers")
        assert any(s.startswith("running: 0/0 devices") for s in listener.statuses())

        stuck = asyncio.ensure_future(agent.buffer.on_buffer_thread(lambda: release.wait(30)))
        await until(lambda: watchdog.stalled, 5, "the stall noticed")
        before = listener.count("WATCHDOG=1")
        ticks = 0

        async def loop_alive() -> None:
            nonlocal ticks
            while True:
                ticks += 1
                await asyncio.sleep(0.01)

        ticker = asyncio.create_task(loop_alive())
        await asyncio.sleep(5 * watchdog.interval_s)
        ticker.cancel()
        assert ticks > 20, "the event loop ran all along"
        assert listener.count("WATCHDOG=1") == before, "no ping while the buffer thread is stuck"
        assert watchdog.withheld >= 3
        assert any("buffer thread stuck" in s for s in listener.statuses())

        release.set()
        await stuck
        await until(lambda: listener.count("WATCHDOG=1") > before, 5, "pings resumed")
        assert not watchdog.stalled
    finally:
        release.set()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await agent.buffer.close()


async def test_a_blocked_event_loop_sends_no_pings(notify_socket: tuple[str, NotifySocket]) -> None:
    path, listener = notify_socket
    notifier = Notifier(NotifyEnv(os.fsencode(path), 0.2))

    async def answers() -> None:
        return None

    watchdog = Watchdog(notifier, 0.1, answers)
    task = asyncio.create_task(watchdog.run())
    try:
        await until(lambda: listener.count("WATCHDOG=1") >= 2, 5, "pings")
        time.sleep(0.6)  # noqa: ASYNC251 -- the point: the loop itself stuck, as a CPU-bound call would
        blocked_until = time.monotonic()
        await until(lambda: listener.count("WATCHDOG=1") >= 4, 5, "pings after the loop runs again")
        pings = listener.when("WATCHDOG=1")
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) >= 0.55, "no ping reached the socket while the loop was blocked"
        assert sum(t > blocked_until for t in pings) >= 1
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# --------------------------------------------------------------------------- a real agent process


def test_agent_process_reports_ready_pings_the_watchdog_and_says_stopping(
    tmp_path: Path,
    mosquitto: Mosquitto,
    notify_socket: tuple[str, NotifySocket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from simulators.servers.modbus import serve_bioreactor_modbus

    path, listener = notify_socket
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    with ThreadedSim(lambda: serve_bioreactor_modbus(port=0, seed=7)) as sim:
        agent = AgentProcess(write_config(tmp_path, mosquitto.port, sim.port), tmp_path / "agent.log").start()
        try:
            wait_for(lambda: agent.running() and listener.count("READY=1"), 30, what="READY=1")
            ready_at = listener.when("READY=1")[0]
            wait_for(
                lambda: (
                    agent.running() and len([t for t in listener.when("WATCHDOG=1") if t > ready_at]) >= 5
                ),
                10,
                what="five watchdog pings after READY",
            )
            assert min(listener.when("WATCHDOG=1")) >= ready_at, "pings begin once the agent is ready"
            statuses = listener.statuses()
            assert statuses[0] == "starting: checking the buffer", statuses
            assert any(s.startswith("running: ") and "devices connected" in s for s in statuses), statuses
            wait_for(lambda: "1/1 devices connected, broker connected" in " ".join(listener.statuses()), 15)
            pings = listener.when("WATCHDOG=1")
            gaps = [b - a for a, b in itertools.pairwise(pings)]
            assert max(gaps) < 1.0, f"a gap between pings reached WATCHDOG_USEC: {gaps}"
            assert agent.proc is not None
            agent.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: listener.count("STOPPING=1"), 10, what="STOPPING=1")
            assert agent.proc.wait(20) == 0, (tmp_path / "agent.log").read_text()[-3000:]
            agent.proc = None
        finally:
            agent.close()
    assert listener.count("READY=1") == 1 and listener.count("STOPPING=1") == 1
    assert listener.when("STOPPING=1")[0] > listener.when("READY=1")[0]


# --------------------------------------------------------------------------- the unit file


def unit_settings() -> list[tuple[str, str, str]]:
    """(section, key, value) in file order; keys repeat (DeviceAllow=, SystemCallFilter=)."""
    out: list[tuple[str, str, str]] = []
    section = ""
    for raw in UNIT.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.append((section, key, value))
    return out


def test_unit_asks_for_notify_watchdog_restart_reload_and_serial_ports() -> None:
    settings = unit_settings()
    service = {k: v for s, k, v in settings if s == "Service"}
    assert service["Type"] == "notify"
    assert service["NotifyAccess"] == "main"
    assert service["WatchdogSec"] == "30s"
    assert service["Restart"] == "on-failure", "on-failure includes a watchdog timeout"
    assert service["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert service["SupplementaryGroups"] == "dialout"
    assert service["DevicePolicy"] == "closed"
    allowed = {v for s, k, v in settings if k == "DeviceAllow"}
    assert allowed == {"char-ttyS rw", "char-ttyUSB rw", "char-ttyACM rw"}
    assert "ProtectClock" not in service, "it would forbid the read-only adjtimex the clock state needs"
    filters = [v for s, k, v in settings if k == "SystemCallFilter"]
    assert filters[-1] == "adjtimex clock_adjtime", "given back last, after ~@privileged removed it"


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    if path is None:
        pytest.skip("systemd-analyze is not installed here")
    return path


def test_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    """Verified in a scratch root holding the system's own units (the targets it is ordered
    against) and a stub for every program the unit runs, which exist only once installed."""
    analyze = systemd_analyze()
    units = next(
        (d for d in (Path("/usr/lib/systemd/system"), Path("/lib/systemd/system")) if d.is_dir()), None
    )
    if units is None:
        pytest.skip("no system unit folder to verify against")
    root = tmp_path / "root"
    shutil.copytree(units, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(UNIT, root / "etc/systemd/system" / UNIT.name)
    programs = {v.lstrip("-@:+!").split()[0] for s, k, v in unit_settings() if k.startswith("Exec")}
    assert "/opt/cleanroom-edge/venv/bin/cleanroom-agent" in programs
    for program in programs:
        stub = root / program.lstrip("/")
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n")
        stub.chmod(0o755)
    proc = subprocess.run(
        [analyze, "verify", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0 and not (proc.stdout + proc.stderr).strip(), proc.stdout + proc.stderr

    # the same check refuses a unit that is wrong: it is not passing vacuously
    (root / "opt/cleanroom-edge/venv/bin/cleanroom-agent").chmod(0o644)
    proc = subprocess.run(
        [analyze, "verify", f"--root={root}", UNIT.name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0 and "is not executable" in proc.stderr


def exposure() -> float:
    analyze = systemd_analyze()
    proc = subprocess.run(
        [analyze, "security", "--offline=true", f"--threshold={int(MAX_EXPOSURE * 10)}", str(UNIT)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    found = re.search(r"Overall exposure level for \S+: (\d+\.\d)", proc.stdout)
    assert found, proc.stdout + proc.stderr
    assert proc.returncode == 0, f"exposure {found[1]} above {MAX_EXPOSURE}:\n{proc.stdout}"
    return float(found[1])


def test_unit_exposure_is_at_most_2_and_the_docs_give_it() -> None:
    figure = exposure()
    assert figure <= MAX_EXPOSURE
    documented = re.search(r"exposure level of \*\*(\d+\.\d)\*\*", OPERATIONS.read_text())
    assert documented, "docs/operations.md gives the exposure figure"
    assert float(documented[1]) == figure, "docs/operations.md gives a stale exposure figure"
