"""``cleanroom-agent init DIR``: a starting point that validates, and never an overwrite."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.app.config import load_config
from agent.cli import main
from agent.cli.init import starter_files


def test_init_writes_a_config_that_validates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    site = tmp_path / "new" / "site"
    assert main(["init", str(site)]) == 0
    out = capsys.readouterr().out
    assert {f.as_posix() for f in starter_files()} == {"agent.yaml", "plant.yaml", "profiles/README.md"}
    for f in starter_files():
        assert (site / f).is_file() and f"wrote {site / f}" in out

    assert main(["validate", str(site / "agent.yaml")]) == 0
    loaded = load_config(site / "agent.yaml")
    # relative paths of the written file are relative to it, wherever the agent starts
    assert loaded.config.buffer.path == site / "buffer.db"
    assert loaded.config.profiles_dirs == [site / "profiles"]
    assert [d.id for d in loaded.devices] == ["br-01", "inc-01", "pc-01"]
    # the starter has no models/ folder: the manifest is the one shipped with the agent
    (binding,) = loaded.config.models
    assert binding.manifest.is_file() and not binding.manifest.is_relative_to(site)


def test_init_refuses_to_overwrite_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "profiles").mkdir()
    (tmp_path / "profiles" / "README.md").write_text("ours\n")
    assert main(["init", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"would overwrite {tmp_path / 'profiles' / 'README.md'}; nothing written" in err
    assert (tmp_path / "profiles" / "README.md").read_text() == "ours\n"
    assert not (tmp_path / "agent.yaml").exists() and not (tmp_path / "plant.yaml").exists()


def test_init_into_a_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = tmp_path / "agent.yaml"
    target.write_text("")
    assert main(["init", str(target)]) == 2
    assert f"init: {target} exists and is not a folder" in capsys.readouterr().err


def test_a_site_profile_replaces_a_shipped_one_of_the_same_name(tmp_path: Path) -> None:
    assert main(["init", str(tmp_path)]) == 0
    shipped = load_config(tmp_path / "agent.yaml").profiles["bioreactor-sim"]
    own = tmp_path / "profiles" / "bioreactor.yaml"
    own.write_text(shipped.read_text())
    loaded = load_config(tmp_path / "agent.yaml")
    assert loaded.profiles["bioreactor-sim"] == own
    assert loaded.devices[0].profile_path == own
