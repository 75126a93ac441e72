"""Build the offline install bundle, or regenerate the lock file it is built from.

    .venv/bin/python deploy/bundle/build.py              # linux x86_64 + aarch64, CPython 3.11-3.13
    .venv/bin/python deploy/bundle/build.py --host-only  # this machine's platform and Python only (tests)
    .venv/bin/python deploy/bundle/build.py --lock       # regenerate deploy/requirements.lock (needs uv)

A gateway is often air-gapped and must get the same dependency versions whenever it is
installed, so the bundle holds every wheel the lock file names for each target, checked
against the lock's hashes as pip downloads them. pip evaluates environment markers against
the interpreter that runs it, not against ``--platform``/``--python-version``, so the lock's
markers are evaluated here for each target and pip gets only that target's lines.

Downloads go through pip's cache: a second build (or the test's) downloads nothing new.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from dataclasses import dataclass
from pathlib import Path

from packaging.markers import Marker

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "deploy" / "requirements.lock"
LOCK_ENV = Path(__file__).resolve().parent / "lock-env"
"""Holds only the uv settings that limit the universal resolution to the bundle's targets."""

ARCHES = ("x86_64", "aarch64")
PYTHONS = ("3.11", "3.12", "3.13")
GLIBC_MAX = 28
"""Newest glibc a wheel may require: 2.28 runs on Debian 10+, RHEL 8+, Ubuntu 20.04+."""

SOURCE_ONLY = {".git", ".venv", "tests", "bench", "build", "dist", ".ci"}
"""Repository folders the wheel is never built from (caches are left out by pattern)."""

LOCK_COMMAND = ".venv/bin/python deploy/bundle/build.py --lock"
UV_COMMAND = (
    "cd deploy/bundle/lock-env && uv pip compile ../../../pyproject.toml --universal --python-version 3.11"
    " --only-binary :all: --generate-hashes --no-header -o ../../requirements.lock"
)


class BundleError(Exception):
    """A build step failed; the message says which and what to do."""


@dataclass(frozen=True)
class Target:
    """One platform and Python the bundle carries wheels for."""

    arch: str
    python: str

    @property
    def name(self) -> str:
        return f"linux-{self.arch}-cp{self.python.replace('.', '')}"

    def platform_tags(self) -> list[str]:
        """Every manylinux tag a gateway with glibc 2.28 accepts: pip matches ``--platform`` exactly."""
        legacy = ["manylinux2014", "manylinux2010", "manylinux1"]
        return [f"manylinux_2_{minor}_{self.arch}" for minor in range(GLIBC_MAX, 4, -1)] + [
            f"{tag}_{self.arch}" for tag in legacy
        ]

    def markers(self) -> dict[str, str]:
        return {
            "sys_platform": "linux",
            "platform_system": "Linux",
            "os_name": "posix",
            "platform_machine": self.arch,
            "platform_python_implementation": "CPython",
            "implementation_name": "cpython",
            "python_version": self.python,
            "python_full_version": f"{self.python}.0",
            "implementation_version": f"{self.python}.0",
        }


@dataclass(frozen=True)
class Pin:
    """One lock entry: ``name==version ; marker`` and its hashes, as one requirements line."""

    line: str
    marker: Marker | None

    def applies(self, target: Target) -> bool:
        return self.marker is None or self.marker.evaluate(target.markers())

    def unconditional(self) -> str:
        """The line without its marker, once :meth:`applies` decided it: pip would evaluate the
        marker for the interpreter running it and silently skip, e.g., a 3.12-only pin."""
        requirement, hashes = self.line.split(" --hash=", 1)
        return f"{requirement.split(';', 1)[0].strip()} --hash={hashes}"


def read_lock(path: Path = LOCK) -> list[Pin]:
    """The lock's entries, each joined onto one line (the file continues them with ``\\``)."""
    joined = re.sub(r"\\\n\s*", " ", path.read_text())
    pins = []
    for raw in joined.splitlines():
        line = raw.split(" #", 1)[0].strip()
        if not line or line.startswith("#"):
            continue
        requirement = line.split(" --hash=", 1)[0]
        if "--hash=sha256:" not in line:
            raise BundleError(f"{path}: {requirement}: no hash (regenerate with {LOCK_COMMAND})")
        marker = Marker(requirement.split(";", 1)[1]) if ";" in requirement else None
        pins.append(Pin(line, marker))
    return pins


def host_target() -> Target:
    arch = platform.machine()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    if arch not in ARCHES or python not in PYTHONS:
        raise BundleError(f"this machine ({arch}, Python {python}) is not a bundle target")
    return Target(arch, python)


