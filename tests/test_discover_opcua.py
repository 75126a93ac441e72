"""``cleanroom-agent discover opcua`` against real servers over TCP on loopback.

Two servers: the bundled bioreactor simulator, and an independent one built here on asyncua's
own Server with a generated address space of 5,000 readable variables in nested folders (some
with EngineeringUnits and EURange, some arrays, some Int32) beside what must not become a tag:
write-only and unreadable variables, a Method, properties, the Server object. asyncua's server
knows no continuation points, so this one is given them (at most ``PAGE`` references per Browse
result, the rest through BrowseNext), as real servers cap their answers.

The chain the issue asks for: discover → validate → run the agent → a reading of every
discovered variable at the broker (real mosquitto).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fnmatch
import io
import json
import re
import shutil
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Server, ua
from asyncua.server.binary_server_asyncio import BinaryServer, OPCUAProtocol
from asyncua.server.uaprocessor import UaProcessor
from asyncua.ua.ua_binary import struct_from_binary
from hypothesis import example, given, settings
from hypothesis import strategies as st

from agent.cli import main
from agent.core.certs import create_certificate
from agent.core.discover import DiscoveryError
from cleanroom_common.net import free_port
from drivers.opcua import discover as opcua_discover
from simulators.servers.opcua import APPLICATION_URI as SIM_SERVER_URI
from simulators.servers.opcua import serve_bioreactor_opcua
from tests.support import AgentProcess, Collector, Mosquitto, ThreadedSim, refused_port, wait_for

NS = "urn:cleanroom-test:discover"
AREAS, LINES, VARS = 5, 10, 100
"""5,000 readable variables: Plant / AreaA / LineL / VarVVV."""
PAGE = 40
"""References per Browse or BrowseNext result the test server gives at most."""
CEL = int.from_bytes(b"CEL", "big")
UNECE = "http://www.opcfoundation.org/UA/units/un/cefact"
NAME = re.compile(r"^[A-Za-z0-9_.\-/]+$")


# --------------------------------------------------------------------------- the independent server


class _PagingProcessor(UaProcessor):  # type: ignore[misc]
    """asyncua's processor, answering Browse with at most :data:`PAGE` references per node and
    serving the rest through continuation points with BrowseNext (which asyncua lacks)."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._points: dict[bytes, list[ua.ReferenceDescription]] = {}
        self._counter = 0

    def _page(self, result: ua.BrowseResult, limit: int) -> None:
        if len(result.References) > limit:
            self._counter += 1
            point = f"cp-{self._counter}".encode()
            self._points[point] = result.References[limit:]
            result.References = result.References[:limit]
            result.ContinuationPoint = point

    async def _process_message(self, typeid: ua.NodeId, requesthdr: Any, seqhdr: Any, body: Any) -> Any:
        browse = ua.NodeId(ua.ObjectIds.BrowseRequest_Encoding_DefaultBinary)
        browse_next = ua.NodeId(ua.ObjectIds.BrowseNextRequest_Encoding_DefaultBinary)
        if self.session is None or typeid not in (browse, browse_next):
            return await super()._process_message(typeid, requesthdr, seqhdr, body)
        self.session_last_activity = time.monotonic()
        response: Any
        if typeid == browse:
            params = struct_from_binary(ua.BrowseParameters, body)
            results = await self.session.browse(params)
            limit = min(PAGE, params.RequestedMaxReferencesPerNode or PAGE)
            for result in results:
                self._page(result, limit)
            response = ua.BrowseResponse()
            response.Results = results
        else:
            next_params = struct_from_binary(ua.BrowseNextParameters, body)
            results = []
            for point in next_params.ContinuationPoints:
                result = ua.BrowseResult()
                rest = self._points.pop(point, None)
                if rest is None:
                    result.StatusCode = ua.StatusCode(ua.StatusCodes.BadContinuationPointInvalid)
                elif not next_params.ReleaseContinuationPoints:
                    result.References = rest
                    self._page(result, PAGE)
                results.append(result)
            response = ua.BrowseNextResponse()
            response.Parameters.Results = results
        self.send_response(requesthdr.RequestHandle, seqhdr, response)
        return True


