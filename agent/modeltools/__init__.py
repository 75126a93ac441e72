"""Model governance toolkit: manifests, CSV loading, training (PCA, isolation forest),
ONNX graph building, the shared windowing/scoring/hysteresis path, and evaluation.

The runtime pieces (:mod:`.manifest`, :mod:`.scoring`) import only numpy, onnxruntime
and pydantic; training and plotting import scikit-learn/skl2onnx/matplotlib lazily,
so a gateway without the ``train`` extra still scores.
"""
