"""Offline model tooling behind ``cleanroom-agent models``: CSV loading (:mod:`.csvdata`),
training of PCA and isolation-forest models frozen to ONNX (:mod:`.train`, :mod:`.graph`)
and event-level evaluation (:mod:`.evaluate`).

It windows, scores and decides through the runtime's own path
(:mod:`agent.transforms.anomaly`), so its figures describe what the agent does; the runtime
never imports it (an import-linter contract). scikit-learn, skl2onnx and matplotlib are
imported only where they are used, so a gateway without the ``train`` extra still scores.
"""
