"""Configuration mistakes get a clear message naming the YAML path and line, exit 2,
and every mistake of a file is reported in one run."""

from __future__ import annotations

import ssl
import subprocess
import sys
from pathlib import Path

import pytest

from agent.app.config import ConfigError, load_config
from agent.cli import main
from agent.core.certs import create_certificate
from agent.core.problems import Problem

VALID = """\
agent:
  id: gw-01
buffer:
  path: buffer.db
  max_bytes: 1GiB
  retention: 7d
mqtt:
  host: 127.0.0.1
  port: 1883
  password: s3cret-value
devices:
  - id: br1
    profile: bioreactor-sim
    connection: {host: 127.0.0.1, port: 5020, unit_id: 1, timeout: 500ms}
    groups:
      process: {interval: 2s}
  - id: br2
    profile: bioreactor-sim
    connection: {host: 127.0.0.1, port: 5021}
"""


def line_of(text: str, needle: str) -> int:
    for n, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return n
    raise AssertionError(f"{needle!r} not in config")


# (name, (old, new) edit of VALID, line marker in the edited text, expected path, expected words)
CASES = [
    ("unknown top-level key", ("devices:", "devics:"), "devics:", "devics", "unknown key"),
    (
        "unknown nested key",
        ("  max_bytes: 1GiB", "  max_byte: 1GiB"),
        "max_byte",
        "buffer.max_byte",
        "unknown key",
    ),
    (
        "bad duration",
        ("retention: 7d", "retention: 7 days"),
        "retention",
        "buffer.retention",
        "not a duration",
    ),
    ("bad size", ("max_bytes: 1GiB", "max_bytes: lots"), "max_bytes", "buffer.max_bytes", "not a size"),
    (
        "negative commit pause",
        ("retention: 7d", "retention: 7d\n  commit_pause: -5ms"),
        "commit_pause",
        "buffer.commit_pause",
        "not a duration",
    ),
    (
        "zero mark interval",
        ("retention: 7d", "retention: 7d\n  mark_interval: 0s"),
        "mark_interval",
        "buffer.mark_interval",
        "greater than 0",
    ),
    ("missing required", ("  id: gw-01\n", "  site: x\n"), "agent:", "agent.id", "required key is missing"),
    ("bad agent id", ("id: gw-01", "id: gw 01"), "gw 01", "agent.id", "pattern"),
    (
        "unknown profile",
        (
            "profile: bioreactor-sim\n    connection: {host: 127.0.0.1, port: 5021}",
            "profile: bioreactr\n    connection: {host: 127.0.0.1, port: 5021}",
        ),
        "bioreactr",
        "devices[1].profile",
        "no profile 'bioreactr'",
    ),
    (
        "duplicate device id",
        ("  - id: br2", "  - id: br1  # dup"),
        "dup",
        "devices[1].id",
        "already used",
    ),
    (
        "connection value out of range",
        ("unit_id: 1,", "unit_id: 300,"),
        "unit_id: 300",
        "devices[0].connection.unit_id",
        "less than or equal to 255",
    ),
    (
        "connection unknown key",
        ("port: 5021}", "port: 5021, hots: x}"),
        "hots",
        "devices[1].connection.hots",
        "unknown key",
    ),
    (
        "override of a group the profile lacks",
        ("process: {interval: 2s}", "fast: {interval: 2s}"),
        "fast:",
        "devices[0].groups.fast",
        "has no group 'fast'",
    ),
    (
        "bad group interval",
        ("interval: 2s", "interval: often"),
        "often",
        "devices[0].groups.process.interval",
        "not a duration",
    ),
    (
        "missing environment variable",
        ("password: s3cret-value", "password: ${CLEANROOM_NOPE_PASSWORD}"),
        "CLEANROOM_NOPE",
        "mqtt.password",
        "CLEANROOM_NOPE_PASSWORD is not set",
    ),
    (
        "bad mqtt protocol",
        ("port: 1883", "port: 1883\n  protocol: '4'"),
        "protocol",
        "mqtt.protocol",
        "3.1.1",
    ),
    ("reserved device id", ("  - id: br2", "  - id: agent"), "id: agent", "devices[1].id", "reserved"),
    (
        "model for a kind not configured",
        (
            "devices:",
            "models:\n  - {manifest: models/incubator-pca.model.yaml, device_kind: incubator}\ndevices:",
        ),
        "incubator-pca",
        "models[0]",
        "no device of kind 'incubator'",
    ),
    (
        "limit on a tag the device lacks",
        ("devices:", "limits:\n  tags:\n    - {tag: phh, devices: [br1], action_high: 7.5}\ndevices:"),
        "phh",
        "limits.tags[0]",
        "has no tag 'phh'",
    ),
    (
        "a named file is missing",
        ("password: s3cret-value", "password_file: /nonexistent/mqtt.pw"),
        "password_file",
        "mqtt.password_file",
        "/nonexistent/mqtt.pw does not exist",
    ),
    ("duplicate YAML key", ("  port: 1883", "  port: 1883\n  port: 1884"), "port: 1884", "", "duplicate key"),
    ("YAML syntax", ("  retention: 7d", "  retention: [7d"), "retention", "", "YAML syntax"),
]


