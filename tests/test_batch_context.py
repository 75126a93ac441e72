"""Batch context on every record (issue 18): the registry that assigns batches (every refusal
typed and audited), the buffer stamping each record with the context of its acquisition time, the
context surviving a restart and a broker outage on a real agent, and the flat and Sparkplug
payloads carrying it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.app.batches import STATE_PREFIX, BatchRegistry, RefusalReason
from agent.app.config import load_config
from agent.app.runtime import Agent
from agent.buffer.audit import Auditor
from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.core.batch import BatchContext, BatchPhase, BatchSource, split_ref
from agent.core.events import DataLoss, LossReason
from agent.core.records import Block, Event, Quality
from agent.sinks.flat import FlatConfig, FlatEncoder
from agent.sinks.payload import TagInfo
from agent.sinks.sparkplug import codec
from cleanroom_common.net import free_port
from tests.support import Collector, Mosquitto, until
from tests.test_flat import validate as validate_flat
from tests.test_forwarder import SCHEMA, check_schema

CLI = BatchSource.CLI
WHO = {"actor": "qa.lead", "reason": "batch record BR-7"}


class Clock:
    """The registry's clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


def registry(
    devices: tuple[str, ...] = ("br1", "inc1", "br2"),
    groups: dict[str, list[str]] | None = None,
) -> tuple[BatchRegistry, list[Event], Clock]:
    sink: list[Event] = []
    clock = Clock()
    groups = {"suite1": ["br1", "inc1"]} if groups is None else groups
    return BatchRegistry(devices, groups, sink.append, Auditor(sink.append, "gw"), clock=clock), sink, clock


def audits(sink: list[Event], action: str) -> list[dict[str, Any]]:
    return [e.data for e in sink if e.kind == "audit" and e.data["action"] == action]


# --------------------------------------------------------------------------- the registry


def test_start_step_end_move_the_ref_and_records_resolve_by_their_own_time() -> None:
    batches, sink, clock = registry()
    clock.now = 100
    started = batches.start(
        ["br1"], "LOT-7", coi_id="PAT-42", product="CAR-T", step="thaw", source=CLI, **WHO
    )
    assert started.ok and started.changed
    # br1 is in group suite1: its incubator is assigned with it, each with a context of its own
    assert [(c.ref, c.group) for c in started.contexts] == [("LOT-7#1", ("br1", "inc1"))] * 2
    clock.now = 200
    assert [c.ref for c in batches.step("inc1", "expansion", source=CLI, **WHO).contexts] == ["LOT-7#2"] * 2
    clock.now = 300
    ended = batches.end("br1", source=BatchSource.MQTT, **WHO)
    assert [(c.ref, c.phase) for c in ended.contexts] == [("LOT-7#3", BatchPhase.END)] * 2
    for device in ("br1", "inc1"):
        assert [batches.resolve(device, t) for t in (99, 100, 199, 200, 299, 300, 10**18)] == [
            None, "LOT-7#1", "LOT-7#1", "LOT-7#2", "LOT-7#2", None, None,
        ]  # fmt: skip
        assert batches.current(device) is None
    assert batches.resolve("br2", 150) is None
    # each change: one batch_context event per device with its state, and one audit record each
    contexts = [e for e in sink if e.kind == BatchContext.KIND]
    assert [(e.device, e.data["ref"], e.data["phase"], e.ts_ns) for e in contexts] == [
        ("br1", "LOT-7#1", "start", 100), ("inc1", "LOT-7#1", "start", 100),
        ("br1", "LOT-7#2", "step", 200), ("inc1", "LOT-7#2", "step", 200),
        ("br1", "LOT-7#3", "end", 300), ("inc1", "LOT-7#3", "end", 300),
    ]  # fmt: skip
    assert contexts[0].data == {
        "ref": "LOT-7#1", "batch_id": "LOT-7", "phase": "start", "coi_id": "PAT-42", "product": "CAR-T",
        "step": "thaw", "group": ["br1", "inc1"], "source": "cli", "actor": "qa.lead",
        "reason": "batch record BR-7", "from_ts": 100,
    }  # fmt: skip
    assert all(e.state is not None and set(e.state) == {f"batch/{e.device}"} for e in contexts)
    assert [(a["device"], a["actor"], a["target"]) for a in audits(sink, "batch_end")] == [
        ("br1", "qa.lead", "LOT-7"),
        ("inc1", "qa.lead", "LOT-7"),
    ]
    assert audits(sink, "batch_end")[0]["source"] == "mqtt" and len(audits(sink, "batch_start")) == 2
    for e in contexts:  # what docs/payload.schema.json says a batch_context is
        check_schema(e.data, SCHEMA["$defs"]["batch_context"])


