"""Real parts for tests: a mosquitto broker on a free port, an MQTT collector, waiting
helpers with bounded time, and hand-written Modbus peers (a raw TCP socket, the device end
of a pty) for devices that misbehave in ways pymodbus's server cannot. Free ports come from
:mod:`cleanroom_common.net`, the one helper the demo, the simulators, the benches and the
tests share."""

from __future__ import annotations

import asyncio
import datetime as dt
import fcntl
import functools
import ipaddress
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

import paho.mqtt.client as mqtt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pymodbus.framer import FramerRTU

from cleanroom_common.net import free_port


def wait_for(cond: Callable[[], Any], timeout: float = 10.0, interval: float = 0.02, what: str = "") -> Any:
    """Poll ``cond`` until truthy; fail the test (never hang) after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what or cond}")
        time.sleep(interval)


async def until(cond: Callable[[], Any], within_s: float = 10.0, what: str = "") -> Any:
    """:func:`wait_for` for code on an event loop: yields to the loop between polls (the thing
    waited for runs there), and ``cond()`` may return a coroutine, which is awaited."""
    import asyncio

    deadline = time.monotonic() + within_s
    while True:
        v = cond()
        if asyncio.iscoroutine(v):
            v = await v
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within_s}s waiting for {what or cond}")
        await asyncio.sleep(0.02)


def mosquitto_binary() -> str:
    path = shutil.which("mosquitto")
    if path is None and os.path.exists("/usr/sbin/mosquitto"):
        path = "/usr/sbin/mosquitto"
    if not path:
        raise RuntimeError("mosquitto not installed: .ci/run installs it (apt-get install mosquitto)")
    return path


class Mosquitto:
    """A private mosquitto on 127.0.0.1:port that a test can stop and restart."""

    def __init__(self, port: int | None = None, extra_conf: str = "", persistence: bool = False) -> None:
        """``persistence``: sessions and queued messages survive a stop/start, so a
        subscriber with a persistent session misses nothing across a broker restart."""
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="mosq-"))
        self.conf = self.dir / "mosquitto.conf"
        # mosquitto started as root drops to user "mosquitto", which cannot write our temp
        # folder; "user root" keeps it (the option is ignored when not started as root).
        persist = (
            f"persistence true\npersistence_location {self.dir}/\nuser root\n"
            if persistence
            else "persistence false\n"
        )
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{persist}"
            f"max_inflight_messages 0\nmax_queued_messages 0\n{extra_conf}"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        self.proc = subprocess.Popen(
            [mosquitto_binary(), "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        wait_for(self._accepting, timeout=10, what=f"mosquitto on port {self.port}")
        return self

    def _accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- TLS, mutual TLS


@dataclass(frozen=True)
class Issued:
    """A certificate and its private key, both PEM files."""

    cert: Path
    key: Path


class CertAuthority:
    """A certificate authority made in the test (``cryptography``, EC P-256): it issues broker and
    client certificates that are valid, expired or for other host names, so every refusal a
    broker link can meet is produced by real files, not by mocks."""

    def __init__(self, folder: Path, name: str = "test CA") -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        self._key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(self.name)
            .issuer_name(self.name)
            .public_key(self._key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(days=1))
            .not_valid_after(now + dt.timedelta(days=30))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(
                x509.KeyUsage(False, False, False, False, False, True, True, False, False), critical=True
            )
            .sign(self._key, hashes.SHA256())
        )
        self.cert = folder / f"{name.replace(' ', '-')}.pem"
        self.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))

    def issue(
        self,
        stem: str,
        *,
        hosts: Sequence[str] = ("localhost", "127.0.0.1"),
        client: bool = False,
        expired: bool = False,
        key_password: str | None = None,
    ) -> Issued:
        """A leaf certificate: for a server (``hosts`` as its subject alternative names) or a
        client; ``expired`` ended yesterday; ``key_password`` encrypts the key file."""
        key = ec.generate_private_key(ec.SECP256R1())
        now = dt.datetime.now(dt.UTC)
        start, end = (now - dt.timedelta(days=10), now - dt.timedelta(days=1)) if expired else (
            now - dt.timedelta(minutes=5), now + dt.timedelta(days=1))  # fmt: skip
        names: list[x509.GeneralName] = []
        for host in hosts:
            try:
                names.append(x509.IPAddress(ipaddress.ip_address(host)))
            except ValueError:
                names.append(x509.DNSName(host))
        usage = ExtendedKeyUsageOID.CLIENT_AUTH if client else ExtendedKeyUsageOID.SERVER_AUTH
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, stem)]))
            .issuer_name(self.name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(start)
            .not_valid_after(end)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        )
        if names:
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        cert = self.folder / f"{stem}.pem"
        cert.write_bytes(builder.sign(self._key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
        enc: serialization.KeySerializationEncryption = (
            serialization.BestAvailableEncryption(key_password.encode())
            if key_password
            else serialization.NoEncryption()
        )
        key_file = self.folder / f"{stem}.key"
        key_file.write_bytes(
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)
        )
        return Issued(cert, key_file)


@dataclass(frozen=True)
class TlsListener:
    """One TLS listener of a :class:`TlsMosquitto`."""

    port: int
    server: Issued
    require_certificate: bool = True
    password_file: Path | None = None
    """Clients must also log in with a user name and password from this mosquitto password file."""


class TlsMosquitto(Mosquitto):
    """A private mosquitto with its plain listener on 127.0.0.1 (for :class:`Collector`, anonymous)
    and TLS listeners, each with its own broker certificate, optionally requiring a client
    certificate signed by ``ca`` (mutual TLS) and a password. Settings are per listener, so the
    plain one stays anonymous while the TLS ones authenticate."""

    def __init__(self, ca: CertAuthority) -> None:
        super().__init__()
        self.ca = ca
        self.listeners: dict[str, TlsListener] = {}

    def add_listener(
        self,
        name: str,
        server: Issued | None = None,
        *,
        require_certificate: bool = True,
        users: dict[str, str] | None = None,
    ) -> TlsListener:
        """A TLS listener on a free port (call before :meth:`start`); ``server`` defaults to a
        valid certificate for localhost and 127.0.0.1; ``users`` (name: password) are required."""
        password_file = None
        if users:
            password_file = self.dir / f"{name}.passwd"
            password_file.touch()
            for user, password in users.items():
                subprocess.run(
                    ["mosquitto_passwd", "-b", str(password_file), user, password], check=True, timeout=10
                )
        listener = TlsListener(
            free_port(), server or self.ca.issue(f"broker-{name}"), require_certificate, password_file
        )
        self.listeners[name] = listener
        self._write_conf()
        return listener

    def _write_conf(self) -> None:
        lines = [
            "per_listener_settings true",
            "persistence false",
            "user root",  # as root, mosquitto would drop to its own user, which cannot read the keys
            "max_inflight_messages 0",
            "max_queued_messages 0",
            f"listener {self.port} 127.0.0.1",
            "allow_anonymous true",
        ]
        for t in self.listeners.values():
            lines += [
                f"listener {t.port} 127.0.0.1",
                f"cafile {self.ca.cert}",
                f"certfile {t.server.cert}",
                f"keyfile {t.server.key}",
                f"require_certificate {'true' if t.require_certificate else 'false'}",
            ]
            if t.password_file is not None:
                lines += ["allow_anonymous false", f"password_file {t.password_file}"]
            else:
                lines.append("allow_anonymous true")
        self.conf.write_text("\n".join(lines) + "\n")

    def start(self) -> TlsMosquitto:
        super().start()
        for name, t in self.listeners.items():
            wait_for(functools.partial(_accepting, t.port), timeout=10, what=f"mosquitto TLS listener {name}")
        return self


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Collector:
    """A test subscriber: collects every message on ``topic`` (QoS 1) in arrival order."""

    def __init__(self, port: int, topic: str = "#", persistent: bool = False) -> None:
        """``persistent``: a non-clean session, so the broker queues what arrives while
        this subscriber is reconnecting (use with ``Mosquitto(persistence=True)``)."""
        self.messages: list[tuple[str, bytes, bool]] = []
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        client_id = f"collector-{os.getpid()}-{id(self)}"
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=not persistent
        )
        self.client.reconnect_delay_set(0.1, 1)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(topic, qos=1)
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        if not self._subscribed.wait(10):
            raise AssertionError("collector could not subscribe")

    def _on_message(self, client: Any, userdata: Any, msg: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.messages.append((msg.topic, msg.payload, bool(msg.retain)))

    def json(self, suffix: str = "") -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(p) for t, p, _ in self.messages if t.endswith(suffix) and p]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class ThreadedSim:
    """Run an async simulator context manager (e.g. ``serve_bioreactor_modbus(...)``) on
    its own event loop in a thread, so a test can run the agent as a separate process
    and still look at the simulator's model."""

    def __init__(self, factory: Callable[[], Any]) -> None:
        import asyncio

        self._factory = factory
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="sim-loop", daemon=True)
        self._cm: Any = None
        self.sim: Any = None

    def __enter__(self) -> Any:
        import asyncio

        self._thread.start()
        self._cm = self._factory()
        self.sim = asyncio.run_coroutine_threadsafe(self._cm.__aenter__(), self._loop).result(15)
        return self.sim

    def call(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on the simulator's loop (models are not thread-safe)."""
        import asyncio

        async def run() -> Any:
            return fn()

        return asyncio.run_coroutine_threadsafe(run(), self._loop).result(10)

    def __exit__(self, *exc: Any) -> None:
        import asyncio

        try:
            asyncio.run_coroutine_threadsafe(self._cm.__aexit__(None, None, None), self._loop).result(15)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._loop.close()


class AgentProcess:
    """``cleanroom-agent run`` as a real child process (so it can be SIGKILLed)."""

    def __init__(self, config: Path, log: Path) -> None:
        self.config = config
        self.log = log
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        import sys

        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "agent.cli", "run", "-c", str(self.config)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self

    def running(self) -> bool:
        """True while the agent runs; raises with its log if it exited (fail fast, not by timeout)."""
        if self.proc is None or self.proc.poll() is not None:
            raise AssertionError(f"agent exited unexpectedly:\n{self.log.read_text()[-3000:]}")
        return True

    def terminate(self, timeout: float = 20) -> int:
        assert self.proc is not None
        self.proc.terminate()
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait(10)
            self.proc = None


# --------------------------------------------------------------------------- Modbus peers


def mbap(tid: int, unit: int, pdu: bytes, length: int | None = None) -> bytes:
    """A Modbus TCP frame; ``length`` overrides the MBAP length field (a header that lies)."""
    return struct.pack(">HHHB", tid, 0, len(pdu) + 1 if length is None else length, unit) + pdu


def registers_pdu(fc: int, values: list[int]) -> bytes:
    return bytes([fc, 2 * len(values)]) + struct.pack(f">{len(values)}H", *values)


def registers_reply(tid: int, unit: int, pdu: bytes, value: int = 9) -> bytes:
    """The correct reply to a read-registers request: every register holds ``value``."""
    count = struct.unpack(">H", pdu[3:5])[0]
    return mbap(tid, unit, registers_pdu(pdu[0], [value] * count))


Script = Callable[[int, int, bytes], bytes | None]
"""(transaction id, unit, request PDU) → the bytes to send back, or None for silence."""


class MbapPeer:
    """A Modbus TCP "device" on a raw asyncio socket whose replies a test scripts frame by
    frame, so it can send what no real server would (garbage, truncation, wrong ids)."""

    def __init__(self, script: Script, delay: float = 0.0) -> None:
        self.script = script
        self.delay = delay
        self.port = free_port()
        self.connections = 0
        self.requests: list[bytes] = []  # request PDUs, in arrival order
        self.server: asyncio.Server | None = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while True:
                header = await reader.readexactly(7)
                tid, _, length, unit = struct.unpack(">HHHB", header)
                pdu = await reader.readexactly(length - 1)
                self.requests.append(pdu)
                if self.delay:
                    await asyncio.sleep(self.delay)
                out = self.script(tid, unit, pdu)
                if out:
                    writer.write(out)
                    await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def __aenter__(self) -> Self:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()


def crc(frame: bytes) -> bytes:
    """The Modbus RTU CRC of ``frame``, in wire order."""
    return int(FramerRTU.compute_CRC(frame)).to_bytes(2, "big")


class PtyPeer:
    """The device end of a pty, for the driver's real RTU client on the other end. It cuts
    what arrives into 8-byte requests (every read and write-single request is 8 bytes); a
    request with a bad CRC is line noise, so the buffer is dropped to resynchronise on the
    next one. Subclasses say how they answer."""

    def __init__(self) -> None:
        self.master, self._slave = os.openpty()
        self.path = os.ttyname(self._slave)
        self._buf = b""

    def answer(self, request: bytes) -> bytes | None:
        """The bytes to send for one 8-byte request (CRC included), or None for silence."""
        raise NotImplementedError

    def send(self, reply: bytes) -> None:
        os.write(self.master, reply)

    def _readable(self) -> None:
        try:
            self._buf += os.read(self.master, 4096)
        except OSError:
            return
        while len(self._buf) >= 8:
            request, self._buf = self._buf[:8], self._buf[8:]
            if crc(request[:6]) != request[6:]:
                self._buf = b""
                return
            reply = self.answer(request)
            if reply is not None:
                self.send(reply)

    @asynccontextmanager
    async def running(self) -> AsyncIterator[Self]:
        loop = asyncio.get_running_loop()
        loop.add_reader(self.master, self._readable)
        try:
            yield self
        finally:
            loop.remove_reader(self.master)
            os.close(self.master)
            os.close(self._slave)


NPM_DIR = Path(os.environ.get("CLEANROOM_NPM_CACHE", Path.home() / ".cache" / "cleanroom-edge" / "npm"))
"""Where the tests install the npm packages they run (Eclipse Tahu's), outside the repository."""


def npm_package(name: str, version: str, purpose: str) -> tuple[str, Path]:
    """node, and ``name@version`` installed under :data:`NPM_DIR`/``name`` (once per machine: later
    runs find it there; a folder per package, so two test workers never install into one). Without
    node or npm the test fails with what to install (``purpose`` says what for); it never skips."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(f"{purpose} needs node and npm on PATH (Debian: apt-get install nodejs npm)")
    prefix = NPM_DIR / name
    module = prefix / "node_modules" / name
    manifest = module / "package.json"
    prefix.mkdir(parents=True, exist_ok=True)
    with (prefix / ".install.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another pytest run may be installing it right now
        if not manifest.exists() or json.loads(manifest.read_text())["version"] != version:
            done = subprocess.run(
                [npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--ignore-scripts",
                 "--save-exact", f"{name}@{version}"],
                capture_output=True, text=True, timeout=240, check=False,
            )  # fmt: skip
            if done.returncode != 0:
                pytest.fail(f"npm install {name}@{version} failed:\n{done.stderr[-3000:]}")
    return node, module


@contextmanager
def refused_port() -> Iterator[int]:
    """A loopback port that refuses connections for as long as the block runs: bound, never
    listening, so no other test's server can take it between picking it and connecting to it
    (as it can with a ``free_port()`` that was let go)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        yield int(s.getsockname()[1])
