"""OPC UA driver against a real asyncua server over TCP on loopback.

The server runs in its own thread and event loop (so the driver's loop sees a real
remote peer, including a server that stops answering), with a LADS-like bioreactor:
string, numeric and browse-path addressed variables, values with Uncertain and Bad
status, and a namespace order that a restart can change.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Server, ua
from asyncua.server.user_managers import UserManager
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.core.certs import create_certificate
from agent.core.driver import DeviceContext, DeviceError, build_groups
from agent.core.records import Block, Quality
from cleanroom_common.net import free_port
from drivers.opcua import driver as opcua
from drivers.opcua.driver import OpcUaDriver
from simulators.servers.faults import CommFault
from simulators.servers.opcua import APPLICATION_URI as SIM_SERVER_URI
from simulators.servers.opcua import serve_bioreactor_opcua

NS = "urn:cleanroom-test:bioreactor"
OTHER = "urn:cleanroom-test:other"
SERVER_URI = "urn:cleanroom-test:server"
AGENT_URI = "urn:cleanroom-test:agent"

TAGS: list[dict[str, Any]] = [
    {"name": "temperature", "node_id": f"nsu={NS};s=BR1.Temperature", "unit": "degC"},
    {"name": "ph", "node_id": f"nsu={NS};i=1001", "unit": "pH"},
    {"name": "do", "node_id": f"/Objects/{{{NS}}}Bioreactor/{{{NS}}}DissolvedOxygen", "unit": "%"},
    {"name": "agitation", "node_id": "ns=3;s=BR1.Agitation", "unit": "rpm", "scale": 0.1},
    {"name": "state", "node_id": f"nsu={NS};s=BR1.State"},
]
VALUES = {"temperature": 37.0, "ph": 7.2, "do": 40.0, "agitation": 100, "state": "Running"}


class _Users(UserManager):
    def get_user(
        self, iserver: Any, username: str | None = None, password: str | None = None, certificate: Any = None
    ) -> Any:
        from asyncua.crypto.permission_rules import User, UserRole

        if username == "operator" and password == "s3cret":
            return User(role=UserRole.User)
        return None


class UaServerThread:
    """An asyncua server in a daemon thread with its own loop: start, stop, restart."""

    def __init__(
        self,
        port: int,
        namespaces: tuple[str, ...] = (OTHER, NS),
        cert: tuple[Path, Path] | None = None,
        users: bool = False,
    ) -> None:
        self.port = port
        self.url = f"opc.tcp://127.0.0.1:{port}"
        self.namespaces = namespaces
        self.cert = cert
        self.users = users
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name=f"ua-server-{port}")
        self.thread.start()
        self.server: Server | None = None
        self.vars: dict[str, Any] = {}

    def run(self, coro: Awaitable[Any], timeout: float = 30) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)  # type: ignore[arg-type]
        return fut.result(timeout)

    def start(self) -> UaServerThread:
        self.run(self._start())
        return self

    async def _start(self) -> None:
        server = Server(user_manager=_Users() if self.users else None)
        await server.init()
        server.set_endpoint(self.url)
        if self.cert is not None:
            await server.set_application_uri(SERVER_URI)
            await server.load_certificate(str(self.cert[0]))
            await server.load_private_key(str(self.cert[1]))
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        idx = 0
        for uri in self.namespaces:
            i = await server.register_namespace(uri)
            if uri == NS:
                idx = i
        br = await server.nodes.objects.add_object(ua.NodeId("BR1", idx), ua.QualifiedName("Bioreactor", idx))
        self.vars = {
            "temperature": await br.add_variable(
                ua.NodeId("BR1.Temperature", idx), ua.QualifiedName("Temperature", idx), 37.0
            ),
            "ph": await br.add_variable(ua.NodeId(1001, idx), ua.QualifiedName("pH", idx), 7.2),
            "do": await br.add_variable(
                ua.NodeId("BR1.DO", idx), ua.QualifiedName("DissolvedOxygen", idx), 40.0
            ),
            "agitation": await br.add_variable(
                ua.NodeId("BR1.Agitation", idx), ua.QualifiedName("Agitation", idx), 100, ua.VariantType.Int32
            ),
            "state": await br.add_variable(
                ua.NodeId("BR1.State", idx), ua.QualifiedName("State", idx), "Running"
            ),
        }
        await server.start()
        self.server = server

    def write(
        self, tag: str, value: Any, status: int | None = None, variant: ua.VariantType | None = None
    ) -> None:
        async def _write() -> None:
            dv = ua.DataValue(
                Value=ua.Variant(value, variant) if variant else ua.Variant(value),
                StatusCode=ua.StatusCode(ua.StatusCodes.Good if status is None else status),
                SourceTimestamp=datetime.now(UTC),
            )
            await self.vars[tag].write_value(dv)

        self.run(_write())

    def stop(self) -> None:
        if self.server is not None:
            self.run(self.server.stop())
            self.server = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def fresh_server() -> Iterator[UaServerThread]:
    """A server of its own, for a test that changes the address space."""
    srv = UaServerThread(free_port()).start()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture(scope="module")
def shared_server() -> Iterator[UaServerThread]:
    srv = UaServerThread(free_port()).start()
    try:
        yield srv
    finally:
        srv.close()


@pytest.fixture
def server(shared_server: UaServerThread) -> UaServerThread:
    """The module's server with every value back to its initial, good state (a server
    start costs seconds; resetting values costs milliseconds)."""
    for tag, value in VALUES.items():
        shared_server.write(tag, value, variant=ua.VariantType.Int32 if tag == "agitation" else None)
    return shared_server


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("pki")
    srv = create_certificate(base / "server", SERVER_URI, ["127.0.0.1", "localhost"], server=True)
    cli = create_certificate(base / "agent", AGENT_URI, ["localhost"])
    trust = base / "trust"
    trust.mkdir()
    (trust / "server.der").write_bytes(srv.cert.read_bytes())
    return {"server_cert": srv.cert, "server_key": srv.key, "cert": cli.cert, "key": cli.key, "trust": trust}


@pytest.fixture(scope="module")
def secure_server(pki: dict[str, Path]) -> Iterator[UaServerThread]:
    srv = UaServerThread(free_port(), cert=(pki["server_cert"], pki["server_key"]), users=True).start()
    try:
        yield srv
    finally:
        srv.close()


def make_driver(
    url: str, tags: list[dict[str, Any]] = TAGS, group: dict[str, Any] | None = None, **conn: Any
) -> OpcUaDriver:
    profile = OpcUaDriver.profile_model().model_validate(
        {
            "profile": "br-test",
            "protocol": "opcua",
            "groups": {"default": group or {"interval": "200ms"}},
            "tags": tags,
        }
    )
    connection = OpcUaDriver.Connection.model_validate(
        {"url": url, "timeout": "1s", "keepalive": "500ms", "security_policy": "None", **conn}
    )
    ctx = DeviceContext(
        id="br1", profile=profile, connection=connection, groups=build_groups("br1", profile, connection, {})
    )
    return OpcUaDriver(ctx)


def as_dict(block: Block) -> dict[str, tuple[Any, Quality, str | None]]:
    return {
        t: (block.values[i], block.quality_of(i), block.reasons[i] if block.reasons else None)
        for i, t in enumerate(block.tags)
    }


async def eventually(cond: Callable[[], Any], within: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + within
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(0.02)


# --------------------------------------------------------------------------- polling


async def test_poll_reads_every_node_id_form_in_one_read_call(server: UaServerThread) -> None:
    drv = make_driver(server.url)
    await drv.connect()
    try:
        before = time.time_ns()
        [block] = await drv.read(drv.ctx.groups["default"])
        assert drv.ctx.stats.requests == 1, "all nodes of a group must travel in one Read call"
        got = as_dict(block)
        assert got["temperature"] == (37.0, Quality.GOOD, None)
        assert got["ph"] == (7.2, Quality.GOOD, None)
        assert got["do"] == (40.0, Quality.GOOD, None)
        assert got["agitation"] == (10.0, Quality.GOOD, None), "scale applied"
        assert got["state"] == ("Running", Quality.GOOD, None)
        assert isinstance(block.source_ts_ns, list) and all(
            ts is not None and abs(ts - before) < 60e9 for ts in block.source_ts_ns
        )
    finally:
        await drv.close()


async def test_large_groups_are_split_into_batches_of_max_nodes_per_request(server: UaServerThread) -> None:
    tags = [*TAGS, {"name": "ph_by_index_path", "node_id": "/Objects/3:Bioreactor/3:pH"}]
    drv = make_driver(server.url, tags, max_nodes_per_request=2)
    group = drv.ctx.groups["default"]
    await drv.connect()
    try:
        [block] = await drv.read(group)
        assert drv.ctx.stats.requests == 3, "6 nodes in Read calls of at most 2"
        assert as_dict(block)["ph_by_index_path"] == (7.2, Quality.GOOD, None)
        blocks: list[Block] = []
        await drv.subscribe(group, blocks.append)
        assert drv.ctx.stats.requests == 6, "monitored items created in 3 calls of at most 2"
        await eventually(lambda: sum(len(b) for b in blocks) >= len(tags), what="every item reporting")
        assert {t for b in blocks for t in b.tags} == {t["name"] for t in tags}
    finally:
        await drv.close()


async def test_status_codes_become_quality_with_the_status_name(server: UaServerThread) -> None:
    server.write("temperature", 36.5, status=ua.StatusCodes.UncertainLastUsableValue)
    server.write("ph", 7.0, status=ua.StatusCodes.BadSensorFailure)
    drv = make_driver(server.url)
    await drv.connect()
    try:
        got = as_dict((await drv.read(drv.ctx.groups["default"]))[0])
        assert got["temperature"] == (36.5, Quality.UNCERTAIN, "UncertainLastUsableValue")
        assert got["ph"] == (None, Quality.BAD, "BadSensorFailure")
        assert got["do"] == (40.0, Quality.GOOD, None)
    finally:
        await drv.close()


async def test_unresolvable_tags_are_bad_readings_not_a_dead_device(server: UaServerThread) -> None:
    tags = [
        TAGS[0],
        {"name": "no_ns", "node_id": "nsu=urn:nowhere;s=X"},
        {"name": "no_path", "node_id": f"/Objects/{{{NS}}}Bioreactor/{{{NS}}}Nope"},
        {"name": "no_node", "node_id": "ns=3;s=BR1.Nope"},
    ]
    drv = make_driver(server.url, tags)
    await drv.connect()
    try:
        got = as_dict((await drv.read(drv.ctx.groups["default"]))[0])
        assert got["temperature"][1] is Quality.GOOD
        assert got["no_ns"] == (None, Quality.BAD, "BadNamespaceUnknown")
        assert got["no_path"][1] is Quality.BAD and got["no_path"][2] in ("BadNoMatch", "BadNodeIdUnknown")
        assert got["no_node"] == (None, Quality.BAD, "BadNodeIdUnknown")
    finally:
        await drv.close()


async def test_address_space_reloaded_behind_a_live_link_is_resolved_again(
    fresh_server: UaServerThread, monkeypatch: pytest.MonkeyPatch
) -> None:
    server = fresh_server
    monkeypatch.setattr(opcua, "_RERESOLVE_S", 0.0)
    tags = [{"name": "ph", "node_id": f"/Objects/{{{NS}}}Bioreactor/{{{NS}}}pH"}]
    drv = make_driver(server.url, tags)
    group = drv.ctx.groups["default"]
    await drv.connect()
    try:
        assert (await drv.read(group))[0].values == [7.2]

        async def reload() -> None:  # the pH node comes back under another node id
            await server.vars["ph"].delete()
            idx = (await server.server.get_namespace_array()).index(NS)  # type: ignore[union-attr]
            parent = server.server.get_node(ua.NodeId("BR1", idx))  # type: ignore[union-attr]
            await parent.add_variable(ua.NodeId(2001, idx), ua.QualifiedName("pH", idx), 7.05)

        server.run(reload())
        [block] = await drv.read(group)
        assert block.values == [7.05] and block.quality is None
        assert drv.ctx.stats.retries == 1
    finally:
        await drv.close()


async def test_server_stop_is_a_device_error_and_restart_remaps_namespaces() -> None:
    port = free_port()
    srv = UaServerThread(port, namespaces=(OTHER, NS)).start()
    drv = make_driver(srv.url)
    try:
        await drv.connect()
        group = drv.ctx.groups["default"]
        assert as_dict((await drv.read(group))[0])["temperature"][0] == 37.0
        srv.stop()
        t0 = time.monotonic()
        with pytest.raises(DeviceError):
            for _ in range(50):
                await drv.read(group)
                await asyncio.sleep(0.1)
        assert time.monotonic() - t0 < 2 * 0.5 + 1.0 + 1.0, (
            "dead server noticed within ~2 keepalives + timeout"
        )
        await drv.close()
        # The server comes back with its namespaces registered in another order:
        # nsu= and browse-path tags follow their URI, not the old index.
        srv.close()
        srv = UaServerThread(port, namespaces=(NS, "urn:cleanroom-test:third", OTHER)).start()
        await drv.connect()
        got = as_dict((await drv.read(group))[0])
        assert got["temperature"] == (37.0, Quality.GOOD, None)
        assert got["ph"] == (7.2, Quality.GOOD, None)
        assert got["do"] == (40.0, Quality.GOOD, None)
        assert got["agitation"] == (None, Quality.BAD, "BadNodeIdUnknown"), (
            "ns=3 is an index: now another namespace"
        )
    finally:
        await drv.close()
        srv.close()


# --------------------------------------------------------------------------- subscriptions


async def test_subscription_emits_only_the_tags_that_changed(server: UaServerThread) -> None:
    drv = make_driver(
        server.url, group={"interval": "500ms", "mode": "subscribe", "sampling_interval": "50ms"}
    )
    group = drv.ctx.groups["default"]
    blocks: list[Block] = []
    await drv.connect()
    try:
        await drv.subscribe(group, blocks.append)
        await eventually(lambda: sum(len(b) for b in blocks) >= len(TAGS), what="initial values")
        first = {t: v for b in blocks for t, v in zip(b.tags, b.values, strict=True)}
        assert first == {**VALUES, "agitation": 10.0}
        blocks.clear()
        server.write("do", 35.5)
        await eventually(lambda: blocks, what="a change notification")
        assert list(blocks[0].tags) == ["do"] and blocks[0].values == [35.5]
        assert blocks[0].group == "default" and list(blocks[0].units) == ["%"]
        assert await drv.read(group) == [], "liveness check of a healthy subscription yields nothing"
    finally:
        await drv.close()


async def test_queued_samples_become_successive_blocks_in_time_order(server: UaServerThread) -> None:
    drv = make_driver(
        server.url,
        tags=TAGS[:3],
        group={
            "interval": "2s",
            "mode": "subscribe",
            "sampling_interval": "10ms",
            "publishing_interval": "700ms",
            "queue_size": 5,
        },
    )
    group = drv.ctx.groups["default"]
    blocks: list[Block] = []
    await drv.connect()
    try:
        await drv.subscribe(group, blocks.append)
        await eventually(lambda: blocks, what="initial values")
        blocks.clear()
        for v in (41.0, 42.0, 43.0):
            server.write("do", v)
        server.write("temperature", 37.5)
        await eventually(lambda: sum(len(b) for b in blocks) >= 4, what="queued samples")
        samples = [(t, v) for b in blocks for t, v in zip(b.tags, b.values, strict=True)]
        assert [v for t, v in samples if t == "do"] == [41.0, 42.0, 43.0], "each sample, in time order"
        assert all(len(set(b.tags)) == len(b.tags) for b in blocks), "no block holds a tag twice"
        if len(blocks) == 3:  # all four samples came in one notification message
            assert [list(b.tags) for b in blocks] == [["temperature", "do"], ["do"], ["do"]]
    finally:
        await drv.close()


async def test_subscription_deadband_suppresses_small_changes(server: UaServerThread) -> None:
    drv = make_driver(
        server.url,
        tags=[TAGS[0]],
        group={
            "interval": "500ms",
            "mode": "subscribe",
            "sampling_interval": "50ms",
            "deadband": "absolute",
            "deadband_value": 1.0,
        },
    )
    group = drv.ctx.groups["default"]
    blocks: list[Block] = []
    await drv.connect()
    try:
        await drv.subscribe(group, blocks.append)
        await eventually(lambda: blocks, what="initial value")
        blocks.clear()
        server.write("temperature", 37.4)
        await asyncio.sleep(0.4)
        server.write("temperature", 39.0)
        await eventually(lambda: blocks, what="change beyond the deadband")
        assert [b.values for b in blocks] == [[39.0]], "the 0.4 step stayed inside the deadband"
    finally:
        await drv.close()


async def test_subscription_link_loss_raises_then_resubscribes_after_restart() -> None:
    port = free_port()
    srv = UaServerThread(port).start()
    drv = make_driver(
        srv.url, tags=[TAGS[0]], group={"interval": "200ms", "mode": "subscribe", "sampling_interval": "50ms"}
    )
    group = drv.ctx.groups["default"]
    blocks: list[Block] = []
    try:
        await drv.connect()
        await drv.subscribe(group, blocks.append)
        await eventually(lambda: blocks, what="initial value")
        srv.stop()
        t0 = time.monotonic()

        async def liveness_fails() -> bool:
            try:
                await drv.read(group)
            except DeviceError:
                return True
            return False

        while not await liveness_fails():
            assert time.monotonic() - t0 < 5, "dead server not noticed"
            await asyncio.sleep(0.1)
        await drv.close()
        srv.close()
        srv = UaServerThread(port, namespaces=(NS, OTHER)).start()
        srv.write("temperature", 38.2)
        blocks.clear()
        await drv.connect()
        await drv.subscribe(group, blocks.append)
        await eventually(lambda: blocks, what="values after resubscribing")
        assert blocks[-1].values == [38.2] and blocks[-1].quality is None
    finally:
        await drv.close()
        srv.close()


# --------------------------------------------------------------------------- security


@pytest.mark.parametrize("policy", ["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"])
@pytest.mark.parametrize("mode", ["Sign", "SignAndEncrypt"])
async def test_secured_read(
    secure_server: UaServerThread, pki: dict[str, Path], policy: str, mode: str
) -> None:
    drv = make_driver(
        secure_server.url,
        tags=[TAGS[0]],
        security_policy=policy,
        security_mode=mode,
        certificate=str(pki["cert"]),
        private_key=str(pki["key"]),
        server_certificate=str(pki["server_cert"]),
        username="operator",
        password="s3cret",
    )
    await drv.connect()
    try:
        [block] = await drv.read(drv.ctx.groups["default"])
        assert block.values == [37.0] and block.quality is None
        assert drv._client is not None and drv._client.security_policy.Mode == getattr(
            ua.MessageSecurityMode, mode
        )
    finally:
        await drv.close()


async def test_trust_dir_and_password_file(
    secure_server: UaServerThread, pki: dict[str, Path], tmp_path: Path
) -> None:
    pw = tmp_path / "pw"
    pw.write_text("s3cret\n")
    common = dict(
        tags=[TAGS[0]],
        security_policy="Basic256Sha256",
        security_mode="SignAndEncrypt",
        certificate=str(pki["cert"]),
        private_key=str(pki["key"]),
        username="operator",
    )
    drv = make_driver(secure_server.url, trust_dir=str(pki["trust"]), password_file=str(pw), **common)
    await drv.connect()
    try:
        assert (await drv.read(drv.ctx.groups["default"]))[0].values == [37.0]
    finally:
        await drv.close()
    # A server whose certificate is not in the trust list is refused, and so is a wrong password.
    other = tmp_path / "other-trust"
    other.mkdir()
    (other / "agent.der").write_bytes(pki["cert"].read_bytes())
    empty = tmp_path / "empty-trust"
    empty.mkdir()
    for conn, reason in (
        ({"trust_dir": str(other), "password_file": str(pw)}, "BadCertificateUntrusted"),
        ({"trust_dir": str(empty), "password_file": str(pw)}, "config_error"),
        ({"trust_dir": str(pki["trust"]), "password": "nope"}, "Bad"),
    ):
        drv = make_driver(secure_server.url, **conn, **common)
        with pytest.raises(DeviceError) as err:
            await drv.connect()
        assert err.value.reason.startswith(reason), err.value
        await drv.close()


@pytest.mark.parametrize(
    ("conn", "message"),
    [
        (
            {"security_policy": "Basic256Sha256", "security_mode": "None"},
            "security_mode must be 'None' exactly when",
        ),
        ({"security_policy": "Basic256Sha256", "security_mode": "Sign"}, "needs certificate and private_key"),
        (
            {
                "security_policy": "Basic256Sha256",
                "security_mode": "Sign",
                "certificate": "c",
                "private_key": "k",
            },
            "needs server_certificate (pinned) or trust_dir",
        ),
        ({"security_policy": "None", "password": "x"}, "a password needs a username"),
        ({"url": "http://host:4840"}, "String should match pattern"),
        ({"security_policy": "Basic128Rsa15", "security_mode": "Sign"}, "Input should be 'None'"),
    ],
)
def test_bad_connection_config_is_rejected_clearly(conn: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        OpcUaDriver.Connection.model_validate({"url": "opc.tcp://h:4840", **conn})


@pytest.mark.parametrize(
    "node_id",
    [
        "ns=2;x=1",
        "nsu=;s=a",
        "nsu=urn:a",
        "nsu=urn:a;ns=2;s=x",
        "/Objects/<Bad",
        "/Objects/70000:X",
        "ns=a;i=1",
        "ns=70000;i=1",
        "i=-5",
        "ns=1;i=99999999999",
        "srv=1;ns=1;i=5",
    ],
)
def test_bad_node_ids_are_rejected_at_config_time(node_id: str) -> None:
    with pytest.raises(ValidationError, match=r"is not a node id"):
        OpcUaDriver.Tag.model_validate({"name": "t", "node_id": node_id})


# --------------------------------------------------------------------------- against the simulator

SIM_PROFILE = Path(__file__).resolve().parent.parent / "deploy" / "profiles" / "bioreactor-sim-opcua.yaml"


def sim_driver(url: str, **conn: Any) -> OpcUaDriver:
    """The simulator's own profile, as a site would deploy it."""
    profile = OpcUaDriver.profile_model().model_validate(yaml.safe_load(SIM_PROFILE.read_text()))
    connection = OpcUaDriver.Connection.model_validate(
        {"url": url, "timeout": "1s", "keepalive": "500ms", "security_policy": "None", **conn}
    )
    groups = build_groups("br1", profile, connection, {})
    return OpcUaDriver(DeviceContext(id="br1", profile=profile, connection=connection, groups=groups))


