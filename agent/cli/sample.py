"""``cleanroom-agent sample add``: enter an offline reference sample (the lab's pH, dissolved oxygen,
viable cell density) through the running agent, which compares it with the online probe at the
sample's time and commits a ``reference_sample`` event (an alarm when the difference exceeds the
profile's ``reference_limits``).

The agent is reached as ``cleanroom-agent batch`` reaches it: on its status listener, with the
control token it wrote next to its buffer (run this as the agent's account). Exit codes: 0 entered
(whatever the comparison found: the event says it), 1 no agent answering, 2 refused (configuration,
arguments, an unknown device or tag, another unit, a missing ``--actor`` or ``--reason``, a time in
the future).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from agent.cli.batch import Unreachable, request
from agent.cli.validate import load_or_report


def register(sub: Any) -> None:
    p = sub.add_parser("sample", help="enter offline reference samples, compared with the online probe")
    actions = p.add_subparsers(dest="sample_action", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="enter one offline sample value of a device's tag")
    add.add_argument("-c", "--config", required=True, help="configuration of the running agent")
    add.add_argument("--device", required=True, help="device id")
    add.add_argument("--tag", required=True, help="the tag the sample measures offline (e.g. ph)")
    add.add_argument("--value", required=True, type=float, help="the offline value, in the tag's unit")
    add.add_argument("--unit", help="the value's unit; refused unless it is the tag's (never converted)")
    add.add_argument(
        "--at",
        required=True,
        help="when the sample was drawn: ISO 8601 with a time zone, or ns since the epoch",
    )
    add.add_argument("--sample-id", help="the sample's id in the LIMS or the lab notebook")
    # Not required by the parser: the agent refuses a sample without them, and audits the refusal.
    add.add_argument("--actor", default="", help="who took or enters the sample, for the audit trail")
    add.add_argument("--reason", default="", help="why it is entered, for the audit trail")
    add.add_argument("--json", action="store_true", help="print the agent's raw JSON answer")
    p.set_defaults(func=cmd_sample)


def sample_of(args: argparse.Namespace) -> dict[str, Any]:
    """The sample document (as the LIMS publishes it) the arguments ask for."""
    at: int | str = int(args.at) if args.at.isdigit() else args.at
    doc: dict[str, Any] = {"device": args.device, "tag": args.tag, "value": args.value, "at": at}
    if args.unit is not None:
        doc["unit"] = args.unit
    if args.sample_id is not None:
        doc["sample_id"] = args.sample_id
    doc["actor"], doc["reason"] = args.actor, args.reason
    return doc


def cmd_sample(args: argparse.Namespace) -> int:
    from agent.app.control import token_path
    from agent.app.referencecommands import REFERENCE_PATH

    loaded = load_or_report(args.config)
    if loaded is None:
        return 2
    listen, token_file = loaded.config.agent.status_listen, token_path(loaded.config.buffer.path)
    try:
        answer = request(listen, token_file, "POST", sample_of(args), REFERENCE_PATH)
    except Unreachable as exc:
        print(f"sample add: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2))
    if answer.get("ok") is not True:
        print(f"sample add refused ({answer.get('refusal')}): {answer.get('detail', '')}", file=sys.stderr)
        return 2
    if not args.json:
        print(format_entered(answer.get("event") or {}, str(answer.get("severity"))))
    return 0


def format_entered(data: dict[str, Any], severity: str) -> str:
    """One line: what the sample was compared with and what came of it."""
    unit = f" {data['unit']}" if data.get("unit") else ""
    if data.get("online") is None:
        return (
            f"{severity}: {data.get('tag')} offline {data.get('offline')}{unit}: no good online reading "
            f"within ±{data.get('window_s')} s of the sample time: not compared"
        )
    verdict = {True: "within", False: "BEYOND", None: "no limit for"}[data.get("within")]
    limit = "" if data.get("limit") is None else f" ±{data['limit']}"
    return (
        f"{severity}: {data.get('tag')} offline {data.get('offline')}{unit}, online {data.get('online')}: "
        f"difference {data.get('difference'):+.6g}, {verdict} the limit{limit}"
    )
