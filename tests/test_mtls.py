"""Mutual TLS to the broker (issue 13, Secure), against a real mosquitto whose TLS listeners require
a client certificate. Every certificate is made in the test: the agent connects with its client
certificate (its key encrypted, opened with ``key_password``) and delivers; every way the
handshake can fail, on either side, is refused with an error that names the cause, in ``status``
and once in the log, never a traceback.

A broker refusing our client certificate is the hard case: with TLS 1.3 it does so only after
our side of the handshake completed, and its alert races our CONNECT, so without care the agent
reports an "Unspecified error"."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from agent.app.config import ConfigError, load_config
from agent.app.runtime import Agent
from agent.cli import main
from cleanroom_common.net import free_port
from tests.support import CertAuthority, Collector, Issued, TlsMosquitto, until

KEY_PASSWORD = "Kp-Walrus-5150"


@dataclass(frozen=True)
class Pki:
    ca: CertAuthority
    other_ca: CertAuthority
    client: Issued
    """Signed by ``ca``, key encrypted with :data:`KEY_PASSWORD`."""
    client_expired: Issued
    client_untrusted: Issued
    """Signed by ``other_ca``, which the broker does not trust."""


@dataclass(frozen=True)
class Setup:
    broker: TlsMosquitto
    pki: Pki


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    """One broker for the module: a listener requiring client certificates with a good broker
    certificate, one whose broker certificate expired, one whose certificate names another host."""
    d = tmp_path_factory.mktemp("pki")
    ca = CertAuthority(d / "ca")
    other = CertAuthority(d / "other", "other CA")
    pki = Pki(
        ca=ca,
        other_ca=other,
        client=ca.issue("gw-client", client=True, hosts=(), key_password=KEY_PASSWORD),
        client_expired=ca.issue("gw-expired", client=True, hosts=(), expired=True),
        client_untrusted=other.issue("gw-untrusted", client=True, hosts=()),
    )
    broker = TlsMosquitto(ca)
    broker.add_listener("mtls")
    broker.add_listener("expired", ca.issue("broker-expired", expired=True))
    broker.add_listener("wrongname", ca.issue("broker-elsewhere", hosts=("broker.plant.example",)))
    broker.start()
    try:
        yield Setup(broker, pki)
    finally:
        broker.close()


def write_config(tmp_path: Path, port: int, tls: dict[str, Any]) -> Path:
    mqtt = {"host": "localhost", "port": port, "reconnect_min": "50ms", "reconnect_max": "200ms",
            "tls": {"enabled": True, **tls}}  # fmt: skip
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw-mtls, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 500ms}}\n"
        f"buffer: {{path: buffer.db, commit_interval: 50ms}}\nmqtt: {json.dumps(mqtt)}\n"
    )
    return cfg


def client_tls(issued: Issued, ca: Path, password: str | None = None) -> dict[str, Any]:
    tls: dict[str, Any] = {"ca_file": str(ca), "cert_file": str(issued.cert), "key_file": str(issued.key)}
    return tls if password is None else {**tls, "key_password": password}


async def test_the_agent_connects_with_its_client_certificate_and_delivers(
    setup: Setup, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    pki, broker = setup.pki, setup.broker
    collector = Collector(broker.port)  # the plain, anonymous listener: what the broker received
    tls = client_tls(pki.client, pki.ca.cert, KEY_PASSWORD)
    agent = Agent(load_config(write_config(tmp_path, broker.listeners["mtls"].port, tls)))
    caplog.set_level(logging.INFO)
    await agent.start()
    try:
        await until(lambda: agent.forwarder and agent.forwarder.stats()["connected"], 10, "mTLS connection")
        # The agent audits its own start: that record reaching the broker is delivery over mTLS.
        await until(lambda: collector.json("/agent/audit"), 10, "the agent_start audit record")
        await until(lambda: agent.forwarder and agent.forwarder.stats()["acked"] >= 1, 10, "a PUBACK")
        status = await agent.status()
        assert status["broker"]["connected"] and status["broker"]["last_error"] is None
        assert status["security"]["mqtt_tls"] == "on"
        statuses = [json.loads(p) for t, p, _ in list(collector.messages) if "/agent/status" in t and p]
        assert [s["agent"] for s in statuses if s["status"] == "online"] == ["gw-mtls"]
    finally:
        await agent.stop()
        collector.close()
    assert KEY_PASSWORD not in caplog.text


REFUSALS: dict[str, tuple[str, Callable[[Pki], dict[str, Any]], str]] = {
    "wrong CA": ("mtls", lambda p: client_tls(p.client, p.other_ca.cert, KEY_PASSWORD),
                 "broker certificate is not signed by a CA of tls.ca_file"),
    "wrong host name": ("wrongname", lambda p: client_tls(p.client, p.ca.cert, KEY_PASSWORD),
                        "broker certificate is not valid for mqtt.host"),
    "expired broker certificate": ("expired", lambda p: client_tls(p.client, p.ca.cert, KEY_PASSWORD),
                                   "broker certificate has expired"),
    "no client certificate": ("mtls", lambda p: {"ca_file": str(p.ca.cert)},
                              "broker requires a client certificate"),
    "expired client certificate": ("mtls", lambda p: client_tls(p.client_expired, p.ca.cert),
                                   "refused the client certificate: it has expired"),
    "untrusted client certificate": ("mtls", lambda p: client_tls(p.client_untrusted, p.ca.cert),
                                     "does not trust the CA that signed the client certificate"),
}  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
async def test_a_refused_handshake_names_its_cause_in_status_and_once_in_the_log(
    setup: Setup,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
    case: str,
) -> None:
    listener, tls, words = REFUSALS[case]
    cfg = write_config(tmp_path, setup.broker.listeners[listener].port, tls(setup.pki))
    agent = Agent(load_config(cfg))
    caplog.set_level(logging.INFO)
    await agent.start()
    try:
        assert agent.forwarder is not None
        fw = agent.forwarder
        await until(lambda: fw.stats()["reconnects"] >= 3, 15, "three refused attempts")
        status = await agent.status()
    finally:
        await agent.stop()
    assert not status["broker"]["connected"]
    assert words in str(status["broker"]["last_error"]), status["broker"]["last_error"]
    said = [r for r in caplog.records if words in r.getMessage() and r.levelno >= logging.WARNING]
    assert len(said) == 1, f"once per streak of refusals, not per retry: {[r.getMessage() for r in said]}"
    assert f"localhost:{setup.broker.listeners[listener].port}" in (said[0].getMessage())
    assert "_ssl.c" not in said[0].getMessage(), "OpenSSL's source line is noise to an operator"
    assert not [r for r in caplog.records if r.exc_info], "no traceback in the log"
    out, err = capfd.readouterr()
    assert "Traceback" not in caplog.text + out + err
    assert KEY_PASSWORD not in caplog.text + out + err + json.dumps(status)


def test_an_encrypted_client_key_with_a_wrong_password_is_refused_by_validate_and_run(
    setup: Setup, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    wrong = "Wr0ng-Narwhal-11"
    cfg = write_config(tmp_path, setup.broker.listeners["mtls"].port,
                       client_tls(setup.pki.client, setup.pki.ca.cert, wrong))  # fmt: skip
    with pytest.raises(ConfigError) as err:
        load_config(cfg)
    [problem] = err.value.problems
    assert problem.path == ("mqtt", "tls") and "tls.key_password does not decrypt" in problem.message
    for argv in (["validate", str(cfg)], ["run", "-c", str(cfg)]):
        assert main(argv) == 2, argv
        out, errs = capsys.readouterr()
        assert "cannot load certificates" in errs and "mqtt.tls" in errs
        assert "Traceback" not in out + errs
        assert wrong not in out + errs and KEY_PASSWORD not in out + errs


def test_an_encrypted_client_key_without_key_password_never_prompts(setup: Setup, tmp_path: Path) -> None:
    """OpenSSL's default asks for the passphrase on the terminal: ``run`` started from a shell
    would wait for it, and without a terminal the error is a bare EINVAL."""
    cfg = write_config(tmp_path, setup.broker.listeners["mtls"].port,
                       client_tls(setup.pki.client, setup.pki.ca.cert))  # fmt: skip
    # A terminal on stdin, typing the right passphrase: it must not be read.
    run = subprocess.run(  # noqa: PLW1510 (the exit status is asserted)
        ["script", "-qec", f"{sys.executable} -m agent.cli validate {cfg}", "/dev/null"],
        input=f"{KEY_PASSWORD}\n{KEY_PASSWORD}\n", capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2, run.stdout + run.stderr
    assert "PEM pass phrase" not in run.stdout
    assert "the private key is encrypted: set tls.key_password" in run.stdout
