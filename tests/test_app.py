"""The agent as a whole, in process: what it records about itself."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path
from typing import Any

from agent.app.config import load_config
from agent.app.runtime import Agent
from cleanroom_common.net import free_port


def audit_trail(db: Path) -> list[dict[str, Any]]:
    with sqlite3.connect(db) as conn:
        bodies = conn.execute("SELECT body FROM records WHERE kind = 'event' ORDER BY id").fetchall()
    events = [json.loads(b) for (b,) in bodies]
    return [e["data"] for e in events if e["kind"] == "audit"]


async def run_once(cfg: Path) -> str:
    loaded = load_config(cfg)
    agent = Agent(loaded)
    await agent.start()
    await agent.stop()
    return loaded.sha256


async def test_a_changed_configuration_is_an_audited_change_with_old_and_new_hash(tmp_path: Path) -> None:
    cfg = tmp_path / "agent.yaml"
    text = f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}'}}\nbuffer: {{path: buffer.db}}\n"
    cfg.write_text(text)
    first = await run_once(cfg)
    assert await run_once(cfg) == first  # same file: no change to record
    cfg.write_text(text + "# retention discussed with QA\nprofiles_dirs: []\n")
    second = await run_once(cfg)
    assert second != first

    actions = [a["action"] for a in audit_trail(tmp_path / "buffer.db")]
    assert actions == ["agent_start", "agent_stop"] * 2 + ["config_changed", "agent_start", "agent_stop"]
    changed = next(a for a in audit_trail(tmp_path / "buffer.db") if a["action"] == "config_changed")
    assert changed["old"] == {"config_sha256": first}
    assert changed["new"] == {"config_sha256": second}
    assert changed["actor"] and changed["why"]


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
