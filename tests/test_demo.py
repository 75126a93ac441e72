"""``cleanroom-agent demo``: the whole plant through the embedded broker, with nothing lost."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def test_demo_runs_the_plant_and_accounts_for_every_reading(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "agent.cli", "demo", "--duration", "6", "--workdir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    out = proc.stdout
    assert proc.returncode == 0, proc.stderr[-3000:]

    def figure(label: str) -> int:
        m = re.search(rf"^{label}\s+(\d+)", out, re.MULTILINE)
        assert m, f"{label!r} missing from the summary:\n{out[-2000:]}"
        return int(m.group(1))

    committed = figure("readings committed")
    assert committed > 200
    assert figure("readings delivered") == committed
    assert figure("readings seen at view") == committed
    assert figure("lost") == 0
    assert figure("still buffered") == 0
    assert figure("devices") >= 10
    # every device kind and protocol of the plant is on the broker
    for kind in (
        "bioreactor over opcua",
        "bioreactor over modbus-tcp",
        "incubator over modbus-rtu",
        "particle_counter over serial",
    ):
        assert kind in out
    for device in ("br-01", "br-03", "inc-01", "pc-01"):
        assert re.search(rf"^\S+\s+{device}\s+\w+\s+#\d+", out, re.MULTILINE), f"no readings from {device}"
