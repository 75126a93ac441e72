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
    # the bioreactor model runs on the bioreactors whose readings carry simulated time, polled
    # often enough for its period; it says why the incubator model is not bound, and its state
    assert "model: bioreactor-pca in shadow mode on br-01, br-02, process polled every 0.25 s" in out
    assert "model: incubator-pca not bound: the demo's incubators are stamped by the agent's clock" in out
    line = re.search(r"^models\s+bioreactor-pca: (.*)$", out, re.MULTILINE)
    assert line, out[-800:]
    counts = [part.split(" ", 1) for part in line.group(1).split(", ")]
    # 6 s at ×60 is the first 6 min of a culture: outside the model's envelope (or not yet polled)
    assert sum(int(n) for n, _ in counts) == 2 and {s for _, s in counts} <= {"out_of_envelope", "warming_up"}
