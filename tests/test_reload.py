"""Hot reload (issue 13) of a real ``cleanroom-agent run`` while readings flow to a real mosquitto:
a valid configuration applies without restarting devices whose configuration did not change (a
TCP proxy in front of each device counts its connections), an invalid one is refused and the agent
runs on, a changed broker section moves the forwarder to the new broker, and the brokers' captures
together verify complete (every seq there, each duplicate a re-send)."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from agent.app.config import load_config
from agent.app.reload import ReloadPlan, ReloadRefused, plan
from agent.app.status import fetch_status
from agent.integrity.capture import Captured
from agent.integrity.verify import verify_capture
from agent.transforms.anomaly.manifest import approve, read_manifest, write_manifest
from cleanroom_common.net import free_port
from simulators.servers.modbus import serve_bioreactor_modbus
from tests.support import AgentProcess, Collector, Mosquitto, ThreadedSim, wait_for

AGENT = "gw-reload"
STATUS_TOPIC = f"cleanroom/agent/status/{AGENT}"


class CountingProxy:
    """A TCP proxy in front of a device that counts the connections the agent opens to it."""

    def __init__(self, target_port: int) -> None:
        self.target = target_port
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = self.server.getsockname()[1]
        self.connections = 0
        self._socks: list[socket.socket] = [self.server]
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return
            self.connections += 1
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self._socks += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        for s in self._socks:
            s.close()


def config_text(broker: int, listen: str, proxies: list[CountingProxy], br2_interval: str = "200ms") -> str:
    devices = "".join(
        f"""  - id: br{n}
    profile: bioreactor-sim
    connection: {{host: 127.0.0.1, port: {p.port}, timeout: 1s, backoff_min: 100ms, backoff_max: 500ms}}
    groups:
      process: {{interval: {"200ms" if n == 1 else br2_interval}}}
      status: {{interval: 1s}}
      setpoints: {{interval: 1s}}
"""
        for n, p in enumerate(proxies, start=1)
    )
    return f"""agent: {{id: {AGENT}, status_listen: '{listen}', shutdown_grace: 5s}}
buffer: {{path: buffer.db, commit_interval: 50ms}}
mqtt: {{host: 127.0.0.1, port: {broker}, reconnect_min: 100ms, reconnect_max: 500ms}}
devices:
{devices}"""


@pytest.fixture
def sim() -> Iterator[ThreadedSim]:
    ts = ThreadedSim(lambda: serve_bioreactor_modbus(port=0, seed=3))
    with ts:
        yield ts


@pytest.fixture
def proxies(sim: ThreadedSim) -> Iterator[list[CountingProxy]]:
    made = [CountingProxy(sim.sim.port), CountingProxy(sim.sim.port)]
    try:
        yield made
    finally:
        for p in made:
            p.close()


def reload_state(listen: str) -> dict[str, Any]:
    state: dict[str, Any] = fetch_status(listen)["reload"]
    return state


def data_from(collector: Collector, device: str) -> int:
    return sum(1 for t, _, _ in list(collector.messages) if t == f"cleanroom/{device}/data")


def test_sighup_and_reload_command_while_readings_flow(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector, proxies: list[CountingProxy]
) -> None:
    listen = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_text(mosquitto.port, listen, proxies))
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    broker2 = Mosquitto().start()
    collector2 = Collector(broker2.port)
    try:
        agent.start()
        wait_for(lambda: agent.running() and data_from(collector, "br1") and data_from(collector, "br2"),
                 20, what="readings of both devices")  # fmt: skip
        assert [p.connections for p in proxies] == [1, 1]
        assert agent.proc is not None

        # A valid change of br2 only: br2 reconnects, br1 keeps its connection.
        cfg.write_text(config_text(mosquitto.port, listen, proxies, br2_interval="300ms"))
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reload_state(listen)["generation"] == 1, 20, what="the first reload")
        state = reload_state(listen)
        assert state["last_outcome"] == "applied", state
        assert state["applied"]["devices_restarted"] == ["br2"]
        assert state["applied"]["devices_unchanged"] == ["br1"]
        assert not state["applied"]["mqtt_reconnected"]
        wait_for(lambda: proxies[1].connections == 2, 10, what="br2 reconnected")
        seen = data_from(collector, "br2")
        wait_for(lambda: data_from(collector, "br2") > seen + 3, 10, what="br2 readings after its restart")
        assert proxies[0].connections == 1, "an unchanged device was reconnected"

        # An invalid configuration: refused, the agent runs on with the one it has.
        cfg.write_text(config_text(mosquitto.port, listen, proxies, br2_interval="300ms") + "bogus: 1\n")
        agent.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: reload_state(listen)["generation"] == 2, 20, what="the refused reload")
        state = reload_state(listen)
        assert state["last_outcome"] == "refused"
        assert state["reason"] == "the configuration is invalid"
        assert any("bogus" in e and "unknown key" in e for e in state["errors"]), state
        seen = data_from(collector, "br1")
        wait_for(lambda: data_from(collector, "br1") > seen + 3, 10, what="readings after the refusal")
        assert agent.running()
        refused = [a for a in collector.json("/agent/audit") for r in a["events"]
                   if r.get("data", {}).get("action") == "config_reload_refused"]  # fmt: skip
        assert refused, "no config_reload_refused audit record"

        # A changed broker, through the command: the forwarder moves, no device reconnects.
        cfg.write_text(config_text(broker2.port, listen, proxies, br2_interval="300ms"))
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "reload", "-c", str(cfg)],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        assert "reloaded (generation 3)" in done.stdout
        assert "mqtt_reconnected: True" in done.stdout
        wait_for(lambda: data_from(collector2, "br1") > 3 and data_from(collector2, "br2") > 3, 20,
                 what="readings on the new broker")  # fmt: skip
        assert [p.connections for p in proxies] == [1, 2]
        online = [json.loads(p) for t, p, _ in list(collector2.messages) if t == STATUS_TOPIC and p]
        assert online and online[0]["status"] == "online"
        old_statuses = [json.loads(p) for t, p, _ in list(collector.messages) if t == STATUS_TOPIC and p]
        assert old_statuses[-1]["reason"] == "clean_stop", "the old broker did not hear a clean offline"
        # The command refuses in turn, with exit code 1, when the agent refuses.
        cfg.write_text(config_text(broker2.port, listen, proxies).replace(AGENT, "gw-other"))
        done = subprocess.run(
            [sys.executable, "-m", "agent.cli", "reload", "-c", str(cfg)],
            check=False, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert done.returncode == 1
        assert "agent.id changed" in done.stderr, done.stderr
        assert agent.terminate() == 0, agent.log.read_text()[-3000:]
    finally:
        agent.close()
        collector2.close()
        broker2.close()

    # Nothing lost: the two brokers' captures, old then new, hold every seq of every stream.
    messages = [*collector.messages, *collector2.messages]
    captured = [Captured(n, t, p, 1, r, float(n)) for n, (t, p, r) in enumerate(messages, start=1)]
    report = verify_capture(captured)
    assert report.ok, (report.breaks, report.gaps, report.duplicates)
    assert {s.stream for s in report.streams} >= {"br1/data", "br2/data", "agent/audit"}
    changes = [r["data"] for a in collector.json("/agent/audit") for r in a["events"]
               if r.get("data", {}).get("action") == "config_change"]  # fmt: skip
    assert changes and "300ms" in changes[0]["diff"]


# --------------------------------------------------------------------------- what a reload changes


def plan_between(tmp_path: Path, before: str, after: str) -> ReloadPlan:
    path = tmp_path / "agent.yaml"
    path.write_text(before)
    old = load_config(path)
    path.write_text(after)
    return plan(old, load_config(path))


BASE = """agent: {id: gw-plan, status_listen: '127.0.0.1:18765'}
buffer: {path: buffer.db}
devices:
  - {id: a, profile: bioreactor-sim, connection: {host: 127.0.0.1, port: 1502}}
  - {id: b, profile: bioreactor-sim, connection: {host: 127.0.0.1, port: 1503}}
