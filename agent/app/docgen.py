"""Render the configuration reference from the config models themselves.

``docs/configuration.md`` holds hand-written guidance plus a generated reference
between two markers; ``python -m agent.app.docgen --write`` regenerates it and a test
fails when it is stale, so the docs cannot drift from the code (Telegraf/Vector rule:
the config type is the documentation).
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

BEGIN = "<!-- BEGIN GENERATED REFERENCE (python -m agent.app.docgen --write) -->"
END = "<!-- END GENERATED REFERENCE -->"
TOP = "(top level)"
DOC = Path("docs", "configuration.md")
"""The reference in the repository, from its root (where ``make`` and the tests run): a
development tool's target, not a file of the installed package."""


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Annotated:
        base = _type_name(args[0])
        meta = " ".join(
            getattr(m, "func", m).__name__ for m in args[1:] if hasattr(getattr(m, "func", m), "__name__")
        )
        if "parse_duration" in meta:
            return "duration"
        if "parse_size" in meta:
            return "size"
        return base
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in args)
    if origin is typing.Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join(_type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _field_type(f: FieldInfo) -> str:
    """The type as a user writes it: ``duration`` and ``size`` rather than float/int."""
    for meta in f.metadata:
        name = getattr(getattr(meta, "func", None), "__name__", "")
        if name == "parse_duration":
            return "duration"
        if name == "parse_size":
            return "size"
    return _type_name(f.annotation)


def _default(f: FieldInfo) -> str:
    if f.is_required():
        return "**required**"
    if f.default_factory is not None:
        try:
            value = f.default_factory()  # type: ignore[call-arg]
        except TypeError:
            return "(computed)"
    else:
        value = f.default
    if value is PydanticUndefined:
        return "**required**"
    if isinstance(value, BaseModel):
        return "(see below)"
    if hasattr(value, "get_secret_value"):
        return "(secret)"
    text = repr(value)
    if isinstance(value, Path | list):
        text = repr([str(p) for p in value] if isinstance(value, list) else str(value))
    if _field_type(f) == "duration":
        text = f"{value:g} s"
    return f"`{text}`"


def _models_in(tp: Any) -> list[type[BaseModel]]:
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return [tp]
    out: list[type[BaseModel]] = []
    for a in typing.get_args(tp):
        out.extend(_models_in(a))
    return out


def render_model(model: type[BaseModel], key: str, seen: set[type[BaseModel]]) -> list[str]:
    """A table of ``model``'s fields, then a section per nested model."""
    if model in seen:
        return []
    seen.add(model)
    doc = (model.__doc__ or "").strip().split("\n\n")[0].replace("\n", " ")
    lines = [f"### `{key}`", "", doc, "", "| key | type | default | meaning |", "|---|---|---|---|"]
    nested: list[tuple[str, type[BaseModel]]] = []
    for name, f in model.model_fields.items():
        desc = (f.description or "").replace("\n", " ").replace("|", "\\|")
        type_name = _field_type(f).replace("|", "\\|")
        lines.append(f"| `{name}` | {type_name} | {_default(f)} | {desc} |")
        for sub in _models_in(f.annotation):
            nested.append((name if key == TOP else f"{key}.{name}", sub))
    lines.append("")
    for sub_key, sub in nested:
        lines.extend(render_model(sub, sub_key, seen))
    return lines


def render() -> str:
    from agent.app.config import AgentConfig
    from agent.core.driver import ProfileBase, load_drivers

    out = ["## Agent configuration file", ""]
    out += render_model(AgentConfig, TOP, set())
    out += ["## Device profiles", "", "Common to every profile file (`deploy/profiles/*.yaml`):", ""]
    out += render_model(ProfileBase, "profile", set())
    for protocol, driver in sorted(load_drivers().items()):
        seen: set[type[BaseModel]] = {ProfileBase}
        out += [f"## Protocol `{protocol}`", ""]
        out += render_model(driver.Connection, f"devices[].connection ({protocol})", seen)
        out += render_model(driver.profile_model(), f"profile ({protocol})", seen)
    return "\n".join(out).rstrip() + "\n"


def splice(text: str, generated: str) -> str:
    if BEGIN not in text or END not in text:
        raise ValueError(f"{DOC} lacks the generated-reference markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    return f"{head}{BEGIN}\n\n{generated}\n{END}{tail}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"update {DOC}")
    args = parser.parse_args()
    generated = render()
    if args.write:
        DOC.write_text(splice(DOC.read_text(), generated))
    else:
        sys.stdout.write(generated)
    return 0


if __name__ == "__main__":
    sys.exit(main())
