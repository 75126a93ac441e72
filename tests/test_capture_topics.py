"""``cleanroom-agent capture`` records what ``verify --capture`` checks, and only that: the JSON
segments' topics and the status. With ``payload: flat`` and ``publish_segments`` the flat messages
share the topic prefix with the segments; captured, each would be a ``malformed`` finding."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import paho.mqtt.client as mqtt
from hypothesis import given
from hypothesis import strategies as st

from agent.app.config import load_config
from agent.app.runtime import Agent
from agent.integrity.capture import Recorder, capture_topics, read_capture
from agent.integrity.verify import verify_capture
from agent.sinks.forwarder import MqttConfig
from cleanroom_common.net import free_port
from simulators.servers.modbus import serve_bioreactor_modbus
from tests.support import Collector, Mosquitto, until

LEVEL = st.from_regex(r"[A-Za-z0-9_\-]{1,8}", fullmatch=True)


@given(
    prefix=st.lists(LEVEL, min_size=1, max_size=3).map("/".join), device=LEVEL.filter(lambda d: d != "agent")
)
def test_each_segment_and_status_topic_is_captured_once_and_flat_topics_never(
    prefix: str, device: str
) -> None:
    """One filter per topic (a broker would deliver a message twice to overlapping filters); the
    flat default topics and a batch command match none."""
    filters = capture_topics(prefix)

    def matches(topic: str) -> int:
        return sum(mqtt.topic_matches_sub(f, topic) for f in filters)

    for stream in (f"{device}/data", f"{device}/events", "agent/events", "agent/audit", "agent/status/gw-1"):
        assert matches(f"{prefix}/{stream}") == 1, stream
    assert matches(f"{prefix}/agent/status") == 1, "the status topic of agents up to 0.2"
    flat = (f"flat/{device}/data", f"flat/{device}/events", f"flat/{device}/data/T1", "flat/agent/audit")
    for other in (*flat, "agent/batch/gw-1"):
        assert matches(f"{prefix}/{other}") == 0, other


async def test_a_capture_beside_flat_messages_verifies(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A real agent publishing ``flat`` and the JSON segments, a real capture: the flat messages
    and a batch command under the same prefix stay out of it, and verify passes."""
    flat = Collector(mosquitto.port, "cleanroom/flat/#")
    out = (tmp_path / "capture.jsonl").open("w", encoding="utf-8")
    recorder: Recorder | None = None
    try:
        async with serve_bioreactor_modbus(port=0, speed=60.0, seed=5) as sim:
            (tmp_path / "agent.yaml").write_text(
                f"agent: {{id: gw-cap, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 1s}}\n"
                "buffer: {path: buffer.db, commit_interval: 50ms}\nhealth: {clock_sync: false}\n"
                f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, payload: flat}}\n"
                "devices:\n  - {id: br1, profile: bioreactor-sim,"
                f" connection: {{host: 127.0.0.1, port: {sim.port}, timeout: 1s}}}}\n"
            )
            loaded = load_config(tmp_path / "agent.yaml")
            assert isinstance(loaded.config.mqtt, MqttConfig) and loaded.config.mqtt.publish_segments
            recorder = Recorder(loaded.config.mqtt, out)
            await asyncio.to_thread(recorder.start)
            agent = Agent(loaded)
            await agent.start()
            try:
                await until(lambda: len(flat.messages) >= 5, 15, "flat messages on the broker")
                await asyncio.to_thread(
                    flat.client.publish, "cleanroom/agent/batch/gw-cap", b'{"command": "start"}', 1
                )
                await until(lambda: recorder is not None and recorder.messages >= 8, 15, "segments captured")
            finally:
                await agent.stop()

            def offline_captured() -> bool:
                return any(
                    m.topic == "cleanroom/agent/status/gw-cap"
                    and json.loads(m.payload)["status"] == "offline"
                    for m in read_capture(tmp_path / "capture.jsonl")
                )

            await until(offline_captured, 10, "the clean stop's offline status captured")
    finally:
        if recorder is not None:
            await asyncio.to_thread(recorder.stop)
        out.close()
        flat.close()
    messages = read_capture(tmp_path / "capture.jsonl")
    assert not any("/flat/" in m.topic or "/batch/" in m.topic for m in messages)
    report = verify_capture(messages)
    assert report.ok, report.breaks
    assert "br1/data" in {s.stream for s in report.streams}
