"""Fail-safe: SIGHUP does not kill the agent (issue 11). Until reload exists, a real
``cleanroom-agent run`` logs that it ignores the signal and keeps running: its MQTT
session stays up and it still stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cleanroom_common.net import free_port
from tests.support import AgentProcess, Collector, Mosquitto, wait_for

AGENT = "gw-hup"


@pytest.fixture
def agent(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[AgentProcess]:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: {AGENT}, status_listen: '127.0.0.1:{free_port()}'}}\n"
        "buffer: {path: buffer.db, commit_interval: 50ms}\n"
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, reconnect_min: 100ms, reconnect_max: 500ms}}\n"
    )
    proc = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        yield proc
    finally:
        proc.close()


def statuses(collector: Collector) -> list[dict[str, str]]:
    return [json.loads(p) for t, p, _ in list(collector.messages) if t.endswith("/agent/status") and p]


def test_sighup_is_logged_and_ignored(agent: AgentProcess, collector: Collector) -> None:
    agent.start()
    wait_for(lambda: agent.running() and "started" in agent.log.read_text(), 20, what="agent started")
    wait_for(lambda: any(s["status"] == "online" for s in statuses(collector)), 10, what="online status")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: "SIGHUP ignored" in agent.log.read_text(), 5, what="the SIGHUP log line")
    time.sleep(0.5)
    assert agent.running()
    assert "reload is not supported yet; SIGHUP ignored" in agent.log.read_text()
    assert agent.terminate() == 0, agent.log.read_text()
    assert statuses(collector)[-1]["reason"] == "clean_stop", "the session outlived the SIGHUP"
