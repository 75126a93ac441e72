"""Where the data files shipped inside the installed package are.

A gateway never runs from a checkout: every data file the agent or the simulators read
by default comes from the installed package through :mod:`importlib.resources`. pip
installs wheels unpacked, so the resource folders are real directories and are returned
as :class:`~pathlib.Path` (the rest of the code globs and opens them like any folder).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path


def package_dir(package: str, *parts: str) -> Path:
    """A folder or file shipped inside ``package`` (e.g. ``("agent.bundled", "models")``)."""
    return Path(str(resources.files(package).joinpath(*parts)))


def profiles_dir() -> Path:
    """The bundled device profiles (the repository's ``deploy/profiles``)."""
    return package_dir("cleanroom_common", "profiles")