"""


def test_plan_restarts_only_what_changed(tmp_path: Path) -> None:
    after = BASE.replace("port: 1503", "port: 1504") + (
        "  - {id: c, profile: bioreactor-sim, connection: {host: 127.0.0.1, port: 1505}}\n"
        "limits: {tags: []}\n"
    )
    changes = plan_between(tmp_path, BASE, after)
    assert changes.summary() == {
        "devices_unchanged": ["a"], "devices_restarted": ["b"], "devices_added": ["c"],
        "devices_removed": [], "mqtt_reconnected": False, "limits_reloaded": True, "models_reloaded": False,
    }  # fmt: skip
    disabled = BASE.replace("port: 1503}}", "port: 1503}, enabled: false}")
    removed = plan_between(tmp_path, BASE, disabled)
    assert removed.summary()["devices_removed"] == ["b"] and not removed.start
    same = plan_between(tmp_path, BASE, BASE + "# a comment changes the hash, nothing else\n")
    assert same.stop == () and same.start == () and not (same.mqtt or same.limits or same.models)


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (("buffer: {path: buffer.db}", "buffer: {path: other.db}"), "the buffer section changed"),
        (("id: gw-plan", "id: gw-new"), "agent.id changed"),
        (("18765", "18766"), "agent.status_listen changed"),
    ],
)
def test_plan_refuses_what_needs_a_restart(tmp_path: Path, change: tuple[str, str], reason: str) -> None:
    with pytest.raises(ReloadRefused, match=reason):
        plan_between(tmp_path, BASE, BASE.replace(*change))


def test_plan_rebinds_the_models_when_a_manifest_changed(tmp_path: Path) -> None:
    """An approval (or an edit voiding one) changes the manifest file, not the configuration: a
    reload must re-bind for it to take effect without a restart."""
    shipped = Path(__file__).resolve().parents[1] / "models" / "bioreactor-pca.model.yaml"
    manifest = read_manifest(shipped)
    shutil.copy2(shipped.parent / manifest.file, tmp_path / manifest.file)
    copy = tmp_path / shipped.name
    write_manifest(copy, manifest)
    path = tmp_path / "agent.yaml"
    path.write_text(BASE + f"models:\n  - {{manifest: {copy}, devices: [a], mode: active}}\n")
    old = load_config(path)
    assert not plan(old, load_config(path)).models, "nothing changed: the models keep running"
    write_manifest(
        copy, approve(manifest, "qa.test", "released after the site's evaluation", "2026-01-01T00:00:00Z")
    )
    assert plan(old, load_config(path)).summary()["models_reloaded"] is True
