"""The offline bundle as an operator uses it: built once for this machine's platform and
Python (``build.py --host-only``, downloads through pip's cache), checked against its
``SHA256SUMS``, installed into a temporary staging root with pip cut off from every network,
run (``--version``, ``validate``), upgraded in place and uninstalled.

The staging root (``install.sh --prefix DIR``) is the same code path as a gateway install,
less the system user, file ownership and systemctl, which need the real root; modes are
checked, owners are not. Building needs PyPI (or a pip cache that already holds the locked
wheels): without them the build fails with pip's reason, it is never skipped.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import tarfile
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import pytest
from packaging.requirements import Requirement

from tests.support import CertAuthority

ROOT = Path(__file__).resolve().parent.parent
DEPLOY = ROOT / "deploy"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
UNREACHABLE = "http://127.0.0.1:9"
"""A proxy and an index nobody listens on: any attempt of pip to reach a network fails."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


def _load_build() -> ModuleType:
    spec = importlib.util.spec_from_file_location("bundle_build", DEPLOY / "bundle" / "build.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bundle_build"] = module
    spec.loader.exec_module(module)
    return module


build = _load_build()


def _offline_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(
        PIP_NO_INDEX="1",
        PIP_INDEX_URL=UNREACHABLE,
        PIP_FIND_LINKS="",
        HTTP_PROXY=UNREACHABLE,
        HTTPS_PROXY=UNREACHABLE,
        http_proxy=UNREACHABLE,
        https_proxy=UNREACHABLE,
        NO_PROXY="",
        no_proxy="",
    )
    return env


