"""Issue 15, OPC UA events: Alarms & Conditions events of the profile's ``alarms.sources``
become ``alarm`` events committed through the buffer at once, not with the device's next block.

Against the bundled simulator (a real asyncua server over TCP): an alarm raised by the
process arrives with its states (active, unacknowledged), comes back by ConditionRefresh
after a reconnect, and clears (inactive, acknowledged); in the in-process agent it is committed
while 30 s groups are still waiting for their second poll, and a device with no tags at all
(alarms only) runs, and reconnects when its link dies; through the whole agent the same reaches
a real mosquitto. Against a plain asyncua server: a server without ConditionRefresh and a source
that does not exist are counted and logged, never a failed device. The event decoding is
fuzzed: whatever a server sends, an event comes out, with what could not be read named and
counted; a storm in one publish response is one hand-over to the buffer.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Iterator, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from asyncua import Server, ua
from asyncua.ua.object_ids import ObjectIds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from agent.app.config import load_config
from agent.app.runtime import Agent
from agent.core.driver import DeviceContext, DriverStats, build_groups
from agent.core.records import Block, Event, Severity, dumps
from cleanroom_common.net import free_port
from drivers.opcua.alarms import EVENT_DECODE_ERROR, SELECT, AlarmSubscription, decode_fields, severity_of
from drivers.opcua.config import Alarms
from drivers.opcua.driver import ALARM_SOURCE_UNAVAILABLE, CONDITION_REFRESH_FAILED, OpcUaDriver
from simulators.servers.opcua import NAMESPACE, serve_bioreactor_opcua
from tests.support import AgentProcess, Collector, Mosquitto, ThreadedSim, until, wait_for

PROFILE = Path(__file__).resolve().parent.parent / "deploy" / "profiles" / "bioreactor-sim-opcua.yaml"
SOURCE = f"nsu={NAMESPACE};s=Bioreactor"


def driver_for(profile: dict[str, Any], url: str) -> tuple[OpcUaDriver, DeviceContext, list[Event]]:
    """The driver, its context, and the events it hands to the agent (``ctx.submit_events``)."""
    prof = OpcUaDriver.profile_model().model_validate(profile)
    conn = OpcUaDriver.Connection.model_validate({"url": url, "security_policy": "None", "timeout": 2})
    submitted: list[Event] = []
    ctx = DeviceContext(
        id="br",
        profile=prof,
        connection=conn,
        groups=build_groups("br", prof, conn, {}),
        submit_events=submitted.extend,
    )
    return OpcUaDriver(ctx), ctx, submitted


def sim_profile() -> dict[str, Any]:
    profile = yaml.safe_load(PROFILE.read_text())
    profile["alarms"]["publishing_interval"] = 0.1
    return profile


async def alarms_until(seen: list[Event], cond: Any) -> Event:
    """The first event the driver submitted that matches, waiting for it (no poll needed)."""
    result: Event = await until(
        lambda: next((e for e in seen if cond(e.data)), None), within_s=10, what="an alarm event"
    )
    return result


# --------------------------------------------------------------------------- the simulator


@pytest.fixture(scope="module")
def sim() -> Iterator[ThreadedSim]:
    """One simulator for the module, on its own loop: the driver's tests and the agent's share it."""
    threaded = ThreadedSim(lambda: serve_bioreactor_opcua(port=0, speed=1, seed=3, update_interval_s=0.05))
    with threaded:
        yield threaded


def setpoint(sim: ThreadedSim, value: float) -> None:
    sim.call(lambda: sim.sim.model.set_setpoint("temperature_setpoint_c", value))


async def test_an_alarm_is_raised_refreshed_after_a_reconnect_and_cleared(sim: ThreadedSim) -> None:
    driver, ctx, seen = driver_for(sim_profile(), sim.sim.url)
    await driver.connect()
    try:
        setpoint(sim, 39.0)  # 37 °C is now 2 °C low
        raised = await alarms_until(seen, lambda d: d["condition"] == "TemperatureLow" and d["active"])
        assert all(not b.events for b in await driver.read(ctx.groups["status"]))  # none ride on blocks
        data = raised.data
        assert raised.kind == "alarm" and raised.severity is Severity.ALARM and raised.device == "br"
        assert data["acked"] is False and data["retain"] is True and data["refresh"] is False
        assert data["severity_ua"] == 700 and data["event_type"] == "OffNormalAlarmType"
        assert data["source"] == "Bioreactor" and data["source_node"] == SOURCE  # by namespace URI
        assert data["condition_id"] == f"nsu={NAMESPACE};s=Bioreactor.Conditions.TemperatureLow"
        assert data["message"] == "Temperature below setpoint - 0.5 °C"
        assert int(data["event_id"], 16) and abs(data["time"] / 1e9 - sim.sim.clock.now()) < 5
        assert "decode_errors" not in data
        json.loads(dumps(raised.data))  # a payload as it is

        # reconnect while it is active: ConditionRefresh brings it again, same EventId
        await driver.close()
        await driver.connect()
        seen.clear()
        again = await alarms_until(seen, lambda d: d["condition"] == "TemperatureLow" and d["active"])
        assert again.data["event_id"] == data["event_id"]

        setpoint(sim, 37.0)
        cleared = await alarms_until(seen, lambda d: d["condition"] == "TemperatureLow" and not d["active"])
        assert cleared.data["acked"] is True and cleared.data["retain"] is False
        assert cleared.data["message"].startswith("Back to normal")
        assert cleared.data["event_id"] != data["event_id"]
        assert not ctx.stats.errors, ctx.stats.errors
    finally:
        await driver.close()


# --------------------------------------------------------------------------- at once, in the agent


def write_alarm_agent(tmp: Path, url: str) -> Path:
    """Two devices on the simulator: the bundled map with every group polled every 30 s, and a
    profile with no tags, read only for its alarms; both publish events every 100 ms."""
    profiles = tmp / "profiles"
    profiles.mkdir()
    slow = sim_profile()
    slow["profile"] = "bioreactor-slow"
    slow["groups"] = {name: {"interval": "30s"} for name in slow["groups"]}  # polled, not subscribed
    (profiles / "slow.yaml").write_text(yaml.safe_dump(slow))
    only = {
        "profile": "bioreactor-alarms-only",
        "protocol": "opcua",
        "tags": [],
        "alarms": {"sources": [SOURCE], "publishing_interval": "100ms"},
    }
    (profiles / "only.yaml").write_text(yaml.safe_dump(only))
    link = (
        f"{{url: '{url}', timeout: 1s, keepalive: 500ms, security_policy: None,"
        " backoff_min: 100ms, backoff_max: 200ms}"
    )
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 0.1}}\n"
        "buffer: {path: buffer.db, commit_interval: 50ms}\n"
        "profiles_dirs: [profiles]\n"
        "devices:\n"
        f"  - {{id: slow, profile: bioreactor-slow, connection: {link}}}\n"
        f"  - {{id: only, profile: bioreactor-alarms-only, connection: {link}}}\n"
    )
    return cfg


async def test_an_alarm_is_committed_at_once_and_a_device_may_be_read_for_alarms_only(
    tmp_path: Path, sim: ThreadedSim
) -> None:
    agent = Agent(load_config(write_alarm_agent(tmp_path, sim.sim.url)))
    committed: list[Event] = []

    def on_commit(blocks: Sequence[Block], events: Sequence[Event]) -> None:
        committed.extend(events)

    def low(device: str) -> list[Event]:
        return [
            e
            for e in committed
            if e.device == device and e.kind == "alarm" and e.data["condition"] == "TemperatureLow"
        ]

    agent.buffer.add_listener(on_commit)
    await agent.start()
    try:
        assert agent.scheduler is not None
        slow, only = agent.scheduler.runners
        await until(lambda: slow.connected and only.connected, within_s=20, what="both connected")
        assert only.group_stats == {}  # nothing to poll: the connection alone is the device's work
        polls_before = {name: s.polls for name, s in slow.group_stats.items()}
        assert polls_before["identity"] == 1, "a group's first tick is polled at once"
        setpoint(sim, 39.0)
        await until(lambda: low("slow") and low("only"), within_s=10, what="the alarm committed")
        # committed while none of the 30 s groups polled: no block carried it
        assert {name: s.polls for name, s in slow.group_stats.items()} == polls_before
        raised = low("only")[0]
        assert raised.severity is Severity.ALARM and raised.data["active"] and raised.seq is not None

        # the alarms-only device's dead link is noticed without any poll, and it reconnects:
        # ConditionRefresh commits the still active alarm again, with its EventId
        driver = only.driver
        assert isinstance(driver, OpcUaDriver)
        driver.link_lost("comm_error", "the test cut the link")
        await until(
            lambda: only.ctx.stats.reconnects >= 1 and len(low("only")) >= 2, within_s=10, what="refreshed"
        )
        assert low("only")[-1].data["event_id"] == raised.data["event_id"]
        status = await agent.status()
        assert status["devices"]["only"]["state"] == "connected"
        assert status["devices"]["only"]["groups"] == {}
    finally:
        setpoint(sim, 37.0)
        await agent.stop()


@asynccontextmanager
async def plain_server() -> AsyncIterator[tuple[Server, str]]:
    """asyncua's own server as it comes: no ConditionRefresh, events on the Server object."""
    port = free_port()
    server = Server()
    await server.init()
    url = f"opc.tcp://127.0.0.1:{port}"
    server.set_endpoint(url)
    server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
    await server.start()
    try:
        yield server, url
    finally:
        await server.stop()


