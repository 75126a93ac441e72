"""Fail-safe: SIGHUP does not kill the agent (issue 11); since issue 13 it reloads the
configuration. A real ``cleanroom-agent run`` given SIGHUP with an unchanged configuration
reloads it, keeps running on the same MQTT session, and still stops cleanly on SIGTERM."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.app.status import fetch_status
from cleanroom_common.net import free_port
from tests.support import AgentProcess, Collector, Mosquitto, wait_for

AGENT = "gw-hup"
LISTEN = f"127.0.0.1:{free_port()}"


@pytest.fixture
def agent(tmp_path: Path, mosquitto: Mosquitto) -> Iterator[AgentProcess]:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: {AGENT}, status_listen: '{LISTEN}'}}\n"
        "buffer: {path: buffer.db, commit_interval: 50ms}\n"
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, reconnect_min: 100ms, reconnect_max: 500ms}}\n"
    )
    proc = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        yield proc
    finally:
        proc.close()


def statuses(collector: Collector) -> list[dict[str, str]]:
    return [
        json.loads(p) for t, p, _ in list(collector.messages) if t == f"cleanroom/agent/status/{AGENT}" and p
    ]


def test_sighup_reloads_and_keeps_the_session(agent: AgentProcess, collector: Collector) -> None:
    agent.start()
    wait_for(lambda: agent.running() and "started" in agent.log.read_text(), 20, what="agent started")
    wait_for(lambda: any(s["status"] == "online" for s in statuses(collector)), 10, what="online status")
    assert agent.proc is not None
    agent.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: fetch_status(LISTEN)["reload"]["generation"] == 1, 10, what="the reload")
    time.sleep(0.5)
    assert agent.running()
    assert fetch_status(LISTEN)["reload"]["last_outcome"] == "applied"
    assert "configuration reloaded (generation 1)" in agent.log.read_text()
    assert agent.terminate() == 0, agent.log.read_text()
    seen = statuses(collector)
    assert seen[-1]["reason"] == "clean_stop", "the session outlived the SIGHUP"
    assert {s["session"] for s in seen} == {seen[0]["session"]}, "SIGHUP reconnected to the broker"
