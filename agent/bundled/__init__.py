"""Data shipped inside the wheel: the anomaly models, the example configuration and the
payload JSON Schema (device profiles ship with :mod:`cleanroom_common`). Read them with
:mod:`agent.core.resources`, never by a path relative to the checkout."""
