"""Picking a free TCP port for a server that must be named before it listens."""

from __future__ import annotations

import socket


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` that nothing listened on a moment ago.

    Some servers need their port before they bind: asyncua writes it into its endpoint URL,
    mosquitto reads it from a config file, and the demo hands it to a child process. Binding
    to port 0 lets the kernel choose, and closing the socket gives the port back.

    This is racy: between the close and the server's own bind, another process may take the
    port. That is safe enough for tests, benches and the demo: the kernel picks from a range
    of thousands of ports, so a collision needs another program to bind that exact port
    within milliseconds, and it shows as the server failing to start ("address in use"),
    never as talking to the wrong peer. A server that can listen on port 0 itself and report
    its port (the Modbus simulator) should do that instead.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