@dataclass
class Staged:
    """A staging root and the bundle it was installed from."""

    bundle: Path
    root: Path

    @property
    def opt(self) -> Path:
        return self.root / "opt" / "cleanroom-edge"

    @property
    def etc(self) -> Path:
        return self.root / "etc" / "cleanroom-edge"

    @property
    def var(self) -> Path:
        return self.root / "var" / "lib" / "cleanroom-edge"

    def install(self, *args: str, bundle: Path | None = None) -> subprocess.CompletedProcess[str]:
        script = (bundle or self.bundle) / "install.sh"
        return _run([str(script), "--prefix", str(self.root), "--python", sys.executable, *args])

    def uninstall(self, *args: str) -> subprocess.CompletedProcess[str]:
        return _run([str(self.opt / "uninstall.sh"), "--prefix", str(self.root), *args])

    def agent(self, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return _run([str(self.opt / "venv" / "bin" / "cleanroom-agent"), *args], env=env, timeout=60)


def _run(
    argv: list[str], env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv,
        cwd="/",
        env=env or _offline_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [sys.executable, str(DEPLOY / "bundle" / "build.py"), "--host-only", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=420,
        check=False,
    )
    if result.returncode != 0:
        pytest.fail(f"building the bundle failed (needs PyPI or pip's cache):\n{result.stderr[-3000:]}")
    return out / f"cleanroom-edge-{VERSION}-bundle"


@pytest.fixture(scope="module")
def staged(bundle: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Staged]:
    s = Staged(bundle, tmp_path_factory.mktemp("stage"))
    result = s.install()
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"installed cleanroom-edge {VERSION}" in result.stdout
    yield s


def test_lock_pins_every_dependency_with_hashes_for_every_target() -> None:
    pins = build.read_lock()
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    header = (DEPLOY / "requirements.lock").read_text().splitlines()[:6]
    assert any(build.LOCK_COMMAND in line for line in header), "regeneration command not in the header"
    targets = [build.Target(a, p) for a in ("x86_64", "aarch64") for p in ("3.11", "3.12", "3.13")]
    for target in targets:
        pinned = {}
        for pin in pins:
            if pin.applies(target):
                requirement = Requirement(pin.line.split(" --hash=", 1)[0])
                assert len(requirement.specifier) == 1 and next(iter(requirement.specifier)).operator == "=="
                assert requirement.name not in pinned, f"{requirement.name} pinned twice for {target.name}"
                # pip would evaluate a marker for the Python running the download, not the target's
                assert ";" not in pin.unconditional().split(" --hash=", 1)[0]
                pinned[requirement.name] = requirement
        for spec in declared:
            dependency = Requirement(spec)
            name = re.sub(r"[-_.]+", "-", dependency.name).lower()
            assert name in pinned, f"{name} not pinned for {target.name}"
            version = next(iter(pinned[name].specifier)).version
            assert dependency.specifier.contains(version), f"{name}=={version} outside {dependency.specifier}"


def test_bundle_has_every_part_and_matching_sums(bundle: Path) -> None:
    for name in ("install.sh", "uninstall.sh", "requirements.lock", "cleanroom-agent.service", "agent.yaml"):
        assert (bundle / name).is_file(), name
    assert os.access(bundle / "install.sh", os.X_OK)
    assert (bundle / f"cleanroom_edge-{VERSION}-py3-none-any.whl").is_file()
    listed = {}
    for line in (bundle / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split("  ", 1)
        listed[name] = digest
    files = {p.relative_to(bundle).as_posix() for p in bundle.rglob("*") if p.is_file()} - {"SHA256SUMS"}
    assert set(listed) == files
    for name, digest in listed.items():
        assert hashlib.sha256((bundle / name).read_bytes()).hexdigest() == digest, name
    wheels = [n for n in files if n.startswith("wheels/")]
    assert any("onnxruntime" in n for n in wheels) and any("numpy" in n for n in wheels)
    with tarfile.open(f"{bundle}.tar.gz") as tar:
        packed = {m.name for m in tar.getmembers() if m.isfile()}
    assert packed == {f"{bundle.name}/{n}" for n in [*files, "SHA256SUMS"]}


def test_altered_bundle_is_refused_and_installs_nothing(bundle: Path, tmp_path: Path) -> None:
    altered = tmp_path / "bundle"
    shutil.copytree(bundle, altered, copy_function=os.link)
    lock = altered / "requirements.lock"
    text = lock.read_text()
    lock.unlink()  # a new file: the hard link to the real bundle's lock stays intact
    lock.write_text(text + "evil==1.0 --hash=sha256:" + "0" * 64 + "\n")
    root = tmp_path / "root"
    result = _run([str(altered / "install.sh"), "--prefix", str(root), "--python", sys.executable])
    assert result.returncode == 1
    assert "does not match its SHA256SUMS" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (root / "opt").exists()


def test_install_lays_out_folders_modes_and_unit(staged: Staged) -> None:
    assert (staged.opt / "venv").is_symlink()
    assert (staged.opt / "venv" / "bin" / "cleanroom-agent").is_file()
    assert (staged.opt / "docs" / "operations.md").is_file()
    assert (staged.root / "etc" / "systemd" / "system" / "cleanroom-agent.service").read_text() == (
        DEPLOY / "systemd" / "cleanroom-agent.service"
    ).read_text()
    assert (staged.etc / "agent.yaml").read_text() == (DEPLOY / "examples" / "agent.yaml").read_text()
    assert _mode(staged.etc) == 0o750
    assert _mode(staged.etc / "agent.yaml") == 0o640
    assert _mode(staged.var) == 0o700
    # The OPC UA application certificate the example configuration names, its key private.
    assert (staged.etc / "opcua" / "cert.der").is_file()
    assert _mode(staged.etc / "opcua" / "key.pem") == 0o600
    assert (staged.etc / "opcua" / "trusted").is_dir()


def test_installed_agent_runs_and_validates_the_example(staged: Staged, tmp_path: Path) -> None:
    version = staged.agent("--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"cleanroom-edge {VERSION}"
    # The example names /etc and /var/lib paths: point them into the staging root, and supply
    # what an operator adds (the broker's CA, the gateway's client certificate, the password).
    ca = CertAuthority(staged.etc / "tls", "ca")
    ca.issue("gw-suite-b", client=True)
    config = (staged.etc / "agent.yaml").read_text()
    for path in ("/etc/cleanroom-edge", "/var/lib/cleanroom-edge"):
        config = config.replace(path, f"{staged.root}{path}")
    (tmp_path / "agent.yaml").write_text(config)
    env = {**_offline_env(), "MQTT_PASSWORD": "s3cret-install-test"}
    result = staged.agent("validate", str(tmp_path / "agent.yaml"), env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "s3cret-install-test" not in result.stdout + result.stderr


def test_upgrade_keeps_config_and_data_then_uninstall_keeps_data_unless_purge(staged: Staged) -> None:
    config = staged.etc / "agent.yaml"
    config.write_text(config.read_text() + "# edited on site\n")
    buffer = staged.var / "buffer.db"
    buffer.write_bytes(b"undelivered readings")
    key = staged.etc / "opcua" / "key.pem"
    key_bytes = key.read_bytes()
    loose_key = staged.etc / "tls" / "loose.key"  # a key an operator left world-readable
    loose_key.parent.mkdir(exist_ok=True)
    loose_key.write_text("not really a key\n")
    loose_key.chmod(0o644)
    first = (staged.opt / "venv").readlink()

    upgrade = staged.install()
    assert upgrade.returncode == 0, upgrade.stdout[-2000:] + upgrade.stderr[-3000:]
    assert f"kept {config}" in upgrade.stdout
    assert config.read_text().endswith("# edited on site\n")
    assert (staged.etc / "agent.yaml.example").read_text() == (DEPLOY / "examples" / "agent.yaml").read_text()
    assert buffer.read_bytes() == b"undelivered readings"
    assert key.read_bytes() == key_bytes
    assert _mode(loose_key) == 0o600
    second = (staged.opt / "venv").readlink()
    assert second != first
    assert sorted(p.name for p in (staged.opt / "venvs").iterdir()) == sorted([first.name, second.name])
    assert staged.agent("--version").stdout.strip() == f"cleanroom-edge {VERSION}"

    removed = staged.uninstall()
    assert removed.returncode == 0, removed.stderr
    assert not staged.opt.exists()
    assert not (staged.root / "etc" / "systemd" / "system" / "cleanroom-agent.service").exists()
    assert buffer.read_bytes() == b"undelivered readings"
    assert config.read_text().endswith("# edited on site\n")

    purge = _run([str(staged.bundle / "uninstall.sh"), "--prefix", str(staged.root), "--purge"])
    assert purge.returncode == 0, purge.stderr
    assert not staged.etc.exists() and not staged.var.exists()


def test_containerfile_builds_from_the_bundle_only() -> None:
    lines = []
    for raw in (DEPLOY / "container" / "Containerfile").read_text().replace("\\\n", " ").splitlines():
        if raw.strip() and not raw.lstrip().startswith("#"):
            lines.append(raw.strip())
    instructions = [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in lines]
    froms = [arg for op, arg in instructions if op == "FROM"]
    assert froms and all(re.search(r"@sha256:[0-9a-f]{64}\b", f) for f in froms), froms
    assert not [arg for op, arg in instructions if op == "ADD"]
    for op, arg in instructions:
        if op == "COPY":
            sources = [w for w in arg.split() if not w.startswith("--")][:-1]
            assert sources and all(
                re.fullmatch(r"cleanroom-edge-\$\{?VERSION\}?-bundle/?", s) for s in sources
            )
        if op == "RUN":
            for mount in re.findall(r"--mount=(\S+)", arg):
                assert re.search(r"source=cleanroom-edge-\$\{?VERSION\}?-bundle(,|$)", mount), mount
            assert "pip install" not in arg, "installs only through install.sh"
    runs = " ".join(arg for op, arg in instructions if op == "RUN")
    assert "install.sh --prefix /" in runs
    users = [arg for op, arg in instructions if op == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
