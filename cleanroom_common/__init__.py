"""What the agent, its drivers and the simulators share, so that a device and the code that
reads it cannot disagree; imports none of them.

- :mod:`.fields`: configuration field types (durations and sizes written as people write them).
- :mod:`.yamlfile`: reading YAML files strictly, with the line of every key, parsed once.
- :mod:`.profilefiles`: device profiles found by name, a site's folders before the bundled ones.
- :mod:`.bundled`: where data shipped inside an installed package is, read through
  :mod:`importlib.resources`; the bundled device profiles are ``profiles/`` here (the
  repository's ``deploy/profiles``).
- :mod:`.modbus` and :mod:`.codec`: Modbus addressing, and the data types and word orders.
- :mod:`.serial_counter`: the serial particle counter's ASCII protocol (framing, checksum,
  commands, record layout).
- :mod:`.particle_limits`: the EU GMP Annex 1 and ISO 14644-1 airborne particle limits.
- :mod:`.net`: ``free_port``, for a server that must be named before it listens.
"""
