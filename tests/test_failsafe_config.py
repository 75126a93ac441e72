"""Bad configuration (issue 11): bounded YAML parsing through the one reader, ``validate`` finds
what ``run`` would reject at start, rejected secrets are never echoed, and the configuration
hash is computed without the values of secrets."""

from __future__ import annotations

import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.app.config import ConfigError, hashed_bytes, load_config, secret_keys
from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.cli import main
from agent.core.driver import load_drivers
from agent.transforms.anomaly.manifest import ModelError, read_manifest
from cleanroom_common.yamlfile import MAX_BYTES, YamlError, read_yaml
from simulators.process.scenario import load_scenario

ROOT = Path(__file__).resolve().parents[1]

BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
"""
"""The classic "billion laughs": 9^9 strings from a few hundred bytes."""

SECRET = "Tr0ub4dor-and-3-horses"

ALL_SECRET_KEYS = secret_keys(list(load_drivers().values()))


def config_text(extra: str = "", mqtt: str = "") -> str:
    text = "agent: {id: gw-01}\nbuffer: {path: buffer.db}\n"
    if mqtt:
        text += f"mqtt:\n  host: 127.0.0.1\n{mqtt}"
    return text + extra


def validate(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", str(cfg)])
    out = capsys.readouterr()
    return code, out.out + out.err


# --------------------------------------------------------------------------- bounded parsing


def test_billion_laughs_is_refused_in_under_a_second_naming_file_and_line(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    started = time.monotonic()
    with pytest.raises(YamlError) as caught:
        read_yaml(bomb)
    assert time.monotonic() - started < 1.0
    assert caught.value.path == bomb and caught.value.line is not None
    assert "alias" in caught.value.message


def test_billion_laughs_through_the_validate_command(tmp_path: Path) -> None:
    bomb = tmp_path / "agent.yaml"
    bomb.write_text("agent: {id: gw}\n" + BOMB)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "validate", str(bomb)],
        capture_output=True,
        text=True,
        timeout=20,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 2, proc.stderr
    assert re.search(rf"{re.escape(str(bomb))}:\d+: .*alias", proc.stderr), proc.stderr
    assert "Traceback" not in proc.stderr
    assert elapsed < 10  # interpreter start and imports included; the parse itself is refused at once


def test_recursive_alias_is_an_error_not_a_recursion_error(tmp_path: Path) -> None:
    f = tmp_path / "loop.yaml"
    f.write_text("agent: {id: gw}\nloop: &a [*a]\n")
    with pytest.raises(YamlError, match="refers to itself") as caught:
        read_yaml(f)
    assert caught.value.line == 2


def test_deep_nesting_is_refused_with_its_line(tmp_path: Path) -> None:
    f = tmp_path / "deep.yaml"
    f.write_text("".join(f"{'  ' * i}k{i}:\n" for i in range(200)) + "  " * 200 + "v\n")
    with pytest.raises(YamlError, match="nested deeper than") as caught:
        read_yaml(f)
    assert caught.value.line is not None and caught.value.line > 1


def test_oversized_document_is_refused_before_parsing(tmp_path: Path) -> None:
    f = tmp_path / "big.yaml"
    line = b"# " + b"x" * 1021 + b"\n"
    with f.open("wb") as out:
        for _ in range(MAX_BYTES // len(line) + 1):
            out.write(line)
    started = time.monotonic()
    with pytest.raises(YamlError, match="larger than"):
        read_yaml(f)
    assert time.monotonic() - started < 1.0


def test_large_legitimate_profile_still_reads(tmp_path: Path) -> None:
    """The bounds leave real files alone: a 10,000-tag profile with an alias in every tag."""
    f = tmp_path / "big-profile.yaml"
    tags = "".join(f"  - {{name: t{i}, meta: *common, address: {i}}}\n" for i in range(10_000))
    f.write_text("common: &common {group: g, type: int16, unit: degC}\ntags:\n" + tags)
    started = time.monotonic()
    doc = read_yaml(f)
    assert time.monotonic() - started < 5
    assert len(doc.data["tags"]) == 10_000 and doc.data["tags"][9999]["meta"]["unit"] == "degC"


def test_every_yaml_reader_goes_through_the_bounded_one(tmp_path: Path) -> None:
    """Manifests, scenarios and profiles: the bomb is refused by each with a clear error."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    with pytest.raises(ModelError, match="alias"):
        read_manifest(bomb)
    with pytest.raises(ValueError, match="alias"):
        load_scenario(bomb)
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    (profiles / "bomb.yaml").write_text(BOMB)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_text("profiles_dirs: [profiles]\n"))
    with pytest.raises(ConfigError, match="alias"):
        load_config(cfg)


def test_no_module_parses_yaml_but_the_one_reader() -> None:
    calls = re.compile(r"\byaml\.(safe_load|load|full_load|unsafe_load|compose|safe_load_all|load_all)\(")
    offenders = [
        str(p.relative_to(ROOT))
        for pkg in ("agent", "drivers", "simulators", "cleanroom_common")
        for p in (ROOT / pkg).rglob("*.py")
        if calls.search(p.read_text(encoding="utf-8"))
    ]
    assert offenders == []


def test_fuzzed_configs_give_config_errors_only(tmp_path: Path) -> None:
    """Truncations, byte flips and inserted YAML punctuation of a valid file: every one is
    either accepted or a ConfigError, never another exception."""
    base = config_text(
        "devices:\n  - id: br1\n    profile: bioreactor-sim\n    connection: {host: 127.0.0.1, port: 5020}\n",
        mqtt="  port: 1883\n  password: pw\n",
    ).encode()
    rng = random.Random(11)
    cfg = tmp_path / "agent.yaml"
    punct = b"&*!|>[]{}:,-?#%@`'\"\t\n\x00\xff"
    outcomes = {"ok": 0, "error": 0}
    for _ in range(400):
        data = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(len(data))
            choice = rng.random()
            if choice < 0.4:
                data[pos] = punct[rng.randrange(len(punct))]
            elif choice < 0.7:
                data.insert(pos, punct[rng.randrange(len(punct))])
            else:
                del data[pos:]
                break
        cfg.write_bytes(bytes(data))
        try:
            load_config(cfg)
            outcomes["ok"] += 1
        except ConfigError as exc:
            assert exc.problems and all(str(p) for p in exc.problems)
            outcomes["error"] += 1
    assert outcomes["error"] > 100


# --------------------------------------------------------------------------- validate finds what run rejects


def test_password_file_that_is_not_text_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pw").write_bytes(SECRET.encode() + b"\xff\xfe\n")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_text(mqtt="  username: u\n  password_file: pw\n"))
    code, out = validate(cfg, capsys)
    assert code == 2 and "mqtt.password_file" in out and "UTF-8" in out, out
    assert SECRET not in out


def test_password_file_that_is_a_folder_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pw").mkdir()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_text(mqtt="  username: u\n  password_file: pw\n"))
    code, out = validate(cfg, capsys)
    assert code == 2 and "mqtt.password_file" in out and "cannot read" in out, out


def test_opcua_password_file_unreadable_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "pw").mkdir()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        config_text(
            "devices:\n  - id: bio\n    profile: bioreactor-sim-opcua\n"
            "    connection: {url: 'opc.tcp://127.0.0.1:4840', username: u, password_file: pw,"
            " security_policy: None, security_mode: None}\n"
        )
    )
    code, out = validate(cfg, capsys)
    assert code == 2 and "devices[0].connection.password_file" in out, out


def test_tls_certificate_that_is_not_a_certificate_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "client.pem").write_text("not a certificate\n")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_text(mqtt="  port: 8883\n  tls: {enabled: true, cert_file: client.pem}\n"))
    code, out = validate(cfg, capsys)
    assert code == 2 and "mqtt.tls" in out and "certificate" in out, out


def test_buffer_folder_that_cannot_be_created_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "not-a-folder").write_text("")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text("agent: {id: gw}\nbuffer: {path: not-a-folder/buffer.db}\n")
    code, out = validate(cfg, capsys)
    assert code == 2 and "buffer.path" in out and "not-a-folder" in out, out


def test_buffer_of_another_agent_fails_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    other = Buffer(BufferConfig(path=tmp_path / "buffer.db"), "someone-else")
    other.open()
    other.close()
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_text())
    code, out = validate(cfg, capsys)
    assert code == 2 and "buffer.path" in out and "someone-else" in out, out


# --------------------------------------------------------------------------- secrets are never echoed


def test_secret_from_the_environment_in_a_rejected_path_is_not_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A password put where its file belongs (``password_file: ${MQTT_PASSWORD}``): the
    error says the file does not exist without printing the password."""
    monkeypatch.setenv("MQTT_PASSWORD", SECRET)
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_text(mqtt="  username: u\n  password_file: ${MQTT_PASSWORD}\n"))
    code, out = validate(cfg, capsys)
    assert code == 2 and "mqtt.password_file" in out, out
    assert SECRET not in out


@pytest.mark.parametrize(
    "mqtt",
    [
        f"  password: [{SECRET}]\n",
        f"  password: {{{SECRET}: 1}}\n",
        f'  password: "{SECRET}\\q"\n',
        f"  password: {SECRET}\n  password_file: pw\n",
        f"  pasword: {SECRET}\n",
    ],
    ids=["list", "mapping", "bad-escape", "both", "misspelt"],
)
def test_rejected_inline_secret_is_not_echoed(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], mqtt: str
) -> None:
    (tmp_path / "pw").write_text("x\n")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_text(mqtt=mqtt))
    code, out = validate(cfg, capsys)
    assert code == 2, out
    assert SECRET not in out


# --------------------------------------------------------------------------- the configuration hash


def test_a_secret_does_not_change_the_configuration_hash(tmp_path: Path) -> None:
    """Secret rotation is not a configuration change: the hash is over the file with the
    values of secrets masked."""
    a, b = tmp_path / "a", tmp_path / "b"
    for folder, pw in ((a, SECRET), (b, "another-password")):
        folder.mkdir()
        (folder / "agent.yaml").write_text(config_text(mqtt=f"  username: u\n  password: {pw}\n"))
    first, second = load_config(a / "agent.yaml"), load_config(b / "agent.yaml")
    assert first.sha256 == second.sha256
    assert SECRET.encode() not in hashed_bytes(read_yaml(a / "agent.yaml"), ALL_SECRET_KEYS)
    (b / "agent.yaml").write_text(config_text(mqtt="  username: v\n  password: another-password\n"))
    assert load_config(b / "agent.yaml").sha256 != first.sha256  # everything else still counts


def test_secrets_from_environment_and_files_do_not_change_the_hash(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(config_text(mqtt="  username: u\n  password: ${MQTT_PASSWORD}\n"))
    monkeypatch.setenv("MQTT_PASSWORD", SECRET)
    first = load_config(cfg).sha256
    monkeypatch.setenv("MQTT_PASSWORD", "rotated")
    assert load_config(cfg).sha256 == first
    assert SECRET.encode() not in hashed_bytes(read_yaml(cfg), ALL_SECRET_KEYS)
    (tmp_path / "pw").write_text(SECRET + "\n")
    cfg.write_text(config_text(mqtt="  username: u\n  password_file: pw\n"))
    second = load_config(cfg).sha256
    (tmp_path / "pw").write_text("rotated\n")
    assert load_config(cfg).sha256 == second
