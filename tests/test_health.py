"""Health (issue 13): each cause of "unhealthy" made with real parts (a simulator stopped, mosquitto
stopped, a buffer filling up, certificates generated with ``cryptography``; the clock's state
injected, since the test machine's clock is whatever it is), seen the same way by the status
API's document, the metrics and ``cleanroom-agent status``'s exit code, and gone again once the
cause is."""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.app.config import load_config
from agent.app.health import HealthWatch, ProblemKind
from agent.app.metrics import render
from agent.app.runtime import Agent
from agent.cli.status import cmd_status, format_status
from agent.core.clock import ClockState
from cleanroom_common.net import free_port
from simulators.servers.modbus import serve_bioreactor_modbus
from tests.support import Mosquitto, until

SYNCED = ClockState(synced=True, offset_s=0.0002, max_error_s=0.01, est_error_s=0.001)


FAST = "  device_down_after: 300ms\n  broker_down_after: 300ms\n"
"""Thresholds a test waits out."""


def write_config(tmp: Path, body: str, health: str = FAST) -> Path:
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw-health, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 100ms}}\n"
        "buffer: {path: buffer.db, commit_interval: 50ms}\n"
        f"health:\n{health}{body}"
    )
    return cfg


def device(port: int | None, interval: str = "100ms") -> str:
    return (
        "devices:\n"
        "  - id: br1\n"
        "    profile: bioreactor-sim\n"
        f"    connection: {{host: 127.0.0.1, port: {port}, timeout: 300ms, backoff_min: 100ms,"
        " backoff_max: 200ms}\n"
        f"    groups: {{process: {{interval: {interval}}}, status: {{interval: {interval}}}}}\n"
    )


@asynccontextmanager
async def running(cfg: Path, clock: ClockState = SYNCED) -> AsyncIterator[Agent]:
    agent = Agent(load_config(cfg))
    agent.health_watch.clock = lambda: clock
    await agent.start()
    try:
        yield agent
    finally:
        await agent.stop()


async def problems(agent: Agent) -> list[dict[str, Any]]:
    health: dict[str, Any] = (await agent.status())["health"]
    assert health["ok"] is (not health["problems"])
    return list(health["problems"])


async def kinds(agent: Agent) -> set[str]:
    return {p["kind"] for p in await problems(agent)}


async def has(agent: Agent, kind: str) -> bool:
    return kind in await kinds(agent)


async def metric_lines(agent: Agent) -> set[str]:
    body, _ = await render(agent)
    return set(body.decode().splitlines())


async def test_a_device_down_past_its_threshold_is_unhealthy_until_it_is_back(tmp_path: Path) -> None:
    sim_cm: AbstractAsyncContextManager[Any] | None = serve_bioreactor_modbus(port=0, speed=60.0, seed=3)
    assert sim_cm is not None
    port = (await sim_cm.__aenter__()).port
    try:
        cfg = write_config(tmp_path, device(port))
        async with running(cfg) as agent:
            await until(lambda: agent.scheduler and agent.scheduler.runners[0].connected, 10, "connected")
            assert await problems(agent) == []
            assert {"cleanroom_healthy 1.0", 'cleanroom_health_problems{kind="device_down"} 0.0'} <= (
                await metric_lines(agent)
            )
            stopping, sim_cm = sim_cm, None
            await stopping.__aexit__(None, None, None)
            await until(lambda: kinds(agent), 10, "a problem")
            [down] = await problems(agent)
            assert down["kind"] == ProblemKind.DEVICE_DOWN and down["subject"] == "br1"
            assert "not connected for" in down["detail"] and down["since"]
            lines = await metric_lines(agent)
            assert {"cleanroom_healthy 0.0", 'cleanroom_health_problems{kind="device_down"} 1.0'} <= lines
            assert 'cleanroom_device_connected{device="br1"} 0.0' in lines
            async with serve_bioreactor_modbus(port=port, speed=60.0, seed=3):
                await until(lambda: agent.scheduler and agent.scheduler.runners[0].connected, 10, "reconnect")
                assert await problems(agent) == []
    finally:
        if sim_cm is not None:
            await sim_cm.__aexit__(None, None, None)


async def test_a_device_down_for_less_than_its_threshold_is_not_a_problem(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, device(free_port()), health="  device_down_after: 1h\n")
    async with running(cfg) as agent:
        await until(lambda: agent.scheduler and agent.scheduler.runners[0].failures >= 2, 10, "failures")
        assert agent.health_watch.down_for("br1") is not None  # it is down, and noted as such
        assert await problems(agent) == []


