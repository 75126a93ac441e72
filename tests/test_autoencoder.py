"""Reconstruction model: a dense autoencoder fitted with scikit-learn, exported to an ONNX
graph built from its weights, scored by the agent like the PCA model (same outputs)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor

from agent.cli import main
from agent.modeltools import autoencoder, graph
from agent.modeltools.autoencoder import Autoencoder
from agent.transforms.anomaly.manifest import ModelError, read_manifest
from agent.transforms.anomaly.model import LoadedModel
from agent.transforms.anomaly.offline import run_offline
from agent.transforms.anomaly.track import Settings
from agent.transforms.inference import ModelBindingConfig
from tests.test_inference import MAPPING, Harness, feed
from tests.test_modelkit import FAULT, SIGNALS, T0, series, write_csv

WINDOW = 12


def windows(hours: float, seed: int) -> np.ndarray:
    """Overlapping raw windows ``[N, WINDOW, S]`` of the synthetic process, float32."""
    _, v = series(hours, seed)
    return np.lib.stride_tricks.sliding_window_view(v, WINDOW, axis=0).transpose(0, 2, 1).astype(np.float32)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


@dataclass
class Fitted:
    ae: Autoencoder
    model: onnx.ModelProto
    windows: np.ndarray
    """Fresh normal windows (another seed than the fitting data)."""
    features: np.ndarray
    """Their features, through the same feature graph training uses."""


@pytest.fixture(scope="module")
def fitted() -> Fitted:
    """An autoencoder fitted on 12 h of normal windows and its exported graph."""
    w = windows(12, 1)
    mean = w.reshape(-1, len(SIGNALS)).mean(axis=0).astype(np.float64)
    std = w.reshape(-1, len(SIGNALS)).std(axis=0).astype(np.float64)
    sd_eps = np.full(len(SIGNALS), 1e-3)
    features = session(graph.feature_model(mean, std, WINDOW, sd_eps))
    feats = features.run(["features"], {"window": w})[0].astype(np.float64)
    f_mean, f_std = feats.mean(axis=0), np.maximum(feats.std(axis=0), 0.05)
    ae, _ = autoencoder.fit(feats, f_mean, f_std, variance=0.95, seed=0)
    fresh = windows(2, 7)
    return Fitted(
        ae, ae.onnx(mean, std, WINDOW, sd_eps), fresh, features.run(["features"], {"window": fresh})[0]
    )


def test_onnx_graph_scores_as_the_reference_forward_pass(fitted: Fitted) -> None:
    score, contrib = session(fitted.model).run(["score", "contrib"], {"window": fitted.windows})
    ref_score, ref_contrib = fitted.ae.score(fitted.features.astype(np.float64))
    assert score.shape == (len(fitted.windows),) and contrib.shape == (len(fitted.windows), len(SIGNALS))
    np.testing.assert_allclose(score, ref_score, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(contrib, ref_contrib, rtol=1e-4, atol=1e-5)
    # contributions are an exact decomposition of the score, as for PCA
    np.testing.assert_allclose(contrib.sum(axis=1), score, rtol=1e-5)
    assert np.median(score) < 1.0  # q_ref is the fitting data's 99th percentile


def test_reference_forward_pass_is_the_sklearn_model() -> None:
    rng = np.random.default_rng(3)
    z = rng.standard_normal((200, 9))
    mlp = MLPRegressor(hidden_layer_sizes=(16, 3, 16), activation="tanh", max_iter=20, random_state=0)
    with pytest.warns(ConvergenceWarning):  # 20 epochs are enough to compare forward passes
        mlp.fit(z, z)
    ae = Autoencoder.of(mlp, np.zeros(9), np.ones(9))
    np.testing.assert_allclose(ae.reconstruct(z), mlp.predict(z), rtol=1e-10, atol=1e-12)


def test_export_refuses_an_activation_the_graph_does_not_build() -> None:
    mlp = MLPRegressor(hidden_layer_sizes=(4,), activation="relu", max_iter=5, random_state=0)
    with pytest.warns(ConvergenceWarning):
        mlp.fit(np.eye(6), np.eye(6))
    with pytest.raises(ModelError, match="supports tanh hidden layers, not 'relu'"):
        Autoencoder.of(mlp, np.zeros(6), np.ones(6))


@pytest.mark.parametrize("signal", range(len(SIGNALS)))
def test_a_fault_on_one_signal_makes_it_the_top_contributor(fitted: Fitted, signal: int) -> None:
    model, w = fitted.model, fitted.windows
    faulty = w[:200].copy()
    sd = w[..., signal].std()
    faulty[:, WINDOW // 2 :, signal] += 8 * sd  # a step inside every window
    score, contrib = session(model).run(["score", "contrib"], {"window": faulty})
    normal = session(model).run(["score"], {"window": w[:200]})[0]
    assert np.all(contrib.argmax(axis=1) == signal)
    assert np.min(score) > np.max(normal)  # every faulty window above every normal one


def test_fit_is_deterministic_and_sized_from_the_data() -> None:
    rng = np.random.default_rng(5)
    latent = rng.standard_normal((60, 2))  # 60 windows: the least train() accepts is 50
    feats = np.tanh(latent @ rng.standard_normal((2, 12))) + 0.01 * rng.standard_normal((60, 12))
    f_mean, f_std = feats.mean(axis=0), feats.std(axis=0)
    a, _ = autoencoder.fit(feats, f_mean, f_std, variance=0.9, seed=1)
    b, _ = autoencoder.fit(feats, f_mean, f_std, variance=0.9, seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a.weights, b.weights, strict=True))
    assert a.q_ref == b.q_ref
    assert [w.shape for w in a.weights] == [(12, 24), (24, 2), (2, 24), (24, 12)]


@pytest.fixture(scope="module")
def ae_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``models train --method autoencoder`` on 8 h of normal synthetic data."""
    d = tmp_path_factory.mktemp("ae")
    csv = write_csv(d / "normal.csv", hours=8, seed=1)
    code = main(
        ["--log-level", "WARNING", "models", "train", "--csv", str(csv), "--out", str(d / "m"),
         "--id", "syn-ae", "--method", "autoencoder", "--window", str(WINDOW), "--units", "temp=degC"]
    )  # fmt: skip
    assert code == 0
    return d / "m" / "syn-ae.model.yaml"


