"""Prometheus metrics (issue 13): the documented table is exactly what a scrape announces, a real
agent (simulator → agent → mosquitto) reports what it did in them, the exposition parses, and the
dashboard queries only metrics that exist."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from agent.app.config import load_config
from agent.app.metrics import render
from agent.app.runtime import Agent
from agent.core.clock import ClockState
from cleanroom_common.net import free_port
from simulators.servers.modbus import serve_bioreactor_modbus
from tests.support import Mosquitto, until

ROOT = Path(__file__).resolve().parents[1]
DASHBOARD = ROOT / "deploy" / "grafana" / "cleanroom-edge.json"


def documented() -> dict[str, str]:
    """Metric name -> type, from the table in docs/operations.md."""
    text = (ROOT / "docs" / "operations.md").read_text()
    section = text.split("## Health and metrics", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `([a-z_]+)` \| (counter|gauge|summary|histogram) \|", section, re.MULTILINE)
    return dict(rows)


def families(body: bytes) -> dict[str, Any]:
    """Exposed families by their exposed name (counters with ``_total``, as in the text format)."""
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        name = f"{fam.name}_total" if fam.type == "counter" else fam.name
        out[name] = fam
    return out


def value(fams: dict[str, Any], name: str, **labels: str) -> float:
    matches = [s.value for f in fams.values() for s in f.samples if s.name == name and s.labels == labels]
    assert len(matches) == 1, f"{name}{labels}: {matches}"
    return float(matches[0])


def write_config(tmp: Path, broker: int, sim: int) -> Path:
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw-metrics, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 100ms}}\n"
        "buffer: {path: buffer.db, commit_interval: 50ms}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker}, username: gw, password: pw-secret-6666,"
        " reconnect_min: 100ms}\n"
        "devices:\n"
        "  - id: br1\n"
        "    profile: bioreactor-sim\n"
        f"    connection: {{host: 127.0.0.1, port: {sim}, timeout: 1s, backoff_min: 100ms}}\n"
        "    groups: {process: {interval: 100ms}, status: {interval: 100ms}}\n"
        f"models:\n  - {{manifest: {ROOT / 'models' / 'bioreactor-pca.model.yaml'}, devices: [br1]}}\n"
    )
    return cfg


async def test_the_documented_table_is_exactly_what_a_scrape_announces(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 100ms}}\n"
        "buffer: {path: buffer.db}\n"
    )
    agent = Agent(load_config(cfg))
    await agent.start()
    try:
        body, content_type = await render(agent)
    finally:
        await agent.stop()
    assert content_type.startswith("text/plain; version=")
    announced = {n: f.type for n, f in families(body).items()}
    assert announced == documented()
    assert all(n.startswith(("cleanroom_", "process_")) for n in announced)


async def test_a_running_agent_reports_its_polls_publishes_buffer_models_and_process(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    async with serve_bioreactor_modbus(port=0, speed=60.0, seed=11) as sim:
        assert sim.port is not None
        agent = Agent(load_config(write_config(tmp_path, mosquitto.port, sim.port)))
        agent.health_watch.clock = lambda: ClockState(synced=True, offset_s=-0.0015, max_error_s=0.02)
        await agent.start()
        try:

            async def acked() -> bool:
                fams = families((await render(agent))[0])
                loaded = bool(fams["cleanroom_model_threshold"].samples)
                polled = all(
                    value(fams, "cleanroom_device_polls_total", device="br1", group=g) >= 3
                    for g in ("process", "status")
                )
                return loaded and polled and value(fams, "cleanroom_mqtt_acked_segments_total") >= 5

            await until(acked, 15, "three polls per group, five segments acknowledged, the model loaded")
            body, _ = await render(agent)
        finally:
            await agent.stop()
    fams = families(body)
    assert value(fams, "cleanroom_agent_info", agent="gw-metrics", version=fams["cleanroom_agent_info"]
                 .samples[0].labels["version"]) == 1  # fmt: skip
    for group in ("process", "status"):
        assert value(fams, "cleanroom_device_polls_total", device="br1", group=group) >= 3
        assert value(fams, "cleanroom_device_poll_failures_total", device="br1", group=group) == 0
    assert value(fams, "cleanroom_device_connected", device="br1") == 1
    requests = value(fams, "cleanroom_device_requests_total", device="br1")
    # A poll is counted when it starts, a request when its reply came: at most one poll per group
    # (the groups poll on phases of their own) may be in flight when the page is rendered.
    polls = sum(
        value(fams, "cleanroom_device_polls_total", device="br1", group=g) for g in ("process", "status")
    )
    assert requests >= polls - 2 >= 4
    assert value(fams, "cleanroom_device_round_trip_seconds_count", device="br1") == requests
    quantiles = [
        value(fams, "cleanroom_device_round_trip_seconds", device="br1", quantile=q)
        for q in ("0.5", "0.9", "0.99")
    ]
    assert 0 < quantiles[0] <= quantiles[1] <= quantiles[2] < 1.0
    assert value(fams, "cleanroom_mqtt_connected") == 1
    published = value(fams, "cleanroom_mqtt_published_messages_total")
    assert published >= value(fams, "cleanroom_mqtt_acked_segments_total") >= 5
    assert value(fams, "cleanroom_mqtt_published_readings_total") > published
    assert value(fams, "cleanroom_buffer_max_bytes") == 2 * 1024**3
    assert value(fams, "cleanroom_buffer_size_bytes") > 0
    [threshold] = fams["cleanroom_model_threshold"].samples
    assert threshold.labels["device"] == "br1" and threshold.labels["model"] == "bioreactor-pca"
    assert threshold.labels["binding"] and threshold.labels["model_version"] and threshold.value > 0
    assert value(fams, "cleanroom_clock_synced") == 1
    assert value(fams, "cleanroom_clock_offset_seconds") == -0.0015
    assert value(fams, "cleanroom_healthy") == 1
    assert value(fams, "process_resident_memory_bytes") > 10e6
    assert value(fams, "process_cpu_seconds_total") > 0
    assert b"pw-secret-6666" not in body


def test_the_dashboard_queries_only_documented_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {m for e in exprs for m in re.findall(r"\b((?:cleanroom|process)_[a-z_]+)", e)}
    known = set(documented())
    suffixes = ("_count", "_sum", "_bucket")
    assert {m for m in used if m not in known and not m.endswith(suffixes)} == set()
    assert {m.removesuffix("_count") for m in used if m.endswith("_count")} <= known
    # what an operator looks at first: health, devices, buffer, broker, models, clock, certificates
    for name in ("cleanroom_healthy", "cleanroom_device_polls_total", "cleanroom_buffer_undelivered_readings",
                 "cleanroom_mqtt_connected", "cleanroom_model_score", "cleanroom_clock_offset_seconds",
                 "cleanroom_certificate_expiry_days", "process_resident_memory_bytes"):  # fmt: skip
        assert name in used
    assert dashboard["uid"] and dashboard["title"]
    assert {v["name"] for v in dashboard["templating"]["list"]} >= {"datasource", "agent"}


async def test_metrics_are_served_on_the_status_listener(tmp_path: Path) -> None:
    import asyncio
    import urllib.request

    port = free_port()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw-http, status_listen: '127.0.0.1:{port}', shutdown_grace: 100ms}}\n"
        "buffer: {path: buffer.db}\n"
    )
    agent = Agent(load_config(cfg))
    await agent.start()

    def scrape() -> tuple[str, bytes]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
            return resp.headers["Content-Type"], resp.read()

    try:
        content_type, body = await asyncio.to_thread(scrape)
    finally:
        await agent.stop()
    assert content_type.startswith("text/plain; version=")
    fams = families(body)
    assert set(fams) == set(documented())
    assert fams["cleanroom_agent_info"].samples[0].labels["agent"] == "gw-http"
