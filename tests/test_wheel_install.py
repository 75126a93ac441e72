"""The built wheel, installed into a fresh virtual environment outside the checkout, works
as a new user would use it: ``--version``, ``init``, ``validate``, ``cleanroom-sim generate``
on a shipped scenario, and ``run`` against ``cleanroom-sim plant`` and a broker.

How it installs without the network, and why this way:

* The wheel is built from a copy of the repository with the build backend already in the
  development environment (``setuptools``, in the ``dev`` extra) and no build isolation, so
  nothing is downloaded and the checkout gets no ``build/`` folder.
* The dependencies are the distributions already installed in the development environment.
  pip cannot turn installed distributions back into wheels, and its cache holds none, so a
  wheelhouse would need the network. Instead the fresh environment sees them through one
  ``.pth`` line naming a folder of links to the development environment's installed
  packages, *without* this project's own editable install (its metadata and import hook).
  The project itself is installed from the wheel alone (``--no-index --no-deps``), and
  ``pip check`` then proves the wheel's declared dependencies are all satisfied there.
* Every command runs with the working directory outside the checkout and without
  ``PYTHONPATH``, and the test asserts the packages are imported from the fresh environment.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import sysconfig
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import Collector, Mosquitto, free_port, wait_for

ROOT = Path(__file__).resolve().parent.parent
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
SOURCE_ONLY = {".git", ".venv", "tests", "bench", "build", "dist", ".ci"}
"""Repository folders the wheel is not built from (caches are left out by pattern)."""

pytestmark = [pytest.mark.slow, pytest.mark.timeout(150)]


@dataclass
class Installed:
    """The fresh environment and a working folder outside the checkout."""

    venv: Path
    work: Path

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        return env

    def run(self, *argv: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(self.venv / "bin" / argv[0]), *argv[1:]],
            cwd=self.work,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def start(self, *argv: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(
                [str(self.venv / "bin" / argv[0]), *argv[1:]],
                cwd=self.work,
                env=self.env,
                stdout=out,
                stderr=subprocess.STDOUT,
            )


def _build_wheel(tmp: Path) -> Path:
    src, dist = tmp / "src", tmp / "dist"
    caches = shutil.ignore_patterns("__pycache__", "*.egg-info", ".*_cache", ".hypothesis")

    def ignore(folder: str, names: list[str]) -> set[str]:
        top = SOURCE_ONLY if Path(folder) == ROOT else set()
        return top.intersection(names) | caches(folder, names)

    shutil.copytree(ROOT, src, symlinks=True, ignore=ignore)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    build = subprocess.run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(dist), str(src)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    (wheel,) = dist.glob("cleanroom_edge-*.whl")
    return wheel


def _dependency_links(tmp: Path) -> Path:
    """Links to every installed distribution of this environment except this project."""
    site = Path(sysconfig.get_paths()["purelib"])
    links = tmp / "deps"
    links.mkdir()
    for entry in site.iterdir():
        name = entry.name.lower()
        if name.startswith(("cleanroom_edge", "__editable__")) or name.endswith(".pth"):
            continue
        (links / entry.name).symlink_to(entry)
    return links


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installed]:
    tmp = tmp_path_factory.mktemp("wheel")
    assert not tmp.is_relative_to(ROOT)
    wheel = _build_wheel(tmp)
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    site = next((venv / "lib").glob("python3*/site-packages"))
    (site / "dependencies.pth").write_text(f"{_dependency_links(tmp)}\n")
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--disable-pip-version-check",
        "--python",
        str(venv / "bin" / "python"),
    ]
    install = subprocess.run(
        [*pip, "install", "--no-index", "--no-deps", str(wheel)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert install.returncode == 0, install.stdout[-2000:] + install.stderr[-2000:]
    check = subprocess.run([*pip, "check"], capture_output=True, text=True, timeout=60, check=False)
    assert check.returncode == 0, f"the wheel's dependencies are not all there:\n{check.stdout}"
    work = tmp / "work"
    work.mkdir()
    yield Installed(venv, work)


def test_the_wheel_holds_our_packages_only_and_runs_from_the_fresh_environment(installed: Installed) -> None:
    probe = installed.run(
        "python",
        "-c",
        "import importlib.util, json, agent, drivers, simulators, cleanroom_common\n"
        "print(json.dumps({'files': [m.__file__ for m in (agent, drivers, simulators, cleanroom_common)],"
        " 'bench': importlib.util.find_spec('bench') is not None,"
        " 'tests': importlib.util.find_spec('tests') is not None}))",
    )
    assert probe.returncode == 0, probe.stderr
    found = json.loads(probe.stdout)
    assert all(Path(f).is_relative_to(installed.venv) for f in found["files"]), found["files"]
    assert not found["bench"] and not found["tests"]

    version = installed.run("cleanroom-agent", "--version")
    assert version.returncode == 0, version.stderr
    assert version.stdout.strip() == f"cleanroom-edge {VERSION}"


def test_init_writes_a_config_that_validates_and_refuses_to_overwrite(installed: Installed) -> None:
    site = installed.work / "site"
    first = installed.run("cleanroom-agent", "init", str(site))
    assert first.returncode == 0, first.stderr
    assert {p.relative_to(site).as_posix() for p in site.rglob("*") if p.is_file()} == {
        "agent.yaml",
        "plant.yaml",
        "profiles/README.md",
    }
    written = (site / "agent.yaml").read_bytes()

    again = installed.run("cleanroom-agent", "init", str(site))
    assert again.returncode == 2
    assert "would overwrite" in again.stderr and str(site / "agent.yaml") in again.stderr
    assert "Traceback" not in again.stderr
    assert (site / "agent.yaml").read_bytes() == written

    valid = installed.run("cleanroom-agent", "validate", str(site / "agent.yaml"))
    assert valid.returncode == 0, valid.stderr
    assert "devices  3" in valid.stdout and "models   1" in valid.stdout


def test_sim_generates_a_shipped_scenario_by_name(installed: Installed) -> None:
    out = installed.work / "generated"
    gen = installed.run(
        "cleanroom-sim", "generate", "--scenario", "incubator-events", "--hours", "0.5", "--out", str(out)
    )
    assert gen.returncode == 0, gen.stderr
    assert (out / "labels.csv").is_file()
    series = [p for p in out.glob("*.csv") if p.name != "labels.csv"]
    assert series and all(len(p.read_text().splitlines()) > 10 for p in series)


def test_run_forwards_readings_from_the_simulated_plant(installed: Installed, tmp_path: Path) -> None:
    site = installed.work / "run-site"
    assert installed.run("cleanroom-agent", "init", str(site)).returncode == 0
    broker = Mosquitto().start()
    collector = Collector(broker.port, "cleanroom/#")
    processes: list[subprocess.Popen[bytes]] = []
    try:
        # the starter's fixed local ports, moved to free ones (tests run side by side)
        ports = {"5020": free_port(), "5021": free_port(), "5022": free_port()}
        status_port = free_port()
        for name in ("agent.yaml", "plant.yaml"):
            text = (site / name).read_text()
            for fixed, free in ports.items():
                text = re.sub(rf"\bport: {fixed}\b", f"port: {free}", text)
            text = text.replace("port: 1883", f"port: {broker.port}")
            text = text.replace("127.0.0.1:8765", f"127.0.0.1:{status_port}")
            (site / name).write_text(text)
        endpoints = tmp_path / "endpoints.json"
        plant = installed.start(
            "cleanroom-sim",
            "plant",
            "--config",
            str(site / "plant.yaml"),
            "--endpoints",
            str(endpoints),
            log=tmp_path / "plant.log",
        )
        processes.append(plant)
        wait_for(lambda: endpoints.exists() or plant.poll() is not None, timeout=30, what="the plant")
        assert plant.poll() is None, (tmp_path / "plant.log").read_text()[-2000:]

        agent = installed.start(
            "cleanroom-agent", "run", "-c", str(site / "agent.yaml"), log=tmp_path / "agent.log"
        )
        processes.append(agent)

        def devices_seen() -> set[str]:
            if agent.poll() is not None:
                raise AssertionError((tmp_path / "agent.log").read_text()[-3000:])
            return {p["device"] for p in collector.json("/data") if any(b["n"] for b in p.get("blocks", []))}

        wait_for(lambda: {"br-01", "inc-01"} <= devices_seen(), timeout=30, what="readings at the broker")
        # the status page's files come from the installed package, not from a checkout
        for path, marker in (("/", b"<html"), ("/app.js", b"fetch"), ("/style.css", b"{")):
            with urllib.request.urlopen(f"http://127.0.0.1:{status_port}{path}", timeout=10) as resp:
                assert resp.status == 200 and marker in resp.read().lower(), path
        agent.send_signal(signal.SIGTERM)
        assert agent.wait(30) == 0, (tmp_path / "agent.log").read_text()[-3000:]
    finally:
        for proc in processes:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(5)
        collector.close()
        broker.close()
