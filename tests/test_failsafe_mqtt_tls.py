"""Secure by default, MQTT: plain MQTT to a broker off loopback is a validation error unless TLS is
turned off in so many words; then, and with ``verify: false``, every start warns and ``status``
says so. TLS itself is checked against a real mosquitto TLS listener."""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent.app.config import ConfigError, load_config
from agent.app.runtime import Agent
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.cli import main
from agent.sinks.forwarder import AgentIdentity, Forwarder, MqttConfig
from cleanroom_common.net import free_port
from tests.support import Mosquitto, until

IDENTITY = AgentIdentity(agent_id="gw-tls", version="0", config_hash="c0ffee")


def write_config(tmp_path: Path, mqtt: str) -> Path:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 200ms}}\n"
        f"buffer: {{path: buffer.db}}\nmqtt: {mqtt}\n"
    )
    return cfg


# --------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    "host",
    ["broker.plant.local", "10.0.4.2", "0.0.0.0", "::ffff:10.0.0.1", "fd00::2", "localhost.example.com",
     "127.0.0.1.nip.io", "my-localhost"],
)  # fmt: skip
def test_plain_mqtt_to_a_broker_off_loopback_is_refused(tmp_path: Path, host: str) -> None:
    cfg = write_config(tmp_path, f"{{host: '{host}', port: 1883}}")
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    [problem] = err.value.problems
    assert problem.path == ("mqtt", "tls")
    assert host in problem.message and "tls.enabled" in problem.message


def test_validate_exits_2_naming_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, "{host: broker.plant.local}")
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "mqtt.tls" in err and "broker.plant.local" in err and "Traceback" not in err


@pytest.mark.parametrize("host", ["127.0.0.1", "127.8.9.10", "::1", "localhost", "LocalHost", "localhost."])
def test_a_broker_on_loopback_needs_no_tls(tmp_path: Path, host: str) -> None:
    loaded = load_config(write_config(tmp_path, f"{{host: '{host}'}}"))
    assert loaded.config.mqtt is not None
    assert loaded.config.mqtt.tls_mode == "loopback"
    assert loaded.config.mqtt.security_warnings() == []


@pytest.mark.parametrize(
    ("tls", "mode"),
    [
        ("{enabled: true}", "on"),
        ("{enabled: false}", "off"),
        ("{enabled: true, verify: false}", "unverified"),
    ],
)
def test_tls_set_explicitly_is_accepted_off_loopback(tmp_path: Path, tls: str, mode: str) -> None:
    loaded = load_config(write_config(tmp_path, f"{{host: broker.plant.local, tls: {tls}}}"))
    assert loaded.config.mqtt is not None and loaded.config.mqtt.tls_mode == mode
    assert bool(loaded.config.mqtt.security_warnings()) == (mode != "on")


@pytest.mark.parametrize(
    ("mqtt", "words"),
    [
        ("{host: ''}", "at least 1 character"),
        ("{host: 127.0.0.1, tls: {enabled: maybe}}", "valid boolean"),
        ("{host: 127.0.0.1, tls: {verify: 0.5}}", "valid boolean"),
        ("{host: 127.0.0.1, tls: {enabled: true, key_password: pw}}", "key_password given without"),
    ],
)
def test_bad_tls_settings_are_clear_errors(tmp_path: Path, mqtt: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words):
        load_config(write_config(tmp_path, mqtt))


# --------------------------------------------------------------------------- every start warns


async def run_agent_once(cfg: Path) -> dict[str, Any]:
    agent = Agent(load_config(cfg))
    await agent.start()
    try:
        return await agent.status()
    finally:
        await agent.stop()


@pytest.mark.parametrize(
    ("tls", "mode", "words"),
    [
        ("{enabled: false}", "off", "TLS is off"),
        ("{enabled: true, verify: false}", "unverified", "does not verify"),
    ],
)
async def test_an_insecure_broker_setting_warns_at_every_start_and_in_status(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, tls: str, mode: str, words: str
) -> None:
    # 0.0.0.0 is not loopback by the rule, yet a connection to it stays on this machine (Linux
    # treats it as the local host): nothing listens on the port, so every attempt fails at once.
    cfg = write_config(tmp_path, f"{{host: 0.0.0.0, port: {free_port()}, tls: {tls}}}")
    for _ in range(2):
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            status = await run_agent_once(cfg)
        warned = [r for r in caplog.records if r.levelno == logging.WARNING and words in r.getMessage()]
        assert len(warned) == 1, [r.getMessage() for r in caplog.records]
        assert "0.0.0.0" in warned[0].getMessage()
        assert status["security"]["mqtt_tls"] == mode
        assert any(words in w for w in status["security"]["warnings"])


async def test_a_secure_setting_does_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = write_config(tmp_path, f"{{host: 127.0.0.1, port: {free_port()}}}")
    with caplog.at_level(logging.WARNING):
        status = await run_agent_once(cfg)
    assert status["security"]["mqtt_tls"] == "loopback"
    assert status["security"]["warnings"] == []
    assert not [r for r in caplog.records if "TLS" in r.getMessage()]


# --------------------------------------------------------------------------- a real TLS listener


def _cert(
    subject: str, key: ec.EllipticCurvePrivateKey, issuer: x509.Name, signer: ec.EllipticCurvePrivateKey,
    ca: bool,
) -> x509.Certificate:  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(signer, hashes.SHA256())