def served(history: Any, block: Block) -> list[tuple[Any, Any]]:
    """(read, served) pairs of a block's good readings, the served value looked up in the
    simulator's history by the reading's source timestamp."""
    snapshots = list(history.items())
    ts = block.source_ts_ns
    assert isinstance(ts, list)

    def at(ns: int | None) -> dict[str, Any]:
        assert ns is not None
        t, values = min(snapshots, key=lambda kv: abs(kv[0] * 1e9 - ns))
        assert abs(t * 1e9 - ns) < 2_000, f"no snapshot served at {ns}"
        return values  # type: ignore[no-any-return]

    def value(values: dict[str, Any], tag: str) -> Any:
        """The served value of a tag; of an expanded array's tag ``name.i``, the array's item i."""
        name, _, index = tag.rpartition(".")
        return values[tag] if tag in values else values[name][int(index)]

    return [
        (v, value(at(ts[i]), t))
        for i, (t, v) in enumerate(zip(block.tags, block.values, strict=True))
        if block.quality_of(i) is Quality.GOOD
    ]


async def test_simulator_values_arrive_as_served_by_poll_and_subscription() -> None:
    async with serve_bioreactor_opcua(speed=60, seed=2, update_interval_s=0.1) as sim:
        drv = sim_driver(sim.url)
        await drv.connect()
        blocks: list[Block] = []
        try:
            polled = [b for g in ("status", "identity") for b in await drv.read(drv.ctx.groups[g])]
            await drv.subscribe(drv.ctx.groups["process"], blocks.append)
            await eventually(lambda: len(blocks) >= 3, what="subscription blocks")
        finally:
            await drv.close()
        for block in polled + blocks:
            pairs = served(sim.server.history, block)
            assert pairs and all(
                a == pytest.approx(b) if isinstance(b, float) else a == b for a, b in pairs
            ), block.group
        assert {t for b in blocks for t in b.tags} <= set(drv.ctx.groups["process"].tags)
        assert len({t for b in blocks for t in b.tags}) >= 10


