"""Docs that cannot drift from the code."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from agent.app.config import ConfigError, load_config
from agent.app.docgen import BEGIN, DOC, END, render

ROOT = Path(__file__).resolve().parent.parent
SITE_FILE_MISSING = re.compile(r": /etc/cleanroom-edge/\S+ does not exist$")


def test_configuration_reference_is_generated_from_the_models() -> None:
    text = DOC.read_text()
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert generated == render().strip(), (
        "docs/configuration.md is stale: run python -m agent.app.docgen --write"
    )


def test_every_config_key_has_a_description() -> None:
    missing = [
        line for line in render().splitlines() if line.startswith("| `") and line.rstrip().endswith("|  |")
    ]
    assert not missing, f"config fields without a docstring: {missing[:5]}"


def test_deploy_examples_validate(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MQTT_PASSWORD", "from-the-environment")
    examples = sorted((ROOT / "deploy" / "examples").glob("*.yaml"))
    assert examples
    for path in examples:
        try:
            assert load_config(path).devices, path
        except ConfigError as exc:
            # the example names the site's own secrets and certificates, which this machine
            # lacks; anything else wrong with it is a broken example
            others = [p for p in exc.problems if not SITE_FILE_MISSING.search(p)]
            assert not others, others
            assert exc.problems