@pytest.mark.parametrize(("name", "edit", "marker", "path", "words"), CASES, ids=[c[0] for c in CASES])
def test_bad_config_names_path_and_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    name: str,
    edit: tuple[str, str],
    marker: str,
    path: str,
    words: str,
) -> None:
    assert edit[0] in VALID, name
    text = VALID.replace(edit[0], edit[1], 1)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    line = line_of(text, marker)
    expected = f"{cfg}:{line}: {path}" if path else f"{cfg}:"
    matching = [ln for ln in err.splitlines() if expected in ln and words in ln]
    assert matching, f"expected '{expected} … {words}' in:\n{err}"
    assert "Traceback" not in err
    assert "s3cret-value" not in err, "secrets are never echoed"


def test_every_mistake_is_reported_in_one_run(tmp_path: Path) -> None:
    text = VALID.replace("retention: 7d", "retention: soon").replace("unit_id: 1,", "unit_id: -1,")
    text = text.replace(
        "profile: bioreactor-sim\n    connection: {host: 127.0.0.1, port: 5021}",
        "profile: nope\n    connection: {host: 127.0.0.1, port: 5021}",
    )
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    joined = str(exc.value)
    # pydantic stops at the first layer (the file's own schema); fix it and the next layer shows
    assert "buffer.retention" in joined
    cfg.write_text(text.replace("retention: soon", "retention: 7d"))
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    problems = [str(p) for p in exc.value.problems]
    assert any("devices[0].connection.unit_id" in p for p in problems)
    assert any("devices[1].profile" in p for p in problems)


