"""cleanroom-edge agent: sources (drivers) -> buffer -> transforms -> sinks (MQTT).

The folders read as the data path: :mod:`agent.core` (records, events, problems, the
driver contract), :mod:`agent.sources`, :mod:`agent.buffer`, :mod:`agent.transforms`,
:mod:`agent.sinks`, then :mod:`agent.app` (wiring) and :mod:`agent.cli`; the offline
model tooling sits apart in :mod:`agent.modeltools`.
"""

from importlib import metadata

__version__ = metadata.version("cleanroom-edge")
"""The installed distribution's version: ``pyproject.toml`` is the one place it is written."""
