"""paho driven by the forwarder's event loop, against a real mosquitto: no paho thread while
connected and publishing; acknowledgements handled on the loop's thread; a callback that raises
drops the connection (the broker publishes the will), is logged once and counted, and the
forwarder reconnects and delivers everything; TLS delivers a burst whose bytes wait decrypted in
the SSL layer, where epoll does not see them; paho's keepalive PINGREQs, sent from the loop,
keep an idle connection up, and stop sends a DISCONNECT; stop waits for a connection attempt
in progress in its worker thread."""

from __future__ import annotations

import asyncio
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from agent.buffer.async_buffer import AsyncBuffer
from agent.sinks.forwarder import Forwarder, MqttConfig
from tests import test_forwarder
from tests.support import CertAuthority, Collector, Mosquitto, TlsMosquitto, until
from tests.test_forwarder import Rig, blocks_for, check_chains, dedup_in_order, received_seqs

IDENTITY = test_forwarder.IDENTITY
STATUS = "cleanroom/agent/status/gw-test"
make_rig = test_forwarder.make_rig
"""The forwarder tests' rig (a buffer and a forwarder on a broker), shared."""


async def _delivered(buf: AsyncBuffer) -> bool:
    return int((await buf.stats())["depth_records"]) == 0


def _paho_threads(fw: Forwarder) -> list[str]:
    """paho's network thread is named after the client id (``loop_start``)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(f"paho-mqtt-client-{fw.client_id}")]


async def test_no_paho_thread_while_connected_and_publishing(
    mosquitto: Mosquitto, collector: Collector, make_rig: Callable[..., Any]
) -> None:
    before = {t.name for t in threading.enumerate()}
    rig = await make_rig(mosquitto.port)
    await until(lambda: rig.fw.stats()["connected"], what="connected")
    seen: set[str] = set()
    for i in range(100):
        rig.buf.submit([blocks_for("d1", i), blocks_for("d2", i)])
        if i % 10 == 0:
            await asyncio.sleep(0.01)
            seen |= {t.name for t in threading.enumerate()}
            assert not _paho_threads(rig.fw), "no paho network thread"
    await rig.buf.flush()
    await until(lambda: _delivered(rig.buf), what="all delivered")
    assert rig.fw.stats()["acked"] == rig.fw.stats()["published"] > 0
    seen |= {t.name for t in threading.enumerate()}
    # The test's own subscriber runs paho with loop_start(): its thread is the only paho one.
    paho = {n for n in seen - before if n.startswith("paho-mqtt-client-")}
    assert not paho, f"threads started by the forwarder: {paho}"
    await until(lambda: len(received_seqs(collector.messages, "d2")) == 400, what="all readings arrived")


async def test_a_puback_is_handled_on_the_loop_thread(
    mosquitto: Mosquitto, make_rig: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    loop = asyncio.get_running_loop()
    rig = await make_rig(mosquitto.port)
    handled: list[tuple[int, bool]] = []
    original = rig.fw._on_puback

    def spy(client: mqtt.Client, mid: int, ok: bool, reason: str) -> None:
        try:
            on_loop = asyncio.get_running_loop() is loop
        except RuntimeError:  # no running loop in this thread
            on_loop = False
        handled.append((threading.get_ident(), on_loop))
        original(client, mid, ok, reason)

    monkeypatch.setattr(rig.fw, "_on_puback", spy)
    for i in range(20):
        rig.buf.submit([blocks_for("d1", i)])
    await rig.buf.flush()
    await until(lambda: _delivered(rig.buf), what="delivered")
    assert handled, "PUBACKs were handled"
    assert set(handled) == {(threading.get_ident(), True)}, "every PUBACK on the loop's own thread"


async def test_a_callback_that_raises_drops_the_connection_and_nothing_is_lost(
    mosquitto: Mosquitto,
    collector: Collector,
    make_rig: Callable[..., Any],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="cleanroom.forwarder")
    rig = await make_rig(mosquitto.port)
    await until(lambda: [s["status"] for s in collector.json("/agent/status/gw-test")] == ["online"],
                what="online")  # fmt: skip
    original = rig.fw._on_puback
    raised: list[int] = []

    def once(client: mqtt.Client, mid: int, ok: bool, reason: str) -> None:
        if not raised:
            raised.append(mid)
            raise RuntimeError("injected callback failure")
        original(client, mid, ok, reason)

    monkeypatch.setattr(rig.fw, "_on_puback", once)
    for i in range(60):
        rig.buf.submit([blocks_for("d1", i), blocks_for("d2", i)])
        await asyncio.sleep(0.002)
    await rig.buf.flush()
    await until(lambda: _delivered(rig.buf), within_s=15, what="everything delivered after the reconnect")
    assert raised, "the callback raised"
    stats = rig.fw.stats()
    assert stats["callback_errors"] == 1 and stats["reconnects"] >= 1 and stats["connected"]
    failures = [r for r in caplog.records if "mqtt-network failed" in r.getMessage()]
    assert len(failures) == 1, "logged once"
    assert failures[0].exc_info is not None and "injected callback failure" in caplog.text
    for device in ("d1", "d2"):
        await until(lambda d=device: len(set(received_seqs(collector.messages, d))) == 240, what="all")
        unique = dedup_in_order(received_seqs(collector.messages, device))
        assert len(unique) == 240 and unique == sorted(unique), "nothing lost, in order"
    check_chains(collector.messages)  # every segment linked to the one before: none missing
    await until(lambda: len(collector.json("/agent/status/gw-test")) >= 3, what="the will, online again")
    statuses = collector.json("/agent/status/gw-test")
    assert [s["status"] for s in statuses[:3]] == ["online", "offline", "online"]
    assert statuses[1]["reason"] == "connection_lost", "dropped without DISCONNECT: the will"
    assert statuses[2]["session"] == f"{IDENTITY.started_ns}.2"


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[tuple[TlsMosquitto, int]]:
    """A TLS mosquitto (no client certificate required) and its TLS port; ``broker.port`` is plain."""
    broker = TlsMosquitto(CertAuthority(tmp_path / "ca"))
    listener = broker.add_listener("tls", require_certificate=False)
    broker.start()
    try:
        yield broker, listener.port
    finally:
        broker.close()


async def _tls_burst(rig: Rig, collector: Collector, port: int, commands: int) -> list[bytes]:
    """A large burst of segments, then a burst of commands sent at once to the forwarder's command
    topic while it is idle; returns the commands its handler got, each checked to arrive in time."""
    await until(lambda: rig.fw.stats()["connected"], what="connected over TLS")
    got: list[bytes] = []
    rig.fw.add_command_handler("cleanroom/cmd/#", lambda topic, payload, retained: got.append(payload))
    for i in range(400):
        rig.buf.submit([blocks_for("d1", i), blocks_for("d2", i), blocks_for("d3", i)])
    await rig.buf.flush()
    await until(lambda: _delivered(rig.buf), within_s=20, what="the burst delivered over TLS")
    for device in ("d1", "d2", "d3"):
        await until(lambda d=device: len(set(received_seqs(collector.messages, d))) == 1600, what="all")
    sender = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="burst")
    sender.connect("127.0.0.1", port)
    sender.loop_start()
    try:
        infos = [sender.publish("cleanroom/cmd/x", str(i).encode(), qos=1) for i in range(commands)]
        for info in infos:
            info.wait_for_publish(10)
    finally:
        sender.disconnect()
        sender.loop_stop()
    # Well within the keepalive (30 s): bytes stuck in the SSL layer would wait for the PINGRESP.
    await until(lambda: len(got) == commands, within_s=5, what="every command handled at once")
    assert got == [str(i).encode() for i in range(commands)]
    assert rig.fw.stats()["reconnects"] == 0
    return got


async def test_tls_large_burst_to_a_tls_mosquitto(
    tls_broker: tuple[TlsMosquitto, int], make_rig: Callable[..., Any]
) -> None:
    broker, port = tls_broker
    collector = Collector(broker.port)
    try:
        rig = await make_rig(port, tls={"enabled": True, "ca_file": str(broker.ca.cert)}, inflight_window=64)
        await _tls_burst(rig, collector, broker.port, commands=300)
    finally:
        collector.close()


class TlsFront:
    """A TLS terminator in front of mosquitto's plain listener, as a load balancer is: what the
    broker sent since its last read goes out as one TLS record, so several MQTT packets share a
    record (mosquitto writes a record per packet). paho reads a packet at a time: the rest of
    the record waits, decrypted, in the client's SSL object, where epoll does not see it."""

    def __init__(self, target_port: int, ca: CertAuthority) -> None:
        server = ca.issue("tls-front")
        self._ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        self._ctx.load_cert_chain(str(server.cert), str(server.key))
        self._target = target_port
        self._loop = asyncio.new_event_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self.port = 0
        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(started,), name="tls-front", daemon=True)
        self._thread.start()
        assert started.wait(10)

    def _run(self, started: threading.Event) -> None:
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._relay, "127.0.0.1", 0, ssl=self._ctx)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        started.set()
        self._loop.run_forever()
        self._loop.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            broker_r, broker_w = await asyncio.open_connection("127.0.0.1", self._target)
            await asyncio.gather(self._pipe(reader, broker_w), self._pipe(broker_r, writer))
        finally:
            self._tasks.discard(task)

    @staticmethod
    async def _pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        try:
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        except (OSError, ssl.SSLError):
            pass
        finally:
            dst.close()

    async def _shutdown(self) -> None:
        self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


