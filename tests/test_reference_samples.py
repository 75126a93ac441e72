"""Reference-sample checks (issue 16): an offline sample (the lab's pH) compared with the online probe
at the sample's time. The simulated bioreactor's pH probe drifts (``ph_drift``) while the model
knows the true pH, which stands for the lab's value: the drift is caught by the profile's
``reference_limits``, a sample within it is info, and every entry that cannot be taken (no actor,
no reason, an unknown tag, a wrong token, a malformed document) is refused and audited. Entered
through the CLI and the control endpoint, and over MQTT on a real mosquitto; the batch report lists
the samples."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.app.control import TOKEN_FILE
from agent.app.referencecommands import MAX_SAMPLE_BYTES, ReferenceCommand, SampleError, parse_sample
from agent.core.driver import ProfileBase
from agent.core.records import Block, now_ns
from simulators.process.base import create_model
from simulators.process.faults import Fault
from tests.support import Collector, Mosquitto, until
from tests.test_app import events_in
from tests.test_batch_sources import audits, cli, http, running, write_config

PROFILES = Path(__file__).parent.parent / "deploy" / "profiles"
DEVICES = "  - {id: br1, profile: bioreactor-ref, enabled: false, connection: {host: 127.0.0.1, port: 1}}\n"
WHO = ("--actor", "qc:lee", "--reason", "daily pH check")
S = 1_000_000_000
DRIFT_PH_PER_DAY = 0.5
"""The fastest the simulator allows: the probe is 0.1 pH off after 4.8 h of simulated time."""
H = 3600


def write_setup(tmp_path: Path, **kw: Any) -> Path:
    """The bundled bioreactor profile (its reference limit on pH is 0.1), and an agent configured with it."""
    (tmp_path / "profiles").mkdir()
    text = (PROFILES / "bioreactor-sim.yaml").read_text()
    assert "reference_limits: {ph: 0.1," in text  # what the drift tests measure against
    text = text.replace("profile: bioreactor-sim\n", "profile: bioreactor-ref\n")
    (tmp_path / "profiles" / "bioreactor-ref.yaml").write_text(text)
    return write_config(tmp_path, devices=DEVICES, profiles=True, **kw)


def drifting_run(
    start_ns: int, seconds: int = 6 * H, every: int = 60
) -> tuple[list[Block], dict[int, float]]:
    """A bioreactor with a drifting pH probe, polled every ``every`` s of simulated time from
    ``start_ns``: the blocks the agent would have committed, and the true pH at each poll."""
    model = create_model("bioreactor", "br1", seed=7)
    model.faults.add(Fault.make("ph_drift", 0.0, 1e9, {"rate_ph_per_day": DRIFT_PH_PER_DAY}))
    blocks, truth = [], {}
    for t in range(0, seconds + 1, every):
        model.advance(float(t))
        ts = start_ns + t * S
        blocks.append(
            Block("br1", "process", ts, ["ph", "do_pct"], ["pH", "%"], [model.signals()["ph"], 40.0])
        )
        truth[ts] = model.offline_sample()["ph"]
    return blocks, truth


# --------------------------------------------------------------------------- the document


def test_the_profile_field_names_tags_of_the_profile() -> None:
    doc = {"profile": "p", "protocol": "any", "tags": [{"name": "ph", "unit": "pH"}]}
    ProfileBase.model_validate({**doc, "reference_limits": {"ph": 0.1}})
    with pytest.raises(ValueError, match="reference_limits names tag 'glucose'"):
        ProfileBase.model_validate({**doc, "reference_limits": {"glucose": 0.5}})
    with pytest.raises(ValueError, match="must be a positive number"):
        ProfileBase.model_validate({**doc, "reference_limits": {"ph": 0}})


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"", "Invalid JSON"),
        (b"[]", "should be an object"),
        (b'{"device": "br1", "tag": "ph", "value": 7.1}', "at: Field required"),
        (b'{"device": "br1", "tag": "ph", "value": "7.1", "at": 1}', "value"),
        (b'{"device": "br1", "tag": "ph", "value": 7.1, "at": "yesterday"}', "not an ISO 8601 time"),
        (b'{"device": "br1", "tag": "ph", "value": 7.1, "at": "2026-12-07T03:00:00"}', "needs its time zone"),
        (b'{"device": "br1", "tag": "ph", "value": 7.1, "at": -5}', "must not be negative"),
        (b'{"device": "br1", "tag": "ph", "value": 7.1, "at": "0001-01-01T00:00+14:00"}', "before 1970"),
        (b'{"device": "br1", "tag": "ph", "value": NaN, "at": 1}', "value"),
        (b'{"device": "br1", "tag": "ph", "value": 7.1, "at": 1, "rogue": 1}', "rogue: Extra inputs"),
        (b'{"device": "", "tag": "ph", "value": 7.1, "at": 1}', "device"),
        (b" " * (MAX_SAMPLE_BYTES + 1), f"more than {MAX_SAMPLE_BYTES}"),
    ],
)
def test_a_malformed_sample_is_a_clear_error(payload: bytes, expected: str) -> None:
    with pytest.raises(SampleError, match=expected) as err:
        parse_sample(payload)
    assert len(str(err.value)) <= 600


def test_times_in_ns_and_iso_are_the_same_instant() -> None:
    iso = parse_sample(b'{"device": "d", "tag": "t", "value": 1, "at": "2026-12-07T03:00:00.5+01:00"}')
    ns = parse_sample(b'{"device": "d", "tag": "t", "value": 1, "at": 1796608800500000000}')
    assert iso.at_ns() == ns.at_ns() == 1_796_608_800_500_000_000


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=5),
    max_leaves=20,
)
NEAR_VALID = st.dictionaries(
    st.sampled_from([*ReferenceCommand.model_fields, "extra"]),
    JSON | st.sampled_from(["br1", "ph", 7.2, "2026-12-07T03:00:00Z", "2026-13-40T99:00Z"]),
    max_size=9,
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.binary(max_size=300)
    | JSON.map(lambda v: json.dumps(v).encode())
    | NEAR_VALID.map(lambda v: json.dumps(v).encode())
)
def test_the_parser_takes_any_payload_without_a_traceback(payload: bytes) -> None:
    """Whatever a LIMS publishes parses or is a SampleError: never another exception."""
    try:
        sample = parse_sample(payload)
    except SampleError as exc:
        assert str(exc)
    else:
        assert sample.at_ns() >= 0 and sample.value == sample.value


# --------------------------------------------------------------------------- the agent


def sample_args(c: str, at_ns: int, value: float, *extra: str) -> tuple[str, ...]:
    return ("sample", "add", "-c", c, "--device", "br1", "--tag", "ph", "--value", repr(value), "--at",
            str(at_ns), *extra)  # fmt: skip


async def test_a_drifting_probe_is_caught_and_every_refusal_is_audited(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_setup(tmp_path)
    c = str(cfg)
    start = now_ns() - 8 * H * S
    blocks, truth = drifting_run(start)
    late, early = start + 6 * H * S, start + H // 2 * S
    async with running(cfg) as agent:
        assert await cli(capsys, "batch", "start", "-c", c, "--device", "br1", "--batch", "LOT-16", *WHO)
        agent._submit(blocks, ())
        assert await agent.buffer.flush(within_s=10)

        # six hours in, the probe reads 0.125 pH above the truth: beyond the limit
        code, out, err = await cli(capsys, *sample_args(c, late, truth[late], "--sample-id", "LIMS-1", *WHO))
        assert (
            (code, err) == (0, "") and out.startswith("alarm: ph offline") and "BEYOND the limit ±0.1" in out
        )
        # half an hour in, the drift is 0.01 pH: within it
        code, out, _ = await cli(capsys, *sample_args(c, early, truth[early], *WHO))
        assert code == 0 and out.startswith("info: ph") and "within the limit" in out
        # no reading near the time: said, not compared with another time's reading
        code, out, _ = await cli(capsys, *sample_args(c, start - H * S, 7.2, "--unit", "pH", *WHO))
        assert code == 0 and out.startswith("warning:") and "not compared" in out

        refusals = [
            (sample_args(c, late, 7.2, "--reason", "no actor"), "missing_actor"),
            (sample_args(c, late, 7.2, "--actor", "qc:lee"), "missing_reason"),
            (
                (
                    "sample",
                    "add",
                    "-c",
                    c,
                    "--device",
                    "br1",
                    "--tag",
                    "glucose",
                    "--value",
                    "5",
                    "--at",
                    str(late),
                    *WHO,
                ),
                "unknown_tag",
            ),
            (
                (
                    "sample",
                    "add",
                    "-c",
                    c,
                    "--device",
                    "br9",
                    "--tag",
                    "ph",
                    "--value",
                    "7",
                    "--at",
                    str(late),
                    *WHO,
                ),
                "unknown_device",
            ),
            (sample_args(c, late, 7.2, "--unit", "mV", *WHO), "unit_mismatch"),
            (sample_args(c, now_ns() + H * S, 7.2, *WHO), "future"),
            (
                (
                    "sample",
                    "add",
                    "-c",
                    c,
                    "--device",
                    "br1",
                    "--tag",
                    "ph",
                    "--value",
                    "7",
                    "--at",
                    "2026-12-07 03:00",
                    *WHO,
                ),
                "malformed",
            ),
        ]
        for args, refusal in refusals:
            code, out, err = await cli(capsys, *args)
            assert (code, out) == (2, "") and f"refused ({refusal})" in err, (refusal, err)

        # the same token as batch commands: none, or a wrong one, is a 401 that enters nothing
        token = (tmp_path / TOKEN_FILE).read_text().strip()
        url = f"http://127.0.0.1:{agent.status_server.port}/api/reference"
        body = json.dumps(
            {"device": "br1", "tag": "ph", "value": 7.0, "at": late, "actor": "x", "reason": "y"}
        )
        for sent in (None, "0" * 64):
            status, answer = await asyncio.to_thread(http, url, sent, body.encode())
            assert status == 401 and token.encode() not in answer
        assert (await agent.status())["reference_samples"] == {"entered": 3, "refused": 7, "alarms": 1}

    events = [e for e in events_in(tmp_path / "buffer.db") if e["kind"] == "reference_sample"]
    assert [e["severity"] for e in events] == ["alarm", "info", "warning"]
    drift = events[0]["data"]
    assert drift["tag"] == "ph" and drift["offline"] == truth[late] and drift["limit"] == 0.1
    assert drift["within"] is False and drift["difference"] == pytest.approx(drift["online"] - truth[late])
    assert drift["difference"] > 0.1 and drift["online_ts"] == late and drift["sample_ts"] == late
    assert drift["sample_id"] == "LIMS-1" and drift["actor"] == "qc:lee" and drift["source"] == "cli"
    assert events[0]["batch"] == "LOT-16#1"  # the device held the batch when it was entered
    assert events[1]["data"]["within"] is True and abs(events[1]["data"]["difference"]) < 0.05
    assert events[2]["data"]["online"] is None and events[2]["data"]["within"] is None

    trail = audits(tmp_path / "buffer.db")
    entered = [(a["action"], a.get("refusal")) for a in trail if a["action"].startswith("reference")]
    assert entered == [("reference_sample", None)] * 3 + [
        ("reference_sample_refused", r) for _, r in refusals
    ]
    first = next(a for a in trail if a["action"] == "reference_sample")
    assert first["actor"] == "qc:lee" and first["reason"] == "daily pH check" and first["device"] == "br1"
    assert first["target"] == "br1/ph" and first["new"]["sample_id"] == "LIMS-1" and first["within"] is False
    no_actor = next(a for a in trail if a.get("refusal") == "missing_actor")
    assert no_actor["actor"].startswith("agent:") and no_actor["requested_by"] is None

    # the batch report lists the samples of the batch (JSON, the same content as the HTML and PDF)
    code, out, _ = await cli(capsys, "report", "batch", "LOT-16", "-c", c, "--format", "json")
    assert code == 0
    listed = json.loads(out)["reference_samples"]
    assert listed["recorded"] is True and [s["within"] for s in listed["samples"]] == [None, True, False]
    assert listed["samples"][2]["sample_id"] == "LIMS-1" and listed["samples"][2]["severity"] == "alarm"


async def test_a_lims_enters_samples_over_mqtt_and_what_it_sends_wrong_is_refused_and_audited(
    tmp_path: Path, mosquitto: Mosquitto, collector: Collector
) -> None:
    cfg = write_setup(tmp_path, broker=mosquitto.port, batch="reference: {mqtt_commands: true}\n")
    start = now_ns() - 2 * H * S
    blocks, truth = drifting_run(start, seconds=600)
    at = start + 600 * S
    topic = "cleanroom/agent/reference/gw"
    lims = {"actor": "lims:labware", "reason": "in-process control", "sample_id": "S-9"}
    async with running(cfg) as agent:
        assert any("reference.mqtt_commands" in w for w in (await agent.status())["security"]["warnings"])
        agent._submit(blocks, ())
        assert await agent.buffer.flush(within_s=10)
        await until(lambda: agent.forwarder is not None and agent.forwarder.stats()["connected"])
        good = {"device": "br1", "tag": "ph", "value": truth[at], "at": at, **lims}
        for _ in range(50):  # until the agent's subscription reached the broker
            collector.client.publish(topic, json.dumps(good), qos=1)
            try:
                await until(lambda: agent.reference.counts["entered"] > 0, within_s=0.5)
                break
            except AssertionError:
                continue
        for payload in (b"{not json", json.dumps({**good, "actor": ""}).encode()):
            collector.client.publish(topic, payload, qos=1)
        await until(lambda: agent.reference.counts["refused"] >= 2)
        await until(
            lambda: any(
                e.get("kind") == "reference_sample"
                for m in collector.json("/br1/events")
                for e in m.get("events", [])
            )
        )
    events = [e for e in events_in(tmp_path / "buffer.db") if e["kind"] == "reference_sample"]
    assert events and all(e["data"]["source"] == "mqtt" and e["data"]["sample_id"] == "S-9" for e in events)
    assert events[0]["severity"] == "info" and events[0]["data"]["within"] is True
    refused = [a for a in audits(tmp_path / "buffer.db") if a["action"] == "reference_sample_refused"]
    assert [(a["refusal"], a["source"]) for a in refused] == [
        ("malformed", "mqtt"),
        ("missing_actor", "mqtt"),
    ]
    assert len(refused[0]["sha256"]) == 64


def test_samples_are_not_subscribed_unless_configured(tmp_path: Path) -> None:
    from agent.app.config import load_config
    from agent.app.runtime import Agent
    from cleanroom_common.net import free_port

    agent = Agent(load_config(write_setup(tmp_path, broker=free_port())))
    assert agent.forwarder is not None and agent.forwarder._commands == []
    assert agent.loaded.config.reference.mqtt_commands is False


def test_samples_over_mqtt_need_a_broker(tmp_path: Path) -> None:
    from agent.app.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=r"reference\.mqtt_commands: reference samples come over MQTT"):
        load_config(write_setup(tmp_path, batch="reference: {mqtt_commands: true}\n"))