async def test_no_condition_refresh_and_a_missing_source_are_counted_not_fatal(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async with plain_server() as (server, url):
        profile = {
            "profile": "plain",
            "protocol": "opcua",
            "groups": {"default": {"interval": 0.1}},
            "tags": [{"name": "state", "node_id": "i=2259"}],  # Server_ServerStatus_State
            "alarms": {"sources": ["i=2253", "nsu=urn:nowhere;s=Device"], "publishing_interval": 0.1},
        }
        driver, ctx, seen = driver_for(profile, url)
        await driver.connect()
        try:
            assert ctx.stats.errors[CONDITION_REFRESH_FAILED] == 1
            assert ctx.stats.errors[ALARM_SOURCE_UNAVAILABLE] == 1
            assert "alarm source nsu=urn:nowhere;s=Device not subscribed" in caplog.text
            gen = await server.get_event_generator()  # BaseEventType on the Server object
            gen.event.Severity = 450
            await gen.trigger(message="door opened")
            event = await until(lambda: seen[0] if seen else None, within_s=10, what="the base event")
            assert event.severity is Severity.WARNING and event.data["message"] == "door opened"
            assert event.data["source"] == "Server" and event.data["event_type"] == "BaseEventType"
            # not a condition: its condition fields are null, and that is no decode error
            assert event.data["condition"] is None and event.data["active"] is None
            assert "decode_errors" not in event.data and not ctx.stats.errors[EVENT_DECODE_ERROR]
        finally:
            await driver.close()


# --------------------------------------------------------------------------- configuration


@pytest.mark.parametrize(
    ("alarms", "message"),
    [
        ({"sources": []}, "at least 1 item"),
        ({"sources": ["ns=2;x=1"]}, "is not a node id"),
        ({"sources": [SOURCE, SOURCE]}, "listed twice"),
        ({"sources": [SOURCE], "warning_from": 800, "alarm_from": 700}, "warning_from must not be above"),
        ({"sources": [SOURCE], "alarm_from": 1001}, "less than or equal to 1000"),
        ({"sources": [SOURCE], "queue": 5}, "Extra inputs are not permitted"),
    ],
)
def test_bad_alarm_configuration_is_rejected_naming_the_key(alarms: dict[str, Any], message: str) -> None:
    profile = {
        "profile": "p",
        "protocol": "opcua",
        "tags": [{"name": "a", "node_id": "i=1"}],
        "alarms": alarms,
    }
    with pytest.raises(ValidationError, match=message) as info:
        OpcUaDriver.profile_model().model_validate(profile)
    assert info.value.errors()[0]["loc"][0] == "alarms"


@pytest.mark.parametrize(
    ("ua_severity", "expected"),
    [
        (1, "info"),
        (399, "info"),
        (400, "warning"),
        (699, "warning"),
        (700, "alarm"),
        (1000, "alarm"),
        (None, "alarm"),
    ],
)
def test_severity_bands(ua_severity: int | None, expected: str) -> None:
    assert severity_of(ua_severity, Alarms(sources=[SOURCE])) == expected


# --------------------------------------------------------------------------- fuzzing

_ODD = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.datetimes(timezones=st.just(UTC)),
    st.builds(ua.LocalizedText, st.one_of(st.none(), st.text(max_size=8))),
    st.builds(lambda i: ua.NodeId(ua.Int32(i)), st.integers(0, 30000)),
    st.just(ua.NodeId("Odd", ua.Int16(7))),
    st.just("\udc80"),
    st.just(datetime(1, 1, 1)),
)
_FIELD = st.one_of(_ODD.map(ua.Variant), _ODD, st.just(ua.Variant()))