def test_a_repeated_command_changes_nothing_and_a_batch_started_again_continues_its_refs() -> None:
    batches, sink, clock = registry()
    assert batches.start(["br2"], "LOT-1", step="thaw", source=CLI, **WHO).changed
    before = len(sink)
    again = batches.start(["br2"], "LOT-1", source=BatchSource.MQTT, **WHO)  # a command delivered twice
    assert again.ok and not again.changed and [c.ref for c in again.contexts] == ["LOT-1#1"]
    assert not batches.step("br2", "thaw", source=CLI, **WHO).changed
    assert len(sink) == before
    clock.now += 1
    batches.end("br2", source=CLI, **WHO)
    clock.now += 1
    batches.start(["br2"], "LOT-2", source=CLI, **WHO)
    clock.now += 1
    batches.end("br2", source=CLI, **WHO)
    clock.now += 1
    # LOT-1 resumed after a hold: its refs go on, never naming an earlier context again
    assert [c.ref for c in batches.start(["br2"], "LOT-1", source=CLI, **WHO).contexts] == ["LOT-1#3"]


def test_a_group_is_assigned_by_its_name_and_stepped_and_ended_together() -> None:
    batches, _, _ = registry(groups={"suite1": ["br1", "inc1"], "suite2": ["br2"]})
    started = batches.start(["suite1", "br2"], "LOT-3", source=CLI, **WHO)
    assert [(c.ref, c.group) for c in started.contexts] == [("LOT-3#1", ("br1", "inc1", "br2"))] * 3
    assert [c.ref for c in batches.end("br2", source=CLI, **WHO).contexts] == ["LOT-3#2"] * 3
    assert batches.snapshot() == {}


@pytest.mark.parametrize(
    ("call", "refusal", "detail"),
    [
        (lambda b: b.start(["br9"], "L", source=CLI, **WHO), RefusalReason.UNKNOWN_DEVICE, "'br9' is not"),
        (lambda b: b.step("nope", "s", source=CLI, **WHO), RefusalReason.UNKNOWN_DEVICE, "'nope' is not"),
        (
            lambda b: b.start(["br2"], "OTHER", source=CLI, **WHO),
            RefusalReason.ALREADY_ASSIGNED,
            "holds batch 'HELD'",
        ),
        (
            lambda b: b.start(["br2"], "HELD", product="x", source=CLI, **WHO),
            RefusalReason.ALREADY_ASSIGNED,
            "with other identifiers",
        ),
        (lambda b: b.step("br1", "s", source=CLI, **WHO), RefusalReason.NOT_ASSIGNED, "'br1' holds no batch"),
        (lambda b: b.end("inc1", source=CLI, **WHO), RefusalReason.NOT_ASSIGNED, "'inc1' holds no batch"),
        (
            lambda b: b.start(["br1"], "L", source=CLI, actor=" ", reason="r"),
            RefusalReason.MISSING_ACTOR,
            "an actor",
        ),
        (lambda b: b.end("br2", source=CLI, actor="a", reason=""), RefusalReason.MISSING_REASON, "a reason"),
        (lambda b: b.start(["br1"], "", source=CLI, **WHO), RefusalReason.INVALID, "batch_id '' is blank"),
        (lambda b: b.start(["br1"], "L\n1", source=CLI, **WHO), RefusalReason.INVALID, "control characters"),
        (lambda b: b.start(["br1"], "L" * 201, source=CLI, **WHO), RefusalReason.INVALID, "longer than 200"),
        (lambda b: b.start([], "L", source=CLI, **WHO), RefusalReason.INVALID, "non-empty list"),
        (lambda b: b.start("br1", "L", source=CLI, **WHO), RefusalReason.INVALID, "non-empty list"),
        (lambda b: b.start(["br1"], 7, source=CLI, **WHO), RefusalReason.INVALID, "batch_id must be text"),
        (lambda b: b.step("br2", " ", source=CLI, **WHO), RefusalReason.INVALID, "step ' ' is blank"),
    ],
)
def test_every_refusal_is_typed_audited_and_changes_nothing(
    call: Any, refusal: RefusalReason, detail: str
) -> None:
    batches, sink, _ = registry()
    batches.start(["br2"], "HELD", source=CLI, **WHO)
    held, before = batches.snapshot(), len(sink)
    result = call(batches)
    assert not result.ok and result.refusal is not None and not result.contexts
    assert result.refusal.reason is refusal and detail in result.refusal.detail
    assert batches.snapshot() == held
    (audit,) = [e for e in sink[before:]]  # nothing else is committed
    assert audit.kind == "audit" and audit.severity == "warning"
    assert audit.data["action"] == "batch_refused" and audit.data["refusal"] == str(refusal)
    assert audit.data["reason"] == result.refusal.detail and audit.data["source"] == "cli"


