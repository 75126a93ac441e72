"""``cleanroom-agent capture --config FILE --out FILE.jsonl``: record what the agent publishes, for
``verify --capture`` (docs/integrity.md)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from agent.cli.validate import load_or_report


def register(sub: Any) -> None:
    p = sub.add_parser(
        "capture", help="record every message the agent publishes (JSON lines) for `verify --capture`"
    )
    p.add_argument("-c", "--config", required=True, help="agent configuration (its mqtt section is used)")
    p.add_argument("--out", required=True, metavar="FILE", help="capture file to write (JSON lines)")
    p.add_argument(
        "--duration",
        type=float,
        metavar="SECONDS",
        help="stop after this long (default: until SIGINT/SIGTERM)",
    )
    p.set_defaults(func=cmd_capture)


def _fail(message: str) -> int:
    print(f"cleanroom-agent capture: error: {message}", file=sys.stderr)
    return 2


def cmd_capture(args: argparse.Namespace) -> int:
    from agent.integrity.capture import CaptureError, Recorder

    if args.duration is not None and not args.duration > 0:
        return _fail(f"--duration must be a positive number of seconds, not {args.duration:g}")
    loaded = load_or_report(args.config)
    if loaded is None:
        return 2
    cfg = loaded.config.mqtt
    if cfg is None:
        return _fail(f"{args.config} has no mqtt section: the agent publishes nothing to capture")
    previous = {sig: signal.signal(sig, _stop_on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    _STOP.clear()
    try:
        with Path(args.out).open("w", encoding="utf-8") as out:
            try:
                recorder = Recorder(cfg, out)
                recorder.start()
            except CaptureError as exc:
                return _fail(str(exc))
            try:
                _wait(recorder.failed, args.duration)
            finally:
                recorder.stop()
    except OSError as exc:
        return _fail(f"--out {args.out}: {exc.strerror or exc}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    result = recorder.result()
    if recorder.error is not None:
        print(f"cleanroom-agent capture: {recorder.error}", file=sys.stderr)
        return 1
    lost = f", through {result.disconnects} broker disconnects" if result.disconnects else ""
    print(f"captured {result.messages} messages to {args.out}{lost}", file=sys.stderr)
    return 0


_STOP = threading.Event()


def _stop_on_signal(signum: int, frame: FrameType | None) -> None:
    _STOP.set()


def _wait(failed: threading.Event, duration: float | None) -> None:
    """Until a signal, a write failure or the duration: polled in short steps so a signal handler
    runs promptly (the main thread must return to Python to run it)."""
    import time

    deadline = None if duration is None else time.monotonic() + duration
    while not (_STOP.is_set() or failed.is_set()):
        left = 0.2 if deadline is None else min(0.2, deadline - time.monotonic())
        if left <= 0:
            return
        _STOP.wait(left)