async def test_simulator_device_fault_status_and_disconnect() -> None:
    async with serve_bioreactor_opcua(speed=60, seed=2, update_interval_s=0.1) as sim:
        drv = sim_driver(sim.url)
        status = drv.ctx.groups["status"]
        await drv.connect()
        try:
            sim.device.faults.force(CommFault.EXCEPTION)
            await asyncio.sleep(0.3)
            [block] = await drv.read(status)
            assert block.reasons is not None and set(block.reasons) == {"BadDeviceFailure"}
            sim.device.faults.force(CommFault.DISCONNECT)
            t0 = time.monotonic()
            with pytest.raises(DeviceError):
                for _ in range(60):
                    await drv.read(status)
                    await asyncio.sleep(0.1)
            assert time.monotonic() - t0 < 4
            await drv.close()
            sim.device.faults.force(None)
            await asyncio.sleep(0.3)
            await drv.connect()
            [block] = await drv.read(status)
            assert block.quality is None or Quality.BAD not in block.quality
        finally:
            await drv.close()


async def test_simulator_secured_endpoint_with_login(pki: dict[str, Path], tmp_path: Path) -> None:
    """The simulator's server identity is its own URI; the agent trusts exactly that certificate."""
    srv = create_certificate(tmp_path / "sim", SIM_SERVER_URI, ["127.0.0.1", "localhost"], server=True)
    trust = tmp_path / "trust"
    trust.mkdir()
    (trust / "sim.der").write_bytes(srv.cert.read_bytes())
    async with serve_bioreactor_opcua(
        speed=60, cert=srv.cert, key=srv.key, user="qa", password="pw-1"
    ) as sim:
        drv = sim_driver(
            sim.url,
            security_policy="Aes256_Sha256_RsaPss",
            security_mode="SignAndEncrypt",
            certificate=str(pki["cert"]),
            private_key=str(pki["key"]),
            trust_dir=str(trust),
            username="qa",
            password="pw-1",
        )
        await drv.connect()
        try:
            [block] = await drv.read(drv.ctx.groups["identity"])
            assert served(sim.server.history, block)
        finally:
            await drv.close()


@given(st.text(max_size=80))
@settings(max_examples=300, deadline=None)
def test_node_id_parser_rejects_anything_with_a_validation_error(text: str) -> None:
    """Whatever is written in a profile, the answer is a config error, never a traceback."""
    with contextlib.suppress(ValidationError):
        OpcUaDriver.Tag.model_validate({"name": "t", "node_id": text})
