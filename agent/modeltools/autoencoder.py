"""Reconstruction model: a dense autoencoder over the same standardised window features
the PCA model uses, fitted with scikit-learn's ``MLPRegressor`` (training extra) and
exported by :func:`agent.modeltools.graph.autoencoder_model` from its weights, so the
agent runs it like any other graph (``score`` + per-signal ``contrib``).

Where PCA can only follow linear relations between features, the autoencoder learns
curved ones (a valve's flow against its opening, a culture's DO against its agitation);
its score is the reconstruction error normalised as PCA's Q is, and each signal's share
of it is that signal's features' squared error.

Sizes come from the data: the bottleneck is the number of principal components that
explain ``variance`` of the features (the PCA model's own choice), capped at half the
features so the network has to compress; the hidden layers are twice the features,
within :data:`HIDDEN_MIN` .. :data:`HIDDEN_MAX`. Scoring stays cheap: for Tennessee
Eastman (52 signals, 128-64-128) a batched run of 100 windows took 0.39 ms of CPU
against the PCA model's 0.34 ms.

Fitted with Adam and early stopping on a validation split, not L-BFGS: on the 500 normal
Tennessee Eastman rows L-BFGS reproduced its training windows so closely that windows it
had not seen scored far higher, the calibrated threshold rose twentyfold and the mean
detection rate fell from 0.91 to 0.70.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import onnx

from agent.modeltools import graph
from agent.transforms.anomaly.manifest import ModelError

HIDDEN_MIN = 16
HIDDEN_MAX = 128
MAX_WINDOWS = 4000
"""Fitting windows (strided evenly): neighbouring windows overlap almost entirely, so more
repeat what these show and only lengthen every epoch (training fits once per calibration
fold as well)."""
MAX_EPOCHS = 200
"""Upper bound on passes over the fitting windows; early stopping on a validation split
ends most fits well before it."""
LEARNING_RATE = 3e-3
"""Adam's step size (scikit-learn's default is 1e-3): with batches of up to 256 it reached
the same error on unseen normal windows in about half the CPU time on the synthetic test
process."""
L2 = 1e-3
"""Weight penalty: keeps the network from learning the identity on few windows."""


@dataclass(frozen=True)
class Autoencoder:
    """A fitted autoencoder as plain arrays: what the graph is built from, and the
    reference forward pass the exported graph must agree with."""

    f_mean: np.ndarray
    f_std: np.ndarray
    weights: list[np.ndarray]
    biases: list[np.ndarray]
    q_ref: float

    @classmethod
    def of(cls, mlp: Any, f_mean: np.ndarray, f_std: np.ndarray, q_ref: float = 1.0) -> Autoencoder:
        """From a fitted ``MLPRegressor`` (tanh hidden layers, identity output)."""
        if mlp.activation != "tanh":
            raise ModelError(f"autoencoder export supports tanh hidden layers, not {mlp.activation!r}")
        return cls(
            np.asarray(f_mean, np.float64),
            np.asarray(f_std, np.float64),
            [np.asarray(w, np.float64) for w in mlp.coefs_],
            [np.asarray(b, np.float64) for b in mlp.intercepts_],
            q_ref,
        )

    def reconstruct(self, z: np.ndarray) -> np.ndarray:
        """Standardised features ``[N, F]`` through the network."""
        h = z
        for i, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            h = h @ w + b
            if i < len(self.weights) - 1:
                h = np.tanh(h)
        return h

    def feature_errors(self, feats: np.ndarray) -> np.ndarray:
        """Each feature's squared reconstruction error over ``q_ref``: ``[N, F]``; the score
        is its row sum."""
        z = (feats - self.f_mean) / self.f_std
        return np.asarray((z - self.reconstruct(z)) ** 2 / self.q_ref)

    def score(self, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Reference ``(score [N], contrib [N, S])`` of raw features ``[N, 3S]``, the
        graph's outputs computed in float64 numpy."""
        err = self.feature_errors(feats)
        per_signal = err.reshape(len(err), graph.FEATURES_PER_SIGNAL, -1).sum(axis=1)
        return err.sum(axis=1), per_signal

    def onnx(self, mean: np.ndarray, std: np.ndarray, window: int, sd_eps: np.ndarray) -> onnx.ModelProto:
        return graph.autoencoder_model(
            mean, std, window, sd_eps, self.f_mean, self.f_std, self.weights, self.biases, self.q_ref
        )


