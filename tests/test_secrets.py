"""Secrets never leak (issue 13, Secure): a real ``cleanroom-agent run`` holds a broker password
(from a file, then from ``${ENV}`` after a reload), the passphrase of its encrypted client key, an
OPC UA user password and an HMAC key. It is driven through what makes software talk: its start, a
broker outage, a refused and an applied reload, ``validate``, ``status``, the status API, the
page and the metrics, and its stop. Then every byte it produced is searched for every secret:
the log, every command's output, every HTTP answer, the buffer file, and every MQTT message the
broker passed on (the audit records included, whose configuration diffs name the secret keys)."""

from __future__ import annotations

import binascii
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cleanroom_common.net import free_port
from simulators.servers.opcua import OpcUaSim, serve_bioreactor_opcua
from tests.support import AgentProcess, CertAuthority, Collector, Issued, ThreadedSim, TlsMosquitto, wait_for

AGENT = "gw-secrets"
BROKER_PASSWORD_FILE = "Bpf-Quokka-4711"
BROKER_PASSWORD_ENV = "Bpe-Axolotl-9023"
KEY_PASSWORD = "Kp-Pangolin-3301"
WRONG_KEY_PASSWORD = "Kw-Tapir-8812"
OPCUA_PASSWORD = "Ou-Narwhal-6620"
HMAC_KEY = "Hk-Okapi-5dd0c8a1f9e24b7c93a1d6e0b2f48c17"
SECRETS = (BROKER_PASSWORD_FILE, BROKER_PASSWORD_ENV, KEY_PASSWORD, WRONG_KEY_PASSWORD, OPCUA_PASSWORD,
           HMAC_KEY)  # fmt: skip
ENV_VAR = "CLEANROOM_TEST_BROKER_PASSWORD"


def forms(secret: str) -> list[bytes]:
    """A secret as it could leak: as text, and hex-encoded (a "key id" that is the key itself)."""
    raw = secret.encode()
    return [raw, binascii.hexlify(raw), binascii.hexlify(raw).upper()]


def leaks(where: str, data: bytes) -> list[str]:
    return [f"{where}: {s}" for s in SECRETS if any(f in data for f in forms(s))]


@pytest.fixture
def broker(tmp_path: Path) -> Iterator[TlsMosquitto]:
    ca = CertAuthority(tmp_path / "pki")
    b = TlsMosquitto(ca)
    b.add_listener("mtls", users={"gw-a": BROKER_PASSWORD_FILE, "gw-b": BROKER_PASSWORD_ENV})
    b.start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def opcua() -> Iterator[OpcUaSim]:
    with ThreadedSim(lambda: serve_bioreactor_opcua(speed=60, user="qa", password=OPCUA_PASSWORD)) as sim:
        yield sim


def write_config(path: Path, *, broker: TlsMosquitto, client: Issued, url: str, listen: str,
                 mqtt_auth: str, key_password: str) -> None:  # fmt: skip
    path.write_text(
        f"""
agent: {{id: {AGENT}, status_listen: "{listen}", shutdown_grace: 2s}}
buffer: {{path: buffer.db, commit_interval: 50ms}}
integrity: {{hmac_key_file: hmac.key}}
mqtt:
  host: localhost
  port: {broker.listeners["mtls"].port}
  reconnect_min: 100ms
  reconnect_max: 500ms
  {mqtt_auth}
  tls: {{enabled: true, ca_file: {broker.ca.cert}, cert_file: {client.cert}, key_file: {client.key},
         key_password: "{key_password}"}}
devices:
  - id: br1
    profile: bioreactor-sim-opcua
    connection: {{url: "{url}", timeout: 2s, security_policy: None, username: qa,
                  password: "{OPCUA_PASSWORD}"}}
    groups:
      process: {{interval: 200ms}}
      status: {{interval: 200ms}}
"""
    )


def cli(*args: str) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, timeout=60, check=False
    )


