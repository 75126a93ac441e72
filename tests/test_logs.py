"""Log output (issue 13): JSON lines for journald and log shippers, repeated device errors
rate-limited with a count of what was left out, secrets masked whatever logged them."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.app.logs import JsonFormatter, RateLimitedHandler, Redacting, configure, secret_values
from agent.sinks.forwarder import MqttConfig
from cleanroom_common.net import free_port
from tests.support import Mosquitto, wait_for


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def logger() -> Iterator[logging.Logger]:
    log = logging.getLogger("test.logs")
    log.propagate = False
    log.setLevel(logging.DEBUG)
    yield log
    for h in list(log.handlers):
        log.removeHandler(h)


def lines(out: io.StringIO) -> list[dict[str, object]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_json_lines_carry_the_device_where_known(logger: logging.Logger) -> None:
    out = io.StringIO()
    handler = RateLimitedHandler(out)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)
    logger.warning("br1: %s (%s)", "timeout", "no answer", extra={"device": "br1", "error_kind": "timeout"})
    logger.info("plain line")
    try:
        raise ValueError("boom")
    except ValueError:
        logger.exception("failed")
    first, plain, failed = lines(out)
    assert first["message"] == "br1: timeout (no answer)"
    assert (first["level"], first["logger"], first["device"], first["error_kind"]) == (
        "WARNING", "test.logs", "br1", "timeout",
    )  # fmt: skip
    assert str(first["ts"]).endswith("+00:00")
    assert "device" not in plain
    assert "ValueError: boom" in str(failed["exc"])


def test_the_same_device_error_is_written_once_per_interval_then_counted(logger: logging.Logger) -> None:
    out, clock = io.StringIO(), FakeClock()
    handler = RateLimitedHandler(out, interval_s=60, clock=clock)
    handler.setFormatter(JsonFormatter())
    logger.addHandler(handler)

    def fail(device: str, kind: str) -> None:
        logger.warning("%s: %s", device, kind, extra={"device": device, "error_kind": kind})

    for _ in range(5):
        fail("br1", "timeout")
        clock.now += 1
    fail("br1", "comm_error")  # another kind of the same device: its own budget
    fail("br2", "timeout")  # another device: its own budget
    assert [(d["device"], d["error_kind"]) for d in lines(out)] == [
        ("br1", "timeout"), ("br1", "comm_error"), ("br2", "timeout"),
    ]  # fmt: skip
    clock.now += 60
    fail("br1", "timeout")
    summary, again = lines(out)[3:]
    assert summary["message"] == "br1: 4 more timeout errors not logged (at most one per 60s)"
    assert summary["suppressed"] == 4
    assert again["message"] == "br1: timeout" and "suppressed" not in again
    fail("br1", "timeout")
    handler.close()  # what is still held back is counted at the end
    assert lines(out)[-1]["message"] == "br1: 1 more timeout errors not logged (at most one per 60s)"


def test_secrets_are_masked_whatever_logged_them(logger: logging.Logger) -> None:
    mqtt = MqttConfig.model_validate(
        {
            "host": "127.0.0.1",
            "password": "hunter2-secret",
            "tls": {"cert_file": "/nonexistent/c.pem", "key_password": "pem-passphrase"},
        }
    )
    found = secret_values(mqtt, [{"token": mqtt.password}])
    assert found == {"hunter2-secret", "pem-passphrase"}
    out = io.StringIO()
    handler = RateLimitedHandler(out)
    handler.setFormatter(Redacting(JsonFormatter(), found))
    logger.addHandler(handler)
    logger.error("connect failed with password hunter2-secret and pem-passphrase")
    text = out.getvalue()
    assert "hunter2" not in text and "pem-passphrase" not in text
    assert lines(out)[0]["message"] == "connect failed with password *** and ***"


def test_configure_replaces_the_root_handlers() -> None:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    try:
        configure("WARNING", "json", stream=out)
        logging.getLogger("test.root").warning("hello")
        logging.getLogger("test.root").info("not at this level")
        assert lines(out) == [
            {"ts": lines(out)[0]["ts"], "level": "WARNING", "logger": "test.root", "message": "hello"}
        ]
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


def test_run_with_json_logs(tmp_path: Path, mosquitto: Mosquitto) -> None:
    """A real ``run --log-format json``: every line is JSON, the failing device is named, the broker
    password taken from the environment appears nowhere."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw-logs, status_listen: '127.0.0.1:{free_port()}'}}\n"
        "buffer: {path: buffer.db, commit_interval: 50ms}\n"
        f"mqtt: {{host: 127.0.0.1, port: {mosquitto.port}, username: u, password: '${{H5_PW}}'}}\n"
        "devices:\n"
        "  - id: br1\n"
        "    profile: bioreactor-sim\n"
        f"    connection: {{host: 127.0.0.1, port: {free_port()}, timeout: 200ms, backoff_min: 100ms}}\n"
    )
    log = tmp_path / "agent.log"
    env = {**os.environ, "H5_PW": "s3cret-broker-pw"}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "agent.cli", "run", "-c", str(cfg), "--log-format", "json"],
            stdout=out, stderr=subprocess.STDOUT, env=env,
        )  # fmt: skip
    try:
        wait_for(lambda: '"device": "br1"' in log.read_text(), 20, what="the device's error line")
        proc.terminate()
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    text = log.read_text()
    records = [json.loads(line) for line in text.splitlines()]
    assert {"ts", "level", "logger", "message"} <= set(records[0])
    failing = [r for r in records if r.get("device") == "br1" and r.get("error_kind")]
    assert failing and failing[0]["level"] == "WARNING"
    assert "s3cret-broker-pw" not in text
