"""The ``serial_counter`` driver; registered in the ``cleanroom_edge.drivers`` entry-point group."""