class _PagingProtocol(OPCUAProtocol):  # type: ignore[misc]
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self.processor is not None:
            self.processor = _PagingProcessor(self.iserver, self.transport, self.limits)
            self.processor.set_policies(self.policies)


class _PagingBinaryServer(BinaryServer):  # type: ignore[misc]
    def _make_protocol(self) -> OPCUAProtocol:
        return _PagingProtocol(
            iserver=self.iserver,
            policies=self._policies,
            clients=self.clients,
            closing_tasks=self.closing_tasks,
            limits=self.limits,
        )


@dataclass
class BigServer:
    url: str
    readable: dict[str, str] = field(default_factory=dict)
    """node_id (nsu= form) → browse path below Objects, of every variable that must become a tag."""
    ranged: dict[str, tuple[float, float]] = field(default_factory=dict)
    arrays: dict[str, int] = field(default_factory=dict)
    writable: set[str] = field(default_factory=set)
    int32: set[str] = field(default_factory=set)


def _nsu(ident: str) -> str:
    return f"nsu={NS};s={ident}"


@asynccontextmanager
async def big_server() -> AsyncIterator[BigServer]:
    port = free_port()
    server = Server()
    await server.init()
    server.set_endpoint(f"opc.tcp://127.0.0.1:{port}")
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    await server.set_build_info(
        "urn:cleanroom-test:big",
        "Test Vendor",
        "Big Test Server",
        "9.8.7",
        "42",
        datetime(2026, 1, 1, tzinfo=UTC),
    )
    await server.set_application_uri("urn:cleanroom-test:big")
    idx = await server.register_namespace(NS)
    info = BigServer(f"opc.tcp://127.0.0.1:{port}")

    def q(name: str) -> ua.QualifiedName:
        return ua.QualifiedName(name, idx)

    plant = await server.nodes.objects.add_folder(ua.NodeId("Plant", idx), q("Plant"))
    for a in range(AREAS):
        area = await plant.add_folder(ua.NodeId(f"A{a}", idx), q(f"Area{a}"))
        for line_no in range(LINES):
            line = await area.add_object(ua.NodeId(f"A{a}.L{line_no}", idx), q(f"Line{line_no}"))
            for v in range(VARS):
                ident = f"A{a}.L{line_no}.V{v:03d}"
                path = f"Plant/Area{a}/Line{line_no}/Var{v:03d}"
                value: ua.Variant
                if v % 25 == 1:
                    value = ua.Variant([float(v)] * 8, ua.VariantType.Double, Dimensions=[8])
                    info.arrays[_nsu(ident)] = 8
                elif v % 7 == 3:
                    value = ua.Variant(v, ua.VariantType.Int32)
                    info.int32.add(_nsu(ident))
                else:
                    value = ua.Variant(float(v), ua.VariantType.Double)
                var = await line.add_variable(ua.NodeId(ident, idx), q(f"Var{v:03d}"), value)
                if v % 50 == 1:  # declared; the others only say OneOrMoreDimensions (asyncua's default)
                    await var.write_attribute(
                        ua.AttributeIds.ValueRank, ua.DataValue(ua.Variant(1, ua.VariantType.Int32))
                    )
                    await var.write_attribute(
                        ua.AttributeIds.ArrayDimensions, ua.DataValue(ua.Variant([8], ua.VariantType.UInt32))
                    )
                if v % 10 == 0:
                    await var.add_property(
                        ua.NodeId(f"{ident}.EURange", idx), "EURange", ua.Range(Low=0.0, High=float(v + 10))
                    )
                    await var.add_property(
                        ua.NodeId(f"{ident}.EU", idx),
                        "EngineeringUnits",
                        ua.EUInformation(
                            NamespaceUri=UNECE, UnitId=CEL, DisplayName=ua.LocalizedText("degC")
                        ),
                    )
                    info.ranged[_nsu(ident)] = (0.0, float(v + 10))
                if v == 50:
                    await var.set_writable()
                    info.writable.add(_nsu(ident))
                info.readable[_nsu(ident)] = path
    # What must not become a tag, and names that must be made valid and unique.
    odd = await plant.add_object(ua.NodeId("Odd", idx), q("Odd"))
    for name, level in (("WriteOnly", ua.AccessLevel.CurrentWrite.mask), ("Hidden", 0)):
        var = await odd.add_variable(ua.NodeId(f"Odd.{name}", idx), q(name), 1.0)
        await var.write_attribute(
            ua.AttributeIds.AccessLevel, ua.DataValue(ua.Variant(level, ua.VariantType.Byte))
        )
        await var.write_attribute(
            ua.AttributeIds.UserAccessLevel, ua.DataValue(ua.Variant(level, ua.VariantType.Byte))
        )
    await odd.add_method(ua.NodeId("Odd.Reset", idx), q("Reset"), lambda parent: [], [], [])
    noted = await odd.add_variable(ua.NodeId("Odd.Noted", idx), q("Noted"), 2.0)
    await noted.add_property(ua.NodeId("Odd.Noted.Note", idx), "Note", "a property, not a tag")
    info.readable[_nsu("Odd.Noted")] = "Plant/Odd/Noted"
    for ident, name in (("Odd.x;y", "a b"), ("Odd.2", "a_b"), ("Odd.3", "a/b")):
        await odd.add_variable(ua.NodeId(ident, idx), q(name), 3.0)
        info.readable[_nsu(ident)] = f"Plant/Odd/{name}"
    numeric = await odd.add_variable(ua.NodeId(4711, idx), q("Numeric"), 4.0)
    info.readable[f"nsu={NS};i=4711"] = "Plant/Odd/Numeric"
    await plant.add_reference(numeric.nodeid, ua.ObjectIds.Organizes)  # a second path to it
    await server.start()
    assert server.bserver is not None
    base = server.bserver
    await base.stop()
    server.bserver = _PagingBinaryServer(base.iserver, base.hostname, base.port, base.limits)
    server.bserver.set_policies(base._policies)
    await server.bserver.start()
    try:
        yield info
    finally:
        await server.stop()


