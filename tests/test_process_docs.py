"""docs/simulators-process.md cannot drift from the models: every parameter (with its default),
signal, status bit and fault kind is listed there."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from simulators.process import MODELS
from simulators.process.faults import FAULT_PARAMS
from simulators.process.scenario import DeviceSpec, FaultSpec, Scenario

DOC = (Path(__file__).resolve().parent.parent / "docs" / "simulators-process.md").read_text()


def shown_default(f: FieldInfo) -> str:
    if f.default_factory is not None:
        return f"`{f.default_factory()!r}`"  # type: ignore[call-arg]
    return "required" if f.default is PydanticUndefined else f"`{f.default!r}`"


def rows(model: type[BaseModel], prefix: str = "") -> list[str]:
    return [f"| {prefix}`{n}` | {shown_default(f)} |" for n, f in model.model_fields.items()]


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_every_model_parameter_signal_and_bit_is_documented(kind: str) -> None:
    cls = MODELS[kind]
    missing = [r for r in rows(cls.Params) if r not in DOC]
    missing += [f"`{s}`" for s in cls.SIGNALS if f"| `{s}` |" not in DOC]
    missing += [f"`{b}`" for b in cls.STATUS if f"`{b}`" not in DOC]
    assert not missing, f"docs/simulators-process.md lacks: {missing}"


def test_every_fault_kind_and_scenario_field_is_documented() -> None:
    missing = [f"`{k}`" for k in FAULT_PARAMS if f"| `{k}` |" not in DOC]
    for kind, model in FAULT_PARAMS.items():
        missing += [r for r in rows(model, f"`{kind}` | ") if r not in DOC]
    for model in (Scenario, DeviceSpec, FaultSpec):
        missing += [r for r in rows(model) if r not in DOC]
    assert not missing, f"docs/simulators-process.md lacks: {missing}"
