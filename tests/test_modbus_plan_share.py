"""Devices of one profile share its read plans (drivers.modbus.plan.shared_plan): one plan per
profile and plan-affecting connection settings, never one that another profile or other settings
would read differently."""

from __future__ import annotations

import dataclasses
import gc
from pathlib import Path

import numpy as np
import pytest

from agent.app.config import LoadedConfig, load_config
from agent.core.device import ResolvedDevice
from agent.core.driver import DeviceContext
from drivers.modbus import plan as plan_module
from drivers.modbus.config import as_tag
from drivers.modbus.driver import ModbusDriver
from drivers.modbus.plan import Plan


def write_profile(folder: Path, registers: int, extra: str = "") -> None:
    tags = "\n".join(
        f"  - {{name: r{i}, table: holding, address: {i}, address_base: 0, vendor_notation: false, "
        f"type: int16, group: fast}}"
        for i in range(registers)
    )
    (folder / "load.yaml").write_text(
        "profile: load\nprotocol: modbus\n"
        "groups: {fast: {interval: 1s}, slow: {interval: 1h}}\n"
        "identity: {serial: serial}\n"
        f"tags:\n{tags}\n"
        "  - {name: serial, address: 40500, type: string, length: 8, group: slow}\n"
        "  - {name: flag, address: 17, group: fast}\n" + extra
    )


def write_config(tmp_path: Path, connections: list[str]) -> Path:
    (tmp_path / "profiles").mkdir(exist_ok=True)
    devices = "\n".join(
        f"  - {{id: dev{i}, profile: load, connection: {{host: 127.0.0.1, port: 502{conn}}}}}"
        for i, conn in enumerate(connections)
    )
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: share}}\nbuffer: {{path: buffer.db}}\nprofiles_dirs: [profiles]\ndevices:\n{devices}\n"
    )
    return cfg


def driver_of(device: ResolvedDevice) -> ModbusDriver:
    ctx = DeviceContext(
        id=device.id, profile=device.profile, connection=device.connection, groups=device.groups
    )
    return ModbusDriver(ctx)


def drivers_of(loaded: LoadedConfig) -> list[ModbusDriver]:
    return [driver_of(d) for d in loaded.devices]


def test_devices_of_one_profile_share_one_plan_per_group(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, ["", ", unit_id: 7", ", timeout: 5s, retries: 3"])
    write_profile(tmp_path / "profiles", 300)
    drivers = drivers_of(load_config(cfg))
    identity_plans = [d._identity[1] for d in drivers if d._identity is not None]
    assert len(identity_plans) == 3 and all(p is identity_plans[0] for p in identity_plans)
    assert all(d._plans["fast"] is drivers[0]._plans["fast"] for d in drivers)
    assert drivers[0]._plans["fast"] is not identity_plans[0]


@pytest.mark.parametrize(
    "setting",
    [
        "address_base: 0",
        "max_registers_per_request: 50",
        "max_bits_per_request: 8",
        "max_gap: 0",
        "one_request_per_tag: true",
    ],
)
def test_a_setting_that_changes_the_plan_gets_its_own(tmp_path: Path, setting: str) -> None:
    cfg = write_config(tmp_path, ["", f", {setting}", ""])
    write_profile(tmp_path / "profiles", 300)
    plain, odd, plain_again = drivers_of(load_config(cfg))
    assert plain_again._plans["fast"] is plain._plans["fast"]
    assert odd._plans["fast"] is not plain._plans["fast"]
    tags = [as_tag(t) for t in odd.ctx.groups["fast"].tag_specs]
    assert odd._plans["fast"].reads == plan_module.build_plan(tags, odd.conn).reads


def test_a_reload_that_changes_the_profile_builds_a_new_plan(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, ["", ""])
    write_profile(tmp_path / "profiles", 300)
    before = drivers_of(load_config(cfg))
    old = before[0]._plans["fast"]
    write_profile(tmp_path / "profiles", 400)
    after = drivers_of(load_config(cfg))
    new = after[0]._plans["fast"]
    assert new is not old and after[1]._plans["fast"] is new
    assert (old.n_tags, new.n_tags) == (301, 401)
    assert new.n_regs == 400 and old.n_regs == 300


def test_a_dropped_profile_takes_its_plans_along(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, [""])
    write_profile(tmp_path / "profiles", 10)
    held = len(plan_module._SHARED)
    drivers = drivers_of(load_config(cfg))
    assert len(plan_module._SHARED) == held + 1
    del drivers
    gc.collect()
    assert len(plan_module._SHARED) == held


def test_a_shared_plan_cannot_be_changed(tmp_path: Path) -> None:
    """What makes sharing safe: a poll (or a bug) cannot alter the plan another device reads by."""
    cfg = write_config(tmp_path, [""])
    write_profile(tmp_path / "profiles", 20)
    plan: Plan = drivers_of(load_config(cfg))[0]._plans["fast"]
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.n_regs = 0  # type: ignore[misc]
    idx, pos, _, _ = plan.numeric[0]
    for array in (idx, pos):
        with pytest.raises(ValueError, match="read-only"):
            array[0] = 5
    assert isinstance(plan.reads, tuple) and isinstance(plan.slots, tuple)
    assert np.array_equal(pos, np.arange(20))


def test_devices_of_one_profile_share_compiled_poll_groups(tmp_path: Path) -> None:
    """The compiled arrays of a group are shared between devices with the same spec and timeout;
    each device's group still names its own device, and another timeout compiles its own."""
    cfg = write_config(tmp_path, ["", ", unit_id: 7", ", timeout: 5s"])
    write_profile(tmp_path / "profiles", 50)
    a, b, c = load_config(cfg).devices
    assert a.groups["fast"] is not b.groups["fast"]
    assert (a.groups["fast"].device, b.groups["fast"].device) == ("dev0", "dev1")
    assert a.groups["fast"]._scale is b.groups["fast"]._scale
    assert a.groups["fast"].tags is b.groups["fast"].tags
    assert c.groups["fast"]._scale is not a.groups["fast"]._scale
    assert b.groups["fast"].bad("timeout").device == "dev1"
