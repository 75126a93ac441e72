"""Data shipped inside the wheel: the anomaly models, the example configurations (the
``starter`` that ``cleanroom-agent init`` copies) and the payload JSON Schema (device
profiles ship with :mod:`cleanroom_common`). Read them with
:func:`cleanroom_common.bundled.package_dir`, never by a path relative to the checkout."""