async def test_tls_bytes_pending_in_the_ssl_layer_are_read(
    tls_broker: tuple[TlsMosquitto, int], make_rig: Callable[..., Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    broker, _ = tls_broker
    pending: list[int] = []
    original = ssl.SSLSocket.pending

    def spy(self: ssl.SSLSocket) -> int:
        n = original(self)
        pending.append(n)
        return n

    monkeypatch.setattr(ssl.SSLSocket, "pending", spy)
    front = TlsFront(broker.port, broker.ca)
    collector = Collector(broker.port)
    try:
        rig = await make_rig(
            front.port, tls={"enabled": True, "ca_file": str(broker.ca.cert)}, inflight_window=64
        )
        await _tls_burst(rig, collector, broker.port, commands=300)
        assert any(pending), "the burst left decrypted bytes in the SSL layer (the case under test)"
        await rig.fw.stop(grace_s=0.5)
    finally:
        collector.close()
        front.close()


async def test_keepalive_pings_keep_an_idle_connection_up(make_rig: Callable[..., Any]) -> None:
    """Nothing published for three keepalive periods: paho's PINGREQs (sent by the loop's timer
    task) are all that tells the broker the client lives; the broker drops a client silent for
    1.5 keepalives."""
    broker = Mosquitto(extra_conf="user root\nlog_type all\nlog_dest file {log}\n")
    log_file = broker.dir / "mosquitto.log"
    broker.conf.write_text(broker.conf.read_text().replace("{log}", str(log_file)))
    broker.start()
    try:
        keepalive = MqttConfig.model_fields["keepalive"].metadata[0].ge
        rig = await make_rig(broker.port, keepalive=keepalive)
        await until(lambda: rig.fw.stats()["connected"], what="connected")
        started = time.monotonic()
        while time.monotonic() - started < 3 * keepalive + 1:
            assert rig.fw.stats()["connected"], "the connection stayed up"
            await asyncio.sleep(0.2)
        stats = rig.fw.stats()
        assert stats["reconnects"] == 0 and stats["published"] == 0
        pings = log_file.read_text().count(f"Received PINGREQ from {rig.fw.client_id}")
        assert pings >= 2, f"PINGREQs sent while idle: {pings}"
        await rig.fw.stop(grace_s=0.5)
        assert rig.fw._sock is None and rig.fw._client.socket() is None, "closed and no longer watched"
        await until(lambda: f"Received DISCONNECT from {rig.fw.client_id}" in log_file.read_text(),
                    what="a clean DISCONNECT on stop")  # fmt: skip
    finally:
        broker.close()


async def test_stop_waits_for_a_connection_attempt_in_progress(make_rig: Callable[..., Any]) -> None:
    """A TLS handshake that never completes (the listener never accepts): the attempt blocks in
    its worker thread for ``connect_timeout``; stop waits for it instead of racing it, and ends
    with nothing left watched."""
    with socket.create_server(("127.0.0.1", 0), backlog=4) as silent:
        rig = await make_rig(
            silent.getsockname()[1], tls={"enabled": True, "verify": False}, connect_timeout="1s"
        )
        await until(lambda: rig.fw._connecting is not None, what="an attempt started")
        await asyncio.sleep(0.2)
        assert rig.fw._connecting is not None and not rig.fw._connecting.done(), "still handshaking"
        started = time.monotonic()
        await rig.fw.stop(grace_s=0.2)
        assert time.monotonic() - started < 3
        assert rig.fw._connecting.done() and rig.fw._sock is None
        assert not rig.fw.stats()["connected"]
