"""``make bench``: every benchmark, one after the other, one JSON object per line.

Each benchmark runs in its own process (so one's memory and threads do not colour the
next) and prints one JSON object; this runner passes them through and adds nothing but
a failure record when one fails. Benchmarks never assert: they measure.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

BENCHES = (
    "bench.pipeline",
    "bench.payload_formats",
    "bench.loop_lag",
    "bench.modbus_requests",
    "bench.modbus_load",
    "bench.opcua_subscription",
    "bench.plant",
    "bench.inference",
    "bench.process_generate",
)


def main() -> int:
    failed = 0
    for module in BENCHES:
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", module], capture_output=True, text=True, timeout=900, check=False
        )
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode == 0 and lines:
            print(lines[-1], flush=True)
        else:
            failed += 1
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            print(json.dumps({"name": module, "error": f"exit {proc.returncode}", "tail": tail}), flush=True)
        print(f"# {module}: {time.monotonic() - t0:.0f} s", file=sys.stderr, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
