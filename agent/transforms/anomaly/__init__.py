"""The anomaly-model runtime: a frozen model (:mod:`.manifest`, :mod:`.model`) and the one
samples -> windows -> score -> hysteresis path (:mod:`.windows`, :mod:`.envelope`,
:mod:`.drift`, :mod:`.track`). The agent's engine (:mod:`agent.transforms.inference`) and the
offline tools (:mod:`.offline`, used by ``models evaluate|score``) share it, so offline
metrics describe exactly what the agent does."""
