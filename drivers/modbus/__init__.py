"""The ``modbus`` driver; registered in the ``cleanroom_edge.drivers`` entry-point group."""
