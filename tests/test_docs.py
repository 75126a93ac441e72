"""Docs that cannot drift from the code."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.config import load_config
from agent.docgen import BEGIN, DOC, END, render

ROOT = Path(__file__).resolve().parent.parent


def test_configuration_reference_is_generated_from_the_models() -> None:
    text = DOC.read_text()
    generated = text.split(BEGIN, 1)[1].split(END, 1)[0].strip()
    assert generated == render().strip(), "docs/configuration.md is stale: run python -m agent.docgen --write"


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
        loaded = load_config(path)
        assert loaded.devices, path
