"""``cleanroom-sim mes``: a simulated MES that assigns the plant's batches through the agent's MQTT
command topic.

It reads the ``batches:`` of a plant or scenario file (:mod:`simulators.process.batch`) and
publishes each assignment command (start, step, end) when it falls due on its own clock at
``--speed``, to ``{prefix}/agent/batch/{agent}`` (the agent's ``batch.command_topic``; it
listens only with ``batch.mqtt_commands: true``). Every command is published with QoS 1 and
counts as sent only once the broker acknowledged it: through a broker outage paho keeps it and
sends it again after reconnecting, and a command not acknowledged within ``ack_timeout_s``
stops the run with exit 1 rather than be lost without a word. The broker is 127.0.0.1:1883
unless told otherwise; TLS and a login are optional, the password read from a file so it never
appears in a process listing or a log.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from simulators.process.base import Clock
from simulators.process.batch import BatchSchedule, Command

log = logging.getLogger(__name__)

DEFAULT_TOPIC = "{prefix}/agent/batch/{agent}"


class MesError(RuntimeError):
    """The broker could not be reached, or did not acknowledge a command in time."""


@dataclass(frozen=True)
class Broker:
    """Where and how the simulated MES connects (loopback, plain MQTT unless told otherwise)."""

    host: str = "127.0.0.1"
    port: int = 1883
    ca: Path | None = None
    """CA bundle of the broker's certificate: turns TLS on."""
    cert: Path | None = None
    """Client certificate (mutual TLS), with ``key``."""
    key: Path | None = None
    username: str | None = None
    password: str | None = None
    client_id: str = ""


class MesPublisher:
    """A paho client on its own network thread; :meth:`publish` returns once the broker acked."""

    def __init__(self, broker: Broker, topic: str, *, ack_timeout_s: float = 30.0) -> None:
        self.broker = broker
        self.topic = topic
        self.ack_timeout_s = ack_timeout_s
        self._acked: set[int] = set()
        self._cond = threading.Condition()
        self._connected = threading.Event()
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=broker.client_id or f"cleanroom-sim-mes-{os.getpid()}"
        )
        self.client.reconnect_delay_set(1, 5)
        if broker.ca is not None or broker.cert is not None:
            self.client.tls_set(
                ca_certs=str(broker.ca) if broker.ca else None,
                certfile=str(broker.cert) if broker.cert else None,
                keyfile=str(broker.key) if broker.key else None,
                tls_version=ssl.PROTOCOL_TLS_CLIENT,
            )
        if broker.username is not None:
            self.client.username_pw_set(broker.username, broker.password)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = lambda *a: self._connected.clear()
        self.client.on_publish = self._on_publish

    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            log.error("MES: the broker refused the connection: %s", reason)
            return
        self._connected.set()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        with self._cond:
            self._acked.add(mid)
            self._cond.notify_all()

    async def connect(self, timeout_s: float = 10.0) -> None:
        b = self.broker
        try:
            await asyncio.to_thread(self.client.connect, b.host, b.port)
        except (OSError, ssl.SSLError) as exc:
            raise MesError(f"cannot connect to the MQTT broker at {b.host}:{b.port}: {exc}") from None
        self.client.loop_start()
        if not await asyncio.to_thread(self._connected.wait, timeout_s):
            self.client.loop_stop()
            raise MesError(f"the MQTT broker at {b.host}:{b.port} did not accept the connection")

    async def publish(self, payload: dict[str, Any]) -> None:
        """Publish one command with QoS 1 and wait for the broker's PUBACK, however many
        reconnects that takes within ``ack_timeout_s``."""
        info = self.client.publish(self.topic, json.dumps(payload, separators=(",", ":")), qos=1)
        if not await asyncio.to_thread(self._wait_acked, info.mid, self.ack_timeout_s):
            raise MesError(
                f"the broker did not acknowledge the {payload['action']} command of batch "
                f"{payload['batch_id']} within {self.ack_timeout_s:g} s"
            )

    def _wait_acked(self, mid: int, timeout_s: float) -> bool:
        with self._cond:
            ok = self._cond.wait_for(lambda: mid in self._acked, timeout_s)
            self._acked.discard(mid)
            return ok

    async def close(self) -> None:
        await asyncio.to_thread(self.client.disconnect)
        await asyncio.to_thread(self.client.loop_stop)


async def run_mes(
    schedule: BatchSchedule,
    publisher: MesPublisher,
    clock: Clock,
    on_sent: Callable[[Command], None] = lambda c: None,
) -> int:
    """Publish every command of ``schedule`` when ``clock`` reaches it; returns how many were sent.
    Commands already due when the run starts go out at once, in order."""
    sent = 0
    for command in schedule.commands():
        wait = (command.t - clock.now()) / clock.speed
        if wait > 0:
            await asyncio.sleep(wait)
        await publisher.publish(command.payload())
        sent += 1
        on_sent(command)
    return sent


def command_line(command: Command) -> str:
    """What ``cleanroom-sim mes`` prints per command the broker acknowledged."""
    p = command.payload()
    target = p.get("group") or ",".join(p.get("devices") or [])
    step = f" step={command.step}" if command.step else ""
    return f"{command.action:<5} {command.batch.id:<16} {target}{step}"


__all__ = ["DEFAULT_TOPIC", "Broker", "MesError", "MesPublisher", "command_line", "run_mes"]
