"""Prometheus metrics of the running agent, served at ``/metrics`` on the status listener.

Nothing is counted for the metrics' sake: a custom collector reads the counters the agent keeps
anyway (the scheduler's poll counts, the drivers' error counts and round trips, the forwarder's
publish counts, the buffer's depth) when Prometheus scrapes, so the data path does no extra work
however often, or never, it is scraped. Each scrape builds its own registry, so two agents in one
process (tests) never share a metric. Every metric family is always announced (``# HELP`` and
``# TYPE``), also when it has no sample yet (no device, no model): the documented table in
docs/operations.md is checked against a scrape.

Labels name devices, groups, error kinds, model bindings and certificate roles: never a secret
nor anything read from a key or a certificate file.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily

from agent import __version__
from agent.app.health import AgentView, Health, ProblemKind, assess
from agent.core.clock import ClockState
from agent.core.stats import percentile
from agent.sinks.forwarder import AgentIdentity
from agent.transforms.inference import InferenceEngine

PREFIX = "cleanroom"
RTT_QUANTILES = (0.5, 0.9, 0.99)
"""Quantiles of the round-trip summary, over the requests each driver keeps (its last 2048)."""


class MetricsAgent(AgentView, Protocol):
    """What metrics read beyond what health reads (:class:`agent.app.runtime.Agent`)."""

    @property
    def inference(self) -> InferenceEngine | None: ...
    @property
    def started_ns(self) -> int | None: ...
    @property
    def identity(self) -> AgentIdentity: ...


@dataclass(frozen=True)
class Scrape:
    """The state one scrape reports: read once, so health and the figures it is made from agree."""

    agent: MetricsAgent
    buffer: Mapping[str, Any]
    health: Health
    clock: ClockState


async def render(agent: MetricsAgent) -> tuple[bytes, str]:
    """The exposition (body, content type) for ``/metrics``. A coroutine because the buffer's depth
    is counted on the buffer's reader thread (never on the event loop)."""
    stats = await agent.buffer.stats()
    scrape = Scrape(agent, stats, assess(agent, stats), agent.health_watch.clock())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(AgentCollector(scrape))
    ProcessCollector(registry=registry)
    return generate_latest(registry), CONTENT_TYPE_LATEST


