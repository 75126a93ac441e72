"""The agent as a whole, in process: what it records about itself."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from agent.app.config import load_config
from agent.app.runtime import Agent
from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from cleanroom_common.net import free_port


def events_in(db: Path) -> list[dict[str, Any]]:
    """Every committed event body, in commit order, read the way export reads the buffer."""
    core = Buffer(BufferConfig(path=db), agent_id=None)
    core.open(readonly=True)
    try:
        return [json.loads(r.body) for r in core.records(kind="event")]
    finally:
        core.close()


def audit_trail(db: Path) -> list[dict[str, Any]]:
    return [e["data"] for e in events_in(db) if e["kind"] == "audit"]


async def run_once(cfg: Path) -> str:
    loaded = load_config(cfg)
    agent = Agent(loaded)
    await agent.start()
    await agent.stop()
    return loaded.sha256


def agent_yaml(site: str, password: str, status_port: int, broker_port: int) -> str:
    """The site is on the last line, three lines below the password: the diff's context shows it."""
    return (
        "mqtt:\n"
        "  host: 127.0.0.1\n"
        f"  port: {broker_port}\n"
        "  username: gw\n"
        f"  password: '{password}'\n"
        "  reconnect_min: 10\n"
        "buffer: {path: buffer.db}\n"
        f"agent: {{id: gw, site: {site}, status_listen: '127.0.0.1:{status_port}', shutdown_grace: 0.1}}\n"
    )


async def test_a_changed_configuration_is_audited_with_its_diff_and_hashes_never_a_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = tmp_path / "agent.yaml"
    ports = free_port(), free_port()  # no broker there: the forwarder keeps trying, the buffer keeps all
    monkeypatch.setenv("BROKER_PW", "env-secret-3333")
    cfg.write_text(agent_yaml("Suite 3", "file-secret-1111", *ports))
    first = await run_once(cfg)
    assert await run_once(cfg) == first  # same file: no change to record
    # a secret rotated (written in the file, then taken from the environment) with a real change
    cfg.write_text(agent_yaml("Suite 4", "${BROKER_PW}", *ports))
    second = await run_once(cfg)
    assert second != first

    db = tmp_path / "buffer.db"
    trail = audit_trail(db)
    actions = [a["action"] for a in trail]
    assert actions == ["agent_start", "agent_stop"] * 2 + ["config_change", "agent_start", "agent_stop"]
    changed = trail[4]
    assert changed["old"] == {"config_sha256": first} and changed["new"] == {"config_sha256": second}
    assert changed["hashes"] == {"old": first, "new": second}
    assert changed["actor"] == "agent:gw" and changed["reason"] and changed["os_user"]
    diff = changed["diff"].splitlines()
    assert diff[:2] == ["--- previous", f"+++ {cfg.resolve()}"]
    assert [line for line in diff[2:] if line[:1] in "+-"] == [
        "-" + agent_yaml("Suite 3", "", *ports).splitlines()[-1],
        "+" + agent_yaml("Suite 4", "", *ports).splitlines()[-1],
    ]
    assert "   password: <secret>" in diff  # context: the masked line, identical before and after
    stored = b"".join(p.read_bytes() for p in sorted(tmp_path.glob("buffer.db*")))  # noqa: ASYNC240
    for secret in (b"file-secret-1111", b"env-secret-3333", b"BROKER_PW"):
        assert secret not in stored


def test_a_buffer_that_cannot_be_opened_is_a_clear_startup_error(tmp_path: Path) -> None:
    import subprocess
    import sys

    (tmp_path / "not-a-folder").write_text("")
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(
        f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}'}}\n"
        "buffer: {path: not-a-folder/buffer.db}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "run", "-c", str(cfg)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    assert "cannot start: buffer" in proc.stderr and "not-a-folder" in proc.stderr
    assert "Traceback" not in proc.stderr
