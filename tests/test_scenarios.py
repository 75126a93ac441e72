"""Scenario and plant files: the shipped examples load, bad files fail with a message naming the key."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from simulators.process.scenario import Scenario, load_scenario, parse_time
from simulators.servers.plant import ServeSpec

SCENARIOS = Path(__file__).resolve().parent.parent / "simulators" / "scenarios"


@pytest.mark.parametrize("path", sorted(SCENARIOS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_scenario_loads_and_builds(path: Path) -> None:
    scn = load_scenario(path)
    models = scn.build(seed=1)
    assert set(models) == {d.id for d in scn.devices}
    labels = scn.labels()
    assert labels and all(lab.start >= scn.start and lab.end > lab.start for lab in labels)
    for d in scn.devices:  # every fault is attached to the model at its absolute time
        assert [(f.kind, f.start_s, f.end_s) for f in models[d.id].faults] == sorted(
            [(f.kind, *f.window(scn.start)) for f in d.faults], key=lambda x: x[1]
        )


def test_the_plant_file_merges_its_fault_scenario_and_keeps_serving_keys_aside() -> None:
    scn = load_scenario(SCENARIOS / "plant.yaml")
    kinds = [d.kind for d in scn.devices]
    assert (kinds.count("bioreactor"), kinds.count("incubator"), kinds.count("particle_counter")) == (4, 6, 8)
    br2 = scn.device("br-02")
    assert br2.serve == {"protocol": "opcua"} and br2.params == {"mu_max_per_h": 0.035}
    assert [f.kind for f in br2.faults] == ["ph_drift", "comm_timeout"]
    inc3 = scn.device("inc-03")  # comm fault written in the plant file itself
    assert inc3.serve == {"protocol": "modbus-rtu", "endpoint": "inc-bus", "unit_id": 3}
    assert [(f.kind, f.start, f.duration) for f in inc3.faults] == [("comm_garbled", 6 * 3600.0, 600.0)]
    inc5 = scn.device("inc-05")
    assert inc5.faults[1].kind == "comm_exception" and inc5.faults[1].params == {"code": 2}
    assert scn.start == parse_time("2026-01-05T00:00:00Z") and scn.speed == 60


def test_the_plant_file_serving_keys_are_valid_for_the_front_ends() -> None:
    """The file is shared with the protocol front ends; their serving model must accept every device."""
    scn = load_scenario(SCENARIOS / "plant.yaml")
    protocols = []
    for d in scn.devices:
        serve = ServeSpec.model_validate(d.serve)
        serve.check_kind(d.id, d.kind)
        protocols.append(serve.protocol)
    assert set(protocols) == {"modbus-tcp", "modbus-rtu", "opcua", "serial"}


def test_labels_are_absolute_sorted_and_clipped() -> None:
    scn = Scenario.model_validate(
        {
            "start": 1000,
            "devices": [
                {"id": "b", "kind": "incubator", "faults": ["comm_timeout@10m", "door_open@1m+30s"]},
                {
                    "id": "a",
                    "kind": "incubator",
                    "faults": [{"kind": "door_open", "start": "1m", "duration": 5}],
                },
            ],
        }
    )
    got = [(lab.kind, lab.device, lab.start, lab.end) for lab in scn.labels(end_s=2000)]
    assert got == [
        ("door_open", "a", 1060, 1065),
        ("door_open", "b", 1060, 1090),
        ("comm_timeout", "b", 1600, 2000),  # no duration: until the end of the run
    ]
    assert scn.labels()[-1].end == math.inf
    assert scn.labels(end_s=1060) == []


def test_seed_offset_gives_a_device_its_own_stream() -> None:
    scn = Scenario.model_validate(
        {"devices": [{"id": "x", "kind": "incubator"}, {"id": "y", "kind": "incubator", "seed_offset": 0}]}
    )
    a = scn.build(seed=3)["x"]
    b = Scenario.model_validate({"devices": [{"id": "x", "kind": "incubator", "seed_offset": 1}]}).build(
        seed=2
    )["x"]
    c = scn.build(seed=4)["x"]
    for m in (a, b, c):
        m.advance(m.start_time_s + 600)
    assert a.signals() == b.signals() != c.signals()


def test_start_times() -> None:
    assert parse_time("2026-01-05T00:00:00Z") == parse_time("2026-01-05T00:00:00") == 1767571200.0
    assert parse_time("2026-01-05T01:00:00+01:00") == 1767571200.0
    assert parse_time(5) == 5.0


BAD = {
    "unknown fault": ("devices: [{id: a, kind: incubator, faults: [door_slam@1h+1m]}]", "unknown fault kind"),
    "fault for another kind": (
        "devices: [{id: a, kind: incubator, faults: [{kind: contamination, start: 1h}]}]",
        "'contamination' does not apply to kind incubator",
    ),
    "fault param": (
        "devices: [{id: a, kind: bioreactor, faults: [{kind: ph_drift, start: 1h,"
        " params: {rate_ph_per_day: 2}}]}]",
        "rate_ph_per_day",
    ),
    "fault param typo": (
        "devices: [{id: a, kind: bioreactor, faults: [{kind: ph_drift, start: 1h, params: {rate: 0.1}}]}]",
        "rate",
    ),
    "duration": (
        "devices: [{id: a, kind: incubator, faults: [{kind: door_open, start: 2 hours}]}]",
        "duration",
    ),
    "shorthand": ("devices: [{id: a, kind: incubator, faults: ['door_open at 1h']}]", "kind[=code]@start"),
    "duplicate id": ("devices: [{id: a, kind: incubator}, {id: a, kind: bioreactor}]", "appears twice"),
    "key typo": ("devices: [{id: a, kind: incubator, fualts: []}]", "fualts"),
    "model param": ("devices: [{id: a, kind: bioreactor, params: {grade: A}}]", "bad params: grade"),
    "param range": (
        "devices: [{id: a, kind: incubator, params: {co2_setpoint_pct: 50}}]",
        "co2_setpoint_pct",
    ),
    "kind": ("devices: [{id: a, kind: centrifuge}]", "devices[0].kind"),
    "zero sample": ("devices: [{id: a, kind: particle_counter, params: {sample: 0s}}]", "at least 1 s"),
    "rocking range": (
        "devices: [{id: a, kind: bioreactor, params: {agitation_min_rpm: 30, agitation_max_rpm: 20}}]",
        "agitation_min_rpm must not exceed",
    ),
    "start": ("start: yesterday\ndevices: [{id: a, kind: incubator}]", "ISO-8601"),
    "no devices": ("name: x", "'devices:'"),
    "not yaml": ("devices: [", "YAML syntax"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scenarios_fail_with_a_message_naming_the_problem(case: str, tmp_path: Path) -> None:
    text, message = BAD[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=r"bad\.yaml") as info:
        load_scenario(path)
    assert message in str(info.value)


def test_unreadable_files_are_value_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot read"):
        load_scenario(tmp_path / "missing.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00devices")
    with pytest.raises(ValueError, match="UTF-8"):
        load_scenario(tmp_path / "bin.yaml")


def test_a_referenced_scenario_cannot_chain(tmp_path: Path) -> None:
    (tmp_path / "a.yaml").write_text("scenario: b.yaml\ndevices: []\n")
    (tmp_path / "b.yaml").write_text("scenario: a.yaml\ndevices: []\n")
    with pytest.raises(ValueError, match="cannot reference another"):
        load_scenario(tmp_path / "a.yaml")
