"""Issue 15, profile versioning: a profile records the device it was written for (``device:``), and
the agent compares it with what the device reports on every connect.

The firmware range parser is tolerant of what devices report (never raises, unparseable is
*unknown*) and strict about what a profile writes (a bad range is a configuration error on its
line). A mismatch is one ``profile_mismatch`` event per change, committed through the buffer, and a
warning in ``status``; acquisition goes on. The end-to-end cases run the real agent against the
OPC UA bioreactor simulator, whose BuildInfo and Identification nodes report firmware 2.4.1.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.app.compat import WARNING_PREFIX, ProfileWatch
from agent.app.config import ConfigError, load_config
from agent.app.runtime import Agent
from agent.core.compat import DeviceCompat, Outcome, Version, parse_range, parse_version
from agent.core.driver import ConnectionBase, DeviceContext, DeviceIdentity, ProfileBase
from agent.core.records import Severity
from cleanroom_common.net import free_port
from simulators.servers.opcua import FIRMWARE, MANUFACTURER, MODEL_NAME, serve_bioreactor_opcua
from tests.support import until
from tests.test_app import events_in

PROFILES = Path(__file__).resolve().parent.parent / "deploy" / "profiles"

# --------------------------------------------------------------------------- versions and ranges


@pytest.mark.parametrize(
    ("text", "numbers", "suffix"),
    [
        ("2.4.1", (2, 4, 1), ""),
        ("V2.04", (2, 4), ""),
        ("112", (112,), ""),
        ("2.4.1 (build 2041)", (2, 4, 1), "(build 2041)"),
        ("FW 3.1-RC2", (3, 1), "rc2"),
        ("1.2.", (1, 2), ""),
    ],
)
def test_a_firmware_string_is_its_first_dotted_numbers_and_a_suffix(
    text: str, numbers: tuple[int, ...], suffix: str
) -> None:
    assert parse_version(text) == Version(numbers, suffix)


@pytest.mark.parametrize("text", ["", "unknown", "v.x", "1" * 19])
def test_a_firmware_string_without_a_version_is_none(text: str) -> None:
    assert parse_version(text) is None


@pytest.mark.parametrize(
    ("spec", "admitted", "refused"),
    [
        (">=2.1,<3", ["2.1", "2.1.0", "2.4.1", "2.99"], ["2.0.9", "3", "3.0.0", "10.0"]),
        ("==2.4.*", ["2.4", "2.4.0", "2.4.17", "2.4.1-rc1"], ["2.5", "2.40", "2"]),
        ("!=2.4.*", ["2.5", "3.0"], ["2.4.3"]),
        ("2.4", ["2.4", "2.4.0", "2.4.0-beta"], ["2.4.1", "2.41"]),
        ("==2.4.1-rc1", ["2.4.1-RC1", "2.4.1 rc1"], ["2.4.1", "2.4.1-rc2"]),
        ("!=2.4.1", ["2.4.2"], ["2.4.1", "2.4.1.0"]),
        (">2, <=2.5", ["2.0.1", "2.5", "2.5.0"], ["2", "2.5.1"]),
        (">=100,<200", ["112", "199"], ["99", "200"]),
    ],
)
def test_ranges_admit_and_refuse(spec: str, admitted: list[str], refused: list[str]) -> None:
    r = parse_range(spec)
    for text in admitted:
        version = parse_version(text)
        assert version is not None and r.admits(version), (spec, text)
    for text in refused:
        version = parse_version(text)
        assert version is not None and not r.admits(version), (spec, text)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("", "empty firmware range"),
        (">=2,,<3", "empty comparison"),
        (">=two", "not a comparison with a version"),
        ("=>2", "not a comparison with a version"),
        (">=2.*", "wildcard (.*) goes only with == or !="),
        ("==2.*-rc", "nothing may follow the wildcard"),
        (">=2.1-rc1", "can only be matched exactly"),
        ("==" + "9" * 19, "more than 18 digits"),
        ("2.4.x", "a dot must be followed by a number"),
    ],
)
def test_a_bad_range_says_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_range(spec)


@given(st.text(max_size=80))
def test_parsing_what_a_device_reports_never_raises(text: str) -> None:
    version = parse_version(text)
    assert version is None or all(n >= 0 for n in version.numbers)


@given(st.text(alphabet="0123456789.,*<>=! -rcbuild", max_size=30))
def test_parsing_a_range_raises_only_value_errors(text: str) -> None:
    with contextlib.suppress(ValueError):
        parse_range(text)


versions = st.lists(st.integers(0, 999), min_size=1, max_size=4).map(lambda ns: ".".join(map(str, ns)))


@given(versions, versions)
def test_every_version_is_below_equal_to_or_above_a_bound(device: str, bound: str) -> None:
    v = parse_version(device)
    assert v is not None
    below, equal, above = (parse_range(f"{op}{bound}").admits(v) for op in ("<", "==", ">"))
    assert below + equal + above == 1
    assert parse_range(f">={bound}").admits(v) == (equal or above)
    assert parse_range(f"<={bound}").admits(v) == (equal or below)
    assert parse_range(f"!={bound}").admits(v) != equal


identities = st.builds(
    DeviceIdentity,
    model=st.none() | st.text(max_size=40),
    vendor=st.none() | st.text(max_size=40),
    firmware=st.none() | st.text(max_size=40),
)


@given(identities)
def test_comparing_any_report_never_raises(identity: DeviceIdentity) -> None:
    compat = DeviceCompat(model=["CELL*", "X?"], vendor="Acme [AB]", firmware=[">=2,<3", "==4.1.*"])
    result = compat.check(identity)
    assert result.outcome in Outcome
    assert (result.outcome is Outcome.MATCH) == (result.detail == "")


# --------------------------------------------------------------------------- the device block


def test_models_match_as_globs_ignoring_case_and_spacing() -> None:
    compat = DeviceCompat(model=["CellCube 2*", "CC-10"], vendor="Acme*")
    ok = compat.check(DeviceIdentity(model="cellcube  2500", vendor="ACME Corp."))
    assert ok.outcome is Outcome.MATCH and ok.fields == {"model": Outcome.MATCH, "vendor": Outcome.MATCH}
    wrong = compat.check(DeviceIdentity(model="CellCube 100", vendor="Acme"))
    assert wrong.outcome is Outcome.MISMATCH
    assert wrong.detail == "model 'CellCube 100' is not 'CellCube 2*' or 'CC-10'"


def test_a_mismatch_outweighs_what_is_unknown() -> None:
    compat = DeviceCompat(model="M1", firmware=">=2")
    silent = compat.check(DeviceIdentity())
    assert silent.outcome is Outcome.UNKNOWN
    assert silent.detail == "the device reported no model; the device reported no firmware"
    garbled = compat.check(DeviceIdentity(model="M1", firmware="n/a"))
    assert garbled.outcome is Outcome.UNKNOWN and garbled.detail == "firmware 'n/a' holds no version number"
    both = compat.check(DeviceIdentity(model="M2", firmware="n/a"))
    assert both.outcome is Outcome.MISMATCH
    assert both.fields == {"model": Outcome.MISMATCH, "firmware": Outcome.UNKNOWN}


PROFILE_HEAD = "profile: thing\nprotocol: modbus\n"
PROFILE_TAIL = "tags:\n  - {name: a, table: holding, address: 40001, type: int16}\n"


@pytest.mark.parametrize(
    ("block", "line", "where", "message"),
    [
        ("device:\n  firmware: '>=2.1rc1'\n", 4, "device.firmware", "'>=2.1rc1': a suffix ('rc1') can only"),
        (
            "device:\n  firmware: ['>=2', '3..1']\n",
            4,
            "device.firmware",
            "entry 1: '3..1': a dot must be followed",
        ),
        ("device:\n  firmware: []\n", 4, "device.firmware", "name at least one range"),
        ("device:\n  model: ''\n", 4, "device.model", "name at least one non-empty pattern"),
        ("device: {}\n", 3, "device", "name at least one of model, vendor, firmware"),
        ("device:\n  modle: X\n", 4, "device.modle", "unknown key"),
    ],
)
def test_a_bad_device_block_is_a_config_error_on_its_line(
    tmp_path: Path, block: str, line: int, where: str, message: str
) -> None:
    problems = profile_problems(tmp_path, PROFILE_HEAD + block + PROFILE_TAIL)
    path = tmp_path / "profiles" / "thing.yaml"
    assert any(p.startswith(f"{path}:{line}: {where}: {message}") for p in problems), problems


def profile_problems(tmp: Path, profile: str) -> list[str]:
    """The configuration problems of an agent with one device of the profile ``thing`` (none: [])."""
    profiles = tmp / "profiles"
    profiles.mkdir()
    (profiles / "thing.yaml").write_text(profile)
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        "agent: {id: gw}\nprofiles_dirs: [profiles]\n"
        "devices:\n  - {id: d1, profile: thing, connection: {host: 127.0.0.1}}\n"
    )
    try:
        load_config(cfg)
    except ConfigError as exc:
        return [str(p) for p in exc.problems]
    return []


NEVER_COMPARED = (
    "never compared: a Modbus device reports its {0} only through a tag; name that tag in identity.{0}"
)


@pytest.mark.parametrize(
    ("identity", "device", "unread"),
    [
        ("", "device:\n  model: 'PC-*'\n", {4: "model"}),
        (
            "identity: {serial: a}\n",
            "device:\n  vendor: Acme\n  model: 'PC-*'\n  firmware: '>=2'\n",
            {5: "vendor", 6: "model", 7: "firmware"},
        ),
        ("identity:\n  model: a\n", "device: {model: 'PC-*', firmware: '>=2'}\n", {5: "firmware"}),
    ],
)
def test_a_modbus_device_block_naming_what_no_identity_tag_reads_is_an_error_on_its_line(
    tmp_path: Path, identity: str, device: str, unread: dict[int, str]
) -> None:
    """A Modbus device says who it is only through identity tags: a field no tag reads would
    never be compared, and nothing would say so."""
    problems = profile_problems(tmp_path, PROFILE_HEAD + identity + device + PROFILE_TAIL)
    path = tmp_path / "profiles" / "thing.yaml"
    for line, field in unread.items():
        said = f"{path}:{line}: device.{field}: {NEVER_COMPARED.format(field)} (or leave device.{field} out)"
        assert said in problems, problems
    assert len(problems) == len(unread) + 1, problems  # and the device names the invalid profile


def test_a_modbus_device_block_whose_fields_identity_tags_read_is_valid(tmp_path: Path) -> None:
    identity = "identity: {model: a, firmware: a, vendor: a}\n"
    device = "device: {model: 'PC-*', firmware: '>=2', vendor: Acme}\n"
    assert profile_problems(tmp_path, PROFILE_HEAD + identity + device + PROFILE_TAIL) == []


def test_every_bundled_device_block_fits_the_simulator_behind_it() -> None:
    from agent.core.driver import driver_for
    from cleanroom_common.profilefiles import load_profile
    from simulators.servers.counter import FIRMWARE as COUNTER_FIRMWARE
    from simulators.servers.counter import MODEL_NAME as COUNTER_MODEL

    def block(name: str) -> DeviceCompat:
        data = load_profile(name)
        driver = driver_for(data["protocol"])
        assert driver is not None
        device = driver.profile_model().model_validate(data).device
        assert device is not None
        return device

    reported = {
        "bioreactor-sim-opcua": DeviceIdentity(firmware=FIRMWARE, model=MODEL_NAME, vendor=MANUFACTURER),
        "particle-counter-sim-modbus": DeviceIdentity(firmware=str(COUNTER_FIRMWARE), model=COUNTER_MODEL),
    }
    for name, identity in reported.items():
        assert block(name).check(identity).outcome is Outcome.MATCH, name


# --------------------------------------------------------------------------- once per change


def watched(**device: Any) -> ProfileWatch:
    profile = ProfileBase.model_validate(
        {"profile": "p1", "protocol": "modbus", "tags": [{"name": "a"}], "device": device}
    )
    return ProfileWatch(DeviceContext(id="d1", profile=profile, connection=ConnectionBase(), groups={}))


def test_each_change_is_said_once_and_shown_in_the_device_warnings() -> None:
    watch = watched(model="M1", firmware=">=2,<3")
    good, old, older = (DeviceIdentity(model="M1", firmware=f) for f in ("2.4", "1.9", "1.8"))
    said = [
        watch.report(i) for i in (good, good, old, old, older, DeviceIdentity(), DeviceIdentity(), good, good)
    ]
    events = [e for e in said if e is not None]
    assert [(e.data["outcome"], e.severity) for e in events] == [
        ("mismatch", Severity.WARNING),
        ("mismatch", Severity.WARNING),  # another firmware, still outside: a new statement
        ("unknown", Severity.INFO),
        ("match", Severity.INFO),
    ]
    first = events[0]
    assert first.device == "d1" and first.kind == "profile_mismatch"
    assert first.data == {
        "outcome": "mismatch",
        "profile": "p1",
        "fields": {"model": "match", "firmware": "mismatch"},
        "expected": {"model": ["M1"], "vendor": None, "firmware": [">=2,<3"]},
        "reported": {"model": "M1", "vendor": None, "firmware": "1.9"},
        "detail": "firmware '1.9' is outside '>=2,<3'",
    }
    assert watch.ctx.stats.warnings == []  # matches again: the warning is gone
    watch.ctx.stats.warnings.append("security_policy None: unrelated")
    watch.report(old)
    assert watch.ctx.stats.warnings == [
        "security_policy None: unrelated",
        f"{WARNING_PREFIX}p1 was not written for this device "
        "(firmware '1.9' is outside '>=2,<3'): readings go on",
    ]


def test_a_profile_without_a_device_block_says_nothing() -> None:
    profile = ProfileBase.model_validate({"profile": "p1", "protocol": "modbus", "tags": [{"name": "a"}]})
    watch = ProfileWatch(DeviceContext(id="d1", profile=profile, connection=ConnectionBase(), groups={}))
    assert watch.report(DeviceIdentity(model="anything")) is None and watch.ctx.stats.warnings == []


# --------------------------------------------------------------------------- the real agent


def write_agent(tmp: Path, url: str, profile: str) -> Path:
    cfg = tmp / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}', shutdown_grace: 0.1}}\n"
        "buffer: {path: buffer.db, commit_interval: 50ms}\n"
        "profiles_dirs: [profiles]\n"
        "devices:\n"
        f"  - id: br1\n    profile: {profile}\n"
        f"    connection: {{url: '{url}', timeout: 1s, security_policy: None,\n"
        "                  backoff_min: 100ms, backoff_max: 200ms}\n"
        "    groups: {status: {interval: 200ms}}\n"
    )
    return cfg


def mismatched_profile(folder: Path) -> None:
    """The bundled simulator profile, written for a firmware the simulator does not run."""
    text = (PROFILES / "bioreactor-sim-opcua.yaml").read_text()
    assert text.count('firmware: ">=2.4,<3"') == 1 and text.count("profile: bioreactor-sim-opcua\n") == 1
    text = text.replace('firmware: ">=2.4,<3"', 'firmware: ">=3.0"')
    text = text.replace("profile: bioreactor-sim-opcua\n", "profile: bioreactor-fw3\n")
    folder.mkdir()
    (folder / "bioreactor-fw3.yaml").write_text(text)


async def run_agent(cfg: Path, *, reconnect: bool) -> dict[str, Any]:
    """Run until the device is connected (and, with ``reconnect``, connected again after its link
    was lost: a second identity report); the status of that moment."""
    agent = Agent(load_config(cfg))
    await agent.start()
    try:
        assert agent.scheduler is not None
        runner = agent.scheduler.runners[0]
        await until(lambda: runner.connected, within_s=20, what="device connected")
        if reconnect:
            driver = runner.driver
            assert hasattr(driver, "link_lost")
            driver.link_lost("comm_error", "the test cut the link")
            await until(
                lambda: runner.ctx.stats.reconnects >= 1 and runner.connected, within_s=20, what="reconnected"
            )
        return await agent.status()
    finally:
        await agent.stop()


async def test_a_firmware_outside_the_range_is_one_event_and_a_status_warning_matching_is_none(
    tmp_path: Path,
) -> None:
    async with serve_bioreactor_opcua(speed=60) as sim:
        wrong, right = tmp_path / "wrong", tmp_path / "right"
        wrong.mkdir()
        right.mkdir()
        mismatched_profile(wrong / "profiles")
        (right / "profiles").mkdir()
        status = await run_agent(write_agent(wrong, sim.url, "bioreactor-fw3"), reconnect=True)
        fine = await run_agent(write_agent(right, sim.url, "bioreactor-sim-opcua"), reconnect=False)

    found = [e for e in events_in(wrong / "buffer.db") if e["kind"] == "profile_mismatch"]
    assert len(found) == 1, found  # connected twice with the same firmware: said once
    event = found[0]
    assert event["severity"] == "warning"
    assert event["data"]["outcome"] == "mismatch"
    assert event["data"]["fields"] == {"model": "match", "vendor": "match", "firmware": "mismatch"}
    assert event["data"]["reported"] == {"model": MODEL_NAME, "vendor": MANUFACTURER, "firmware": FIRMWARE}
    line = f"device br1: {WARNING_PREFIX}bioreactor-fw3 was not written for this device"
    assert any(w.startswith(line) for w in status["security"]["warnings"]), status["security"]
    assert status["devices"]["br1"]["state"] == "connected"  # acquisition goes on

    assert [e for e in events_in(right / "buffer.db") if e["kind"] == "profile_mismatch"] == []
    assert not any(w.startswith(WARNING_PREFIX) for w in fine["devices"]["br1"]["driver"]["warnings"])


def test_a_serial_counter_profile_has_no_device_block(tmp_path: Path) -> None:
    """The counter reports only its serial number: a model, vendor or firmware is never compared."""
    profile = (
        "profile: thing\nprotocol: serial_counter\ngroups: {records: {}}\ndevice:\n  model: 'L2*'\n"
        "tags:\n  - {name: c, group: records, field: count, size_um: 0.5}\n"
    )
    problems = profile_problems(tmp_path, profile)
    path = tmp_path / "profiles" / "thing.yaml"
    said = f"{path}:4: device: never compared: a serial counter reports only its serial number (CSN)"
    assert any(p.startswith(said) for p in problems), problems
