"""ONNX graphs of the anomaly models, built with ``onnx.helper``.

Every model has the same interface, so the agent treats them alike:

* input ``window``: float32 ``[N, W, S]``, raw engineering values (gaps already filled);
* output ``score``: float32 ``[N]``, higher = more anomalous;
* output ``contrib``: float32 ``[N, S]``, each signal's share of the score (PCA and
  autoencoder: an exact decomposition of the score; isolation forest: standardised
  feature deviation).

The whole computation, normalisation and window features included, lives in the graph:
the frozen, hashed file *is* the model, and the agent holds no scoring math beside it.
Window features per signal (in training σ units): mean, log standard deviation (a
stuck sensor has none, an oscillation much), and last minus first (steps and ramps).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
IR_VERSION = 9
FEATURES_PER_SIGNAL = 3
LOG_SD_FLOOR = 1e-6
"""Smallest per-signal epsilon added to the window σ before the log (a flat line stays finite)."""


def _init(name: str, value: Any, dtype: Any = np.float32) -> TensorProto:
    return numpy_helper.from_array(np.asarray(value, dtype=dtype), name)


def _feature_part(
    mean: np.ndarray, std: np.ndarray, window: int, sd_eps: np.ndarray
) -> tuple[list[Any], list[TensorProto]]:
    """Nodes from ``window`` to ``features`` ``[N, 3S]`` (mean | log σ | last - first).
    ``sd_eps`` (per signal, training σ units) is a small fraction of the signal's typical
    window σ, so a stuck sensor lands far below every normal window on the log scale."""
    inits = [
        _init("sig_mean", mean),
        _init("sig_std", std),
        _init("log_eps", np.maximum(sd_eps, LOG_SD_FLOOR)),
        _init("idx_last", window - 1, np.int64),
        _init("idx_first", 0, np.int64),
    ]
    nodes = [
        helper.make_node("Sub", ["window", "sig_mean"], ["xc"]),
        helper.make_node("Div", ["xc", "sig_std"], ["xn"]),
        helper.make_node("ReduceMean", ["xn"], ["f_mean"], axes=[1], keepdims=0),
        helper.make_node("ReduceMean", ["xn"], ["f_mean_k"], axes=[1], keepdims=1),
        helper.make_node("Sub", ["xn", "f_mean_k"], ["dev"]),
        helper.make_node("Mul", ["dev", "dev"], ["dev2"]),
        helper.make_node("ReduceMean", ["dev2"], ["var"], axes=[1], keepdims=0),
        helper.make_node("Sqrt", ["var"], ["sd"]),
        helper.make_node("Add", ["sd", "log_eps"], ["sd_eps"]),
        helper.make_node("Log", ["sd_eps"], ["f_logsd"]),
        helper.make_node("Gather", ["xn", "idx_last"], ["x_last"], axis=1),
        helper.make_node("Gather", ["xn", "idx_first"], ["x_first"], axis=1),
        helper.make_node("Sub", ["x_last", "x_first"], ["f_delta"]),
        helper.make_node("Concat", ["f_mean", "f_logsd", "f_delta"], ["features"], axis=1),
    ]
    return nodes, inits


def _per_signal(src: str, dst: str, n_signals: int) -> tuple[list[Any], list[TensorProto]]:
    """Sum a per-feature tensor ``[N, 3S]`` into per-signal ``[N, S]``."""
    inits = [
        _init(f"{dst}_shape", [-1, FEATURES_PER_SIGNAL, n_signals], np.int64),
        _init(f"{dst}_axis", [1], np.int64),
    ]
    nodes = [
        helper.make_node("Reshape", [src, f"{dst}_shape"], [f"{dst}_3d"]),
        helper.make_node("ReduceSum", [f"{dst}_3d", f"{dst}_axis"], [dst], keepdims=0),
    ]
    return nodes, inits


def _io(window: int, n_signals: int) -> tuple[Any, Any]:
    x = helper.make_tensor_value_info("window", TensorProto.FLOAT, ["N", window, n_signals])
    feats = helper.make_tensor_value_info(
        "features", TensorProto.FLOAT, ["N", FEATURES_PER_SIGNAL * n_signals]
    )
    return x, feats


def _finish(graph: Any, extra_opsets: dict[str, int] | None = None) -> onnx.ModelProto:
    opsets = [helper.make_opsetid("", OPSET)]
    opsets += [helper.make_opsetid(d, v) for d, v in (extra_opsets or {}).items()]
    model = helper.make_model(graph, opset_imports=opsets, producer_name="cleanroom-edge")
    model.ir_version = IR_VERSION
    onnx.checker.check_model(model)
    return model


def _scored(nodes: list[Any], inits: list[Any], name: str, window: int, n: int) -> onnx.ModelProto:
    """The end both error models share: per-signal sums of ``contrib_f`` and the ``score`` and
    ``contrib`` outputs the agent reads (anomaly/model.py), so the runtime needs no change per
    method."""
    more_nodes, more_inits = _per_signal("contrib_f", "contrib", n)
    x, _ = _io(window, n)
    outputs = [
        helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("contrib", TensorProto.FLOAT, ["N", n]),
    ]
    return _finish(helper.make_graph(nodes + more_nodes, name, [x], outputs, inits + more_inits))


def feature_model(mean: np.ndarray, std: np.ndarray, window: int, sd_eps: np.ndarray) -> onnx.ModelProto:
    """The feature part alone: training computes its features with exactly the graph the
    deployed model contains."""
    nodes, inits = _feature_part(mean, std, window, sd_eps)
    x, feats = _io(window, len(mean))
    return _finish(helper.make_graph(nodes, "features", [x], [feats], inits))


def pca_model(
    mean: np.ndarray,
    std: np.ndarray,
    window: int,
    sd_eps: np.ndarray,
    f_mean: np.ndarray,
    f_std: np.ndarray,
    loadings: np.ndarray,
    eigenvalues: np.ndarray,
    t2_ref: float,
    q_ref: float,
) -> onnx.ModelProto:
    """PCA monitor: score = T²/t2_ref + Q/q_ref, decomposed exactly per feature:
    T² = Σ_f z_f (P Λ⁻¹ Pᵀ z)_f and Q = Σ_f r_f², with r = z - P Pᵀ z."""
    n = len(mean)
    nodes, inits = _feature_part(mean, std, window, sd_eps)
    inits += [
        _init("f_mu", f_mean),
        _init("f_sd", f_std),
        _init("P", loadings),
        _init("PT", loadings.T),
        _init("inv_lam", 1.0 / eigenvalues),
        _init("inv_t2", 1.0 / t2_ref),
        _init("inv_q", 1.0 / q_ref),
        _init("sum_axis", [1], np.int64),
    ]
    nodes += [
        helper.make_node("Sub", ["features", "f_mu"], ["fc"]),
        helper.make_node("Div", ["fc", "f_sd"], ["z"]),
        helper.make_node("MatMul", ["z", "P"], ["t"]),
        helper.make_node("Mul", ["t", "inv_lam"], ["t_w"]),
        helper.make_node("MatMul", ["t_w", "PT"], ["zt"]),
        helper.make_node("Mul", ["z", "zt"], ["t2_f"]),
        helper.make_node("MatMul", ["t", "PT"], ["z_hat"]),
        helper.make_node("Sub", ["z", "z_hat"], ["resid"]),
        helper.make_node("Mul", ["resid", "resid"], ["q_f"]),
        helper.make_node("Mul", ["t2_f", "inv_t2"], ["t2_fs"]),
        helper.make_node("Mul", ["q_f", "inv_q"], ["q_fs"]),
        helper.make_node("Add", ["t2_fs", "q_fs"], ["contrib_f"]),
        helper.make_node("ReduceSum", ["contrib_f", "sum_axis"], ["score"], keepdims=0),
    ]
    return _scored(nodes, inits, "pca_monitor", window, n)


def iforest_model(
    mean: np.ndarray,
    std: np.ndarray,
    window: int,
    sd_eps: np.ndarray,
    f_mean: np.ndarray,
    f_std: np.ndarray,
    forest: onnx.ModelProto,
    forest_input: str,
    forest_score: str,
) -> onnx.ModelProto:
    """Isolation forest (converted by skl2onnx) behind the shared feature part.
    score = -decision_function (positive = anomalous); contrib = standardised squared
    feature deviation per signal (the forest has no exact attribution)."""
    n = len(mean)
    nodes, inits = _feature_part(mean, std, window, sd_eps)
    forest_graph = onnx.compose.add_prefix_graph(forest.graph, "if_")
    inits += [_init("f_mu", f_mean), _init("f_sd", f_std), _init("score_shape", [-1], np.int64)]
    nodes += [
        helper.make_node("Identity", ["features"], [f"if_{forest_input}"]),
        *forest_graph.node,
        helper.make_node("Neg", [f"if_{forest_score}"], ["neg_score"]),
        helper.make_node("Reshape", ["neg_score", "score_shape"], ["score"]),
        helper.make_node("Sub", ["features", "f_mu"], ["fc"]),
        helper.make_node("Div", ["fc", "f_sd"], ["z"]),
        helper.make_node("Mul", ["z", "z"], ["z2"]),
    ]
    inits += list(forest_graph.initializer)
    more_nodes, more_inits = _per_signal("z2", "contrib", n)
    x, _ = _io(window, n)
    outputs = [
        helper.make_tensor_value_info("score", TensorProto.FLOAT, ["N"]),
        helper.make_tensor_value_info("contrib", TensorProto.FLOAT, ["N", n]),
    ]
    graph = helper.make_graph(nodes + more_nodes, "iforest_monitor", [x], outputs, inits + more_inits)
    extra = {o.domain: o.version for o in forest.opset_import if o.domain not in ("", "ai.onnx")}
    return _finish(graph, extra)


def autoencoder_model(
    mean: np.ndarray,
    std: np.ndarray,
    window: int,
    sd_eps: np.ndarray,
    f_mean: np.ndarray,
    f_std: np.ndarray,
    weights: list[np.ndarray],
    biases: list[np.ndarray],
    q_ref: float,
) -> onnx.ModelProto:
    """Dense autoencoder over the standardised window features: tanh on every hidden
    layer, identity output. score = Σ_f (z_f - ẑ_f)² / q_ref, like PCA's Q, so each
    feature's squared reconstruction error is its exact share and ``contrib`` sums them
    per signal. Tanh, not ReLU: a saturated layer cannot follow a window far outside the
    training data, so such a window is reconstructed badly instead of extrapolated."""
    n = len(mean)
    nodes, inits = _feature_part(mean, std, window, sd_eps)
    inits += [_init("f_mu", f_mean), _init("f_sd", f_std), _init("inv_q", 1.0 / q_ref)]
    inits += [_init("sum_axis", [1], np.int64)]
    nodes += [
        helper.make_node("Sub", ["features", "f_mu"], ["fc"]),
        helper.make_node("Div", ["fc", "f_sd"], ["z"]),
    ]
    layer = "z"
    last = len(weights) - 1
    for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
        inits += [_init(f"ae_w{i}", w), _init(f"ae_b{i}", b)]
        nodes += [
            helper.make_node("MatMul", [layer, f"ae_w{i}"], [f"ae_m{i}"]),
            helper.make_node("Add", [f"ae_m{i}", f"ae_b{i}"], ["z_hat" if i == last else f"ae_a{i}"]),
        ]
        if i < last:
            nodes.append(helper.make_node("Tanh", [f"ae_a{i}"], [f"ae_h{i}"]))
            layer = f"ae_h{i}"
    nodes += [
        helper.make_node("Sub", ["z", "z_hat"], ["resid"]),
        helper.make_node("Mul", ["resid", "resid"], ["q_f"]),
        helper.make_node("Mul", ["q_f", "inv_q"], ["contrib_f"]),
        helper.make_node("ReduceSum", ["contrib_f", "sum_axis"], ["score"], keepdims=0),
    ]
    return _scored(nodes, inits, "autoencoder_monitor", window, n)
