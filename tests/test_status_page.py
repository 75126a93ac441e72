"""The local status page in a real browser (Debian's headless Chromium): a status listener over a
fixed agent state (fixed times, fixed readings) is loaded, its DOM checked, and its screenshot
compared with ``tests/data/status_page.png``.

The comparison is on 16x16-pixel cells of the greyscale image: a cell differs when its mean
brightness is more than :data:`CELL_TOLERANCE` (of 255) from the reference's, and the page matches
when at most :data:`CELLS_ALLOWED` of the cells differ. A font that renders a glyph a pixel wider
moves a cell's mean by a few levels and changes a handful of cells; a layout that breaks (a card
missing, columns collapsed, the stylesheet not applied) moves whole rows of cells.
``CLEANROOM_UPDATE_SCREENSHOT=1`` rewrites the reference instead of comparing."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import shutil
import subprocess
import tempfile
import zlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from agent.app.status import StatusServer
from agent.app.trend import MAX_SERIES, TrendRecorder
from agent.core.records import Block, Event, Quality, Severity
from cleanroom_common.net import free_port

CHROMIUM = "/usr/bin/chromium"
REFERENCE = Path(__file__).parent / "data" / "status_page.png"
WINDOW = (1280, 1000)
CELL = 16
CELL_TOLERANCE = 24
CELLS_ALLOWED = 0.015

NOW = 1_736_935_200_000_000_000  # 2025-01-15T10:00:00Z
S = 1_000_000_000

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(), reason="chromium is not installed")


# --------------------------------------------------------------------------- the fixed agent


def fixture_trend() -> TrendRecorder:
    """An hour of readings every 10 s from two devices, then a device going down, an excursion."""
    trend = TrendRecorder(clock=lambda: NOW)
    for k in range(360, 0, -1):
        ts = NOW - k * 10 * S
        phase = k / 40
        trend.on_committed(
            [
                Block("inc-01", "env", ts, ["temp", "rh"], ["degC", "%"],
                      [round(37.0 + 0.3 * math.sin(phase), 3), round(55 + 4 * math.cos(phase / 2), 2)]),
                Block("bsc-02", "air", ts, ["downflow", "door_open"], ["m/s", None],
                      [round(0.45 + 0.02 * math.sin(phase * 3), 4), k % 90 < 3]),
            ],
            (),
        )  # fmt: skip
    trend.on_committed(
        [Block("pc-03", "counts", NOW - 5 * S, ["p05"], ["1/ft3"], [None], quality=[Quality.BAD])],
        [  # in the order they were committed
            Event("agent", "agent_start", Severity.INFO, {"version": "0.9.0"}, ts_ns=NOW - 3700 * S),
            Event("inc-01", "excursion", Severity.ALARM, {"tag": "temp", "level": "alarm", "peak": 37.9},
                  ts_ns=NOW - 600 * S),
            Event("pc-03", "device_state", Severity.WARNING, {"state": "backoff", "reason": "timeout"},
                  ts_ns=NOW - 4 * S),
        ],
    )  # fmt: skip
    return trend


def device(
    protocol: str, profile: str, state: str, errors: dict[str, int], last_error: str | None
) -> dict[str, Any]:
    return {
        "protocol": protocol, "profile": profile, "state": state, "connected": state == "connected",
        "last_error": last_error, "consecutive_failures": 3 if last_error else 0, "groups": {},
        "driver": {"requests": 360, "retries": 0, "reconnects": 0, "errors": errors,
                   "rtt_p50_ms": 2.1, "rtt_p99_ms": 7.4, "warnings": []},
        "tasks": {},
    }  # fmt: skip


async def fixture_status() -> dict[str, Any]:
    return {
        "agent": "gw-suite-b",
        "version": "0.9.0",
        "config_sha256": "ab" * 32,
        "started": NOW - 3700 * S,
        "devices": {
            "inc-01": device("modbus", "incubator-x", "connected", {}, None),
            "bsc-02": device("opcua", "bsc-class2", "connected", {"timeout": 2}, None),
            "pc-03": device("modbus", "particle-counter", "backoff", {"timeout": 7, "comm_error": 1},
                            "timeout"),
        },
        "buffer": {"depth_readings": 1234, "depth_records": 310, "oldest_undelivered_age_s": 95.4,
                   "size_bytes": 3 * 1048576, "max_bytes": 512 * 1048576, "quarantined": 0},
        "broker": {"connected": False, "broker": "10.0.8.5:8883", "client_id": "gw-suite-b", "inflight": 0,
                   "last_error": "connection refused"},
        "limits": {"problems": [], "rules": 4, "excursions": 1, "failed_records": 0, "active": [
            {"device": "inc-01", "tag": "temp", "kind": "high", "level": "alarm", "active": True,
             "since_ts": NOW - 600 * S, "peak": 37.9, "excursions": 1}]},
        "health": {"ok": False, "problems": [
            {"kind": "device_down", "subject": "pc-03", "since": NOW - 300 * S, "detail": "timeout"},
            {"kind": "broker_unreachable", "subject": "10.0.8.5:8883", "since": NOW - 120 * S,
             "detail": None}]},
        "security": {"mqtt_tls": "on", "status_listener": "loopback", "warnings": []},
    }  # fmt: skip


@contextlib.asynccontextmanager
async def fixture_server() -> AsyncIterator[StatusServer]:
    server = StatusServer(
        f"127.0.0.1:{free_port()}", fixture_status, trend=fixture_trend(), clock=lambda: NOW
    )
    await server.start()
    try:
        assert server.listening
        yield server
    finally:
        await server.stop()


# --------------------------------------------------------------------------- the browser


def chromium(url: str, *args: str) -> subprocess.CompletedProcess[bytes]:
    """One headless run; the virtual time budget lets the page's fetches finish before the DOM is
    dumped or the screenshot taken (its refresh timer runs in virtual time too)."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        return subprocess.run(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run",
                f"--user-data-dir={profile}",
                "--hide-scrollbars", "--force-device-scale-factor=1", "--font-render-hinting=none",
                "--virtual-time-budget=4000", f"--window-size={WINDOW[0]},{WINDOW[1]}", *args, url,
            ],
            capture_output=True,
            timeout=90,
            check=False,
        )  # fmt: skip