def test_a_conflict_is_recorded_and_audited_and_the_assignment_stays() -> None:
    batches, sink, _ = registry()
    batches.start(["br2"], "LOT-1", source=BatchSource.MQTT, actor="mes", reason="order 5")
    held = batches.snapshot()
    batches.conflict(
        "br2", source=BatchSource.DEVICE, claimed={"batch_id": "LOT-9"}, detail="the PLC reports LOT-9"
    )
    assert batches.snapshot() == held
    event, audit = sink[-2:]
    assert (event.device, event.kind, event.severity) == ("br2", "batch_conflict", "warning")
    assert event.data["claimed"] == {"batch_id": "LOT-9"} and event.data["current"]["ref"] == "LOT-1#1"
    check_schema(event.data, SCHEMA["$defs"]["batch_conflict"])
    assert audit.data["action"] == "batch_conflict" and audit.data["reason"] == "the PLC reports LOT-9"


def test_the_state_restores_the_assignment_and_its_history_and_bad_state_is_audited() -> None:
    batches, sink, clock = registry()
    clock.now = 100
    batches.start(["br1"], "LOT-7", step="thaw", source=CLI, **WHO)
    clock.now = 200
    batches.step("br1", "expansion", source=CLI, **WHO)
    state: dict[str, str] = {}
    for e in sink:
        state.update(e.state or {})
    state["batch/br2"] = '{"last": {"ref": "x"}}'  # damaged: the device starts with none, audited
    state["agent:config_sha256"] = "not ours"
    restored, sink2, _ = registry()
    restored.restore(state)
    assert restored.snapshot() == batches.snapshot() and restored.current("br1") == batches.current("br1")
    assert [restored.resolve("inc1", t) for t in (99, 150, 250)] == [None, "LOT-7#1", "LOT-7#2"]
    assert restored.current("br2") is None
    (failed,) = audits(sink2, "batch_restore_failed")
    assert failed["device"] == "br2" and "cannot be read" in failed["reason"]
    assert restored.end("br1", source=CLI, **WHO).contexts[0].ref == "LOT-7#3"


json_values = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.text(max_size=6)),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@settings(max_examples=80, deadline=None)
@given(st.one_of(st.text(max_size=20), json_values.map(json.dumps)))
def test_any_stored_state_restores_or_is_audited_never_raised(text: str) -> None:
    """The buffer's state is read back at every start: whatever it holds, the start goes on."""
    batches, sink, _ = registry()
    batches.restore({"batch/br1": text})
    held = batches.current("br1")
    assert held is None or batches.resolve("br1", 10**19) == held.ref
    assert all(e.data["action"] == "batch_restore_failed" for e in sink)


texts = st.one_of(st.text(max_size=8), st.none(), st.integers(), st.lists(st.text(max_size=3), max_size=3))


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.tuples(st.sampled_from(["start", "step", "end"]), texts, texts, texts, texts), max_size=6))
def test_any_request_is_applied_or_refused_never_raised(
    requests: list[tuple[str, Any, Any, Any, Any]],
) -> None:
    """What an MES command or a device register could hand the registry, however malformed."""
    batches, sink, clock = registry()
    for op, a, b, actor, reason in requests:
        clock.now += 1
        who = {"source": CLI, "actor": actor, "reason": reason}
        if op == "start":
            result = batches.start(a if isinstance(a, list) else [a], b, **who)
        elif op == "step":
            result = batches.step(a, b, **who)
        else:
            result = batches.end(a, **who)
        assert result.ok or (result.refusal is not None and isinstance(result.refusal.reason, RefusalReason))
    for e in sink:
        json.dumps(e.data, allow_nan=False)
    for device, ctx in batches.snapshot().items():
        assert (
            split_ref(ctx["ref"])[0] == ctx["batch_id"] and batches.resolve(device, clock.now) == ctx["ref"]
        )


# --------------------------------------------------------------------------- payloads


