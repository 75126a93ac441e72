"""The simulator profiles are accepted by the agent's own drivers, fit the models they
are served from, and are all documented in docs/simulators.md."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from agent.core.driver import load_drivers
from cleanroom_common.bundled import profiles_dir
from cleanroom_common.profilefiles import load_profile
from simulators.process.base import Clock
from simulators.servers.device import SimulatedDevice
from simulators.servers.modbus import unit_for
from simulators.servers.registers import slots_of

SIM_PROFILES = sorted(p.stem for p in profiles_dir().glob("*-sim*.yaml"))
DOC = Path(__file__).resolve().parents[1] / "docs" / "simulators.md"


def test_every_simulator_profile_is_here() -> None:
    assert set(SIM_PROFILES) >= {
        "bioreactor-sim",
        "bioreactor-sim-opcua",
        "incubator-sim-modbus",
        "incubator-sim-rtu",
        "particle-counter-sim-modbus",
        "particle-counter-sim-serial",
    }


@pytest.mark.parametrize("name", SIM_PROFILES)
def test_profile_validates_with_its_driver(name: str) -> None:
    data = load_profile(name)
    driver = load_drivers()[data["protocol"]]
    profile = driver.profile_model().model_validate(data)
    assert profile.profile == name and profile.tags


@pytest.mark.parametrize("name", [n for n in SIM_PROFILES if load_profile(n)["protocol"] == "modbus"])
def test_modbus_profile_fits_its_model(name: str) -> None:
    data = load_profile(name)
    device = SimulatedDevice.create(data["device_kind"], "dev-1", clock=Clock(1.0), seed=0)
    unit = unit_for(device, data)  # raises when a tag names a value the device does not produce
    assert unit.read("holding" if "holding" in unit.image.spans else "input", 0, 1)


MODBUS_PROFILES = sorted(
    p.stem for p in profiles_dir().glob("*.yaml") if load_profile(p.stem)["protocol"] == "modbus"
)


@pytest.mark.parametrize("name", MODBUS_PROFILES)
def test_simulator_serves_each_tag_where_the_driver_reads_it(name: str) -> None:
    """One addressing rule for both sides, every notation the profiles use (the generic
    example has them all: vendor, six-digit, plain with a base, defaults)."""
    data = load_profile(name)
    profile: Any = load_drivers()["modbus"].profile_model().model_validate(data)
    driver_side = {t.name: t.locate() for t in profile.tags}
    assert {s.name: (s.table, s.start) for s in slots_of(data)} == driver_side


@pytest.mark.parametrize("name", SIM_PROFILES)
def test_every_tag_is_documented(name: str) -> None:
    text = DOC.read_text()
    assert f"`{name}`" in text or f"{name}.yaml" in text
    missing = [t["name"] for t in load_profile(name)["tags"] if f"`{t['name']}`" not in text]
    assert not missing, f"{name}: tags not in docs/simulators.md: {missing}"


def test_plant_serving_keys_are_documented() -> None:
    from simulators.servers.plant import ServeSpec

    text = DOC.read_text()
    for name, field in ServeSpec.model_fields.items():
        assert field.description, f"ServeSpec.{name} has no docstring"
        assert f"| `{name}` |" in text and field.description in text, name