async def dump_dom(url: str) -> str:
    run = await asyncio.to_thread(chromium, url, "--dump-dom")
    assert run.returncode == 0, run.stderr.decode(errors="replace")[-2000:]
    return run.stdout.decode()


def take_screenshot(url: str, path: Path) -> np.ndarray:
    run = chromium(url, f"--screenshot={path}")
    assert run.returncode == 0 and path.exists(), run.stderr.decode(errors="replace")[-2000:]
    return read_png(path.read_bytes())


async def screenshot(url: str, path: Path) -> np.ndarray:
    return await asyncio.to_thread(take_screenshot, url, path)


def read_png(data: bytes) -> np.ndarray:
    """An 8-bit RGB(A) non-interlaced PNG (what Chromium writes) as a greyscale array."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, b"", b""
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        header = body if kind == b"IHDR" else header
        idat += body if kind == b"IDAT" else b""
        pos += 12 + length
    width, height = int.from_bytes(header[0:4], "big"), int.from_bytes(header[4:8], "big")
    depth, colour, interlace = header[8], header[9], header[12]
    assert depth == 8 and colour in (2, 6) and interlace == 0, f"unsupported PNG {depth=} {colour=}"
    bpp = 3 if colour == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    out = np.zeros((height, stride), dtype=np.uint8)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(height):
        kind = raw[y * (stride + 1)]
        line = np.frombuffer(raw, np.uint8, stride, y * (stride + 1) + 1).astype(np.int32)
        if kind == 1:  # sub: a running sum per channel
            line = np.cumsum(line.reshape(width, bpp), axis=0).reshape(stride) & 0xFF
        elif kind == 2:
            line = (line + prev) & 0xFF
        elif kind in (3, 4):
            cur = [0] * stride
            lv, pv = line.tolist(), prev.tolist()
            for i in range(stride):
                a = cur[i - bpp] if i >= bpp else 0
                b = pv[i]
                if kind == 3:
                    pred = (a + b) >> 1
                else:
                    c = pv[i - bpp] if i >= bpp else 0
                    p = a + b - c
                    pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                    pred = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (lv[i] + pred) & 0xFF
            line = np.array(cur, dtype=np.int32)
        out[y] = line
        prev = line
    rgb = out.reshape(height, width, bpp)[:, :, :3].astype(np.float64)
    grey: np.ndarray = rgb @ np.array([0.299, 0.587, 0.114])
    return grey


def differing_cells(image: np.ndarray, reference: np.ndarray) -> float:
    """The fraction of :data:`CELL`-pixel cells whose mean brightness differs by more than the
    tolerance (images of different sizes differ everywhere)."""
    if image.shape != reference.shape:
        return 1.0
    h, w = (image.shape[0] // CELL) * CELL, (image.shape[1] // CELL) * CELL

    def cells(a: np.ndarray) -> np.ndarray:
        return a[:h, :w].reshape(h // CELL, CELL, w // CELL, CELL).mean(axis=(1, 3))

    return float((np.abs(cells(image) - cells(reference)) > CELL_TOLERANCE).mean())


# --------------------------------------------------------------------------- tests


async def test_the_page_shows_the_agent_state_in_chromium() -> None:
    async with fixture_server() as server:
        dom = await dump_dom(f"http://127.0.0.1:{server.port}/")
    assert 'data-loaded="true"' in dom, dom[:2000]  # the script ran and both fetches answered
    for text in (
        "gw-suite-b", "v0.9.0", "unhealthy", "device_down: pc-03 (timeout)",
        "broker_unreachable: 10.0.8.5:8883",
        "disconnected", "connection refused", "1234 readings", "95 s", "3.0 of 512 MiB",
        "as of 10:00:00 UTC",
    ):  # fmt: skip
        assert text in dom, text
    # devices: state, error counts, last values with units, one inline SVG trend per tag
    assert dom.count('class="card device"') == 3
    assert 'class="badge state backoff">backoff' in dom
    assert "8 errors (timeout 7, comm_error 1) · last: timeout" in dom
    assert "2 errors (timeout 2)" in dom and "no errors" in dom
    temp = dom.split('data-tag="temp"', 1)[1].split("</tr>", 1)[0]
    assert "degC" in temp and "<svg" in temp and "<polyline" in temp and "<polygon" in temp
    assert dom.count('<svg class="trend"') == 5  # temp, rh, downflow, door_open, p05
    p05 = dom.split('data-tag="p05"', 1)[1].split("</tr>", 1)[0]
    assert "q-bad" in p05 and "—" in p05 and "<polyline" not in p05  # a bad reading draws no trend
    # alarms and events, newest event first, times in UTC from the agent's clock
    alarms = dom.split('id="alarms"', 1)[1].split("</table>", 1)[0]
    assert "inc-01" in alarms and "alarm high" in alarms and "09:50:00" in alarms and "37.9" in alarms
    events = dom.split('id="events"', 1)[1].split("</table>", 1)[0]
    assert events.index("09:59:56") < events.index("09:50:00") < events.index("08:58:20")
    assert "state=backoff reason=timeout" in events
    assert "http://" not in dom.replace(f"http://127.0.0.1:{server.port}", "")  # nothing external


async def test_the_page_matches_the_reference_screenshot(tmp_path: Path) -> None:
    async with fixture_server() as server:
        image = await screenshot(f"http://127.0.0.1:{server.port}/", tmp_path / "page.png")
    assert image.shape == (WINDOW[1], WINDOW[0])
    if os.environ.get("CLEANROOM_UPDATE_SCREENSHOT") == "1":
        REFERENCE.parent.mkdir(exist_ok=True)
        shutil.copyfile(tmp_path / "page.png", REFERENCE)
        pytest.skip(f"reference rewritten: {REFERENCE}")
    reference = read_png(REFERENCE.read_bytes())
    diff = differing_cells(image, reference)
    assert diff <= CELLS_ALLOWED, f"{diff:.1%} of the page differs from {REFERENCE} (screenshot: {tmp_path})"


async def test_the_comparison_catches_a_broken_layout(tmp_path: Path) -> None:
    """The tolerance is not so loose that it passes anything: the same page without its stylesheet,
    or with a device card gone, differs from the reference by far more than it allows."""
    reference = read_png(REFERENCE.read_bytes())
    async with fixture_server() as server:
        server._files.pop("/style.css")  # the layout falls apart
        unstyled = await screenshot(f"http://127.0.0.1:{server.port}/", tmp_path / "unstyled.png")
    assert differing_cells(unstyled, reference) > 5 * CELLS_ALLOWED
    shifted = np.roll(reference, 24, axis=0)  # everything a line lower, as a taller header would do
    assert differing_cells(shifted, reference) > 3 * CELLS_ALLOWED
    assert differing_cells(reference, reference) == 0.0


async def test_the_trend_api_filters_and_bounds() -> None:
    import json
    import urllib.request

    async with fixture_server() as server:
        base = f"http://127.0.0.1:{server.port}/api/trend"

        def get(query: str) -> dict[str, Any]:
            with urllib.request.urlopen(base + query, timeout=5) as resp:
                doc: dict[str, Any] = json.loads(resp.read())
                return doc

        one = await asyncio.to_thread(get, "?device=inc-01&tag=temp")
        every = await asyncio.to_thread(get, "")
        inc = await asyncio.to_thread(get, "?device=inc-01")
        none = await asyncio.to_thread(get, "?device=nope")
    [temp] = one["series"]
    assert (temp["device"], temp["tag"], temp["unit"]) == ("inc-01", "temp", "degC")
    # an hour of readings every 10 s in 30 s buckets; the hour's first bucket starts with the
    # current one (empty yet), so the reading of exactly an hour ago is out
    assert len(temp["points"]) == 119
    assert all(p[1] <= p[3] <= p[2] for p in temp["points"])  # min <= mean <= max
    assert temp["points"][-1][0] == NOW - 30 * S and temp["last"]["ts"] == NOW - 10 * S
    assert [s["tag"] for s in inc["series"]] == ["rh", "temp"]
    assert len(every["series"]) == 5 and none["series"] == []
    assert (one["window_s"], one["bucket_s"], one["now"]) == (3600, 30, NOW)


def test_the_trend_memory_is_bounded() -> None:
    trend = TrendRecorder(clock=lambda: NOW)
    tags = [f"t{i}" for i in range(MAX_SERIES + 100)]
    for k in range(200):  # more than an hour of buckets
        trend.on_committed([Block("big", "g", NOW - (200 - k) * 30 * S, tags, [None] * len(tags),
                                  [float(k)] * len(tags))], ())  # fmt: skip
    for i in range(100):
        trend.on_committed((), [Event("big", "x", Severity.INFO, {"i": i, "text": "y" * 500})])
    series = trend.series(device="big")
    assert len(series) == MAX_SERIES and trend.dropped_series == 100
    assert max(len(s["points"]) for s in series) == 119  # the hour: 120 buckets with the current one, empty
    events = trend.events()
    assert len(events) == 50 and events[0]["summary"].startswith("i=99 ")
    assert max(len(e["summary"]) for e in events) <= 80


def test_a_fast_group_enters_the_trend_once_per_sample_period() -> None:
    trend = TrendRecorder(clock=lambda: NOW)
    tags, units = ("a", "b"), (None, None)
    for k in range(50):  # 5 s of polls every 100 ms, values rising
        block = Block(
            "dev", "fast", NOW - 10 * S + k * S // 10, tags, units, [float(k), float(-k)], seq_first=k
        )
        trend.on_committed([block], [])
    [a, b] = trend.series("dev")
    assert a["last"]["value"] == 40.0 and b["last"]["value"] == -40.0  # polls 0, 10, 20, 30, 40 were taken
    assert [round(p[3], 3) for p in a["points"]] == [20.0]  # the mean of the five samples