def committed_segments(tmp_path: Path, items: list[Block | Event]) -> list[Any]:
    core = Buffer(BufferConfig(path=tmp_path / "b.db"), agent_id="gw")
    core.open()
    try:
        core.commit(items)
        return core.pending(0, 10)
    finally:
        core.close()


def test_flat_and_sparkplug_carry_the_batch_and_a_birth_repeats_it(tmp_path: Path) -> None:
    tags = ("temp", "ph")
    blocks = [
        Block("br1", "process", 10**18, tags, ("degC", "pH"), [37.0, 7.2], batch="LOT-7#2"),
        Block("br1", "process", 10**18 + 10**9, tags, ("degC", "pH"), [None, 7.1],
              quality=[Quality.BAD, Quality.GOOD], reasons=["timeout", None]),
    ]  # fmt: skip
    event = Event("br1", "limit", data={"tag": "temp"}, ts_ns=10**18, batch="LOT-7#2")
    data_seg, events_seg = committed_segments(tmp_path, [*blocks, event])
    catalog = {"br1": [TagInfo("temp", "degC"), TagInfo("ph", "pH")]}

    flat = FlatEncoder(FlatConfig(), catalog, "p")
    samples = [json.loads(m.payload) for m in flat.encode(data_seg, historical=True)]
    assert [s["batch"] for s in samples] == ["LOT-7#2", None]
    (flat_event,) = [json.loads(m.payload) for m in flat.encode(events_seg, historical=False)]
    assert flat_event["batch"] == "LOT-7#2"
    for msg in [*samples, flat_event]:
        validate_flat(msg)

    specs = codec.catalog_metrics(catalog)["br1"]
    batch_alias = next(s.alias for s in specs if s.name == codec.BATCH)
    doc = json.loads(data_seg.payload)
    seqs = iter(range(10))
    out = codec.data_from_segment(
        doc, specs=specs, seq_for=lambda: next(seqs), segment_ref="r", historical=True, ts_ms=1
    )
    first, second = ([m for m in codec.decode(p).metrics if m.alias == batch_alias] for p in out.payloads)
    assert [(m.value, m.is_null, m.is_historical) for m in first] == [("LOT-7#2", False, True)]
    assert [(m.value, m.is_null) for m in second] == [(None, True)]  # the end is said, not left out
    birth = codec.decode(
        codec.dbirth(seq=0, ts_ms=1, specs=specs, last={codec.BATCH: codec.Last("LOT-7#2", 5)})
    )
    declared = next(m for m in birth.metrics if m.name == codec.BATCH)
    assert (declared.value, declared.datatype) == ("LOT-7#2", codec.DataType.STRING)
    with pytest.raises(ValueError, match="reserved"):
        codec.catalog_metrics({"br1": [TagInfo(codec.BATCH)]})


# --------------------------------------------------------------------------- a real agent