def test_trained_model_loads_and_alarms_on_the_fault_only(ae_model: Path) -> None:
    m = read_manifest(ae_model)
    assert m.method == "autoencoder" and m.validation["bottleneck"] >= 1
    loaded = LoadedModel(ae_model)
    result = run_offline(loaded, Settings.of(m), *series(8, 11, FAULT))
    caught = [tr for tr in result.transitions if tr.phase == "start" and tr.started >= T0 + FAULT[0]]
    assert caught and caught[0].started <= T0 + FAULT[0] + 120
    assert caught[0].top[0]["signal"] == "temp"
    in_fault = (result.ts >= T0 + FAULT[0] + 120) & (result.ts < T0 + FAULT[1])
    assert result.alarm[in_fault].all() and np.all(result.top_signal[in_fault] == 0)
    # calibrated for a small share of normal windows in alarm, not for none
    quiet = run_offline(loaded, Settings.of(m), *series(8, 12))
    assert quiet.alarm.mean() < 0.05


async def test_a_binding_scores_the_autoencoder_in_the_engine(ae_model: Path) -> None:
    h = Harness()
    engine = h.engine(ModelBindingConfig(manifest=ae_model, devices=["d1"], signals=MAPPING, mode="shadow"))
    await engine.start()
    try:
        await feed(engine, "d1", *series(8, 11, FAULT))
        status = engine.status()
    finally:
        await engine.stop()
    assert status["syn-ae@d1"]["state"] == "ok" and status["syn-ae@d1"]["windows_scored"] > 2000
    in_fault = [
        e
        for e in h.of("anomaly")
        if e.data["phase"] == "start" and T0 + FAULT[0] <= e.data["start_ts"] / 1e9 <= T0 + FAULT[0] + 120
    ]
    assert len(in_fault) == 1 and in_fault[0].data["model"]["id"] == "syn-ae"
    assert in_fault[0].data["top_signals"][0]["signal"] == "temp"


def test_cli_refuses_an_unknown_method(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["models", "train", "--csv", "x.csv", "--out", str(tmp_path), "--method", "lstm"])
    assert exc.value.code == 2
    assert "invalid choice: 'lstm'" in capsys.readouterr().err