async def test_an_unreachable_broker_past_its_threshold_is_unhealthy(
    tmp_path: Path, mosquitto: Mosquitto
) -> None:
    cfg = write_config(
        tmp_path,
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, reconnect_min: 100ms, reconnect_max: 200ms}}\n",
    )
    async with running(cfg) as agent:
        assert agent.forwarder is not None
        await until(lambda: agent.forwarder and agent.forwarder.stats()["connected"], 10, "broker")
        assert await problems(agent) == []
        assert "cleanroom_mqtt_connected 1.0" in await metric_lines(agent)
        mosquitto.stop()
        await until(lambda: kinds(agent), 10, "a problem")
        [down] = await problems(agent)
        assert down["kind"] == "broker_unreachable" and down["subject"] == f"127.0.0.1:{mosquitto.port}"
        assert "unreachable for" in down["detail"]
        lines = await metric_lines(agent)
        assert {
            "cleanroom_mqtt_connected 0.0",
            'cleanroom_health_problems{kind="broker_unreachable"} 1.0',
        } <= lines
        mosquitto.start()
        await until(lambda: agent.forwarder and agent.forwarder.stats()["connected"], 10, "broker again")
        assert await problems(agent) == []


async def test_a_buffer_above_its_fill_level_is_unhealthy(tmp_path: Path) -> None:
    # an empty buffer holds 40 KiB of 64 KiB (62 %); readings without a broker fill it past 70 %
    port = free_port()
    cfg = write_config(tmp_path, device(port, "20ms"), health=FAST + "  buffer_fill_max: 0.7\n")
    cfg.write_text(
        cfg.read_text().replace("commit_interval: 50ms", "commit_interval: 50ms, max_bytes: 64KiB")
    )
    async with running(cfg) as agent:
        assert await problems(agent) == []  # nothing to buffer yet: the device is not there
        async with serve_bioreactor_modbus(port=port, speed=60.0, seed=5):
            await until(lambda: has(agent, "buffer_full"), 20, "the buffer full")
            full = [p for p in await problems(agent) if p["kind"] == "buffer_full"]
            assert [p["subject"] for p in full] == ["buffer"]
            assert "of buffer.max_bytes in use (more than 70%)" in full[0]["detail"]
            assert 'cleanroom_health_problems{kind="buffer_full"} 1.0' in await metric_lines(agent)


@pytest.mark.parametrize(
    ("clock", "setting", "unhealthy"),
    [
        (ClockState(synced=False, max_error_s=16.0), "", True),
        (ClockState(), "", False),  # unknown (adjtimex refused): proves nothing either way
        (ClockState(synced=False, max_error_s=16.0), "  clock_sync: false\n", False),
        (SYNCED, "", False),
    ],
)
async def test_an_unsynchronised_clock_counts_only_when_known_and_wanted(
    tmp_path: Path, clock: ClockState, setting: str, unhealthy: bool
) -> None:
    async with running(write_config(tmp_path, "", health=FAST + setting), clock=clock) as agent:
        found = await problems(agent)
        assert [p["kind"] for p in found] == (["clock_unsynchronised"] if unhealthy else [])
        if unhealthy:
            assert found[0]["detail"] == "the wall clock is not synchronised (max error 16.0 s)"
        lines = await metric_lines(agent)
        assert ("cleanroom_clock_synced 0.0" in lines) is (clock.synced is False)
        assert ("cleanroom_clock_offset_seconds 0.0002" in lines) is (clock is SYNCED)