def sizes(z: np.ndarray, variance: float) -> tuple[int, int]:
    """(hidden width, bottleneck width) for standardised features ``z`` ``[N, F]``."""
    n_feat = z.shape[1]
    hidden = int(np.clip(2 * n_feat, HIDDEN_MIN, HIDDEN_MAX))
    s = np.linalg.svd(z - z.mean(axis=0), compute_uv=False)
    explained = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-12)
    k = int(np.searchsorted(explained, variance) + 1)
    return hidden, max(1, min(k, n_feat // 2, hidden // 2))


def fit(
    feats: np.ndarray, f_mean: np.ndarray, f_std: np.ndarray, variance: float, seed: int
) -> tuple[Autoencoder, int]:
    """Fit on normal window features ``[N, 3S]``, deterministic for a given ``seed``; returns
    the autoencoder and the epochs it took. ``q_ref`` is the 99th percentile of the fitting
    windows' summed error, so a score of 1 means "as badly reconstructed as the worst 1 %
    of normal windows"."""
    try:
        from sklearn.exceptions import ConvergenceWarning
        from sklearn.neural_network import MLPRegressor
        from threadpoolctl import threadpool_limits  # scikit-learn's own dependency
    except ImportError as exc:
        raise ModelError(
            f"autoencoder training needs the 'train' extra ({exc.name} missing): "
            "pip install 'cleanroom-edge[train]'"
        ) from None
    z = (feats - f_mean) / f_std
    fit_z = z[:: max(1, len(z) // MAX_WINDOWS)]
    hidden, bottleneck = sizes(fit_z, variance)
    mlp = MLPRegressor(
        hidden_layer_sizes=(hidden, bottleneck, hidden),
        activation="tanh",
        alpha=L2,
        # large batches for few Python steps per epoch, yet 16 steps per epoch on short data
        batch_size=int(np.clip(len(fit_z) // 16, 32, 256)),
        learning_rate_init=LEARNING_RATE,
        max_iter=MAX_EPOCHS,
        early_stopping=True,
        validation_fraction=0.1,
        n_iter_no_change=10,
        random_state=seed,
    )
    # One BLAS thread: the matrices are small, and OpenBLAS's own threads, spinning for
    # work on a busy 2-core machine, made a Tennessee Eastman training (52 signals, six
    # fits) take 92-139 CPU seconds instead of 7-8.
    with warnings.catch_warnings(), threadpool_limits(1):
        # Reaching MAX_EPOCHS is recorded in the manifest (epochs), not a reason to stop.
        warnings.simplefilter("ignore", ConvergenceWarning)
        mlp.fit(fit_z, fit_z)
    ae = Autoencoder.of(mlp, f_mean, f_std)
    q = ae.feature_errors(feats).sum(axis=1)
    return replace(ae, q_ref=max(float(np.quantile(q, 0.99)), 1e-6)), int(mlp.n_iter_)


def fit_model(
    mean: np.ndarray,
    std: np.ndarray,
    sd_eps: np.ndarray,
    window: int,
    feats: np.ndarray,
    f_mean: np.ndarray,
    f_std: np.ndarray,
    variance: float,
    seed: int,
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """The training step's contract (as for PCA and the isolation forest): the full graph
    and what the manifest's validation records about the fit."""
    ae, epochs = fit(feats, f_mean, f_std, variance, seed)
    hidden, bottleneck = ae.weights[0].shape[1], ae.weights[1].shape[1]
    info = {"hidden": hidden, "bottleneck": bottleneck, "epochs": epochs}
    return ae.onnx(mean, std, window, sd_eps), info
