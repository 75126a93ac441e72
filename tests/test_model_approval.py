"""Model governance: ``models approve`` records who released a model and why, bound to the
exact manifest and ONNX file; an unapproved or since-edited model runs in shadow mode only."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from agent.buffer.config import BufferConfig
from agent.buffer.store import Buffer
from agent.cli import main
from agent.core.records import Block, Severity
from agent.transforms.anomaly.manifest import (
    ModelError,
    approval_problem,
    approve,
    content_sha256,
    read_manifest,
    write_manifest,
)
from agent.transforms.inference import ModelBindingConfig
from tests.test_inference import MAPPING, Harness, approved_copy, feed
from tests.test_modelkit import FAULT, SIGNALS, private_copy, series, trained_model


@pytest.fixture(scope="session")
def syn_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trained_model(tmp_path_factory)


@pytest.fixture
def model_copy(syn_model: Path, tmp_path: Path) -> Path:
    return private_copy(syn_model, tmp_path)


@pytest.fixture
def h() -> Harness:
    return Harness()


def run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(["--log-level", "WARNING", "models", *args])
    out, err = capsys.readouterr()
    return code, out, err


def test_approve_records_who_why_when_and_the_hashes(
    model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert approval_problem(read_manifest(model_copy)) == (
        "model syn-pca 1.0.0 is not approved (cleanroom-agent models approve)"
    )
    code, out, err = run(
        capsys, "approve", "--model", str(model_copy), "--actor", "qa.lead", "--reason", "VP-12 passed"
    )
    assert code == 0, err
    m = read_manifest(model_copy)
    a = m.approval
    assert a is not None and (a.actor, a.reason) == ("qa.lead", "VP-12 passed")
    assert a.sha256 == m.sha256 and a.manifest_sha256 == content_sha256(m)
    assert a.at.endswith("Z") and "approved by qa.lead" in out
    assert approval_problem(m) is None
    # reformatting the YAML (another key order, flow style) keeps the approval: content is what counts
    raw = yaml.safe_load(model_copy.read_text())
    model_copy.write_text(yaml.safe_dump(dict(reversed(list(raw.items()))), default_flow_style=True))
    assert approval_problem(read_manifest(model_copy)) is None


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--reason", "VP-12 passed"], "--actor"),
        (["--actor", "qa.lead"], "--reason"),
        (["--actor", "  ", "--reason", "VP-12 passed"], "must not be blank"),
        (["--actor", "qa.lead", "--reason", ""], "must not be blank"),
    ],
)
def test_approve_refuses_without_actor_or_reason(
    model_copy: Path, capsys: pytest.CaptureFixture[str], args: list[str], message: str
) -> None:
    with pytest.raises(SystemExit) as exc:
        run(capsys, "approve", "--model", str(model_copy), *args)
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert read_manifest(model_copy).approval is None


def test_approve_function_refuses_blank_attribution(model_copy: Path) -> None:
    with pytest.raises(ModelError, match="needs a non-blank actor"):
        approve(read_manifest(model_copy), " ", "why", "2026-01-01T00:00:00Z")


def test_approve_refuses_a_model_whose_onnx_does_not_match(
    model_copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    onnx_file = model_copy.parent / "syn-pca.onnx"
    onnx_file.write_bytes(onnx_file.read_bytes() + b"\0")
    code, _, err = run(capsys, "approve", "--model", str(model_copy), "--actor", "qa", "--reason", "ok")
    assert code == 2 and "refusing to load it" in err and "Traceback" not in err
    assert read_manifest(model_copy).approval is None


def test_editing_the_manifest_after_approval_voids_it(model_copy: Path, tmp_path: Path) -> None:
    path = approved_copy(model_copy, tmp_path / "approved")
    m = read_manifest(path)
    write_manifest(path, m.model_copy(update={"threshold": m.threshold * 2}))
    assert "manifest changed after the approval by qa.test" in str(approval_problem(read_manifest(path)))
    # an approval copied onto a retrained model names the other ONNX file
    write_manifest(path, m.model_copy(update={"sha256": "0" * 64}))
    assert "was approved by qa.test at 2026-01-01T00:00:00Z for ONNX sha256" in str(
        approval_problem(read_manifest(path))
    )


@pytest.mark.parametrize(
    ("approval", "message"),
    [
        ("yes", "approval: Input should be a valid dictionary"),
        ({"actor": "qa"}, "approval.reason: Field required"),
        (
            {"actor": "", "reason": "r", "at": "t", "sha256": "0" * 64, "manifest_sha256": "0" * 64},
            "approval.actor: String should have at least 1 character",
        ),
        (
            {"actor": "qa", "reason": "r", "at": "t", "sha256": "abc", "manifest_sha256": "0" * 64},
            "approval.sha256: String should match pattern",
        ),
        (
            {
                "actor": "qa",
                "reason": "r",
                "at": "t",
                "sha256": "0" * 64,
                "manifest_sha256": "0" * 64,
                "by": 1,
            },
            "approval.by: Extra inputs are not permitted",
        ),
    ],
)
def test_a_malformed_approval_block_is_a_clear_error(
    model_copy: Path, approval: object, message: str
) -> None:
    raw = yaml.safe_load(model_copy.read_text())
    model_copy.write_text(yaml.safe_dump({**raw, "approval": approval}))
    with pytest.raises(ModelError) as exc:
        read_manifest(model_copy)
    assert str(exc.value).startswith(f"{model_copy}: invalid manifest") and message in str(exc.value)


async def test_unapproved_active_binding_runs_in_shadow_with_an_audit_event(
    syn_model: Path, h: Harness
) -> None:
    engine = h.engine(ModelBindingConfig(manifest=syn_model, devices=["d1"], signals=MAPPING, mode="active"))
    await engine.start()
    try:
        await feed(engine, "d1", *series(8, 11, FAULT))
        status = engine.status()["syn-pca@d1"]
        with pytest.raises(
            ModelError, match=r"syn-pca@d1 stays in shadow mode: model syn-pca 1\.0\.0 is not"
        ):
            engine.set_mode("syn-pca@d1", "active", actor="qa.lead", reason="try")
    finally:
        await engine.stop()
    assert status["mode"] == "shadow" and "is not approved" in status["shadow_reason"]
    anomalies = h.of("anomaly")
    assert anomalies and all(e.severity is Severity.INFO and e.data["shadow"] is True for e in anomalies)
    (demoted,) = h.of("audit", "model_mode")
    assert demoted.severity is Severity.WARNING
    assert (demoted.data["old"], demoted.data["new"], demoted.data["target"]) == (
        "active",
        "shadow",
        "syn-pca@d1",
    )
    assert demoted.data["reason"].startswith("configured active, runs in shadow: model syn-pca 1.0.0 is not")
    (load,) = h.of("audit", "model_load")
    assert load.data["new"]["mode"] == "shadow" and load.data["new"]["approved"] is None


async def test_approved_active_binding_runs_active(syn_model: Path, tmp_path: Path, h: Harness) -> None:
    model = approved_copy(syn_model, tmp_path / "approved")
    engine = h.engine(ModelBindingConfig(manifest=model, devices=["d1"], signals=MAPPING, mode="active"))
    await engine.start()
    try:
        await feed(engine, "d1", *series(8, 11, FAULT))
        status = engine.status()["syn-pca@d1"]
    finally:
        await engine.stop()
    assert status["mode"] == "active" and status["shadow_reason"] is None
    starts = [e for e in h.of("anomaly") if e.data["phase"] == "start"]
    assert starts and starts[0].severity is Severity.ALARM and starts[0].data["shadow"] is False
    assert not h.of("audit", "model_mode")
    (load,) = h.of("audit", "model_load")
    assert load.data["new"]["approved"] == {"by": "qa.test", "at": "2026-01-01T00:00:00Z"}


def test_the_training_data_hash_is_over_the_data_as_read(
    syn_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """CSV: the hash of the files' digests (``sha256sum``); buffer: of the record bodies read."""
    csv_digest = hashlib.sha256((syn_model.parent.parent / "normal.csv").read_bytes()).hexdigest()
    assert read_manifest(syn_model).provenance.data_sha256 == hashlib.sha256(csv_digest.encode()).hexdigest()

    buf = Buffer(BufferConfig(path=tmp_path / "buffer.db", synchronous="off"), agent_id="gw1")
    buf.open()
    t, v = series(12, 41)
    buf.commit(
        [
            Block("bio1", "process", int(ts * 1e9), list(SIGNALS), [None] * 3, [float(x) for x in row])
            for ts, row in zip(t, v, strict=True)
        ]
    )
    bodies = [r.body for r in buf.records(device="bio1")]
    buf.close()
    code, _, err = run(
        capsys, "train", "--buffer", str(tmp_path / "buffer.db"), "--device", "bio1",
        "--signals", ",".join(SIGNALS), "--out", str(tmp_path / "m"), "--id", "b", "--window", "12",
    )  # fmt: skip
    assert code == 0, err
    body_digest = hashlib.sha256(b"".join(b.encode() + b"\n" for b in bodies)).hexdigest()
    got = read_manifest(tmp_path / "m" / "b.model.yaml").provenance.data_sha256
    assert got == hashlib.sha256(body_digest.encode()).hexdigest()
