"""Models fail alone (issue 11): a manifest cannot point outside its folder, a graph without
inputs is a validation error, an altered model disables only its own bindings (event, audit,
status) and acquisition never waits for a model to load."""

from __future__ import annotations

import asyncio
import hashlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from agent.app.config import load_config
from agent.app.runtime import Agent
from agent.buffer.audit import Auditor
from agent.cli import main
from agent.core.driver import ProfileBase, TagBase
from agent.core.records import Block, Event, Severity
from agent.transforms import inference
from agent.transforms.anomaly.manifest import ModelError, verify
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.inference import InferenceEngine, ModelBindingConfig
from cleanroom_common.net import free_port
from tests.support import until

SIGNALS = ("temperature_c", "ph")
WINDOW = 4


def tiny_onnx(inputs: bool = True) -> bytes:
    """A graph with the agent's interface (``window`` [N, W, S] -> ``score`` [N], ``contrib``
    [N, S]), or one with no inputs at all."""
    from onnx import TensorProto, helper

    s = len(SIGNALS)
    outputs = [
        helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("contrib", TensorProto.FLOAT, ["N", s]),
    ]
    if inputs:
        ins = [helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", WINDOW, s])]
        nodes = [
            helper.make_node("ReduceMean", ["window"], ["contrib"], axes=[1], keepdims=0),
            helper.make_node("ReduceMean", ["contrib"], ["score"], axes=[1], keepdims=0),
        ]
    else:
        ins = []
        nodes = [
            helper.make_node(
                "Constant", [], ["score"], value=helper.make_tensor("s", TensorProto.FLOAT, [1], [0])
            ),
            helper.make_node(
                "Constant", [], ["contrib"], value=helper.make_tensor("c", TensorProto.FLOAT, [1, s], [0] * s)
            ),
        ]
    model = helper.make_model(
        helper.make_graph(nodes, "tiny", ins, outputs), opset_imports=[helper.make_opsetid("", 13)]
    )
    model.ir_version = 8
    return bytes(model.SerializeToString())


def write_model(
    folder: Path,
    name: str = "tiny",
    *,
    inputs: bool = True,
    file: str | None = None,
    data: bytes | None = None,
) -> Path:
    """A manifest and its ONNX file in ``folder``; ``file`` names the ONNX file in the manifest
    (default: the one written next to it), ``data`` its bytes for the hash."""
    folder.mkdir(parents=True, exist_ok=True)
    onnx_bytes = data if data is not None else tiny_onnx(inputs)
    (folder / f"{name}.onnx").write_bytes(onnx_bytes)
    signal = {"mean": 0.0, "std": 1.0, "normal_low": -1.0, "normal_high": 1.0, "bin_edges": [0.0]}
    manifest = {
        "id": name,
        "version": "1.0.0",
        "file": file or f"{name}.onnx",
        "sha256": hashlib.sha256(onnx_bytes).hexdigest(),
        "method": "pca",
        "intended_use": "tests",
        "device_kind": "bioreactor",
        "signals": [{"name": n, **signal, "bin_fractions": [0.5, 0.5]} for n in SIGNALS],
        "period": "1s",
        "window": WINDOW,
        "threshold": 1000.0,
        "provenance": {
            "source": "test",
            "start": "2024-01-01T00:00:00Z",
            "end": "2024-01-02T00:00:00Z",
            "rows": 10,
            "data_sha256": "0" * 64,
        },
        "tool_version": "0.0.0",
        "created": "2024-01-01T00:00:00Z",
    }
    path = folder / f"{name}.model.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def agent_config(tmp_path: Path, *bindings: str) -> Path:
    """Two Modbus devices on a port nothing listens on (acquisition runs, gets no answer)
    and the given ``models:`` entries."""
    dead = free_port()
    text = (
        f"agent: {{id: gw, status_listen: '127.0.0.1:{free_port()}'}}\nbuffer: {{path: buffer.db}}\n"
        "devices:\n"
        f"  - {{id: br1, profile: bioreactor-sim, connection: {{host: 127.0.0.1, port: {dead}}}}}\n"
        f"  - {{id: br2, profile: bioreactor-sim, connection: {{host: 127.0.0.1, port: {dead}}}}}\n"
        "models:\n" + "".join(f"  - {b}\n" for b in bindings)
    )
    cfg = tmp_path / "agent.yaml"
    cfg.write_text(text)
    return cfg


def validate(cfg: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["validate", str(cfg)])
    out = capsys.readouterr()
    return code, out.out + out.err


# --------------------------------------------------------------------------- the manifest's file


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_model_file_outside_the_manifest_folder_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    outside = tmp_path / "elsewhere" / "x.onnx"
    outside.parent.mkdir()
    data = tiny_onnx()
    outside.write_bytes(data)
    models = tmp_path / "models"
    if where == "parent":
        manifest = write_model(models, file="../elsewhere/x.onnx", data=data)
    elif where == "absolute":
        manifest = write_model(models, file=str(outside), data=data)
    else:
        manifest = write_model(models, file="link.onnx", data=data)
        os.symlink(outside, models / "link.onnx")
    with pytest.raises(ModelError, match="outside"):
        verify(manifest)
    cfg = agent_config(tmp_path, "{manifest: models/tiny.model.yaml, devices: [br1]}")
    code, out = validate(cfg, capsys)
    assert code == 2 and "models[0]" in out and "outside" in out, out


def test_model_file_in_a_subfolder_is_fine(tmp_path: Path) -> None:
    models = tmp_path / "models"
    (models / "onnx").mkdir(parents=True)
    manifest = write_model(models, file="onnx/tiny.onnx")
    (models / "onnx" / "tiny.onnx").write_bytes((models / "tiny.onnx").read_bytes())
    assert verify(manifest)[0].id == "tiny"


# --------------------------------------------------------------------------- the graph


def test_graph_without_inputs_is_a_model_error_not_an_index_error(tmp_path: Path) -> None:
    manifest = write_model(tmp_path / "models", inputs=False)
    with pytest.raises(ModelError, match="no inputs"):
        LoadedModel(manifest)


def test_graph_without_inputs_fails_validate(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write_model(tmp_path / "models", inputs=False)
    cfg = agent_config(tmp_path, "{manifest: models/tiny.model.yaml, devices: [br1]}")
    code, out = validate(cfg, capsys)
    assert code == 2 and "models[0]" in out and "no inputs" in out, out


def test_file_onnxruntime_cannot_load_fails_validate(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_model(tmp_path / "models", data=b"not a graph")
    cfg = agent_config(tmp_path, "{manifest: models/tiny.model.yaml, devices: [br1]}")
    code, out = validate(cfg, capsys)
    assert code == 2 and "models[0]" in out and "onnxruntime cannot load" in out, out


# --------------------------------------------------------------------------- an altered model fails alone


def alter(manifest: Path) -> None:
    onnx_file = manifest.parent / "tiny.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")


def test_altered_model_fails_validate_but_not_the_configuration(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    alter(write_model(tmp_path / "bad"))
    cfg = agent_config(tmp_path, "{manifest: bad/tiny.model.yaml, devices: [br1]}")
    loaded = load_config(cfg)  # what run loads: the agent starts, the model is disabled
    assert [d.id for d in loaded.devices] == ["br1", "br2"]
    code, out = validate(cfg, capsys)
    assert code == 2 and "models[0]" in out and "sha256" in out, out


async def test_altered_model_disables_only_its_binding_while_acquisition_runs(tmp_path: Path) -> None:
    write_model(tmp_path / "good")
    alter(write_model(tmp_path / "bad"))
    cfg = agent_config(
        tmp_path,
        "{manifest: good/tiny.model.yaml, devices: [br1]}",
        "{manifest: bad/tiny.model.yaml, devices: [br2]}",
    )
    agent = Agent(load_config(cfg))
    events: list[Event] = []
    submit = agent._submit_event

    def capture(event: Event) -> None:
        events.append(event)
        submit(event)

    agent.auditor = Auditor(capture, "gw")
    assert agent.inference is not None
    agent.inference.auditor = agent.auditor
    agent.inference.emit = capture
    await agent.start()
    try:
        await until(lambda: "tiny@br2" in agent.inference.refused if agent.inference else False, 10)
        status = await agent.status()
    finally:
        await agent.stop()
    assert status["models"]["tiny@br2"]["state"] == "refused"
    assert "sha256" in status["models"]["tiny@br2"]["error"]
    assert status["models"]["tiny@br1"]["state"] != "refused"
    assert set(status["devices"]) == {"br1", "br2"}  # both devices acquire
    audits = [e for e in events if e.kind == "audit" and e.data["action"] == "model_refused"]
    assert len(audits) == 1 and audits[0].data["target"] == "tiny@br2"
    disabled = [e for e in events if e.kind == "model_disabled"]
    assert len(disabled) == 1 and disabled[0].device == "br2" and disabled[0].severity is Severity.ALARM
    assert disabled[0].data["binding"] == "tiny@br2" and "sha256" in disabled[0].data["reason"]


# --------------------------------------------------------------------------- acquisition never waits


@pytest.fixture
def slow_loading(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Model loading blocks until the test releases it."""
    release = threading.Event()

    class Slow(LoadedModel):
        def __init__(self, path: Path) -> None:
            release.wait(20)
            super().__init__(path)

    monkeypatch.setattr(inference, "LoadedModel", Slow)
    yield release
    release.set()


PROFILE = ProfileBase(
    profile="bio", protocol="test", device_kind="bioreactor", tags=[TagBase(name=t) for t in SIGNALS]
)


async def test_engine_start_does_not_wait_for_models(tmp_path: Path, slow_loading: threading.Event) -> None:
    manifest = write_model(tmp_path / "models")
    events: list[Event] = []
    engine = InferenceEngine(
        [ModelBindingConfig(manifest=manifest, devices=["d1"])],
        {"d1": PROFILE},
        events.append,
        Auditor(events.append, "gw"),
    )
    async with asyncio.timeout(2):
        await engine.start()
    await until(lambda: engine.status() == {"tiny@d1": {"state": "loading"}}, 5)
    # readings committed while the model loads are scored once it is there
    for i in range(3 * WINDOW):
        engine.on_committed(
            [Block("d1", "process", int((1000 + i) * 1e9), SIGNALS, [None] * 2, [1.0, 2.0])], []
        )
    slow_loading.set()
    try:
        async with asyncio.timeout(10):
            await engine.idle()
        status: dict[str, Any] = engine.status()["tiny@d1"]
    finally:
        await engine.stop()
    assert status["state"] != "loading" and status["windows_scored"] > 0


async def test_agent_acquires_while_a_model_loads(tmp_path: Path, slow_loading: threading.Event) -> None:
    write_model(tmp_path / "good")
    cfg = agent_config(tmp_path, "{manifest: good/tiny.model.yaml, devices: [br1]}")
    agent = Agent(load_config(cfg))
    async with asyncio.timeout(5):
        await agent.start()
    try:
        assert agent.scheduler is not None and len(agent.scheduler.runners) == 2
        await until(
            lambda: agent.inference and agent.inference.status() == {"tiny@br1": {"state": "loading"}}, 5
        )
        slow_loading.set()
        await until(lambda: agent.inference is not None and "tiny@br1" in agent.inference.bindings, 10)
    finally:
        await agent.stop()
