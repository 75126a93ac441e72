"""``cleanroom-agent init DIR``: a working starting point from the installed package.

Writes ``agent.yaml``, the site files it names (a ``profiles/`` folder for the site's own
profiles) and a simulated plant to try it against (``plant.yaml``), copied from the
package's ``examples/starter`` (the repository's ``deploy/examples/starter``). It never
overwrites: when any of those files exists, nothing is written and the command says which.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from cleanroom_common.bundled import package_dir

STARTER = package_dir("agent.bundled", "examples", "starter")


def register(sub: Any) -> None:
    p = sub.add_parser("init", help="write a starting agent.yaml and the files it names into DIR")
    p.add_argument("dir", type=Path, help="folder to write into (created if missing)")
    p.set_defaults(func=cmd_init)


def starter_files() -> list[Path]:
    """The starter's files, relative to its folder."""
    return sorted(p.relative_to(STARTER) for p in STARTER.rglob("*") if p.is_file())


def cmd_init(args: argparse.Namespace) -> int:
    target: Path = args.dir
    files = starter_files()
    if target.exists() and not target.is_dir():
        print(f"init: {target} exists and is not a folder", file=sys.stderr)
        return 2
    existing = [f for f in files if (target / f).exists()]
    if existing:
        names = ", ".join(str(target / f) for f in existing)
        print(f"init: would overwrite {names}; nothing written (choose another folder)", file=sys.stderr)
        return 2
    try:
        for f in files:
            (target / f).parent.mkdir(parents=True, exist_ok=True)
            with (target / f).open("xb") as out:  # "x": never replace a file made meanwhile
                out.write((STARTER / f).read_bytes())
    except OSError as exc:
        print(f"init: cannot write into {target}: {exc.strerror or exc}", file=sys.stderr)
        return 2
    for f in files:
        print(f"wrote {target / f}")
    config = target / "agent.yaml"
    print(
        f"\nnext:\n  cleanroom-sim plant --config {target / 'plant.yaml'}   # simulated devices\n"
        f"  cleanroom-agent validate {config}\n"
        f"  cleanroom-agent run -c {config}   # with a broker on 127.0.0.1:1883"
    )
    return 0
