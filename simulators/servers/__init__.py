"""Protocol front ends of the simulators: Modbus TCP/RTU, OPC UA and serial ASCII servers
that put the process models of :mod:`simulators.process` on the wire.

In-process API (tests, demo)::

    async with serve_bioreactor_modbus(port=0, speed=60, seed=1) as sim:
        sim.port, sim.model
"""

from simulators.servers.modbus import (
    serve_bioreactor_modbus,
    serve_counter_modbus,
    serve_incubator_modbus,
    serve_modbus,
)

__all__ = ["serve_bioreactor_modbus", "serve_counter_modbus", "serve_incubator_modbus", "serve_modbus"]
