"""The machine form of the report: the same content as the HTML and the PDF, as one JSON object
(its shape is :class:`~agent.review.exceptions.BatchReport`; docs/operations.md, "Reviewing a
batch")."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from agent.review.exceptions import BatchReport


def as_dict(report: BatchReport) -> dict[str, Any]:
    return dataclasses.asdict(report)


def render(report: BatchReport) -> bytes:
    return (json.dumps(as_dict(report), indent=1, ensure_ascii=False, allow_nan=False) + "\n").encode()
