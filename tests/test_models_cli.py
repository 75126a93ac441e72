"""``cleanroom-agent models train|evaluate|score|verify`` end to end, in process, on real
files: CSV folders with labels, the agent's buffer database, altered models."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.cli import main
from agent.core.records import Block
from agent.transforms.anomaly.manifest import read_manifest
from tests.test_modelkit import FAULT, SIGNALS, T0, private_copy, series, trained_model, write_csv


@pytest.fixture(scope="session")
def syn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model(tmp_path_factory)


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--log-level", "WARNING", "models", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_train_from_a_folder_excludes_labelled_faults(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_csv(data / "dev1.csv", hours=24, seed=21, fault=FAULT)
    write_csv(data / "dev2.csv", hours=24, seed=22)
    (data / "labels.csv").write_text(
        f"kind,device,start,end\ntemp_low,dev1,{T0 + FAULT[0]},{T0 + FAULT[1]}\n"
    )
    code, out, err = run(
        capsys, "train", "--data", str(data), "--out", str(tmp_path / "m"), "--id", "t1", "--window", "12",
        "--exclude-after", "30m", "--units", "temp=degC", "--notes", "unit test",
    )  # fmt: skip
    assert code == 0, err
    m = read_manifest(tmp_path / "m" / "t1.model.yaml")
    assert "model t1 1.0.0 sha256 " + m.sha256 in out
    assert m.provenance.excluded_rows == int((FAULT[1] - FAULT[0] + 1800) / 10) + 1
    assert (
        m.provenance.rows == 2 * 24 * 360 - m.provenance.excluded_rows and m.provenance.notes == "unit test"
    )
    assert "dev1.csv" in m.provenance.source and "dev2.csv" in m.provenance.source


def test_evaluate_score_and_verify(
    syn_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = private_copy(syn_model, tmp_path)
    data = tmp_path / "eval"
    data.mkdir()
    write_csv(data / "dev1.csv", hours=10, seed=31, fault=FAULT)
    (data / "labels.csv").write_text(
        "kind,device,start,end\n"
        f"temp_low,dev1,{T0 + FAULT[0]},{T0 + FAULT[1]}\ncomm_timeout,dev1,{T0},{T0 + 60}\n"
    )
    code, out, err = run(
        capsys,
        "evaluate",
        "--model",
        str(model),
        "--data",
        str(data),
        "--plots",
        str(tmp_path / "png"),
        "--record",
        "--actor",
        "qa",
        "--reason",
        "test",
    )
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["faults"] == 1 and metrics["f1"] == 1.0 and metrics["false_alarms"] == 0
    assert (tmp_path / "png" / "dev1.png").read_bytes()[:4] == b"\x89PNG"
    assert read_manifest(model).validation["eval_f1"] == 1.0

    code, out, err = run(
        capsys,
        "score",
        "--model",
        str(model),
        "--csv",
        str(data / "dev1.csv"),
        "--out",
        str(tmp_path / "s.csv"),
    )
    assert code == 0, err
    rows = list(csv.DictReader((tmp_path / "s.csv").open()))
    assert list(rows[0]) == ["timestamp", "score", "alarm", "top_signal"]
    alarmed = [r for r in rows if r["alarm"] == "1"]
    assert alarmed and alarmed[0]["top_signal"] == "temp"
    assert alarmed[0]["timestamp"].startswith("2026-01-05T05:0")

    code, out, _ = run(capsys, "verify", str(model.parent))
    assert code == 0 and out.startswith("ok ")
    onnx_file = model.parent / "syn-pca.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes()[:-8])
    code, out, _ = run(capsys, "verify", str(model.parent))
    assert code == 1 and "MISMATCH" in out and "refusing to load it" in out


def test_train_from_the_agent_buffer(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    buf = Buffer(BufferConfig(path=tmp_path / "buffer.db", synchronous="off"), agent_id="gw1")
    buf.open()
    t, v = series(12, 41)
    blocks = [
        Block("bio1", "process", int(ts * 1e9), list(SIGNALS), [None] * 3, [float(x) for x in row])
        for ts, row in zip(t, v, strict=True)
    ]
    for i in range(0, len(blocks), 500):
        buf.commit(blocks[i : i + 500])
    buf.close()
    db, out = str(tmp_path / "buffer.db"), str(tmp_path / "m")
    code, _, err = run(
        capsys, "train", "--buffer", db, "--device", "bio1", "--signals", ",".join(SIGNALS),
        "--since", "2026-01-05T01:00:00Z", "--out", out, "--id", "from-buffer", "--window", "12",
    )  # fmt: skip
    assert code == 0, err
    m = read_manifest(tmp_path / "m" / "from-buffer.model.yaml")
    assert m.provenance.start == "2026-01-05T01:00:00Z" and m.provenance.rows == 11 * 360
    assert m.signal_names == list(SIGNALS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["train", "--csv", "missing.csv", "--out", "o"], "missing.csv: cannot read"),
        (["train", "--buffer", "nope.db", "--device", "x", "--out", "o"], "nope.db: no buffer database"),
        (["train", "--out", "o"], "no data: give --csv FILE or --data FOLDER"),
        (["score", "--model", "none.model.yaml", "--csv", "x.csv", "--out", "o.csv"], "cannot read manifest"),
        (["verify", "empty"], "no *.model.yaml found"),
        (["train", "--envelope", "age>1", "--out", "o"], "envelope condition 'age>1': write SIGNAL>=MIN"),
    ],
)
def test_bad_input_is_one_clear_line_and_exit_2(
    args: list[str],
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "empty").mkdir()
    code, _, err = run(capsys, *args)
    assert code == 2
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_wrong_signal_column_names_the_columns(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_csv(tmp_path / "a.csv", hours=1)
    code, _, err = run(
        capsys, "train", "--csv", str(tmp_path / "a.csv"), "--signals", "temp,rpm", "--out", "o"
    )
    assert code == 2 and "no column(s) rpm; columns are timestamp, temp, ph, do" in err


def test_shipped_models_verify_and_carry_their_evaluation(capsys: pytest.CaptureFixture[str]) -> None:
    models = Path(__file__).resolve().parent.parent / "models"
    code, out, _ = run(capsys, "verify", str(models))
    assert code == 0 and out.count("ok ") == 3
    for kind in ("bioreactor", "incubator", "particle-counter"):
        m = read_manifest(models / f"{kind}-pca.model.yaml")
        assert m.validation["eval_faults"] and m.validation["eval_f1"] is not None
        # provenance names what the data were generated from, never a build machine's scratch path
        assert m.provenance.source.startswith("models/data/train.yaml")
        assert str(m.validation["eval_data"]).startswith("models/data/eval.yaml")
        assert (
            f"sha256 `{m.sha256}`" in (models / f"{kind}-pca.md").read_text()
        )  # the card describes this file


def test_train_with_an_envelope_and_score_with_it(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The envelope's column is not a model input (default signals exclude it) but travels
    with the data into scoring; a CSV without it is one clear error."""
    plain = write_csv(tmp_path / "plain.csv", hours=24, seed=41)
    lines = plain.read_text().splitlines()
    with_age = tmp_path / "dev.csv"
    rows = [f"{r},{0.5 if i < 360 else 1 + i / 360}" for i, r in enumerate(lines[1:])]  # outside for 1 h
    with_age.write_text("\n".join([lines[0] + ",age_h", *rows]) + "\n")
    code, _, err = run(
        capsys, "train", "--csv", str(with_age), "--envelope", "age_h>=1", "--out", str(tmp_path / "m"),
        "--id", "env", "--window", "12", "--source", "unit data",
    )  # fmt: skip
    assert code == 0, err
    m = read_manifest(tmp_path / "m" / "env.model.yaml")
    assert m.signal_names == list(SIGNALS) and [str(c) for c in m.envelope] == ["1 <= age_h"]
    assert m.provenance.source == "unit data"
    code, _, err = run(
        capsys, "score", "--model", str(tmp_path / "m" / "env.model.yaml"), "--csv", str(with_age),
        "--out", str(tmp_path / "s.csv"),
    )  # fmt: skip
    assert code == 0, err
    scored = (tmp_path / "s.csv").read_text().splitlines()[1:]
    assert all(r.split(",")[1] == "" for r in scored[:360])  # the first hour is outside: not scored
    assert all(r.split(",")[1] != "" for r in scored[400:])
    code, _, err = run(
        capsys, "train", "--csv", str(plain), "--envelope", "age_h>=1", "--out", str(tmp_path / "n")
    )
    assert code == 2 and "no column age_h for the envelope" in err
