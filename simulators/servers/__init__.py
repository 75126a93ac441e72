"""Protocol front ends of the simulators: Modbus TCP/RTU, OPC UA and serial ASCII servers
that put the process models of :mod:`simulators.process` on the wire.

In-process API (tests, demo)::

    async with serve_bioreactor_modbus(port=0, speed=60, seed=1) as sim:
        sim.port, sim.model
"""

from simulators.servers.faults import CommFault
from simulators.servers.modbus import (
    serve_bioreactor_modbus,
    serve_counter_modbus,
    serve_incubator_modbus,
    serve_modbus,
)
from simulators.servers.opcua import serve_bioreactor_opcua
from simulators.servers.serial_ascii import serve_counter_serial

__all__ = [
    "CommFault",
    "serve_bioreactor_modbus",
    "serve_bioreactor_opcua",
    "serve_counter_modbus",
    "serve_counter_serial",
    "serve_incubator_modbus",
    "serve_modbus",
]