def _event_lists() -> st.SearchStrategy[Any]:
    fields = st.lists(_FIELD, max_size=len(SELECT) + 2)
    efl = st.one_of(st.builds(lambda f: ua.EventFieldList(ClientHandle=0, EventFields=f), fields), _ODD)
    return st.lists(efl, max_size=4).map(lambda events: ua.EventNotificationList(Events=events))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(_event_lists(), min_size=1, max_size=3))
def test_any_event_a_server_sends_becomes_an_alarm_event_or_a_counted_decode_error(
    notifications: list[ua.EventNotificationList],
) -> None:
    stats = DriverStats()
    events: list[Event] = []
    lost: list[str] = []
    sub = AlarmSubscription(
        "d",
        Alarms(sources=[SOURCE]),
        events.extend,
        5.0,
        link_lost=lambda r, d: lost.append(d),
        stats=stats,
        timeout_s=1.0,
    )
    sub.on_publish(
        ua.PublishResult(NotificationMessage=ua.NotificationMessage(NotificationData=notifications))
    )
    assert not lost, lost  # never a handler failure
    sent = sum(len(n.Events) for n in notifications)
    assert len(events) <= sent
    undecodable = 0
    for event in events:
        assert event.kind == "alarm" and event.severity in set(Severity)
        event.seq = 1
        json.loads(dumps(event.body()))  # strict JSON, storable as it is
        assert set(event.data) >= {key for key, _, _ in SELECT} | {"refresh"}
        undecodable += "decode_errors" in event.data
    assert stats.errors[EVENT_DECODE_ERROR] == undecodable


