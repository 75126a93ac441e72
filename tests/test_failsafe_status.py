"""Secure by default, the status listener: ``validate`` accepts exactly the addresses ``run`` binds;
loopback by default and a warning elsewhere; request size, time and connection count are bounded
(a slowloris client cannot exhaust file descriptors); read-only, one request per connection, and a
loopback listener answers only to a loopback host name (DNS rebinding); a request never runs on the
buffer's commit thread; secrets never appear in status output."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.app.config import ConfigError, load_config
from agent.app.runtime import Agent
from agent.app.status import StatusServer, fetch_status, parse_listen
from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.cli import main
from agent.core.records import Block
from cleanroom_common.net import free_port


def write_config(tmp_path: Path, listen: str, extra: str = "") -> Path:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw, status_listen: '{listen}', shutdown_grace: 200ms}}\n"
        f"buffer: {{path: buffer.db}}\n{extra}"
    )
    return cfg


async def fake_status() -> dict[str, Any]:
    return {"agent": "gw", "ok": True}


class _AnyInt:
    def __eq__(self, other: object) -> bool:
        return isinstance(other, int)

    __hash__ = object.__hash__


ANY_INT: Any = _AnyInt()
"""The time the listener adds to the status (``now``)."""


@contextlib.asynccontextmanager
async def serving(listen: str, **kw: Any) -> AsyncIterator[StatusServer]:
    server = StatusServer(listen, fake_status, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` and read until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        out = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                out += chunk
        return out


# --------------------------------------------------------------------------- validate == run


@pytest.mark.parametrize(
    ("listen", "words"),
    [
        ("localhost", "HOST:PORT"),
        ("", "HOST:PORT"),
        (":8765", "host"),
        ("127.0.0.1:", "port"),
        ("127.0.0.1:http", "port"),
        ("127.0.0.1:0", "1 to 65535"),
        ("127.0.0.1:99999", "1 to 65535"),
        ("127.0.0.1:-1", "port"),
        ("::1:8765", "[::1]"),
        ("[::1:8765", "HOST:PORT"),
        ("[127.0.0.1]:8765", "IPv6"),
        ("gw-suite-b:8765", "IP address or localhost"),
        ("300.1.1.1:8765", "IP address or localhost"),
        ("127.0.0.1:8765 ", "port"),
    ],
)
def test_validate_refuses_what_run_cannot_bind(tmp_path: Path, listen: str, words: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(write_config(tmp_path, listen))
    [problem] = err.value.problems
    assert problem.path == ("agent", "status_listen")
    assert words in problem.message


@pytest.mark.parametrize("host", ["localhost", "127.0.0.1", "127.0.0.2", "[::1]", "LOCALHOST"])
async def test_what_validate_accepts_run_binds_and_answers(tmp_path: Path, host: str) -> None:
    listen = f"{host}:{free_port()}"
    loaded = load_config(write_config(tmp_path, listen))
    agent = Agent(loaded)
    await agent.start()
    try:
        status = await asyncio.to_thread(fetch_status, listen)
        assert status["agent"] == "gw"
        assert status["security"]["status_listener"] == "loopback"
    finally:
        await agent.stop()


def test_the_status_command_refuses_a_bad_address_clearly(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["status", "--listen", "localhost"]) == 2
    err = capsys.readouterr().err
    assert "HOST:PORT" in err and "Traceback" not in err


async def test_a_listener_off_loopback_warns(caplog: pytest.LogCaptureFixture) -> None:
    # An address of no interface here (TEST-NET-2): the bind fails, nothing is exposed by the test.
    assert not parse_listen("198.51.100.7:8765").loopback
    assert not parse_listen("0.0.0.0:8765").loopback and not parse_listen("[::]:8765").loopback
    with caplog.at_level(logging.WARNING, logger="cleanroom.status"):
        async with serving(f"198.51.100.7:{free_port()}") as server:
            assert not server.listening
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("not loopback" in m and "198.51.100.7" in m for m in messages), messages


# --------------------------------------------------------------------------- bounds


async def test_oversized_request_line_and_head_are_refused_and_the_listener_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with serving(f"127.0.0.1:{free_port()}") as server:
        port = server.port
        with caplog.at_level(logging.ERROR):
            long_line = await asyncio.to_thread(
                raw_exchange, port, b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n\r\n"
            )
            long_head = await asyncio.to_thread(
                raw_exchange,
                port,
                b"GET /api/status HTTP/1.1\r\n" + b"X-Pad: " + b"b" * 100_000 + b"\r\n\r\n",
            )
            many_fields = await asyncio.to_thread(
                raw_exchange, port, b"GET /api/status HTTP/1.1\r\n" + b"X: y\r\n" * 500 + b"\r\n"
            )
            ok = await asyncio.to_thread(
                raw_exchange, port, b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
            )
        for refused in (long_line, long_head, many_fields):
            assert refused.startswith((b"HTTP/1.0 400 ", b"HTTP/1.1 400 ")), refused[:200]
        assert ok.startswith(b"HTTP/1.1 200 ") and b"Connection: close" in ok.split(b"\r\n\r\n")[0]
        assert json.loads(ok.split(b"\r\n\r\n", 1)[1]) == {"agent": "gw", "ok": True, "now": ANY_INT}
        assert not caplog.records, [r.getMessage() for r in caplog.records]


async def test_slowloris_clients_are_capped_and_timed_out_and_a_normal_request_is_answered() -> None:
    cap, timeout = 8, 1.5
    async with serving(f"127.0.0.1:{free_port()}", max_connections=cap, head_timeout=timeout) as server:
        port = server.port
        stop = threading.Event()
        closed_after: list[float] = []
        peak = 0

        def slow_client() -> None:
            """A valid request head, then a byte of a header field every second, never the end of
            the head; note when the server hangs up."""
            start = time.monotonic()
            next_byte = start
            chunk = b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.settimeout(0.1)
                while not stop.is_set():
                    if time.monotonic() >= next_byte:
                        next_byte += 1.0
                        with contextlib.suppress(OSError):
                            s.sendall(chunk)
                        chunk = b"a"
                    try:
                        if s.recv(1024) == b"":
                            break
                    except TimeoutError:
                        pass
                    except OSError:
                        break
                closed_after.append(time.monotonic() - start)

        threads = [threading.Thread(target=slow_client, daemon=True) for _ in range(40)]
        for t in threads:
            t.start()
        try:
            await asyncio.sleep(0.5)  # all of them connected and trickling
            peak = server.open_connections
            answered = await asyncio.to_thread(fetch_status, f"127.0.0.1:{port}", 3.0)
            deadline = time.monotonic() + timeout + 2
            while time.monotonic() < deadline and len(closed_after) < len(threads):
                peak = max(peak, server.open_connections)
                await asyncio.sleep(0.02)
        finally:
            stop.set()
            for t in threads:
                await asyncio.to_thread(t.join, 5)
        assert peak == cap  # held to the cap: the others were closed as newer ones came
        assert server.counts["evicted"] >= len(threads) - cap and server.counts["timed_out"] >= 1
        assert answered == {"agent": "gw", "ok": True, "now": ANY_INT}
        assert len(closed_after) == len(threads)
        assert max(closed_after) < timeout + 1.5, closed_after  # the server hung up on every one of them
        assert server.open_connections == 0


async def test_malformed_requests_over_a_socket_get_an_answer_or_a_close() -> None:
    rng = random.Random(7)
    async with serving(f"127.0.0.1:{free_port()}", head_timeout=0.5) as server:
        port = server.port
        good = b"GET /api/status?x=1 HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: */*\r\n\r\n"
        for i in range(300):
            if i % 3 == 0:
                junk = rng.randbytes(rng.randint(1, 300)) + b"\r\n\r\n"
            else:  # a request with a few bytes changed, inserted or deleted
                head = bytearray(good)
                for _ in range(rng.randint(1, 6)):
                    pos = rng.randrange(len(head))
                    head[pos : pos + rng.randint(0, 4)] = rng.randbytes(rng.randint(0, 4))
                junk = bytes(head) + b"\r\n\r\n"
            reply = await asyncio.to_thread(raw_exchange, port, junk)
            assert reply == b"" or reply.startswith((b"HTTP/1.1 2", b"HTTP/1.1 4", b"HTTP/1.0 4")), reply[
                :100
            ]
        assert server.open_connections == 0
        assert (await asyncio.to_thread(fetch_status, f"127.0.0.1:{port}")) == {
            "agent": "gw", "ok": True, "now": ANY_INT,
        }  # fmt: skip
        replies = {
            b"POST /api/status HTTP/1.1\r\nHost: localhost\r\n\r\n": b"HTTP/1.1 405 ",
            b"DELETE / HTTP/1.1\r\nHost: localhost\r\n\r\n": b"HTTP/1.1 405 ",
            b"GET /nope HTTP/1.1\r\nHost: localhost\r\n\r\n": b"HTTP/1.1 404 ",
            b"GET /../../etc/passwd HTTP/1.1\r\nHost: localhost\r\n\r\n": b"HTTP/1.1 404 ",
            b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n": b"HTTP/1.1 404 ",  # none configured here
            b"GET status HTTP/1.1\r\n\r\n": b"HTTP/1.0 400 ",
            # a page elsewhere reaching the listener through a name that resolves to 127.0.0.1
            b"GET /api/status HTTP/1.1\r\nHost: rebind.example:8765\r\n\r\n": b"HTTP/1.1 421 ",
            b"HEAD /api/status HTTP/1.1\r\nHost: [::1]:8765\r\n\r\n": b"HTTP/1.1 200 ",
        }
        for request, expected in replies.items():
            assert (await asyncio.to_thread(raw_exchange, port, request)).startswith(expected), request


# --------------------------------------------------------------------------- never on the commit thread


async def test_a_status_request_never_holds_up_a_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Buffer.stats`` over a backlog of a million rows takes 140 ms; here it takes 1.5 s, so a
    status request that ran on the buffer's commit thread would hold the commit behind it."""
    slow_stats = Buffer.stats

    def slow(self: Buffer, now: int | None = None) -> dict[str, Any]:
        time.sleep(1.5)
        return slow_stats(self, now)

    monkeypatch.setattr(Buffer, "stats", slow)
    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db", commit_interval=0.01), "gw")
    await buf.open()
    try:
        stats = asyncio.create_task(buf.stats())
        await asyncio.sleep(0.1)  # the stats query is running
        t0 = time.monotonic()
        block = Block(device="d1", group="g", acq_ts_ns=time.time_ns(), tags=["t"], units=["-"], values=[1.0])
        buf.submit([block])
        await buf.flush()
        assert time.monotonic() - t0 < 0.8
        assert block.seq_first == 0
        assert (await stats)["next_seq"] >= 0
        assert (await buf.stats())["depth_readings"] == 1  # the reader sees what was committed
    finally:
        await buf.close()