def _pip(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input", *args]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def download(target: Target, pins: list[Pin], wheels: Path, work: Path) -> None:
    """Every wheel ``target`` needs, hash-checked by pip against the lock."""
    requirements = work / f"{target.name}.txt"
    requirements.write_text("".join(pin.unconditional() + "\n" for pin in pins if pin.applies(target)))
    result = _pip(
        "download",
        "--only-binary=:all:",
        "--no-deps",
        "--require-hashes",
        *(f"--platform={tag}" for tag in target.platform_tags()),
        f"--python-version={target.python}",
        "--implementation=cp",
        "-d",
        str(wheels),
        "-r",
        str(requirements),
    )
    if result.returncode != 0:
        tail = "\n".join((result.stdout + result.stderr).strip().splitlines()[-12:])
        raise BundleError(
            f"pip download failed for {target.name} (it needs PyPI, or every wheel in pip's cache):\n{tail}"
        )


def build_wheel(out: Path, work: Path) -> Path:
    """The project's wheel, built from a copy so the checkout gets no build/ or egg-info."""
    src = work / "src"
    caches = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache", ".hypothesis")

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = SOURCE_ONLY if Path(folder) == ROOT else set()
        return top.intersection(names) | caches(folder, names)

    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    result = _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(out), str(src))
    if result.returncode != 0:
        raise BundleError(f"building the project wheel failed:\n{result.stderr[-2000:]}")
    (wheel,) = out.glob("cleanroom_edge-*.whl")
    return wheel


def write_sums(bundle: Path) -> None:
    """SHA256SUMS over every file, in ``sha256sum --check`` format, paths relative to the bundle."""
    lines = []
    for path in sorted(p for p in bundle.rglob("*") if p.is_file() and p.name != "SHA256SUMS"):
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        lines.append(f"{digest}  {path.relative_to(bundle).as_posix()}\n")
    (bundle / "SHA256SUMS").write_text("".join(lines))


def build(out_dir: Path, targets: list[Target], tarball: bool) -> Path:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    bundle = out_dir / f"cleanroom-edge-{version}-bundle"
    if bundle.exists():
        shutil.rmtree(bundle)
    (bundle / "wheels").mkdir(parents=True)
    pins = read_lock()
    with tempfile.TemporaryDirectory(prefix="cleanroom-bundle-") as tmp:
        work = Path(tmp)
        for target in targets:
            print(f"wheels for {target.name}", flush=True)
            download(target, pins, bundle / "wheels", work)
        build_wheel(bundle, work)
    for source, mode in (
        (ROOT / "deploy" / "install.sh", 0o755),
        (ROOT / "deploy" / "uninstall.sh", 0o755),
        (LOCK, 0o644),
        (ROOT / "deploy" / "systemd" / "cleanroom-agent.service", 0o644),
        (ROOT / "deploy" / "examples" / "agent.yaml", 0o644),
    ):
        shutil.copyfile(source, bundle / source.name)
        (bundle / source.name).chmod(mode)
    (bundle / "TARGETS").write_text("".join(f"{t.arch} {t.python}\n" for t in targets))
    write_sums(bundle)
    if tarball:
        with tarfile.open(f"{bundle}.tar.gz", "w:gz") as tar:
            tar.add(bundle, arcname=bundle.name)
    return bundle


def lock() -> None:
    """Regenerate the lock with uv's universal resolver, limited to the bundle's targets."""
    uv = shutil.which("uv", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if uv is None:
        raise BundleError("uv is not installed: .venv/bin/pip install uv")
    result = subprocess.run(
        [
            uv,
            "pip",
            "compile",
            str(ROOT / "pyproject.toml"),
            "--universal",
            "--python-version",
            "3.11",
            "--only-binary",
            ":all:",
            "--generate-hashes",
            "--no-header",
        ],
        cwd=LOCK_ENV,
        capture_output=True,
        text=True,
        check=False,
    )
    if result.returncode != 0:
        raise BundleError(f"uv pip compile failed:\n{result.stderr[-3000:]}")
    header = (
        "# Every runtime dependency of cleanroom-edge, pinned with hashes, for linux x86_64 and aarch64,\n"
        "# CPython 3.11-3.13 (deploy/bundle/lock-env/pyproject.toml limits the resolution to them).\n"
        f"# Regenerate (uv in .venv: .venv/bin/pip install uv): {LOCK_COMMAND}\n"
        f"# which runs: {UV_COMMAND}\n"
        "# then commit this file and rebuild the bundle (make bundle).\n"
    )
    LOCK.write_text(header + result.stdout)
    print(f"wrote {LOCK.relative_to(ROOT)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--host-only", action="store_true", help="wheels for this machine's platform and Python"
    )
    parser.add_argument("--out", type=Path, default=ROOT / "dist", help="output folder (default dist/)")
    parser.add_argument("--no-tarball", action="store_true", help="leave out the .tar.gz")
    parser.add_argument("--lock", action="store_true", help="regenerate deploy/requirements.lock and stop")
    args = parser.parse_args(argv)
    try:
        if args.lock:
            lock()
            return 0
        host_only = args.host_only or os.environ.get("BUNDLE_HOST_ONLY") == "1"
        targets = [host_target()] if host_only else [Target(a, p) for a in ARCHES for p in PYTHONS]
        bundle = build(args.out, targets, tarball=not args.no_tarball)
    except BundleError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"bundle: {bundle}" + ("" if args.no_tarball else f" and {bundle}.tar.gz"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