def test_a_malformed_event_keeps_what_could_be_read() -> None:
    good = [ua.Variant(None)] * len(SELECT)
    fields = list(good)
    fields[0] = ua.Variant(b"\x01\x02")  # EventId
    fields[5] = ua.Variant(ua.LocalizedText("CO2 low"))  # Message
    fields[6] = ua.Variant(5000, ua.VariantType.UInt16)  # Severity out of 1..1000
    fields[10] = ua.Variant("yes")  # ActiveState/Id not a Boolean
    data, problems = decode_fields(fields[:-1])  # AckedState/Id missing altogether
    assert data["event_id"] == "0102" and data["message"] == "CO2 low"
    assert data["severity_ua"] is None and data["active"] is None
    assert problems == ["event_type", "time", "severity_ua", "active", "acked"]


def publish(*event_types: int) -> ua.PublishResult:
    """One publish response holding one event of each type (EventId and EventType only)."""
    events = [
        ua.EventFieldList(
            ClientHandle=0,
            EventFields=[ua.Variant(i.to_bytes(4, "big")), ua.Variant(ua.NodeId(ua.Int32(t)))],
        )
        for i, t in enumerate(event_types)
    ]
    message = ua.NotificationMessage(NotificationData=[ua.EventNotificationList(Events=events)])
    return ua.PublishResult(NotificationMessage=message)


