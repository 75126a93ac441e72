"""``cleanroom-agent batch start|step|end|show``: assign devices to a batch, move it to another
procedure step, release it, and show what each device holds, through the running agent.

The agent is reached on its status listener (``agent.status_listen`` of the configuration) with
the control token it wrote next to its buffer (``control.token``, readable by the agent's account
only: run this as that account). The agent applies the command exactly as it applies one from
the MES, and refuses and audits what it cannot apply. Exit codes: 0 applied (or already so),
1 refused because of what the devices hold (``already_assigned``, ``not_assigned``) or no agent
answering, 2 bad input (configuration, arguments, an unknown device, a missing ``--actor`` or
``--reason``).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from agent.cli.validate import load_or_report

TIMEOUT_S = 10.0
INPUT_REFUSALS = frozenset({"unknown_device", "missing_actor", "missing_reason", "invalid", "malformed"})
"""Refusals that say the command itself was wrong (exit 2); the rest are about what devices hold (exit 1)."""


def register(sub: Any) -> None:
    p = sub.add_parser("batch", help="assign devices to batches (start, step, end) and show assignments")
    actions = p.add_subparsers(dest="batch_action", required=True, metavar="ACTION")

    start = actions.add_parser("start", help="assign devices (or a group) to a batch")
    _common(start, many=True)
    start.add_argument("--batch", required=True, help="the batch (lot) id")
    start.add_argument("--coi", help="the chain-of-identity id (autologous therapy: the patient's)")
    start.add_argument("--product", help="the product")
    start.add_argument("--step", help="the ISA-88 procedure step it starts in")
    _attribution(start)

    step = actions.add_parser("step", help="the batch a device (and its group) holds enters another step")
    _common(step, many=False)
    step.add_argument("--step", required=True, help="the ISA-88 procedure step")
    step.add_argument("--batch", help="refuse unless the device holds this batch")
    _attribution(step)

    end = actions.add_parser("end", help="release the batch a device (and its group) holds")
    _common(end, many=False)
    end.add_argument("--batch", help="refuse unless the device holds this batch")
    _attribution(end)

    show = actions.add_parser("show", help="what each device holds")
    show.add_argument("-c", "--config", required=True, help="configuration of the running agent")
    show.add_argument("--json", action="store_true", help="print the raw JSON")
    p.set_defaults(func=cmd_batch)


def _common(p: argparse.ArgumentParser, *, many: bool) -> None:
    p.add_argument("-c", "--config", required=True, help="configuration of the running agent")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument(
        "--device",
        action="append" if many else "store",
        help="device id" + (" (repeat for several devices assigned together)" if many else ""),
    )
    which.add_argument("--group", help="a group of batch.groups")


def _attribution(p: argparse.ArgumentParser) -> None:
    # Not required by the parser: the agent refuses a command without them, and audits the refusal.
    p.add_argument("--actor", default="", help="who asks (a person's name or user id), for the audit trail")
    p.add_argument("--reason", default="", help="why, for the audit trail")


def command_of(args: argparse.Namespace) -> dict[str, Any]:
    """The batch command (docs/batch-command.schema.json) the arguments ask for."""
    doc: dict[str, Any] = {"action": args.batch_action}
    if args.group is not None:
        doc["group"] = args.group
    else:
        doc["devices"] = args.device if isinstance(args.device, list) else [args.device]
    for key, attr in (("batch_id", "batch"), ("coi_id", "coi"), ("product", "product"), ("step", "step")):
        value = getattr(args, attr, None)
        if value is not None:
            doc[key] = value
    doc["actor"], doc["reason"] = args.actor, args.reason
    return doc


class Unreachable(Exception):
    """No agent answers, or it cannot be asked (its token cannot be read); the message says why."""


def request(
    listen: str, token_file: Path, method: str, body: dict[str, Any] | None, path: str | None = None
) -> dict[str, Any]:
    """Send one request to the agent's control endpoint (``path``: one of its paths, by default the
    batch path); its JSON answer (an answer saying why a command was refused included). Every
    command that talks to the running agent goes through here (``batch``, ``sample``)."""
    from agent.app.control import PATH, read_token
    from agent.app.status import parse_listen

    try:
        token = read_token(token_file)
    except FileNotFoundError:
        raise Unreachable(
            f"no control token at {token_file}: is the agent running with this configuration?"
        ) from None
    except PermissionError:
        raise Unreachable(
            f"cannot read the control token {token_file}: run this as the agent's account"
        ) from None
    except (OSError, ValueError) as exc:
        raise Unreachable(f"cannot read the control token {token_file}: {exc}") from None
    url = f"http://{parse_listen(listen)}{path or PATH}"
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method)
    req.add_header("Authorization", f"Bearer {token}")
    if data is not None:
        req.add_header("Content-Type", "application/json")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT_S) as resp:
            return _answer(resp.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise Unreachable(
                f"the agent at {listen} did not accept the control token in {token_file}: is it the agent "
                "of this configuration?"
            ) from None
        answer = _answer(exc.read())
        if not answer:
            raise Unreachable(f"the agent at {listen} answered {exc.code} {exc.reason}") from None
        return answer
    except (urllib.error.URLError, OSError) as exc:
        raise Unreachable(f"no agent answers at {url} ({exc}); is it running with this config?") from None


def _answer(raw: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(raw)
    except ValueError:
        return {}
    return doc if isinstance(doc, dict) else {}


def cmd_batch(args: argparse.Namespace) -> int:
    from agent.app.control import token_path

    loaded = load_or_report(args.config)
    if loaded is None:
        return 2
    listen, token_file = loaded.config.agent.status_listen, token_path(loaded.config.buffer.path)
    body = None if args.batch_action == "show" else command_of(args)
    try:
        answer = request(listen, token_file, "GET" if body is None else "POST", body)
    except Unreachable as exc:
        print(f"batch {args.batch_action}: {exc}", file=sys.stderr)
        return 1
    if body is None:
        devices = answer.get("devices") or {}
        print(json.dumps(devices, indent=2) if args.json else format_assignments(devices))
        return 0
    if answer.get("ok") is True:
        contexts = answer.get("contexts") or []
        if not answer.get("changed"):
            print(f"batch {args.batch_action}: nothing to change, already so")
        for ctx in contexts:
            print(_context_line(ctx))
        return 0
    refusal = str(answer.get("refusal"))
    print(f"batch {args.batch_action} refused ({refusal}): {answer.get('detail', '')}", file=sys.stderr)
    return 2 if refusal in INPUT_REFUSALS else 1


def _context_line(ctx: dict[str, Any]) -> str:
    group = ctx.get("group") or []
    return (
        f"{ctx.get('phase')} {ctx.get('batch_id')} ref {ctx.get('ref')}"
        + (f" step {ctx['step']}" if ctx.get("step") else "")
        + (f" group {','.join(group)}" if group else "")
    )


def format_assignments(devices: dict[str, Any]) -> str:
    if not devices:
        return "no device holds a batch"
    lines = [f"{'device':<16} {'batch':<20} {'ref':<24} {'step':<16} {'product':<14} {'coi':<14} source"]
    for device, ctx in sorted(devices.items()):
        lines.append(
            f"{device:<16} {ctx.get('batch_id') or '':<20} {ctx.get('ref') or '':<24} "
            f"{ctx.get('step') or '-':<16} {ctx.get('product') or '-':<14} {ctx.get('coi_id') or '-':<14} "
            f"{ctx.get('source')}"
        )
    return "\n".join(lines)