class AgentCollector:
    """Reads :class:`Scrape` into metric families (prometheus_client's custom collector protocol)."""

    def __init__(self, scrape: Scrape) -> None:
        self.s = scrape

    def collect(self) -> Iterator[Metric]:
        yield from self._agent()
        yield from self._devices()
        yield from self._buffer()
        yield from self._broker()
        yield from self._models()
        yield from self._clock()
        yield from self._certificates()
        yield from self._health()

    def _agent(self) -> Iterator[Metric]:
        info = GaugeMetricFamily(
            f"{PREFIX}_agent_info", "The agent's id and version (always 1).", labels=["agent", "version"]
        )
        info.add_metric([self.s.agent.identity.agent_id, __version__], 1)
        yield info
        started = GaugeMetricFamily(
            f"{PREFIX}_agent_start_time_seconds", "When the agent started (Unix time)."
        )
        if self.s.agent.started_ns is not None:
            started.add_metric([], self.s.agent.started_ns / 1e9)
        yield started

    def _devices(self) -> Iterator[Metric]:
        dg, dk, d = ["device", "group"], ["device", "kind"], ["device"]
        polls = CounterMetricFamily(
            f"{PREFIX}_device_polls", "Polls started, per device and poll group.", labels=dg
        )
        failed = CounterMetricFamily(
            f"{PREFIX}_device_poll_failures",
            "Polls that produced bad readings (device down or read failed).",
            labels=dg,
        )
        overruns = CounterMetricFamily(
            f"{PREFIX}_device_poll_overruns",
            "Poll ticks skipped because the previous poll ran past them.",
            labels=dg,
        )
        errors = CounterMetricFamily(
            f"{PREFIX}_device_errors",
            "Device errors by kind (the quality reason: timeout, comm_error, ...).",
            labels=dk,
        )
        requests = CounterMetricFamily(
            f"{PREFIX}_device_requests", "Requests the driver completed.", labels=d
        )
        reconnects = CounterMetricFamily(
            f"{PREFIX}_device_reconnects", "Connections made again after a loss.", labels=d
        )
        connected = GaugeMetricFamily(
            f"{PREFIX}_device_connected", "1 while the device is connected.", labels=d
        )
        rtt = SummaryMetricFamily(
            f"{PREFIX}_device_round_trip_seconds",
            "Request round-trip time; quantiles over the driver's last 2048 requests, count over all.",
            labels=d,
        )
        scheduler = self.s.agent.scheduler
        for runner in scheduler.runners if scheduler is not None else ():
            for group, gs in runner.group_stats.items():
                polls.add_metric([runner.id, group], gs.polls)
                failed.add_metric([runner.id, group], gs.failed)
                overruns.add_metric([runner.id, group], gs.overruns)
            stats = runner.ctx.stats
            for kind, n in sorted(stats.errors.items()):
                errors.add_metric([runner.id, kind], n)
            requests.add_metric([runner.id], stats.requests)
            reconnects.add_metric([runner.id], stats.reconnects)
            connected.add_metric([runner.id], 1 if runner.connected else 0)
            window = list(stats.rtt_s)
            for q in RTT_QUANTILES if window else ():
                value = percentile(window, q)
                rtt.add_sample(rtt.name, {"device": runner.id, "quantile": str(q)}, value or 0.0)
            rtt.add_sample(f"{rtt.name}_count", {"device": runner.id}, stats.requests)
        yield from (polls, failed, overruns, errors, requests, reconnects, connected, rtt)

    def _buffer(self) -> Iterator[Metric]:
        b = self.s.buffer
        figures = (
            (
                "undelivered_readings",
                "depth_readings",
                "Readings committed and not yet acknowledged by the broker.",
            ),
            (
                "undelivered_segments",
                "depth_segments",
                "Segments (each one or more MQTT messages) not yet acknowledged.",
            ),
            (
                "oldest_undelivered_age_seconds",
                "oldest_undelivered_age_s",
                "Age of the oldest undelivered reading.",
            ),
            ("size_bytes", "size_bytes", "Live data in the buffer file (what buffer.max_bytes bounds)."),
            ("max_bytes", "max_bytes", "buffer.max_bytes: beyond it the oldest data is dropped."),
        )
        for name, key, doc in figures:
            g = GaugeMetricFamily(f"{PREFIX}_buffer_{name}", doc)
            if b.get(key) is not None:
                g.add_metric([], float(b[key]))
            yield g
        shed = CounterMetricFamily(
            f"{PREFIX}_buffer_shed_readings", "Readings given up while the disk refused commits (data loss)."
        )
        shed.add_metric([], float(b.get("shed_readings", 0)))
        yield shed

    def _broker(self) -> Iterator[Metric]:
        fw = self.s.agent.forwarder
        counts = fw.stats() if fw is not None else {}
        # The forwarder counts segments, its unit of delivery; each is one MQTT message with json,
        # one or more with flat and sparkplug_b (births and the status not counted).
        counters = (
            ("published_segments", "published", "Segments published (a re-send counts again)."),
            ("published_messages", "messages", "MQTT messages published that carry segments."),
            ("published_readings", "published_readings", "Readings published."),
            ("acked_segments", "acked", "Segments the broker acknowledged every message of (delivered)."),
            ("acked_readings", "acked_readings", "Readings delivered."),
            (
                "rejected_segments",
                "rejected",
                "Segments the broker refused a message of (MQTT 5); sent again.",
            ),
            ("encode_errors", "encode_errors", "Segments the payload format could not encode; tried again."),
            ("reconnects", "reconnects", "Connections to the broker made again after a loss."),
            (
                "callback_errors",
                "callback_errors",
                "Errors in the MQTT client's callbacks; each dropped the connection, made again.",
            ),
        )
        for name, key, doc in counters:
            c = CounterMetricFamily(f"{PREFIX}_mqtt_{name}", doc)
            if key in counts:
                c.add_metric([], counts[key])
            yield c
        connected = GaugeMetricFamily(f"{PREFIX}_mqtt_connected", "1 while connected to the broker.")
        inflight = GaugeMetricFamily(
            f"{PREFIX}_mqtt_inflight_segments", "Segments published and awaiting the broker's ack."
        )
        if fw is not None:
            connected.add_metric([], 1 if counts["connected"] else 0)
            inflight.add_metric([], counts["inflight"])
        yield from (connected, inflight)

    def _models(self) -> Iterator[Metric]:
        labels = ["binding", "device", "model", "model_version"]
        score = GaugeMetricFamily(
            f"{PREFIX}_model_score", "Anomaly score of the last window scored.", labels=labels
        )
        threshold = GaugeMetricFamily(
            f"{PREFIX}_model_threshold", "Score above which a window is anomalous.", labels=labels
        )
        alarm = GaugeMetricFamily(
            f"{PREFIX}_model_alarm", "1 while the binding's anomaly alarm is active.", labels=labels
        )
        scored = CounterMetricFamily(
            f"{PREFIX}_model_windows_scored", "Windows the model scored.", labels=labels
        )
        engine = self.s.agent.inference
        for key, b in sorted(engine.bindings.items()) if engine is not None else ():
            t = b.track
            lv = [key, b.device, b.model.manifest.id, b.model.manifest.version]
            if t.last_score is not None:
                score.add_metric(lv, t.last_score)
            threshold.add_metric(lv, t.settings.threshold)
            alarm.add_metric(lv, 1 if t.debounce.active else 0)
            scored.add_metric(lv, t.windows_scored)
        yield from (score, threshold, alarm, scored)
        inference = SummaryMetricFamily(
            f"{PREFIX}_model_inference_seconds",
            "Time spent scoring windows (all models, one call per batch).",
        )
        if engine is not None:
            inference.add_metric([], count_value=engine.score_calls, sum_value=engine.score_seconds)
        yield inference

    def _clock(self) -> Iterator[Metric]:
        c = self.s.clock
        synced = GaugeMetricFamily(
            f"{PREFIX}_clock_synced", "1 while the wall clock is synchronised (absent: unknown)."
        )
        offset = GaugeMetricFamily(
            f"{PREFIX}_clock_offset_seconds", "The kernel's estimate of the clock's offset."
        )
        max_error = GaugeMetricFamily(
            f"{PREFIX}_clock_max_error_seconds", "The kernel's bound on the clock's error."
        )
        for family, value in ((synced, c.synced), (offset, c.offset_s), (max_error, c.max_error_s)):
            if value is not None:
                family.add_metric([], float(value))
            yield family

    def _certificates(self) -> Iterator[Metric]:
        days = GaugeMetricFamily(
            f"{PREFIX}_certificate_expiry_days",
            "Days until a certificate the agent presents expires (negative: expired).",
            labels=["certificate"],
        )
        now = datetime.now(UTC)
        for cert in self.s.agent.health_watch.certificate_expiry():
            days.add_metric([cert.subject], cert.days_left(now))
        yield days

    def _health(self) -> Iterator[Metric]:
        h = self.s.health
        healthy = GaugeMetricFamily(
            f"{PREFIX}_healthy", "1 when the agent has no health problem (docs/operations.md)."
        )
        healthy.add_metric([], 1 if h.ok else 0)
        problems = GaugeMetricFamily(
            f"{PREFIX}_health_problems", "Health problems now, by kind.", labels=["kind"]
        )
        for kind in ProblemKind:
            problems.add_metric([str(kind)], sum(1 for p in h.problems if p.kind is kind))
        yield from (healthy, problems)