@pytest.fixture(scope="module")
def big() -> Iterator[BigServer]:
    with ThreadedSim(big_server) as info:
        yield info


@dataclass
class Run:
    rc: int
    out: str
    err: str
    seconds: float


def discover(*argv: str) -> Run:
    """``cleanroom-agent discover opcua ARGV`` in this process, its output captured."""
    out, err = io.StringIO(), io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["discover", "opcua", *argv])
        except SystemExit as exc:  # argparse's own refusals
            rc = int(exc.code or 0)
    run = Run(rc, out.getvalue(), err.getvalue(), time.perf_counter() - t)
    assert "Traceback" not in run.err
    return run


@pytest.fixture(scope="module")
def big_profile(big: BigServer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Run]:
    """The whole 5,000-variable server discovered once, for the tests that read the result."""
    out = tmp_path_factory.mktemp("big") / "big.yaml"
    run = discover(big.url, "--security-policy", "None", "--out", str(out))
    assert run.rc == 0, run.err
    return out, run


# --------------------------------------------------------------------------- helpers


def load(path: Path) -> tuple[list[str], dict[str, Any]]:
    text = path.read_text()
    header = [line for line in text.splitlines() if line.startswith("#")]
    return header, yaml.safe_load(text)


def write_config(tmp: Path, devices: list[tuple[str, str, str]], broker_port: int) -> Path:
    """An agent config naming each (device id, profile, url), profiles read from tmp/profiles."""
    lines = "\n".join(
        f"  - {{id: {dev}, profile: {profile}, connection: {{url: '{url}', security_policy: None, "
        f"timeout: 5s, backoff_min: 100ms, backoff_max: 500ms}}}}"
        for dev, profile, url in devices
    )
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        f"""
agent: {{id: gw-discover, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 5s}}
buffer: {{path: buffer.db, commit_interval: 50ms}}
mqtt: {{host: 127.0.0.1, port: {broker_port}, reconnect_min: 100ms, reconnect_max: 500ms}}
health: {{clock_sync: false}}
profiles_dirs: [profiles]
devices:
{lines}
"""
    )
    return cfg


