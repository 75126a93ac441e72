"""A plant in one process: every protocol served from one file, endpoints usable by a
client as written, scenario comm faults acted out, the CLI's plant and generate commands."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import serial
from pymodbus.client import AsyncModbusSerialClient, AsyncModbusTcpClient

from simulators.servers.plant import Plant

ROOT = Path(__file__).resolve().parents[1]

PLANT = """
speed: 600
seed: 3
devices:
  - {id: br-a, kind: bioreactor, protocol: modbus-tcp, endpoint: gw, unit_id: 1}
  - {id: br-b, kind: bioreactor, protocol: modbus-tcp, endpoint: gw, unit_id: 2,
     faults: ["comm_exception=6@0s+1h"]}
  - {id: inc-a, kind: incubator, protocol: modbus-rtu, endpoint: bus, unit_id: 4, pty_link: LINK}
  - {id: pc-a, kind: particle_counter, protocol: serial, params: {grade: B}}
"""


async def test_relative_serve_paths_are_relative_to_the_plant_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "plant.yaml").write_text(PLANT.replace("LINK", "bus"))
    monkeypatch.chdir(tmp_path)  # anywhere but the plant file's folder
    async with Plant.from_file(site / "plant.yaml") as plant:
        eps = {e["device"]: e for e in plant.endpoints()}
        assert Path(eps["inc-a"]["connection"]["port"]) == site / "bus"
        assert (site / "bus").is_symlink() and not (tmp_path / "bus").exists()


async def test_plant_serves_each_device_where_its_endpoint_says(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(PLANT.replace("LINK", str(tmp_path / "bus")))
    async with Plant.from_file(path) as plant:
        eps = {e["device"]: e for e in plant.endpoints()}
        assert set(eps) == {"br-a", "br-b", "inc-a", "pc-a"}
        assert eps["br-a"]["connection"]["port"] == eps["br-b"]["connection"]["port"]  # one gateway
        assert eps["br-a"]["profile"] == "bioreactor-sim" and eps["inc-a"]["profile"] == "incubator-sim-rtu"
        assert eps["pc-a"]["profile"] == "particle-counter-sim-serial"
        json.dumps(eps)  # what --endpoints writes

        tcp = AsyncModbusTcpClient("127.0.0.1", port=eps["br-a"]["connection"]["port"], timeout=1, retries=0)
        await tcp.connect()
        ok = await tcp.read_input_registers(0, count=2, device_id=1)
        faulted = await tcp.read_input_registers(0, count=2, device_id=2)  # scenario comm fault
        tcp.close()
        assert not ok.isError() and 3500 < ok.registers[0] < 3900
        assert faulted.isError() and faulted.exception_code == 6  # the scenario's code

        rtu = AsyncModbusSerialClient(eps["inc-a"]["connection"]["port"], timeout=1, retries=0)
        await rtu.connect()
        rr = await rtu.read_holding_registers(0, count=2, device_id=4)
        rtu.close()
        temperature = rtu.convert_from_registers(rr.registers, rtu.DATATYPE.FLOAT32, word_order="little")
        assert temperature == pytest.approx(plant.devices["inc-a"].model.signals()["temperature_c"], rel=1e-6)

        def ask_serial() -> bytes:
            with serial.Serial(eps["pc-a"]["connection"]["port"], timeout=1) as port:
                port.write(b"CSN\r\n")
                return port.readline()

        assert (await asyncio.to_thread(ask_serial)).startswith(b"RSN LSR-SIM-")


def test_bad_plant_file_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text("devices:\n  - {id: x, kind: particle_counter, protocol: opcua}\n")
    out = subprocess.run(
        [sys.executable, "-m", "simulators.cli", "plant", "--config", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
        cwd=ROOT,
    )
    assert out.returncode == 2 and "OPC UA front end serves bioreactors and incubators only" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_plant_writes_endpoints_and_stops_on_sigint(tmp_path: Path) -> None:
    path = tmp_path / "plant.yaml"
    path.write_text(PLANT.replace("LINK", str(tmp_path / "bus")))
    endpoints = tmp_path / "endpoints.json"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "simulators.cli",
            "plant",
            "--config",
            str(path),
            "--endpoints",
            str(endpoints),
        ],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline() for _ in range(4)]
        assert [ln.split()[0] for ln in lines] == ["br-a", "br-b", "inc-a", "pc-a"]
        written = json.loads(endpoints.read_text())
        assert {e["device"] for e in written} == {"br-a", "br-b", "inc-a", "pc-a"}
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert not (tmp_path / "bus").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_cli_generate_writes_ground_truth(tmp_path: Path) -> None:
    scenario = tmp_path / "s.yaml"
    scenario.write_text(
        "devices:\n  - id: br-x\n    kind: bioreactor\n"
        "    faults: [{kind: ph_drift, start: 1h, duration: 2h}]\n"
    )
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "simulators.cli",
            "generate",
            "--scenario",
            str(scenario),
            "--hours",
            "4",
            "--seed",
            "2",
            "--out",
            str(tmp_path / "out"),
            "--period",
            "600",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader((tmp_path / "out" / "br-x.csv").open()))
    assert len(rows) >= 20 and "ph" in rows[0]
    labels = list(csv.DictReader((tmp_path / "out" / "labels.csv").open()))
    assert [(lab["kind"], lab["device"]) for lab in labels] == [("ph_drift", "br-x")]


def test_cli_device_from_a_scenario_on_a_serial_line(tmp_path: Path) -> None:
    link = tmp_path / "pc"
    scenario = ROOT / "simulators" / "scenarios" / "comm-faults.yaml"
    cmd = ["particle-counter", "--protocol", "serial", "--scenario", str(scenario), "--pty-link", str(link)]
    proc = subprocess.Popen(
        [sys.executable, "-m", "simulators.cli", *cmd], stdout=subprocess.PIPE, text=True, cwd=ROOT
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().split() == ["pc-comm", "particle_counter", "serial", str(link)]
        with serial.Serial(str(link), timeout=2) as port:
            port.write(b"CSN\r\n")
            assert port.readline().startswith(b"RSN LSR-SIM-")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