def _pem_key(key: ec.EllipticCurvePrivateKey, path: Path, password: bytes | None = None) -> Path:
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password) if password else serialization.NoEncryption()
    )
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc))
    return path


def make_pki(d: Path) -> dict[str, Path]:
    """A CA, a broker certificate for localhost/127.0.0.1 and an unrelated CA."""
    out: dict[str, Path] = {}
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test CA")])
    out["ca"] = d / "ca.pem"
    out["ca"].write_bytes(
        _cert("test CA", ca_key, ca_name, ca_key, True).public_bytes(serialization.Encoding.PEM)
    )
    other = ec.generate_private_key(ec.SECP256R1())
    other_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "other CA")])
    out["other_ca"] = d / "other-ca.pem"
    out["other_ca"].write_bytes(
        _cert("other CA", other, other_name, other, True).public_bytes(serialization.Encoding.PEM)
    )
    server_key = ec.generate_private_key(ec.SECP256R1())
    out["server_cert"] = d / "server.pem"
    out["server_cert"].write_bytes(
        _cert("localhost", server_key, ca_name, ca_key, False).public_bytes(serialization.Encoding.PEM)
    )
    out["server_key"] = _pem_key(server_key, d / "server.key")
    return out


@pytest.fixture
def tls_broker() -> Iterator[tuple[Mosquitto, dict[str, Path]]]:
    broker = Mosquitto()
    os.chmod(broker.dir, 0o755)  # mosquitto started as root reads the certificates as its own user
    pki = make_pki(broker.dir)
    for p in pki.values():
        os.chmod(p, 0o644)
    broker.conf.write_text(
        broker.conf.read_text() + f"cafile {pki['ca']}\ncertfile {pki['server_cert']}\n"
        f"keyfile {pki['server_key']}\n"
    )
    broker.start()
    try:
        yield broker, pki
    finally:
        broker.close()


async def test_tls_against_a_real_listener_verifies_and_unverified_connects_with_a_warning(
    tls_broker: tuple[Mosquitto, dict[str, Path]], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    broker, pki = tls_broker
    base = {"host": "localhost", "port": broker.port, "reconnect_min": "50ms", "reconnect_max": "200ms"}
    cases = {
        "verified": {"enabled": True, "ca_file": str(pki["ca"])},
        "wrong-ca": {"enabled": True, "ca_file": str(pki["other_ca"])},
        "unverified": {"enabled": True, "ca_file": str(pki["other_ca"]), "verify": False},
    }
    forwarders: dict[str, Forwarder] = {}
    buffers: list[AsyncBuffer] = []
    try:
        with caplog.at_level(logging.WARNING):
            for name, tls in cases.items():
                buf = AsyncBuffer(BufferConfig(path=tmp_path / f"{name}.db"), "gw-tls")
                await buf.open()
                buffers.append(buf)
                cfg = MqttConfig.model_validate({**base, "client_id": name, "tls": tls})
                forwarders[name] = Forwarder(cfg, buf, IDENTITY)
                await forwarders[name].start()
        await until(lambda: forwarders["verified"].stats()["connected"], what="verified TLS connection")
        await until(lambda: forwarders["unverified"].stats()["connected"], what="unverified TLS connection")
        await until(lambda: forwarders["wrong-ca"].stats()["reconnects"] >= 1, what="a refused attempt")
        assert not forwarders["wrong-ca"].stats()["connected"]
        assert "certificate verify failed" in str(forwarders["wrong-ca"].stats()["last_error"])
        warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert sum("does not verify" in w for w in warnings) == 1, warnings  # only the unverified one
    finally:
        for fw in forwarders.values():
            await fw.stop(grace_s=0.5)
        for buf in buffers:
            await buf.close()


async def test_an_encrypted_client_key_is_loaded_with_its_password(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    cert = tmp_path / "client.pem"
    cert.write_bytes(_cert("client", key, name, key, True).public_bytes(serialization.Encoding.PEM))
    _pem_key(key, tmp_path / "client.key", b"k3y-pa55")
    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db"), "gw-tls")
    tls = {"enabled": True, "cert_file": str(cert), "key_file": str(tmp_path / "client.key")}
    good = MqttConfig.model_validate({"host": "127.0.0.1", "tls": {**tls, "key_password": "k3y-pa55"}})
    Forwarder(good, buf, IDENTITY)  # loads
    with pytest.raises(ValueError, match="cannot load certificates"):
        MqttConfig.model_validate({"host": "127.0.0.1", "tls": {**tls, "key_password": "wrong-pa55"}})


def test_certificates_that_run_cannot_load_are_refused_by_validate(tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "client")])
    (tmp_path / "client.pem").write_bytes(
        _cert("client", key, name, key, True).public_bytes(serialization.Encoding.PEM)
    )
    _pem_key(key, tmp_path / "client.key", b"k3y-pa55")
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    tls = "{enabled: true, cert_file: client.pem, key_file: client.key, key_password: wr0ng-pa55}"
    for bad in (tls, "{enabled: true, ca_file: junk.pem}"):
        with pytest.raises(ConfigError) as err:
            load_config(write_config(tmp_path, f"{{host: broker.plant.local, tls: {bad}}}"))
        [problem] = err.value.problems
        assert problem.path == ("mqtt", "tls") and "cannot load certificates" in problem.message
        assert "wr0ng-pa55" not in str(err.value)
    good = tls.replace("wr0ng-pa55", "k3y-pa55")
    assert load_config(write_config(tmp_path, f"{{host: broker.plant.local, tls: {good}}}")).config.mqtt