def readings(collector: Collector) -> dict[str, dict[str, list[tuple[Any, str]]]]:
    """device → tag → [(value, quality)] of every reading at the broker."""
    out: dict[str, dict[str, list[tuple[Any, str]]]] = {}
    for topic, payload, _ in list(collector.messages):
        if not topic.endswith("/data") or not payload:
            continue
        msg = json.loads(payload)
        for block in msg["blocks"]:
            for i, tag in enumerate(block["tags"]):
                quality = block["quality"][i] if "quality" in block else "good"
                out.setdefault(msg["device"], {}).setdefault(tag, []).append((block["values"][i], quality))
    return out


# --------------------------------------------------------------------------- the 5,000 variables


def test_finds_exactly_the_readable_variables_in_batches_deterministically(
    big: BigServer, big_profile: tuple[Path, Run], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, run = big_profile
    with capsys.disabled():  # the figure the issue asks for, reported, never asserted
        print(f"\ndiscover opcua, {len(big.readable)} variables: {run.seconds:.2f} s ({run.out.strip()})")
    header, profile = load(out)
    tags = profile["tags"]
    by_node = {t["node_id"]: t for t in tags}
    assert len(by_node) == len(tags)
    assert set(by_node) == set(big.readable), "exactly the readable variables, nothing else"
    names = [t["name"] for t in tags]
    assert len(set(names)) == len(names) and all(NAME.match(n) for n in names)
    assert by_node[_nsu("A2.L3.V042")]["name"] == "Plant/Area2/Line3/Var042"
    # collisions after sanitising get suffixes in browse-path order: "a b" < "a/b" < "a_b"
    assert [by_node[_nsu(i)]["name"] for i in ("Odd.x;y", "Odd.3", "Odd.2")] == [
        "Plant/Odd/a_b",
        "Plant/Odd/a_b_2",
        "Plant/Odd/a_b_3",
    ]
    assert by_node[f"nsu={NS};i=4711"]["name"] == "Plant/Numeric", "the shorter of two paths"
    for node, (low, high) in big.ranged.items():
        tag = by_node[node]
        assert tag["unit"] == "degC" and tag["unit_code"] == "CEL"
        assert tag.get("range", [low, high]) == [low, high]
    for node, size in big.arrays.items():
        assert by_node[node]["array"] == {"mode": "value", "size": size}
        assert "range" not in by_node[node]
    assert all(by_node[n]["datatype"] == "Int32" for n in big.int32)
    assert {n for n, t in by_node.items() if t["access"] == "read_write"} == big.writable
    assert all(t["datatype"] == "Double" for n, t in by_node.items() if n not in big.int32)
    text = "\n".join(header)
    assert "ApplicationUri urn:cleanroom-test:big" in text and "Big Test Server" in text and "9.8.7" in text
    assert profile["device"] == {"model": "Big Test Server", "vendor": "Test Vendor", "firmware": "==9.8.7"}
    assert "--security-policy None" in text and f"Found {len(tags)} readable variables" in text
    assert "the Server object (--include-server adds it): 1" in text
    assert "variables not readable (UserAccessLevel): 2" in text
    requests = dict((s, int(n)) for s, n in re.findall(r"(Browse|BrowseNext|Read) (\d+)", text))
    # batching: a handful of calls for thousands of nodes (one per node would be >10,000)
    assert requests["BrowseNext"] > 0, "continuation points were followed"
    assert requests["Browse"] <= 20 and requests["Read"] <= 50, requests

    # Run twice on a fifth of it (paged lines, two paths to a node, colliding names), the
    # files are the same but for the time line.
    subset = ["--root", f"nsu={NS};s=Plant", "--exclude", "Area[1-4]", "--security-policy", "None"]
    files = [tmp_path / "first.yaml", tmp_path / "second.yaml"]
    for path in files:
        again = discover(big.url, *subset, "--out", str(path))
        assert again.rc == 0, again.err
    first, second = (p.read_text().splitlines() for p in files)
    assert len(first) > len(big.readable) // AREAS
    assert [line for line in first if not line.startswith("# Discovered")] == [
        line for line in second if not line.startswith("# Discovered")
    ], "an unchanged server gives the same file but for the time line"


def test_root_patterns_depth_and_node_limit(
    big: BigServer,
) -> None:
    base = [big.url, "--security-policy", "None", "--out", "-"]
    run = discover(
        *base,
        "--root",
        f"/Objects/{{{NS}}}Plant/{{{NS}}}Area1",
        "--include",
        "Line2/*",
        "--exclude",
        "Line2/Var00*",
        "--name",
        "area1-line2",
    )
    assert run.rc == 0, run.err
    profile = yaml.safe_load(run.out)
    assert profile["profile"] == "area1-line2"
    expected = {
        n
        for n, p in big.readable.items()
        if p.startswith("Plant/Area1/Line2/") and not p.startswith("Plant/Area1/Line2/Var00")
    }
    assert {t["node_id"] for t in profile["tags"]} == expected
    assert all(t["name"].startswith("Line2/Var") for t in profile["tags"])
    assert "not matching --include" in run.out and "excluded by --exclude" in run.out

    # an excluded folder takes everything below it along
    run = discover(*base, "--root", f"nsu={NS};s=A0", "--exclude", "Line[1-9]")
    assert run.rc == 0, run.err
    assert {t["node_id"] for t in yaml.safe_load(run.out)["tags"]} == {
        n for n, p in big.readable.items() if p.startswith("Plant/Area0/Line0/")
    }

    run = discover(*base, "--root", f"nsu={NS};s=Plant", "--max-nodes", "120")
    assert run.rc == 0, run.err
    profile = yaml.safe_load(run.out)
    assert 0 < len(profile["tags"]) <= 120
    assert "# STOPPED at --max-nodes 120" in run.out and "STOPPED at --max-nodes" in run.err

    run = discover(*base, "--root", f"nsu={NS};s=A0", "--max-depth", "1")
    assert run.rc == 1 and "no readable variable below" in run.err and "--max-depth 1" in run.err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--root", "ns=1;x=what"], "--root"),
        (["--root", f"nsu={NS};s=NoSuchNode"], "not on this server (BadNodeIdUnknown)"),
        (["--root", f"/Objects/{{{NS}}}Nowhere"], "not on this server"),
        (["--root", "nsu=urn:not-there;s=Plant"], "not on this server"),
        (["--root", f"nsu={NS};s=A0.L0.V000"], "is a Variable, not an Object"),
        (["--include", "[abc"], "'[' is not closed"),
        (["--exclude", "/Plant/*"], "without a leading '/'"),
        (["--include", ""], "empty pattern"),
        (["--max-depth", "0"], "--max-depth must be at least 1"),
        (["--name", "no spaces"], "--name"),
        (["--timeout", "soon"], "--timeout"),
    ],
)
def test_bad_arguments_exit_2_with_one_clear_line(big: BigServer, argv: list[str], message: str) -> None:
    run = discover(big.url, "--security-policy", "None", "--out", "-", *argv)
    assert run.rc == 2, run
    assert run.out == ""
    assert message in run.err and len(run.err.strip().splitlines()) == 1, run.err


