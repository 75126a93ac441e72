"""Device profiles found by name, the one way the agent and the simulators both find them.

A profile is a YAML file whose ``profile:`` key is its name. Folders are searched in
order: a site's own folders first, then the profiles shipped in the package, so a site
can replace a shipped profile by writing one of the same name. Two files of a site's
folders claiming the same name are a mistake (which one was meant?), never a silent pick.
Files are parsed through :func:`~cleanroom_common.yamlfile.read_yaml`, once per content.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cleanroom_common.bundled import profiles_dir
from cleanroom_common.yamlfile import YamlDoc, YamlError, read_yaml


@dataclass(frozen=True)
class ProfileFile:
    """A file that declares a profile, before any driver has validated it."""

    name: str
    doc: YamlDoc

    @property
    def path(self) -> Path:
        return self.doc.path

    @property
    def protocol(self) -> str | None:
        protocol = self.doc.data.get("protocol")
        return None if protocol is None else str(protocol)


@dataclass
class ProfileIndex:
    """Every profile the search folders hold, and every file or folder that could not be used."""

    profiles: dict[str, ProfileFile] = field(default_factory=dict)
    errors: list[YamlError] = field(default_factory=list)


def search_dirs(site_dirs: Sequence[Path] = ()) -> list[Path]:
    """The site's folders in their order, then the shipped profiles (each folder once)."""
    out: list[Path] = []
    for d in [*site_dirs, profiles_dir()]:
        if all(d.absolute() != o.absolute() for o in out):
            out.append(d)
    return out


def index_profiles(site_dirs: Sequence[Path] = ()) -> ProfileIndex:
    """The profiles of ``site_dirs`` and of the package, by name (see the module docstring)."""
    index = ProfileIndex()
    bundled = profiles_dir()
    for d in search_dirs(site_dirs):
        if not d.is_dir():
            index.errors.append(YamlError(d, "profiles folder does not exist"))
            continue
        for f in sorted(d.glob("*.yaml")):
            try:
                doc = read_yaml(f)
            except YamlError as exc:
                index.errors.append(exc)
                continue
            if not isinstance(doc.data, dict) or "profile" not in doc.data:
                continue
            name = str(doc.data["profile"])
            earlier = index.profiles.get(name)
            if earlier is None:
                index.profiles[name] = ProfileFile(name, doc)
            elif d != bundled:
                index.errors.append(YamlError(f, f"profile {name!r} is also defined in {earlier.path}"))
    return index


def load_profile(name_or_path: str | Path) -> dict[str, Any]:
    """A profile's content, named by a path (``*.yaml``) or by its name among the shipped
    profiles. Raises :class:`ValueError` naming the problem. The mapping is shared: read it only."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        data = read_yaml(path).data
    else:
        profiles = index_profiles().profiles
        if str(name_or_path) not in profiles:
            known = ", ".join(sorted(profiles))
            raise ValueError(f"no profile {str(name_or_path)!r} (known: {known})")
        data = profiles[str(name_or_path)].doc.data
    if not isinstance(data, dict) or "tags" not in data:
        raise ValueError(f"{path}: not a device profile (no 'tags')")
    return data