def make_certificate(folder: Path, days: float, *, der: bool = False) -> tuple[Path, Path]:
    """A self-signed client certificate valid for ``days`` from now, and its key (PEM)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "gw-health")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=30))
        .not_valid_after(now + dt.timedelta(days=days))
        .sign(key, hashes.SHA256())
    )
    folder.mkdir(parents=True, exist_ok=True)
    cert_path = folder / ("cert.der" if der else "cert.pem")
    cert_path.write_bytes(
        cert.public_bytes(serialization.Encoding.DER if der else serialization.Encoding.PEM)
    )
    key_path = folder / "key.pem"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"key-secret-4444"),
        )
    )
    key_path.chmod(0o600)
    return cert_path, key_path


async def test_a_certificate_within_30_days_of_expiry_is_unhealthy_until_renewed(tmp_path: Path) -> None:
    cert, key = make_certificate(tmp_path / "mqtt", days=10)
    opcua_cert, opcua_key = make_certificate(tmp_path / "opcua", days=400, der=True)
    (tmp_path / "trust").mkdir()
    cfg = write_config(
        tmp_path,
        f"mqtt:\n  host: 127.0.0.1\n  port: {free_port()}\n  username: gw\n  password: mqtt-secret-5555\n"
        f"  tls: {{enabled: true, cert_file: {cert}, key_file: {key}, key_password: key-secret-4444}}\n"
        "devices:\n  - id: opc1\n    profile: bioreactor-sim-opcua\n"
        f"    connection: {{url: 'opc.tcp://127.0.0.1:{free_port()}', certificate: {opcua_cert},"
        f" private_key: {opcua_key}, trust_dir: {tmp_path / 'trust'}}}\n",
        health="  device_down_after: 1h\n  broker_down_after: 1h\n",
    )
    async with running(cfg) as agent:
        [expiring] = await problems(agent)
        assert expiring["kind"] == "certificate_expiring" and expiring["subject"] == "mqtt"
        assert expiring["detail"].startswith("expires in 9.9 days (") or expiring["detail"].startswith(
            "expires in 10.0 days ("
        )
        body = (await render(agent))[0].decode()
        days = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in body.splitlines()
                if line.startswith("cleanroom_certificate_expiry_days{")}  # fmt: skip
        assert set(days) == {'certificate="mqtt"', 'certificate="opcua:opc1"'}
        assert 9.9 < days['certificate="mqtt"'] <= 10 and 399.9 < days['certificate="opcua:opc1"'] <= 400
        for secret in ("mqtt-secret-5555", "key-secret-4444", str(key), str(opcua_key)):
            assert secret not in body
        # renewed in place (same path, a new file): read again, the problem is gone
        renewed, _ = make_certificate(tmp_path / "renewed", days=365)
        os.replace(renewed, cert)
        assert await problems(agent) == []


async def test_an_expired_certificate_says_so(tmp_path: Path) -> None:
    watch = HealthWatch(load_config(write_config(tmp_path, "")).config.health, {})
    cert, _ = make_certificate(tmp_path / "old", days=-3)
    watch.certificates = {"mqtt": cert}
    [expiry] = watch.certificate_expiry()
    assert -3.01 < expiry.days_left(dt.datetime.now(dt.UTC)) < -2.99


async def test_an_unreadable_certificate_is_logged_once_and_not_guessed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    garbage = tmp_path / "cert.pem"
    garbage.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    watch = HealthWatch(load_config(write_config(tmp_path, "")).config.health, {"mqtt": garbage})
    assert watch.certificate_expiry() == [] and watch.certificate_expiry() == []
    said = [r.getMessage() for r in caplog.records if r.name == "cleanroom.health"]
    assert said == [f"certificate {garbage}: cannot read its expiry (ValueError)"]


async def test_the_status_command_exits_1_when_unhealthy_and_names_each_problem(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with running(write_config(tmp_path, ""), clock=ClockState(synced=False, max_error_s=16.0)) as agent:
        status = await agent.status()
    text = format_status(status)
    assert "health: UNHEALTHY (1 problems)" in text
    assert "PROBLEM clock_unsynchronised clock: the wall clock is not synchronised (max error 16.0 s)" in text
    healthy = {**status, "health": {"ok": True, "problems": []}}
    assert "health: ok" in format_status(healthy)
    assert "health: unknown" in format_status({k: v for k, v in status.items() if k != "health"})


async def test_the_status_command_exit_code_follows_health_over_the_listener(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse
    import asyncio

    cfg = write_config(tmp_path, "")
    args = argparse.Namespace(listen=None, config=str(cfg), json=False)
    for clock, code in ((SYNCED, 0), (ClockState(synced=False, max_error_s=16.0), 1)):
        async with running(cfg, clock=clock):
            assert await asyncio.to_thread(cmd_status, args) == code
        out = capsys.readouterr().out
        assert ("health: ok" in out) is (code == 0)
        assert ("PROBLEM clock_unsynchronised" in out) is (code == 1)


async def test_a_reload_applies_new_thresholds_and_certificates(tmp_path: Path) -> None:
    cert, _ = make_certificate(tmp_path / "opcua", days=40, der=True)
    (tmp_path / "trust").mkdir()
    opcua = (
        "devices:\n  - id: opc1\n    profile: bioreactor-sim-opcua\n"
        f"    connection: {{url: 'opc.tcp://127.0.0.1:{free_port()}', certificate: {cert},"
        f" private_key: {tmp_path / 'opcua' / 'key.pem'}, trust_dir: {tmp_path / 'trust'}}}\n"
    )
    cfg = write_config(tmp_path, "", health="  device_down_after: 1h\n")
    async with running(cfg, clock=ClockState(synced=False, max_error_s=16.0)) as agent:
        assert await kinds(agent) == {"clock_unsynchronised"}
        text = cfg.read_text().replace(
            "  device_down_after: 1h\n", "  device_down_after: 1h\n  clock_sync: false\n"
        )
        cfg.write_text(text + opcua)
        assert (await agent.reload()).outcome == "applied"
        assert await problems(agent) == []  # 40 days left: not yet within 30
        cfg.write_text(
            cfg.read_text().replace("clock_sync: false\n", "clock_sync: false\n  cert_warn_days: 45\n")
        )
        assert (await agent.reload()).outcome == "applied"
        [expiring] = await problems(agent)
        assert (expiring["kind"], expiring["subject"]) == ("certificate_expiring", "opcua:opc1")