# --------------------------------------------------------------------------- bad input without a server


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["http://10.0.0.1:4840", "--security-policy", "None"], "is not an OPC UA endpoint URL"),
        (["opc.tcp://", "--security-policy", "None"], "is not an OPC UA endpoint URL"),
        (
            ["opc.tcp://127.0.0.1:4840"],
            "--security-policy Basic256Sha256 needs --certificate and --private-key",
        ),
        (
            ["opc.tcp://127.0.0.1:4840", "--security-policy", "None", "--security-mode", "Sign"],
            "--security-mode must be 'None'",
        ),
        (
            ["opc.tcp://127.0.0.1:4840", "--security-policy", "None", "--password-file", "/nonexistent"],
            "needs a --username",
        ),
    ],
)
def test_malformed_url_and_security_options_are_named(argv: list[str], message: str) -> None:
    run = discover(*argv, "--out", "-")
    assert run.rc == 2 and message in run.err, run.err


def test_unreachable_server_is_exit_1_within_the_timeout() -> None:
    with refused_port() as port:
        refused = discover(f"opc.tcp://127.0.0.1:{port}", "--security-policy", "None", "--out", "-")
    assert refused.rc == 1 and "connect opc.tcp://127.0.0.1" in refused.err, refused.err
    # a listener that accepts and never answers: bounded by --timeout, not forever
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()
    stop = threading.Event()
    held: list[socket.socket] = []

    def accept() -> None:
        silent.settimeout(0.1)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except OSError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        port = silent.getsockname()[1]
        run = discover(
            f"opc.tcp://127.0.0.1:{port}",
            "--security-policy",
            "None",
            "--timeout",
            "500ms",
            "--out",
            "-",
        )
    finally:
        stop.set()
        acceptor.join(5)
        for s in [*held, silent]:
            s.close()
    assert run.rc == 1 and "timeout" in run.err.lower(), run.err
    assert run.seconds < 30  # the test's own bound; the option makes it ~1.5 s


