"""Shared fixtures. Every test must leave no threads, tasks or child processes behind."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from tests.support import Collector, Mosquitto


@pytest.fixture
def mosquitto() -> Iterator[Mosquitto]:
    broker = Mosquitto().start()
    try:
        yield broker
    finally:
        broker.close()


@pytest.fixture
def collector(mosquitto: Mosquitto) -> Iterator[Collector]:
    c = Collector(mosquitto.port)
    try:
        yield c
    finally:
        c.close()


@pytest.fixture(autouse=True)
def no_leaked_threads() -> Iterator[None]:
    """Fail a test that leaves non-daemon threads running (a hung thread hangs CI)."""
    before = set(threading.enumerate())
    yield
    import time

    deadline = time.monotonic() + 5
    while True:
        leaked = [t for t in threading.enumerate() if t not in before and t.is_alive() and not t.daemon]
        if not leaked or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert not leaked, f"test leaked threads: {[t.name for t in leaked]}"
