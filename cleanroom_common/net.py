"""Picking a free TCP port for a server that must be named before it listens, and telling a
loopback address from the rest (what decides whether the agent insists on TLS or warns)."""

from __future__ import annotations

import ipaddress
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


def is_loopback_host(host: str) -> bool:
    """Whether ``host`` names this machine's loopback interface by what it says: an address in
    ``127.0.0.0/8`` or ``::1`` (IPv4-mapped too), or ``localhost``.

    Any other name is not loopback, whatever it resolves to today: the configuration must be safe
    by what it says, and a name's resolution can change under it (DNS, an edited hosts file).
    """
    name = host.rstrip(".").lower()
    if name == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(name)
    except ValueError:
        return False
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback
