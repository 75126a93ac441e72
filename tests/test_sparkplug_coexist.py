"""The agent and a third-party edge node share one broker and one Sparkplug group: Eclipse Tahu's
JavaScript edge node client (npm ``sparkplug-client``, run by node) is edge node B, the agent is
edge node A, and a host application (a paho subscriber on ``spBv1.0/G/#``) decodes everything
with our codec. Each node keeps its own bdSeq and seq, a rebirth asked of one node re-births
only that node, B's death fires B's will and not A's, and nothing B publishes reaches the agent
as a command. node and npm are required: without them the test fails, it does not skip."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from agent.buffer.async_buffer import AsyncBuffer
from agent.buffer.config import BufferConfig
from agent.core.records import Block
from agent.sinks.forwarder import AgentIdentity, Forwarder, MqttConfig
from agent.sinks.payload import TagInfo
from agent.sinks.sparkplug import codec
from agent.sinks.sparkplug.generated import sparkplug_b_pb2 as pb
from agent.sinks.sparkplug.session import SparkplugEncoder
from tests.support import Collector, Mosquitto, npm_package, until

pytestmark = pytest.mark.timeout(300)  # a first run installs the npm package

CLIENT_VERSION = "3.2.4"
"""sparkplug-client, Eclipse Tahu's JavaScript edge node. 3.2.4 is the newest release and the only
one built on sparkplug-payload 1.0.3 (the Sparkplug 3.0 schema) and mqtt.js 4; 3.2.1 and 3.2.2
are the older code on sparkplug-payload 1.0.1. Its session is pre-3.0 all the same: bdSeq stays 0
on every connect and its NDEATH will is QoS 0 (3.0 asks for 1), which this test tolerates."""

GROUP = "G"
CATALOG = {"sim-1": [TagInfo("temp", "degC"), TagInfo("count", kind="int")]}
IDENTITY = AgentIdentity(agent_id="gw", version="0.1.0", config_hash="c0ffee")

# Edge node B: Tahu's client connects, emits "birth" (on every connect) and "ncmd" (it has no
# rebirth event of its own); the script answers an NCMD Node Control/Rebirth = true with its
# births, as the 3.0 specification asks, and publishes one DDATA per "data <k>" line on stdin.
# It reports what it saw as JSON lines.
EDGE_NODE_B = """
const sparkplug = require(CLIENT);
const say = (o) => process.stdout.write(JSON.stringify(o) + "\\n");
const client = sparkplug.newClient({
  serverUrl: `tcp://127.0.0.1:${PORT}`, username: null, password: null, groupId: "G",
  edgeNode: "B", clientId: "tahu-edge-B", version: "spBv1.0",
});
function births() {
  const ts = Date.now();
  client.publishNodeBirth({timestamp: ts, metrics: [
    {name: "Node Control/Rebirth", type: "Boolean", value: false},
  ]});
  client.publishDeviceBirth("pump", {timestamp: ts, metrics: [
    {name: "flow", type: "Double", value: 0.0, properties: {engUnit: {type: "String", value: "L/min"}}},
  ]});
}
client.on("birth", () => { births(); say({event: "birth"}); });
client.on("ncmd", (p) => {
  const rebirth = (p.metrics || []).some((m) => m.name === "Node Control/Rebirth" && m.value === true);
  say({event: "ncmd", rebirth});
  if (rebirth) births();
});
client.on("dcmd", (device) => say({event: "dcmd", device}));
client.on("error", (e) => { say({event: "error", message: String(e)}); process.exit(2); });
require("readline").createInterface({input: process.stdin}).on("line", (line) => {
  const k = Number(line.split(" ")[1]);
  const flow = {name: "flow", type: "Double", value: k + 0.5};
  client.publishDeviceData("pump", {timestamp: Date.now(), metrics: [flow]});
});
"""


@pytest.fixture(scope="module")
def tahu_client() -> tuple[str, Path]:
    return npm_package(
        "sparkplug-client", CLIENT_VERSION, "the Sparkplug coexistence test (Tahu's edge node client)"
    )


class EdgeNodeB:
    """The node process running :data:`EDGE_NODE_B`, and the events it reported."""

    def __init__(self, proc: asyncio.subprocess.Process, stderr: Path) -> None:
        self.proc = proc
        self.stderr = stderr
        self.events: list[dict[str, Any]] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for line in self.proc.stdout:
            self.events.append(json.loads(line))

    def alive(self) -> bool:
        """True while node runs; fails the test with node's own words when it stopped."""
        if self.proc.returncode is not None or any(e["event"] == "error" for e in self.events):
            raise AssertionError(
                f"edge node B (node) failed: {self.events}\n{self.stderr.read_text()[-3000:]}"
            )
        return True

    async def data(self, k: int) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(f"data {k}\n".encode())
        await self.proc.stdin.drain()

    async def kill(self) -> None:
        """An abrupt end (no MQTT DISCONNECT): the broker publishes B's will."""
        if self.proc.returncode is None:
            self.proc.kill()
        await self.proc.wait()
        await self._reader


@contextlib.asynccontextmanager
async def edge_node_b(tahu: tuple[str, Path], port: int, tmp_path: Path) -> AsyncIterator[EdgeNodeB]:
    node, module = tahu
    script = f"const CLIENT = {json.dumps(str(module))};\nconst PORT = {port};\n{EDGE_NODE_B}"
    (tmp_path / "edge-b.js").write_text(script)
    stderr = tmp_path / "edge-b.stderr"
    with stderr.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(
            node, str(tmp_path / "edge-b.js"), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=err,
        )  # fmt: skip
    b = EdgeNodeB(proc, stderr)
    try:
        yield b
    finally:
        await b.kill()


def block(k: int) -> Block:
    return Block(device="sim-1", group="g", acq_ts_ns=time.time_ns(), tags=["temp", "count"],
                 units=["degC", None], values=[20 + k / 4, k])  # fmt: skip


def rebirth_command() -> bytes:
    p = pb.Payload()
    p.timestamp = int(time.time() * 1000)
    metric = p.metrics.add()
    metric.name, metric.datatype, metric.boolean_value = codec.REBIRTH, codec.DataType.BOOLEAN, True
    return bytes(p.SerializeToString())


def bd_seq(d: codec.Decoded) -> int:
    return int(next(m.value for m in d.metrics if m.name == codec.BDSEQ))


async def test_agent_and_tahu_edge_node_coexist_in_one_group(
    tahu_client: tuple[str, Path], mosquitto: Mosquitto, tmp_path: Path
) -> None:
    host = Collector(mosquitto.port, topic=f"spBv1.0/{GROUP}/#")
    buf = AsyncBuffer(BufferConfig(path=tmp_path / "b.db", synchronous="off", commit_interval="10ms"), "gw")
    cfg = MqttConfig.model_validate(
        {"host": "127.0.0.1", "port": mosquitto.port, "reconnect_min": "50ms", "reconnect_max": "200ms",
         "payload": "sparkplug_b", "publish_segments": False,
         "sparkplug": {"group_id": GROUP, "edge_node_id": "A"}}
    )  # fmt: skip
    # A's bdSeq goes on from 7, as after a reload that rebuilt its forwarder; B's starts at 0: each
    # node's numbers are its own
    encoder = SparkplugEncoder(cfg.sparkplug, CATALOG, IDENTITY.agent_id, bd_seq=7)
    fw = Forwarder(cfg, buf, IDENTITY, encoder=encoder)

    def seen(kind: str, node: str) -> int:
        return sum(1 for t, _, _ in list(host.messages) if t.split("/")[2:4] == [kind, node])

    def received(node: str) -> list[Any]:
        """The readings of ``node``'s device in arrival order: A's ``count`` (DDATA by alias, as
        its DBIRTH declares it), B's ``flow`` (by name)."""
        out: list[Any] = []
        names: dict[int, str] = {}
        for t, p, _ in list(host.messages):
            _, _, kind, edge, *_ = t.split("/")
            if edge != node or kind not in ("DBIRTH", "DDATA"):
                continue
            for m in codec.decode(p).metrics:
                if kind == "DBIRTH" and m.alias is not None and m.name is not None:
                    names[m.alias] = m.name
                name = m.name or names.get(m.alias or 0)
                if kind == "DDATA" and name in ("count", "flow"):
                    out.append(m.value)
        return out

    sent = 0

    async def both_send(rounds: int, b: EdgeNodeB | None) -> None:
        """``rounds`` readings from each node (interleaved), until the host has them all."""
        nonlocal sent
        for _ in range(rounds):
            buf.submit([block(sent)])
            if b is not None:
                await b.data(sent)
            sent += 1
        await buf.flush()
        await until(lambda: received("A") == list(range(sent)), what="A's data at the host")
        if b is not None:
            await until(lambda: b.alive() and len(received("B")) == sent, what="B's data at the host")

    await buf.open()
    try:
        try:
            await fw.start()
            async with edge_node_b(tahu_client, mosquitto.port, tmp_path) as b:
                await until(lambda: b.alive() and seen("DBIRTH", "B") == 1, what="B's births")
                await until(lambda: seen("DBIRTH", "A") == 1, what="A's births")
                await both_send(5, b)
                host.client.publish(f"spBv1.0/{GROUP}/NCMD/A", rebirth_command(), qos=1)
                await until(lambda: seen("DBIRTH", "A") == 2, what="A's rebirth")
                await both_send(5, b)
                host.client.publish(f"spBv1.0/{GROUP}/NCMD/B", rebirth_command(), qos=1)
                await until(lambda: b.alive() and seen("DBIRTH", "B") == 2, what="B's rebirth")
                await both_send(5, b)
                assert [e for e in b.events if e["event"] != "birth"] == [
                    {"event": "ncmd", "rebirth": True}
                ], "B took exactly one command, the rebirth sent to it: none of the agent's messages"
                await b.kill()
                await until(lambda: seen("NDEATH", "B") == 1, what="B's will")
            await both_send(3, None)  # A goes on alone
            assert seen("NDEATH", "A") == 0, "B's death is not A's"
            stats = fw.stats()
            assert stats["connected"] and stats["reconnects"] == 0
            assert (stats["message_errors"], stats["command_errors"]) == (0, 0)
            sp = stats["sparkplug"]
            assert (sp["refused_commands"], sp["malformed_commands"]) == (0, 0), (
                "nothing of B taken as a command"
            )
            assert (sp["births"], sp["rebirths"], sp["bd_seq"]) == (2, 1, 7)
        finally:
            await fw.stop(grace_s=0.5)
            await buf.close()
        await until(lambda: seen("NDEATH", "A") == 1, what="A's NDEATH at its clean stop")
    finally:
        host.close()

    by_node: dict[str, list[tuple[str, codec.Decoded]]] = {"A": [], "B": []}
    for t, p, _ in host.messages:
        _, _, kind, edge, *_ = t.split("/")
        if kind not in ("NCMD", "DCMD"):  # the host's own
            by_node[edge].append((kind, codec.decode(p)))  # every message of both nodes decodes
    assert [k for k, _ in by_node["A"]] == [
        "NBIRTH", "DBIRTH", *["DDATA"] * 5, "NBIRTH", "DBIRTH", *["DDATA"] * 13, "NDEATH"
    ], "A re-births once, on its NCMD, and dies only at its stop"  # fmt: skip
    assert [k for k, _ in by_node["B"]] == [
        "NBIRTH", "DBIRTH", *["DDATA"] * 10, "NBIRTH", "DBIRTH", *["DDATA"] * 5, "NDEATH"
    ], "B re-births once, on its own NCMD (after A's rebirth and the data that followed it)"  # fmt: skip
    for (node, messages), bd in zip(by_node.items(), (7, 0), strict=True):
        births = [bd_seq(d) for k, d in messages if k in ("NBIRTH", "NDEATH")]
        assert births == [bd, bd, bd], f"{node}: its session's bdSeq in both births and its death"
        alive = [(k, d.seq) for k, d in messages if k != "NDEATH"]
        expected: list[int] = []
        for k, _ in alive:
            expected.append(0 if k == "NBIRTH" else (expected[-1] + 1) % 256)
        seqs = [seq for _, seq in alive]
        assert seqs == expected, f"{node}: seq from 0 at each NBIRTH, +1 per message, no gap: {seqs}"
        assert messages[-1][1].seq is None, f"{node}: NDEATH carries no seq"
    assert received("A") == list(range(sent))
    assert received("B") == [k + 0.5 for k in range(15)]
    a_birth = {m.name: m for m in by_node["A"][1][1].metrics}
    assert (a_birth["temp"].datatype, a_birth["temp"].properties) == (
        codec.DataType.DOUBLE,
        {"engUnit": "degC"},
    )
    (flow,) = by_node["B"][1][1].metrics
    assert (flow.name, flow.datatype, flow.properties) == (
        "flow",
        codec.DataType.DOUBLE,
        {"engUnit": "L/min"},
    )
