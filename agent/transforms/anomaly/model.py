"""A frozen model ready to score: its verified manifest and one onnxruntime session, shared by
every binding of the model so the engine can score all their windows in one batched run."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from agent.transforms.anomaly.manifest import Manifest, ModelError, verify

CHUNK = 4096
"""Windows per ``session.run`` offline (bounds memory on long histories)."""


class LoadedModel:
    """A verified manifest and one onnxruntime session for it (shared by all its bindings)."""

    def __init__(self, manifest_path: Path) -> None:
        self.manifest_path = manifest_path
        self.manifest: Manifest
        self.manifest, self.onnx_path, data = verify(manifest_path)
        # Imported here, not at module level: an agent without models never pays for
        # onnxruntime's memory (tens of MB on a small gateway).
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        try:
            self.session = ort.InferenceSession(data, sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own exception types for bad graphs
            raise ModelError(
                f"model {self.manifest.id}: onnxruntime cannot load {self.onnx_path}: {exc}"
            ) from None
        m = self.manifest
        inputs = self.session.get_inputs()
        if len(inputs) != 1 or inputs[0].name != "window":
            found = ", ".join(repr(i.name) for i in inputs) or "no inputs"
            raise ModelError(f"model {m.id}: the graph has {found}; the agent feeds one input, 'window'")
        outputs = {o.name for o in self.session.get_outputs()}
        if missing := {"score", "contrib"} - outputs:
            raise ModelError(f"model {m.id}: the graph has no output {', '.join(sorted(missing))}")
        shape = inputs[0].shape
        if shape[1:] != [m.window, len(m.signals)]:
            raise ModelError(
                f"model {m.id}: graph input is {shape}, "
                f"manifest says window {m.window} x {len(m.signals)} signals"
            )
        self.mean = np.array([s.mean for s in m.signals], dtype=np.float64)

    @property
    def ident(self) -> dict[str, str]:
        """What every decision carries: which exact model made it."""
        m = self.manifest
        return {"id": m.id, "version": m.version, "sha256": m.sha256}

    def score(self, windows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Scores ``[N]`` and per-signal contributions ``[N, S]`` of float32 windows ``[N, W, S]``."""
        if len(windows) == 0:
            return np.zeros(0, np.float32), np.zeros((0, len(self.mean)), np.float32)
        scores, contribs = [], []
        for i in range(0, len(windows), CHUNK):
            s, c = self.session.run(["score", "contrib"], {"window": windows[i : i + CHUNK]})
            scores.append(s)
            contribs.append(c)
        return np.concatenate(scores), np.concatenate(contribs)