def test_a_storm_in_one_publish_response_is_one_hand_over_and_a_refused_one_a_driver_error() -> None:
    handed: list[list[Event]] = []
    lost: list[tuple[str, str]] = []

    def subscription(deliver: Any) -> AlarmSubscription:
        return AlarmSubscription(
            "d",
            Alarms(sources=[SOURCE]),
            deliver,
            5.0,
            link_lost=lambda r, d: lost.append((r, d)),
            stats=DriverStats(),
            timeout_s=1.0,
        )

    start, end, base = ObjectIds.RefreshStartEventType, ObjectIds.RefreshEndEventType, ObjectIds.BaseEventType
    subscription(handed.append).on_publish(publish(start, *[base] * 500, end))
    assert [len(events) for events in handed] == [500] and not lost  # the markers are not published
    assert all(e.data["refresh"] for e in handed[0])

    def refuse(events: list[Event]) -> None:
        raise RuntimeError("buffer is not open")

    subscription(refuse).on_publish(publish(base))  # never raises into asyncua's publish loop
    assert lost == [("driver_error", "RuntimeError('buffer is not open')")]


# --------------------------------------------------------------------------- through the agent


def test_simulator_alarms_reach_the_broker_as_alarm_events_with_their_states(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector, sim: ThreadedSim
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"""
agent: {{id: gw-alarms, status_listen: "127.0.0.1:{free_port()}"}}
buffer: {{path: buffer.db, commit_interval: 50ms}}
mqtt: {{host: 127.0.0.1, port: {mosquitto.port}}}
devices:
  - id: br1
    profile: bioreactor-sim-opcua
    connection: {{url: "{sim.sim.url}", timeout: 2s, security_policy: None}}
    groups:
      status: {{interval: 200ms}}
"""
    )
    agent = AgentProcess(cfg, tmp_path / "agent.log").start()
    try:
        wait_for(lambda: agent.running() and data_tags(collector), timeout=30, what="first readings")
        setpoint(sim, 39.0)
        wait_for(lambda: agent.running() and low(collector, True), timeout=30, what="the alarm raised")
        setpoint(sim, 37.0)
        wait_for(lambda: agent.running() and low(collector, False), timeout=30, what="the alarm cleared")
    finally:
        agent.terminate()
    raised, cleared = low(collector, True)[0], low(collector, False)[0]
    assert raised["severity"] == "alarm" and cleared["seq"] > raised["seq"]
    assert (raised["data"]["acked"], cleared["data"]["acked"]) == (False, True)
    assert raised["data"]["source"] == "Bioreactor" and raised["data"]["severity_ua"] == 700
    # the expanded array's elements arrived as tags of their own
    assert {f"zone_temperature_c.{i}" for i in range(4)} <= data_tags(collector)


def data_tags(collector: Collector) -> set[str]:
    return {t for m in collector.json("/br1/data") for b in m["blocks"] for t in b["tags"]}


def low(collector: Collector, active: bool) -> list[dict[str, Any]]:
    return [
        e
        for m in collector.json("/br1/events")
        for e in m["events"]
        if e["kind"] == "alarm"
        and e["data"]["condition"] == "TemperatureLow"
        and e["data"]["active"] is active
    ]