def test_bad_profile_file_names_its_own_path_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "thing.yaml").write_text(
        "profile: thing\nprotocol: modbus\ntags:\n"
        "  - {name: a, table: holding, address: 40001, type: int16}\n"
        "  - {name: b, table: holding, address: 40002, type: int17}\n"
    )
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        "agent: {id: gw}\nprofiles_dirs: [profiles]\ndevices:\n  - {id: d1, profile: thing, "
        "connection: {host: 127.0.0.1}}\n"
    )
    assert main(["validate", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert f"{profiles / 'thing.yaml'}:5: tags[1].type" in err, err
    assert f"{cfg}:4: devices[0].profile" in err, err


def test_valid_config_prints_summary_and_hash(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(VALID)
    assert main(["validate", str(cfg)]) == 0
    out = capsys.readouterr().out
    loaded = load_config(cfg)
    assert loaded.sha256 in out
    assert "br1" in out and "br2" in out and "bioreactor-sim" in out
    assert "s3cret-value" not in out
    assert loaded.devices[0].groups["process"].interval_s == 2.0
    assert loaded.devices[1].groups["process"].interval_s == 1.0
    assert loaded.config.buffer.path == tmp_path / "buffer.db"  # relative to the file
    # the hash covers the config: any change changes it
    cfg.write_text(VALID.replace("port: 5021", "port: 5022"))
    assert load_config(cfg).sha256 != loaded.sha256


def test_cli_exit_code_two_from_the_real_binary(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("agent: {id: gw}\nbuffer: {max_bytes: 12 parsecs}\n")
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "validate", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2
    assert f"{cfg}:2: buffer.max_bytes" in proc.stderr
    assert "Traceback" not in proc.stderr
    missing = subprocess.run(
        [sys.executable, "-m", "agent.cli", "validate", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert missing.returncode == 2 and "cannot read" in missing.stderr


def test_problems_are_typed_with_file_line_path_and_hint(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(VALID.replace("  max_bytes: 1GiB", "  max_byte: 1GiB"))
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    (problem,) = exc.value.problems
    assert isinstance(problem, Problem)
    assert (problem.file, problem.line, problem.path) == (cfg, 5, ("buffer", "max_byte"))
    assert (problem.message, problem.hint) == ("unknown key", "check its spelling and its indentation")
    assert str(problem) == f"{cfg}:5: buffer.max_byte: unknown key (check its spelling and its indentation)"


def test_checks_of_limits_and_models_are_placed_on_their_entry(tmp_path: Path) -> None:
    """Two entries binding one model to one device: the second is reported on its own line
    (the running agent refuses it too)."""
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        VALID.replace(
            "devices:",
            "models:\n  - {manifest: models/bioreactor-pca.model.yaml, devices: [br1]}\n"
            "  - {manifest: models/bioreactor-pca.model.yaml, device_kind: bioreactor}\n"
            "limits:\n  tags:\n    - {tag: phh, devices: [br1], action_high: 7.5}\ndevices:",
        )
    )
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    text = cfg.read_text()
    by_path = {p.path: p for p in exc.value.problems}
    twice = by_path[("models", 1)]
    assert twice.line == line_of(text, "device_kind: bioreactor") and twice.file == cfg
    assert "already bound to this device by models[0]" in twice.message
    assert by_path[("limits", "tags", 0)].line == line_of(text, "phh")
    assert ("models", 0) not in by_path


def test_every_relative_path_is_relative_to_the_file_that_names_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = tmp_path / "site"
    (site / "profiles").mkdir(parents=True)
    cfg = site / "agent.yaml"
    cfg.write_text(
        "agent: {id: gw}\nbuffer: {path: data/buffer.db}\nprofiles_dirs: [profiles]\n"
        "mqtt: {host: 127.0.0.1, password_file: secrets/mqtt.pw, tls: {enabled: true, ca_file: tls/ca.pem}}\n"
        "devices:\n  - id: br\n    profile: bioreactor-sim-opcua\n    connection:\n"
        "      url: opc.tcp://127.0.0.1:4840\n      security_policy: Basic256Sha256\n"
        "      security_mode: SignAndEncrypt\n      certificate: certs/agent.der\n"
        "      private_key: certs/agent.pem\n      trust_dir: certs/trusted\n"
    )
    monkeypatch.chdir(tmp_path)  # started elsewhere: nothing may resolve against this folder
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    missing = {p.path: p.message for p in exc.value.problems}
    for loc, rel in [
        (("mqtt", "password_file"), "secrets/mqtt.pw"),
        (("mqtt", "tls", "ca_file"), "tls/ca.pem"),
        (("devices", 0, "connection", "certificate"), "certs/agent.der"),
        (("devices", 0, "connection", "private_key"), "certs/agent.pem"),
        (("devices", 0, "connection", "trust_dir"), "certs/trusted"),
    ]:
        assert missing.pop(loc) == f"{site / rel} does not exist"
    assert not missing
    for rel in ("secrets/mqtt.pw", "tls/ca.pem", "certs/agent.der", "certs/agent.pem"):
        (site / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / rel).write_text("x\n")
    (site / "certs" / "trusted").mkdir()
    (site / "data").mkdir()
    # validate loads the broker CA file as run would: it must hold a certificate
    ca_der = create_certificate(tmp_path / "pki", "urn:test:ca").cert.read_bytes()
    (site / "tls" / "ca.pem").write_text(ssl.DER_cert_to_PEM_cert(ca_der))
    loaded = load_config(cfg)
    assert loaded.config.buffer.path == site / "data" / "buffer.db"
    assert loaded.config.profiles_dirs == [site / "profiles"]


def test_two_site_files_claiming_one_profile_name_are_an_error(tmp_path: Path) -> None:
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "thing.yaml").write_text("profile: thing\nprotocol: modbus\ntags: []\n")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("agent: {id: gw}\nprofiles_dirs: [a, b]\n")
    with pytest.raises(ConfigError) as exc:
        load_config(cfg)
    assert [str(p) for p in exc.value.problems] == [
        f"{tmp_path / 'b' / 'thing.yaml'}: profile 'thing' is also defined in {tmp_path / 'a' / 'thing.yaml'}"
    ]