# --------------------------------------------------------------------------- secrets


async def test_secrets_never_appear_in_status_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MQTT_PW", "mqtt-Pa55w0rd!")
    listen = f"127.0.0.1:{free_port()}"
    cfg = write_config(
        tmp_path,
        listen,
        f"mqtt: {{host: 127.0.0.1, port: {free_port()}, username: edge, password: '${{MQTT_PW}}'}}\n",
    )
    agent = Agent(load_config(cfg))
    await agent.start()
    try:
        await asyncio.sleep(0.3)  # a connection attempt has failed: last_error is filled in
        raw = json.dumps(await asyncio.to_thread(fetch_status, listen))
        assert await asyncio.to_thread(main, ["status", "--listen", listen]) in (0, 1)  # 1: unhealthy
        assert await asyncio.to_thread(main, ["status", "--listen", listen, "--json"]) in (0, 1)
    finally:
        await agent.stop()
    out = capsys.readouterr()
    assert "security" in raw and "last_error" in raw  # the output is the real one...
    for secret in ("mqtt-Pa55w0rd!", "Pa55w0rd"):
        assert secret not in raw and secret not in out.out and secret not in out.err  # ...without the secret


def test_security_warnings_include_each_drivers_own() -> None:
    """An OPC UA device without security warns in the device's status; the agent's security
    section must carry it too, or an auditor reading only that section would miss it."""
    from agent.app.status import security_report

    devices = {
        "br-02": {
            "driver": {
                "warnings": ["OPC UA security_policy None: the session is neither signed nor encrypted"]
            }
        },
        "inc-01": {"driver": {"warnings": []}},
    }
    report = security_report(None, parse_listen("127.0.0.1:8765"), devices)
    assert report["warnings"] == [
        "device br-02: OPC UA security_policy None: the session is neither signed nor encrypted"
    ]
    assert security_report(None, parse_listen("127.0.0.1:8765"))["warnings"] == []
