"""An earlier tree of this checkout, for the benchmarks that run a former code path beside today's."""

from __future__ import annotations

import subprocess
from pathlib import Path


def extract(ref: str, into: Path) -> str | None:
    """The tree of ``ref`` from this checkout's git history in ``into``; None, or why not."""
    root = Path(__file__).resolve().parent.parent
    try:
        archive = subprocess.run(
            ["git", "-C", str(root), "archive", "--format=tar", ref],
            capture_output=True,
            check=True,
            timeout=60,
        ).stdout
        subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as exc:
        return f"cannot extract {ref}: {exc}"
    return None
