"""Ground-truth generation: byte-for-byte reproducible, labels that match what the data shows."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from simulators.process.generate import generate
from simulators.process.scenario import Scenario

START = 1_767_571_200.0  # 2026-01-05T00:00:00Z

SCENARIO = {
    "start": START,
    "devices": [
        {"id": "br-01", "kind": "bioreactor", "params": {"step_s": 5}, "faults": ["comm_timeout@20m+5m"]},
        {
            "id": "inc-01",
            "kind": "incubator",
            "faults": [{"kind": "door_open", "start": "30m", "duration": "1m"}],
        },
        {
            "id": "pc-01",
            "kind": "particle_counter",
            "params": {"grade": "C", "buffer_size": 50},
            "faults": [{"kind": "counter_flow_fault", "start": "1h", "duration": "30m"}],
        },
    ],
}


def read(path: Path) -> tuple[list[str], np.ndarray]:
    with path.open(newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], np.array(rows[1:], dtype=float)


def test_same_seed_same_bytes_other_seed_other_data(tmp_path: Path) -> None:
    scn = Scenario.model_validate(SCENARIO)
    a = generate(scn, 2, 7, tmp_path / "a", period_s=30)
    b = generate(scn, 2, 7, tmp_path / "b", period_s=30)
    c = generate(scn, 2, 8, tmp_path / "c", period_s=30)
    assert [p.name for p in a] == ["br-01.csv", "inc-01.csv", "pc-01.csv", "labels.csv"]
    for pa, pb, pc in zip(a, b, c, strict=True):
        assert pa.read_bytes() == pb.read_bytes()
        if pa.name != "labels.csv":
            assert pa.read_bytes() != pc.read_bytes()


def test_columns_rows_and_labels(tmp_path: Path) -> None:
    out = tmp_path / "out"
    generate(Scenario.model_validate(SCENARIO), 3, 1, out, period_s=10)

    with (out / "labels.csv").open(newline="") as fh:
        labels = list(csv.DictReader(fh))
    assert labels == [
        {"kind": "comm_timeout", "device": "br-01", "start": "1767572400", "end": "1767572700"},
        {"kind": "door_open", "device": "inc-01", "start": "1767573000", "end": "1767573060"},
        {"kind": "counter_flow_fault", "device": "pc-01", "start": "1767574800", "end": "1767576600"},
    ]

    head, br = read(out / "br-01.csv")
    assert head[:4] == ["timestamp", "temperature_c", "ph", "do_pct"] and "base_pump_on" in head
    assert len(br) == 3 * 360 + 1 and br[0, 0] == START and np.all(np.diff(br[:, 0]) == 10)

    head, inc = read(out / "inc-01.csv")
    t, door = inc[:, 0], inc[:, head.index("door_open")]
    assert set(t[door == 1]) == {START + 1800 + k for k in range(10, 61, 10)}  # state of the step ending at t
    temp = inc[:, head.index("temperature_c")]
    assert temp[(t > START + 1800) & (t < START + 1900)].min() < 36.0 < temp[t < START + 1800].min()

    head, pc = read(out / "pc-01.csv")
    assert head[:3] == ["timestamp", "device_timestamp", "index"] and head[-6:-2] == [
        "count_0_3um",
        "count_0_5um",
        "count_1_0um",
        "count_5_0um",
    ]
    # 180 one-minute samples although the counter only buffers 50: the generator drains it in time.
    assert list(pc[:, head.index("index")]) == list(range(180))
    ends, flow_ok = pc[:, 0], pc[:, head.index("flow_ok")]
    assert set(ends[flow_ok == 0]) == {START + 3600 + 60 * k for k in range(1, 31)}


def test_the_csv_is_what_a_served_model_shows_at_that_time(tmp_path: Path) -> None:
    """A front end advancing the same device at irregular request times sees the generated rows."""
    scn = Scenario.model_validate(SCENARIO)
    generate(scn, 1, 4, tmp_path, period_s=60)
    _, inc = read(tmp_path / "inc-01.csv")
    served = scn.build(seed=4)["inc-01"]
    for t in (7.5, 1234.0, 1805.2):
        served.advance(START + t)
    for k in (31, 45, 60):  # rows after the door opening at 30 min, and the last row
        served.advance(START + 60 * k)
        signals = list(served.signals().values())
        assert inc[k, 0] == START + 60 * k
        assert list(inc[k, 1 : 1 + len(signals)]) == pytest.approx(signals, rel=1e-9)


def test_bad_arguments_are_value_errors(tmp_path: Path) -> None:
    scn = Scenario.model_validate(SCENARIO)
    with pytest.raises(ValueError, match="hours"):
        generate(scn, 0, 1, tmp_path)
    with pytest.raises(ValueError, match="period"):
        generate(scn, 1, 1, tmp_path, period_s=0)
    bad = tmp_path / "bad.yaml"
    bad.write_text("devices: [{id: a, kind: incubator, faults: [{kind: contamination, start: 1h}]}]")
    with pytest.raises(ValueError, match="does not apply"):
        generate(bad, 1, 1, tmp_path / "o")


def test_the_cli_writes_the_same_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from simulators.cli import main

    scenario = Path(__file__).resolve().parent.parent / "simulators" / "scenarios" / "comm-faults.yaml"
    rc = main(
        ["generate", "--scenario", str(scenario), "--hours", "1", "--seed", "3", "--out", str(tmp_path)]
    )
    assert rc == 0
    printed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in printed) == [
        "br-comm.csv",
        "inc-comm.csv",
        "labels.csv",
        "pc-comm.csv",
    ]
    with (tmp_path / "labels.csv").open() as fh:
        assert sum(1 for _ in fh) == 1 + 6


def test_output_does_not_depend_on_the_interpreters_hash_seed(tmp_path: Path) -> None:
    """Seeding uses a stable digest of the device id, never ``hash()`` (salted per process)."""
    scenario = (
        Path(__file__).resolve().parent.parent / "simulators" / "scenarios" / "cleanroom-particles.yaml"
    )
    code = (
        "import sys; from simulators.process.generate import generate as g; g(sys.argv[1], 2, 5, sys.argv[2])"
    )
    root = Path(__file__).resolve().parent.parent
    for salt in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": salt, "PYTHONPATH": str(root)}
        subprocess.run(
            [sys.executable, "-c", code, str(scenario), str(tmp_path / salt)], env=env, check=True, timeout=60
        )
    for f in sorted((tmp_path / "1").iterdir()):
        assert f.read_bytes() == (tmp_path / "2" / f.name).read_bytes(), f.name