# --------------------------------------------------------------------------- discover → validate → run


def test_discovered_profiles_validate_and_every_variable_reaches_the_broker(
    big: BigServer,
    big_profile: tuple[Path, Run],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    mosquitto: Mosquitto,
    collector: Collector,
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    shutil.copy(big_profile[0], profiles / "big.yaml")
    with ThreadedSim(lambda: serve_bioreactor_opcua(port=0, speed=60, seed=3)) as sim:
        run = discover(sim.url, "--security-policy", "None", "--out", str(profiles / "sim.yaml"))
        assert run.rc == 0, run.err
        sim_profile = yaml.safe_load((profiles / "sim.yaml").read_text())
        big_tags = yaml.safe_load((profiles / "big.yaml").read_text())
        assert sim_profile["identity"] == {
            "serial": "Bioreactor/Identification/SerialNumber",
            "firmware": "Bioreactor/Identification/SoftwareRevision",
            "model": "Bioreactor/Identification/Model",
        }
        assert sim_profile["device"] == {
            "model": "CLEANROOM-SIM BIOREACTOR",
            "vendor": "Cleanroom-Sim Bioprocess",
            "firmware": "==2.4.1",
        }
        temperature = next(t for t in sim_profile["tags"] if t["name"].endswith("Temperature/CurrentValue"))
        assert (temperature["unit"], temperature["unit_code"], temperature["range"]) == (
            "degC",
            "CEL",
            [0, 60],
        )

        cfg = write_config(
            tmp_path,
            [("br1", sim_profile["profile"], sim.url), ("big1", big_tags["profile"], big.url)],
            mosquitto.port,
        )
        assert main(["validate", str(cfg)]) == 0, capsys.readouterr().err
        capsys.readouterr()

        agent = AgentProcess(cfg, tmp_path / "agent.log").start()
        try:
            expected = {
                "br1": {t["name"] for t in sim_profile["tags"]},
                "big1": {t["name"] for t in big_tags["tags"]},
            }

            def all_arrived() -> bool:
                got = readings(collector)
                return agent.running() and all(expected[d] <= set(got.get(d, {})) for d in expected)

            wait_for(all_arrived, timeout=60, what="a reading of every discovered variable")
        finally:
            agent.close()
    got = readings(collector)
    for device, profile in (("br1", sim_profile), ("big1", big_tags)):
        for tag in profile["tags"]:
            if "array" not in tag:
                assert any(q == "good" for _, q in got[device][tag["name"]]), (device, tag["name"])
    assert got["big1"]["Plant/Area2/Line3/Var042"][0] == (42.0, "good")
    events = [
        e for t, p, _ in collector.messages if t.endswith("/events") and p for e in json.loads(p)["events"]
    ]
    assert not [e for e in events if e["kind"] == "profile_mismatch"], "each device is what its profile says"


# --------------------------------------------------------------------------- security


def test_secured_discovery_with_login_never_shows_the_password(tmp_path: Path) -> None:
    server = create_certificate(tmp_path / "sim", SIM_SERVER_URI, ["127.0.0.1", "localhost"], server=True)
    agent = create_certificate(tmp_path / "agent", "urn:cleanroom-test:discover-agent", ["localhost"])
    password = "pw-Zq81-secret"
    (tmp_path / "password").write_text(password + "\n")
    out = tmp_path / "secured.yaml"
    secured = [
        "--security-policy",
        "Basic256Sha256",
        "--certificate",
        str(agent.cert),
        "--private-key",
        str(agent.key),
        "--server-certificate",
        str(server.cert),
        "--username",
        "qa",
        "--password-file",
        str(tmp_path / "password"),
    ]
    with ThreadedSim(
        lambda: serve_bioreactor_opcua(
            port=0, speed=60, cert=server.cert, key=server.key, user="qa", password=password
        )
    ) as sim:
        run = discover(sim.url, *secured, "--out", str(out))
        assert run.rc == 0, run.err
        (tmp_path / "password").write_text("wrong\n")
        refused = discover(sim.url, *secured, "--out", "-")
    text = out.read_text()
    assert "--security-policy Basic256Sha256 --security-mode SignAndEncrypt, user login" in text
    assert len(yaml.safe_load(text)["tags"]) > 20
    assert refused.rc == 1 and "Bad" in refused.err and len(refused.err.strip().splitlines()) == 1, (
        refused.err
    )
    for shown in (text, run.out, run.err, refused.err):
        assert password not in shown and str(agent.key) not in shown


# --------------------------------------------------------------------------- options, fuzzed


@settings(max_examples=200, deadline=None)
@given(root=st.text(max_size=40), pattern=st.text(max_size=20), name=st.text(max_size=12))
@example(root="0\n=", pattern="", name="")  # the stack's message repeated the newline (CI, once)
def test_any_option_text_is_accepted_or_refused_as_bad_input(root: str, pattern: str, name: str) -> None:
    """Whatever is typed for --root, a pattern or --name: options, or a DiscoveryError that says
    it is bad input (exit 2), before anything is sent."""
    args = argparse.Namespace(
        root=root,
        max_depth=10,
        max_nodes=100,
        include=[pattern],
        exclude=[pattern],
        include_server=False,
        name=name,
    )
    try:
        options = opcua_discover._options(args)
    except DiscoveryError as exc:
        assert exc.bad_input and str(exc) and "\n" not in str(exc)
        return
    assert options.root.text == root.strip()
    for p in (*options.include, *options.exclude):
        fnmatch.fnmatchcase("Area1/Line2/Var003", p)  # every accepted pattern is usable