def http_get(listen: str, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(f"http://{listen}{path}", timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def api_status(listen: str) -> dict[str, Any] | None:
    for path in ("/api/status", "/status"):
        try:
            code, body = http_get(listen, path)
        except OSError:
            return None
        if code == 200:
            doc: dict[str, Any] = json.loads(body)
            return doc
    return None


def test_no_secret_appears_anywhere_the_agent_writes(
    tmp_path: Path, broker: TlsMosquitto, opcua: OpcUaSim, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(ENV_VAR, BROKER_PASSWORD_ENV)
    (tmp_path / "broker.pw").write_text(BROKER_PASSWORD_FILE + "\n")
    (tmp_path / "hmac.key").write_text(HMAC_KEY + "\n")
    for f in ("broker.pw", "hmac.key"):
        os.chmod(tmp_path / f, 0o600)
    listen = f"127.0.0.1:{free_port()}"
    cfg = tmp_path / "agent.yaml"
    client = broker.ca.issue("gw-client", client=True, hosts=(), key_password=KEY_PASSWORD)
    settings: dict[str, Any] = {"broker": broker, "client": client, "url": opcua.url, "listen": listen}
    write_config(cfg, **settings, mqtt_auth="username: gw-a\n  password_file: broker.pw",
                 key_password=KEY_PASSWORD)  # fmt: skip
    outputs: dict[str, bytes] = {}
    ran: list[str] = []

    def record(name: str, proc: subprocess.CompletedProcess[bytes]) -> subprocess.CompletedProcess[bytes]:
        outputs[name] = proc.stdout + proc.stderr
        assert b"Traceback" not in outputs[name], outputs[name].decode()
        return proc

    def scrape(stage: str) -> dict[str, Any]:
        """Every HTTP route the agent answers, and ``status`` in both forms."""
        for path in ("/api/status", "/status", "/metrics", "/", "/api/trend?device=br1&tag=temperature_c"):
            code, body = http_get(listen, path)
            outputs[f"GET {path} ({stage})"] = body
            if code == 200:
                ran.append(f"GET {path}")
        record(f"status ({stage})", cli("status", "-c", str(cfg)))
        record(f"status --json ({stage})", cli("status", "-c", str(cfg), "--json"))
        doc = api_status(listen)
        assert doc is not None
        return doc

    def online_sessions() -> list[str]:
        return [json.loads(p)["session"] for t, p, _ in list(collector.messages)
                if "/agent/status" in t and p and json.loads(p)["status"] == "online"]  # fmt: skip

    assert record("validate", cli("validate", str(cfg))).returncode == 0
    collector = Collector(broker.port)
    agent = AgentProcess(cfg, tmp_path / "agent.log")
    try:
        agent.start()
        # Readings from the OPC UA device (logged in with its password) over mutual TLS (client key
        # opened with its passphrase, broker login from the password file), signed with the key.
        wait_for(lambda: agent.running() and any(t.endswith("br1/data") for t, _, _ in collector.messages[:]),
                 40, what="readings from br1 on the broker")  # fmt: skip
        assert len(online_sessions()) == 1
        scrape("running")

        # A broker outage: the agent says so (status, log) and reconnects.
        broker.stop()
        wait_for(lambda: (s := api_status(listen)) and not s["broker"]["connected"], 20, what="outage seen")
        scrape("outage")
        broker.start()
        wait_for(
            lambda: agent.running() and len(online_sessions()) == 2, 30, what="reconnect after the outage"
        )

        # A reload whose key passphrase is wrong is refused; then one that takes the broker
        # password from the environment (another user) is applied and reconnects.
        write_config(cfg, **settings, mqtt_auth="username: gw-a\n  password_file: broker.pw",
                     key_password=WRONG_KEY_PASSWORD)  # fmt: skip
        assert record("validate (wrong key password)", cli("validate", str(cfg))).returncode == 2
        assert agent.proc is not None
        agent.proc.send_signal(signal.SIGHUP)
        reloads = wait_for(lambda: (s := api_status(listen)) and s.get("reload", {}).get("generation") == 1
                           and s["reload"], 20, what="the refused reload")  # fmt: skip
        assert reloads["last_outcome"] == "refused", reloads
        ran.append("reload refused")
        write_config(cfg, **settings, mqtt_auth=f'username: gw-b\n  password: "${{{ENV_VAR}}}"',
                     key_password=KEY_PASSWORD)  # fmt: skip
        assert record("validate (env password)", cli("validate", str(cfg))).returncode == 0
        reload = record("reload", cli("reload", "-c", str(cfg)))
        assert reload.returncode == 0, outputs["reload"].decode()
        ran.append("reload applied")
        wait_for(lambda: agent.running() and len(online_sessions()) == 3, 30, what="reconnect as gw-b")
        status = scrape("reloaded")
        assert status["broker"]["connected"] and status["reload"]["last_outcome"] == "applied"
        assert agent.terminate() == 0
    finally:
        agent.close()
        collector.close()
    # What was searched must hold what the test meant: the audit trail has the refusal (its
    # error names tls.key_password) and the applied reload's diff of the mqtt section.
    audit = b"".join(p for t, p, _ in collector.messages if t.endswith("/agent/audit"))
    assert b"config_reload_refused" in audit and b"key_password" in audit
    assert b"config_change" in audit and b"gw-b" in audit

    everything: list[str] = []
    everything += leaks("agent log", (tmp_path / "agent.log").read_bytes())
    for name, data in outputs.items():
        everything += leaks(name, data)
    for stored in sorted(tmp_path.glob("buffer.db*")):
        everything += leaks(stored.name, stored.read_bytes())
    for topic, payload, _ in collector.messages:
        everything += leaks(f"MQTT {topic}", topic.encode() + payload)
    assert not everything, everything
    assert len(tmp_path.joinpath("agent.log").read_text().splitlines()) > 5
    print("parts exercised:", ", ".join(dict.fromkeys(ran)))
