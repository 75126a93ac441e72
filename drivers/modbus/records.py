"""Records mode: drain a particle counter's rotating record buffer after the watermark (the
newest record timestamp delivered), one block per record, with the record's own
timestamp and status bits as quality, so readings the agent missed during an outage are
read back from the device instead of lost.
"""

from __future__ import annotations

import time
from typing import Protocol

import numpy as np

from agent.core.driver import DeviceContext, PollGroup
from agent.core.events import DataLoss, LossReason
from agent.core.records import Block, Event, Quality, Reason, Value, now_ns
from drivers.modbus.config import Connection, RecordLayout, Tag
from drivers.modbus.plan import Outcome, Plan, build_plan, decode_plan, raw_values

_NS = 1_000_000_000
"""Nanoseconds per second: the device keeps record times in whole seconds."""


class Requester(Protocol):
    """What the reader needs of its driver: the device, and requests through its bus (with the
    driver's retries, error counting and health logging)."""

    conn: Connection
    ctx: DeviceContext

    async def execute(self, plan: Plan) -> Outcome: ...

    async def write_register(self, address: int, value: int) -> str | None: ...


class RecordReader:
    """Drains a record buffer after the watermark (the newest record timestamp delivered).

    Positions shift while a full buffer is drained (a new record pushes the oldest out),
    so the reader finds its place by timestamp (binary search: timestamps grow with
    position), checks that each record is newer than the one before, and after a batch
    on a full buffer re-checks that the first position still holds the same record; if
    not, the batch is dropped and re-read next poll (the watermark has not moved, so
    nothing is lost or duplicated).
    """

    def __init__(self, driver: Requester, group: PollGroup, layout: RecordLayout, tags: list[Tag]) -> None:
        self.driver = driver
        self.group = group
        self.layout = layout
        names = [t.name for t in tags]  # the profile checked that the layout's tags are here
        self.ts_index = names.index(layout.timestamp_tag)
        self.bad_bits = [names.index(n) for n in layout.bad_when]
        self.uncertain_bits = [names.index(n) for n in layout.uncertain_when]
        self.exempt = {self.ts_index, *self.bad_bits, *self.uncertain_bits}
        conn = driver.conn
        self.record_plan = build_plan(tags, conn)
        self.ts_plan = build_plan([tags[self.ts_index]], conn)
        self.count_plan = build_plan([Tag(name="record_count", address=layout.count_address)], conn)
        self.index_address = (
            build_plan([Tag(name="record_index", address=layout.index_address)], conn).reads[0].start
        )
        self.state_key = f"{group.name}.last_ts"
        stored = driver.ctx.state.get(self.state_key)
        self.watermark: int | None = int(stored) if stored else None
        self.last_count: int | None = None

    async def _values(self, plan: Plan) -> list[Value]:
        return (await self._read(plan))[0]

    async def _read(self, plan: Plan) -> tuple[list[Value], Outcome]:
        outcome = await self.driver.execute(plan)
        values, _, _ = decode_plan(plan, outcome.regs, outcome.bits, outcome.failed)
        if outcome.failed:
            raise _RecordUnavailable(next(iter(outcome.failed.values())))
        return (values.tolist() if isinstance(values, np.ndarray) else values), outcome

    async def _select(self, index: int) -> None:
        refused = await self.driver.write_register(self.index_address, index)
        if refused is not None:
            raise _RecordUnavailable(refused)

    async def _ts_at(self, position: int) -> int:
        await self._select(position)
        ts = (await self._values(self.ts_plan))[0]
        if not isinstance(ts, int):
            raise _RecordUnavailable(Reason.DECODE_ERROR)
        return ts

    async def read(self) -> list[Block]:
        try:
            return await self._drain()
        except _RecordUnavailable as exc:
            return [self.group.bad(exc.reason)]

    async def _drain(self) -> list[Block]:
        # Blocks are returned only when the poll ends, so a poll the scheduler cancels
        # delivers nothing: stop taking records after half the group's timeout, and a
        # large backlog drains over several polls instead of never.
        budget_end = time.monotonic() + 0.5 * self.group.timeout_s
        layout = self.layout
        count = (await self._values(self.count_plan))[0]
        if not isinstance(count, int) or count < 0:
            raise _RecordUnavailable(Reason.DECODE_ERROR)
        previous_count, self.last_count = self.last_count, count
        if count == 0:
            return []
        first, last = layout.first_index, layout.first_index + count - 1
        wm = self.watermark
        lost: LossReason | None = None
        if wm is None and not layout.backfill:
            block = await self._record(layout.newest_index)
            self.watermark = _seconds(block)
            return [block]
        if wm is None:
            start = first
        else:
            if await self._ts_at(last) <= wm:
                return []
            lo, hi = first, last  # invariant: ts(hi) > wm
            if last > first:  # the common case, one new record, costs one probe
                if await self._ts_at(last - 1) <= wm:
                    lo = last
                else:
                    hi = last - 1
            while lo < hi:
                mid = (lo + hi) // 2
                if await self._ts_at(mid) > wm:
                    hi = mid
                else:
                    lo = mid + 1
            start = lo
            if start == first and (count >= layout.capacity or (previous_count or 0) > count):
                wrapped = count >= layout.capacity
                lost = LossReason.DEVICE_BUFFER_WRAPPED if wrapped else LossReason.DEVICE_BUFFER_CLEARED
        blocks: list[Block] = []
        prev = wm
        for position in range(start, min(last, start + layout.max_records_per_read - 1) + 1):
            if blocks and time.monotonic() > budget_end:
                break
            block = await self._record(position)
            if prev is not None and _seconds(block) <= prev:
                break  # positions moved under us: the rest comes next poll
            prev = _seconds(block)
            blocks.append(block)
        if blocks and count >= layout.capacity and await self._ts_at(start) != _seconds(blocks[0]):
            return []  # the buffer rotated during the batch: re-read it next poll
        if lost is not None and wm is not None and blocks:
            self.driver.ctx.stats.error("device_records_lost")
            blocks[0].events = [self._loss(lost, wm, blocks)]
        if prev is not None:
            self.watermark = prev
        return blocks

    def _loss(self, reason: LossReason, watermark: int, blocks: list[Block]) -> Event:
        """The records between the watermark and the oldest one still in the buffer are gone.

        The device does not count them, so ``records`` stays unknown; the estimate (the gap
        over the spacing of the first two records read) goes in ``detail``.
        """
        oldest = _seconds(blocks[0])
        detail = None
        if len(blocks) > 1 and _seconds(blocks[1]) > oldest:
            period = _seconds(blocks[1]) - oldest
            estimate = max(0, round((oldest - watermark) / period) - 1)
            detail = f"about {estimate} records (one every {period} s)"
        loss = DataLoss(
            reason, group=self.group.name, first_ts=watermark * _NS, last_ts=oldest * _NS, detail=detail
        )
        return loss.event(self.driver.ctx.id)

    async def _record(self, index: int) -> Block:
        acq = now_ns()
        await self._select(index)
        values, outcome = await self._read(self.record_plan)
        ts = values[self.ts_index]
        if not isinstance(ts, int):
            raise _RecordUnavailable(Reason.DECODE_ERROR)
        raw = raw_values(self.record_plan, outcome) if self.driver.ctx.record_raw else None
        block = self.group.finish(values, acq_ts_ns=acq, source_ts_ns=ts * _NS, device_raw=raw)
        block.state = {self.state_key: str(ts)}
        worst = None
        if any(values[i] for i in self.bad_bits):
            worst = Quality.BAD
        elif any(values[i] for i in self.uncertain_bits):
            worst = Quality.UNCERTAIN
        if worst is not None:
            # Readings taken under a device fault keep their values and raw words (the
            # original record) but never pass as good; a reading already bad (out of range)
            # stays so. The timestamp and the status bits themselves are the device's own report.
            n = len(values)
            qs = block.quality or [Quality.GOOD] * n
            rs = block.reasons or [None] * n
            block.quality = [q if q is Quality.BAD or i in self.exempt else worst for i, q in enumerate(qs)]
            block.reasons = [
                r if q is Quality.BAD or i in self.exempt else Reason.DEVICE_STATUS
                for i, (q, r) in enumerate(zip(qs, rs, strict=True))
            ]
        return block


class _RecordUnavailable(Exception):
    """The record cannot be read this poll; ``reason`` becomes the bad block's quality reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def _seconds(block: Block) -> int:
    """A record block's own timestamp, in the whole seconds the device keeps."""
    assert isinstance(block.source_ts_ns, int)
    return block.source_ts_ns // _NS