def agent_yaml(tmp_path: Path, broker_port: int) -> Path:
    """One device nobody answers: its failed polls are committed every 200 ms as bad blocks."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 2s}}\n"
        "buffer: {path: buffer.db, commit_interval: 50ms}\n"
        f"mqtt: {{host: 127.0.0.1, port: {broker_port}, reconnect_min: 100ms, reconnect_max: 300ms}}\n"
        "devices:\n  - id: br1\n    profile: bioreactor-sim\n"
        f"    connection: {{host: 127.0.0.1, port: {free_port()}, timeout: 100ms}}\n"
        "    groups: {process: {interval: 200ms}}\n"
    )
    return cfg


def stored(db: Path, kind: str) -> list[dict[str, Any]]:
    core = Buffer(BufferConfig(path=db), agent_id=None)
    core.open(readonly=True)
    try:
        return [json.loads(r.body) for r in core.records(kind=kind)]
    finally:
        core.close()


def blocks_since(db: Path, ts: int, group: str = "process") -> int:
    return sum(1 for b in stored(db, "data") if b["ts"] >= ts and b["group"] == group)


def bad_block(ts: int) -> Block:
    """A record the device kept and the driver reads late (a counter's backfill): an old time."""
    return Block.bad("br1", "backfill", ("temp",), ("degC",), "timeout", acq_ts_ns=ts)


async def test_context_survives_a_restart_and_a_broker_outage_by_acquisition_time(tmp_path: Path) -> None:
    broker = Mosquitto(persistence=True).start()
    collector = Collector(broker.port, topic="cleanroom/#", persistent=True)
    db = tmp_path / "buffer.db"
    cfg = agent_yaml(tmp_path, broker.port)
    agent = Agent(load_config(cfg))
    try:
        await agent.start()
        await until(lambda: any("blocks" in m for m in collector.json()), what="blocks delivered")
        broker.stop()  # everything from here on waits in the buffer
        started = agent.batches.start(
            ["br1"], "LOT-7", coi_id="PAT-42", product="CAR-T", step="thaw", source=CLI, **WHO
        )
        assert started.ok
        t_start = started.contexts[0].ts_ns
        agent._submit([bad_block(t_start - 1)], ())  # acquired before the start: no batch
        await until(lambda: blocks_since(db, t_start) >= 2, what="blocks in the batch")
        await agent.stop()
        # a loss the stop could not commit (the disk refused): committed at the next start, while
        # br1 holds the batch again, so it names it
        loss = DataLoss(LossReason.NOT_COMMITTED, readings=1, rows=1, detail="carried over")
        carried = {"losses": [{"device": "br1", "data": loss.data()}]}
        Path(f"{db}.uncommitted").write_text(json.dumps(carried))  # noqa: ASYNC240

        agent = Agent(load_config(cfg))  # a restart, the broker still down
        await agent.start()
        held = agent.batches.current("br1")
        assert held is not None and held.ref == "LOT-7#1"
        assert (await agent.status())["batches"]["br1"]["ref"] == "LOT-7#1"
        restarted = agent.started_ns or 0
        await until(lambda: blocks_since(db, restarted) >= 2, what="blocks after the restart")
        t_step = agent.batches.step("br1", "expansion", source=CLI, **WHO).contexts[0].ts_ns
        agent._submit([bad_block((t_start + t_step) // 2)], ())  # backfilled: its own time's context
        await until(lambda: blocks_since(db, t_step) >= 2, what="blocks after the step")
        t_end = agent.batches.end("br1", source=CLI, **WHO).contexts[0].ts_ns
        await until(lambda: blocks_since(db, t_end) >= 2, what="blocks after the end")

        broker.start()  # the backlog goes out now, long after its acquisition
        await agent.buffer.flush(5)
        await until(
            lambda: (
                {b["seq"] for b in stored(db, "data")}
                <= {b["seq"] for m in collector.json() for b in m.get("blocks", [])}
            ),
            within_s=20,
            what="every block delivered",
        )
    finally:
        await agent.stop()
        collector.close()
        broker.close()

    def expected(ts: int) -> str | None:
        return None if ts < t_start or ts >= t_end else "LOT-7#1" if ts < t_step else "LOT-7#2"

    delivered = [b for m in collector.json() for b in m.get("blocks", [])]
    assert all(b["batch"] == expected(b["ts"]) for b in delivered)
    assert {b["batch"] for b in delivered} == {None, "LOT-7#1", "LOT-7#2"}
    backfilled = sorted((b["ts"], b["batch"]) for b in delivered if b["group"] == "backfill")
    assert [ref for _, ref in backfilled] == [None, "LOT-7#1"]
    events = [e for m in collector.json() for e in m.get("events", [])]
    changes = [
        (e["data"]["ref"], e["data"]["phase"], e["batch"]) for e in events if e["kind"] == "batch_context"
    ]
    assert changes == [
        ("LOT-7#1", "start", "LOT-7#1"),
        ("LOT-7#2", "step", "LOT-7#2"),
        ("LOT-7#3", "end", None),
    ]
    trail = [e for e in events if e["kind"] == "audit" and e["data"]["action"].startswith("batch_")]
    assert [(a["data"]["action"], a["data"]["device"], a["data"]["actor"], a["batch"]) for a in trail] == [
        ("batch_start", "br1", "qa.lead", "LOT-7#1"),
        ("batch_step", "br1", "qa.lead", "LOT-7#2"),
        ("batch_end", "br1", "qa.lead", None),
    ]
    assert all(e["batch"] is None for e in events if e["kind"] == "audit" and "device" not in e["data"])
    (carried_loss,) = [
        e for e in events if e["kind"] == "data_loss" and e["data"]["detail"] == "carried over"
    ]
    assert carried_loss["batch"] == "LOT-7#1"
    state = json.loads(_state(db)[f"{STATE_PREFIX}br1"])
    assert state["last"]["phase"] == "end"


def _state(db: Path) -> dict[str, str]:
    core = Buffer(BufferConfig(path=db), agent_id=None)
    try:
        return core.open(readonly=True)
    finally:
        core.close()
