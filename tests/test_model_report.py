"""``models evaluate --report``: the HTML evaluation report of a shipped model on simulator
ground truth, with its plots and confusion counts; data-derived names are escaped; without
matplotlib the command says what to install."""

from __future__ import annotations

import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from PIL import Image

from agent.cli import main
from agent.modeltools.csvdata import load_csv, load_labels
from agent.modeltools.evaluate import evaluate
from agent.modeltools.report import worst_events
from agent.transforms.anomaly.manifest import read_manifest, write_manifest
from agent.transforms.anomaly.model import LoadedModel
from simulators.process.generate import generate
from simulators.process.scenario import Scenario

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "models" / "incubator-pca.model.yaml"
HOSTILE_DEVICE = "inc<b>&'1"
HOSTILE_SIGNAL = "<script>alert('x')</script>"


@pytest.fixture(scope="module")
def incubator_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """5 h of simulated incubator with a 1-minute door opening at 3 h (``inc1.csv``, ``labels.csv``)."""
    out = tmp_path_factory.mktemp("inc")
    scn = Scenario.model_validate(
        {"devices": [{"id": "inc1", "kind": "incubator", "faults": ["door_open@3h+1m"]}]}
    )
    generate(scn, 5, 77, out, period_s=5)
    return out


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--log-level", "WARNING", "models", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_report_of_a_shipped_model_has_its_plots_and_confusion_counts(
    incubator_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "report"
    code, out, err = run(
        capsys, "evaluate", "--model", str(SHIPPED), "--data", str(incubator_data), "--report", str(report)
    )
    assert code == 0, err
    metrics = json.loads(out)
    assert metrics["report"] == str(report / "report.html")
    html = (report / "report.html").read_text(encoding="utf-8")
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert sorted(re.findall(r'<img src="([^"]+)"', html)) == pngs
    assert {"device-1-score.png", "device-1-signals.png", "event-1-contributions.png"} <= set(pngs)
    for name in pngs:
        with Image.open(report / name) as img:
            assert img.format == "PNG" and img.size[0] > 300
            img.verify()
    # the door opening is found: one fault, detected, and its alarm is the worst event
    assert metrics["faults"] == 1 and metrics["detected"] == 1
    assert "<tr><td>faults detected (an alarm started inside)</td><td>1</td></tr>" in html
    rows = metrics["rows"]
    assert rows["true_positive"] > 0 and rows["scored"] == sum(
        rows[k] for k in ("grace", "true_positive", "false_positive", "false_negative", "true_negative")
    )
    assert (
        f"<tr><td>inside a fault</td><td>{rows['true_positive']}</td><td>{rows['false_negative']}</td></tr>"
    ) in html
    assert (
        f"<tr><td>normal</td><td>{rows['false_positive']}</td><td>{rows['true_negative']}</td></tr>" in html
    )
    assert "1. inc1: " in html and "model incubator-pca 1.0.0 is not approved" in html
    contributions = re.search(r"<tr><th>signal</th><th>contribution</th></tr>(.*?)</table>", html)
    assert contributions is not None
    assert contributions.group(1).count("<tr>") == 5  # every signal was rescored, the top five listed


def test_data_derived_names_are_escaped(
    incubator_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A device id (a file name) and a signal name (a CSV column) written as HTML."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    m = read_manifest(SHIPPED)
    shutil.copy2(SHIPPED.parent / m.file, model_dir / m.file)
    signals = [
        s.model_copy(update={"name": HOSTILE_SIGNAL}) if s.name == "temperature_c" else s for s in m.signals
    ]
    write_manifest(model_dir / SHIPPED.name, m.model_copy(update={"signals": signals}))
    data = tmp_path / "data"
    data.mkdir()
    text = (incubator_data / "inc1.csv").read_text()
    header, body = text.split("\n", 1)
    header = ",".join(
        f'"{HOSTILE_SIGNAL.replace(chr(34), chr(34) * 2)}"' if c == "temperature_c" else c
        for c in header.split(",")
    )
    (data / f"{HOSTILE_DEVICE}.csv").write_text(header + "\n" + body)
    (data / "labels.csv").write_text(
        (incubator_data / "labels.csv").read_text().replace(",inc1,", f',"{HOSTILE_DEVICE}",')
    )
    report = tmp_path / "report"
    code, out, err = run(
        capsys,
        "evaluate",
        "--model",
        str(model_dir / SHIPPED.name),
        "--data",
        str(data),
        "--report",
        str(report),
    )
    assert code == 0, err
    assert json.loads(out)["detected"] == 1
    html = (report / "report.html").read_text(encoding="utf-8")
    assert "<script" not in html and "<b>" not in html
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt;" in html
    assert "inc&lt;b&gt;&amp;&#x27;1" in html
    assert all(re.fullmatch(r"(device|event)-\d+-\w+\.png", p.name) for p in report.glob("*.png"))


def test_without_matplotlib_the_command_says_what_to_install(
    incubator_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    code, out, err = run(
        capsys,
        "evaluate",
        "--model",
        str(SHIPPED),
        "--data",
        str(incubator_data),
        "--report",
        str(tmp_path / "r"),
    )
    assert code == 2 and out == ""
    need = "plots and reports need matplotlib (the 'train' extra): pip install 'cleanroom-edge[train]'"
    assert err == f"error: {need}\n"
    assert not (tmp_path / "r").exists()


def test_a_report_folder_that_cannot_be_created_is_a_clear_error(
    incubator_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    code, _, err = run(
        capsys,
        "evaluate",
        "--model",
        str(SHIPPED),
        "--data",
        str(incubator_data),
        "--report",
        str(blocker / "r"),
    )
    assert (
        code == 2
        and err.startswith(f"error: {blocker / 'r'}: cannot create the folder")
        and "Traceback" not in err
    )


def test_worst_event_contributions_are_those_the_agent_reported_at_the_peak(incubator_data: Path) -> None:
    """The report rescores only the peak window's rows: it must find the window the agent's own
    run peaked on, with the same contributions the alarm event carried for its top signals."""
    model = LoadedModel(SHIPPED)
    data = {"inc1": load_csv(incubator_data / "inc1.csv", signals=model.manifest.data_names)}
    _, results = evaluate(model, data, load_labels(incubator_data / "labels.csv"))
    (event,) = worst_events(model, results)
    end = next(t for t in results[0].result.transitions if t.phase == "end")
    assert event.peak_score == pytest.approx(end.peak_score, rel=1e-6)
    assert len(event.contributions) == len(model.manifest.signals)
    for top, (name, value) in zip(end.top, event.contributions, strict=False):
        assert (top["signal"], top["contribution"]) == (name, pytest.approx(value, rel=1e-3, abs=1e-4))
