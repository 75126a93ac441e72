"""A minimal, fast Modbus TCP register server for load benchmarks.

Answers function codes 3 and 4 for any unit id from one static register image, in
plain asyncio with no per-request allocation beyond the reply. It is deliberately not
the simulator: the load benchmark measures the agent, so the server must cost little
and never be the bottleneck.

    python -m bench.regserver --ports 15020,15021 --registers 10000
"""

from __future__ import annotations

import argparse
import asyncio
import struct

import numpy as np


def image(registers: int) -> bytes:
    regs = (np.arange(registers, dtype=np.int64) * 7 % 2001 - 1000).astype(">i2")
    return regs.tobytes()


async def serve(port: int, data: bytes) -> asyncio.Server:
    n_regs = len(data) // 2

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readexactly(7)
                tid, _proto, length, unit = struct.unpack(">HHHB", head)
                pdu = await reader.readexactly(length - 1)
                fc = pdu[0]
                if fc in (3, 4) and len(pdu) >= 5:
                    addr, count = struct.unpack(">HH", pdu[1:5])
                    if 1 <= count <= 125 and addr + count <= n_regs:
                        body = bytes((fc, count * 2)) + data[addr * 2 : (addr + count) * 2]
                    else:
                        body = bytes((fc | 0x80, 2))
                else:
                    body = bytes((fc | 0x80, 1))
                writer.write(struct.pack(">HHHB", tid, 0, len(body) + 1, unit) + body)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def main(ports: list[int], registers: int) -> None:
    data = image(registers)
    servers = [await serve(p, data) for p in ports]
    print("ready", flush=True)
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", required=True)
    parser.add_argument("--registers", type=int, default=1000)
    args = parser.parse_args()
    asyncio.run(main([int(p) for p in args.ports.split(",")], args.registers))
