"""``cleanroom-agent discover``: what the command does with any discoverer's result.

A scripted discoverer stands in for the protocol here (the protocols are tested against real
servers in their own files: tests/test_discover_opcua.py, tests/test_discover_modbus.py), so
every outcome of a discovery can be had on demand: the file written whole with its header and
accepted by ``validate``, an existing file kept, stdout, each failure as one line and its exit
code. Device-supplied text cannot break the file it is written into (fuzzed).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import re
import unicodedata
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.cli import discover as cli
from agent.cli import main
from agent.core.discover import (
    ENTRY_POINT_GROUP,
    Discoverer,
    Discovery,
    DiscoveryError,
    clean_text,
    tag_names,
)
from cleanroom_common.yamlfile import read_yaml

NAME_PATTERN = r"^[A-Za-z0-9_.\-/]+$"

PROFILE: dict[str, Any] = {
    "profile": "scripted",
    "protocol": "opcua",
    "description": "Two variables of a scripted device.",
    "groups": {"default": {"interval": "1s"}},
    "tags": [
        {"name": "Tank/Level", "node_id": "nsu=urn:test;s=Tank.Level", "unit": "%", "range": [0, 100]},
        {"name": "Tank/State", "node_id": "nsu=urn:test;i=7", "description": 'says: "ok" # not a comment'},
    ],
}


class Scripted(Discoverer):
    """A discovery whose outcome the test picks with ``--outcome``."""

    protocol = "opcua"
    help = "scripted discovery for the command's tests"

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--outcome", default="ok")

    async def discover(self, args: argparse.Namespace) -> Discovery:
        if args.outcome == "unreachable":
            raise DiscoveryError("connect opc.tcp://10.0.0.9:4840: TimeoutError")
        if args.outcome == "bad-root":
            raise DiscoveryError("--root ns=7;s=X: not on this server (BadNodeIdUnknown)", bad_input=True)
        if args.outcome == "bug":
            raise KeyError("surprise")
        if args.outcome == "invalid":
            return Discovery({**PROFILE, "tags": [{"name": "bad name", "node_id": "i=1"}]})
        return Discovery(
            PROFILE, ["Discovered now by a script.", "Server: line one\nline two"], "2 tags in 0.0 s"
        )


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> None:
    entry = metadata.EntryPoint("opcua", f"{__name__}:Scripted", ENTRY_POINT_GROUP)
    monkeypatch.setattr(cli, "discoverers", lambda: {"opcua": entry})


@dataclass
class Run:
    rc: int
    out: str
    err: str


def run(*argv: str) -> Run:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            rc = main(["discover", *argv])
        except SystemExit as exc:
            rc = int(exc.code or 0)
    assert "Traceback" not in err.getvalue()
    return Run(rc, out.getvalue(), err.getvalue())


def test_writes_the_header_and_a_profile_that_validate_accepts(scripted: None, tmp_path: Path) -> None:
    profiles = tmp_path / "profiles"
    profiles.mkdir()
    out = profiles / "scripted.yaml"
    r = run("opcua", "--out", str(out))
    assert r.rc == 0, r.err
    assert r.out == f"{out}: 2 tags in 0.0 s\n"
    text = out.read_text()
    assert text.startswith(
        "# Discovered now by a script.\n# Server: line one\n# line two\nprofile: scripted\n"
    )
    assert "  - {name: Tank/Level, " in text, "one tag per line"
    assert read_yaml(out).data == PROFILE
    assert [p.name for p in profiles.iterdir()] == ["scripted.yaml"], "no temporary file left"
    cfg = tmp_path / "agent.yaml"
    connection = "{url: 'opc.tcp://127.0.0.1:4840', security_policy: None}"
    cfg.write_text(
        "agent: {id: gw}\nprofiles_dirs: [profiles]\ndevices:\n"
        f"  - {{id: t1, profile: scripted, connection: {connection}}}\n"
    )
    assert main(["validate", str(cfg)]) == 0


def test_an_existing_file_is_kept_unless_force(scripted: None, tmp_path: Path) -> None:
    out = tmp_path / "p.yaml"
    out.write_text("reviewed by hand\n")
    r = run("opcua", "--outcome", "bug", "--out", str(out))  # refused before the device is asked
    assert r.rc == 2 and "exists (--force replaces it)" in r.err
    assert out.read_text() == "reviewed by hand\n"
    r = run("opcua", "--out", str(out), "--force")
    assert r.rc == 0 and read_yaml(out).data == PROFILE
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml"]


def test_out_dash_writes_the_profile_to_stdout_and_the_summary_to_stderr(scripted: None) -> None:
    r = run("opcua", "--out", "-")
    assert r.rc == 0
    assert yaml.safe_load(r.out) == PROFILE and r.out.startswith("# Discovered")
    assert r.err.strip() == "2 tags in 0.0 s"


@pytest.mark.parametrize(
    ("outcome", "rc", "message"),
    [
        ("unreachable", 1, "discover opcua: connect opc.tcp://10.0.0.9:4840: TimeoutError"),
        ("bad-root", 2, "discover opcua: --root ns=7;s=X: not on this server (BadNodeIdUnknown)"),
        ("bug", 1, "discover opcua: failed: KeyError: 'surprise' (--log-level DEBUG shows where)"),
        ("invalid", 1, "does not validate, nothing written: 1 error(s), first at tags.0.name"),
    ],
)
def test_failures_are_one_line_with_their_exit_code_and_write_nothing(
    scripted: None, tmp_path: Path, outcome: str, rc: int, message: str
) -> None:
    out = tmp_path / "p.yaml"
    r = run("opcua", "--outcome", outcome, "--out", str(out))
    assert r.rc == rc
    assert message in r.err and len(r.err.strip().splitlines()) == 1, r.err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_bad_targets_and_protocols_are_refused_up_front(scripted: None, tmp_path: Path) -> None:
    r = run("opcua", "--out", str(tmp_path / "no" / "p.yaml"))
    assert r.rc == 2 and "does not exist" in r.err
    r = run("opcua", "--out", str(tmp_path))
    assert r.rc == 2 and "is a directory" in r.err
    r = run("opcua")
    assert r.rc == 2 and "--out" in r.err


def test_unknown_protocol_lists_the_installed_ones() -> None:
    r = run("profinet", "--out", "-")
    assert r.rc == 2
    assert r.err.strip() == "discover: no discoverer for protocol 'profinet'; installed: modbus, opcua"
    r = run()
    assert r.rc == 2 and "installed: modbus, opcua" in r.err


def test_a_protocols_help_shows_its_own_options() -> None:
    r = run("opcua", "--help")
    assert r.rc == 0
    for option in (
        "--out",
        "--force",
        "--root",
        "--max-depth",
        "--include",
        "--security-policy",
        "--password-file",
    ):
        assert option in r.out, option


text = st.text(alphabet=st.characters(), max_size=40)


@settings(max_examples=80, deadline=None)
@given(
    header=st.lists(text, max_size=4),
    strings=st.lists(text, min_size=1, max_size=4),
    paths=st.lists(st.lists(text, min_size=1, max_size=3), min_size=1, max_size=6),
)
def test_device_text_cannot_break_the_file(
    header: list[str], strings: list[str], paths: list[list[str]]
) -> None:
    """Whatever a device calls itself and its nodes: the header stays comments, every cleaned
    string reads back as written, every name is a valid tag name and no two are the same."""
    names = tag_names(paths)
    assert len(set(names)) == len(names)
    assert all(re.match(NAME_PATTERN, n) for n in names)
    cleaned = [clean_text(s) for s in strings]
    assert not any(unicodedata.category(ch) in ("Cc", "Cs") for c in cleaned for ch in c)
    tags = [
        {
            "name": name,
            "node_id": f"nsu=urn:x;s={cleaned[i % len(cleaned)]}",
            "description": cleaned[i % len(cleaned)],
        }
        for i, name in enumerate(names)
    ]
    profile = {"profile": "p", "protocol": "opcua", "description": cleaned[0], "tags": tags}
    rendered = Discovery(profile, header).render()
    body = rendered.splitlines()
    comments = [line for line in body if line.startswith("#")]
    assert body[: len(comments)] == comments, "the header is comment lines and only at the top"
    assert yaml.safe_load(rendered) == profile
