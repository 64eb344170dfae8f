"""Prometheus metrics of a station (``GET /metrics``), with prometheus-client.

Events the service sees itself (requests, latencies, verdicts, errors) are counted as they happen;
what the batchers and the line runtime count (queue depth, engine batch sizes, dropped frames,
sink spools) is read from their ``stats()`` at scrape time, so there is one source of truth.
Each service has its own registry: two in one process (tests) never share counters.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

# Seconds: 5 ms (a GPU batch) .. 60 s (a queue behind a slow CPU engine).
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64)
STAGES = ("upload", "decode", "queue", "engine", "scoring", "resize", "store")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# The line runtime's counters: a dict (or dataclass) with per-source "dropped"/"reconnects"/"incomplete", per-sink
# "spool_pending"/"spool_overflow" mappings.
StationStats = Callable[[], Any]


def verdict_of(anomalous: bool | None, error: str | None) -> str:
    if error is not None:
        return "error"
    return {True: "anomalous", False: "normal", None: "undecided"}[anomalous]


class _Pulled:
    """Collector for counts kept by the batchers and the line runtime, read at scrape time."""

    def __init__(self, batchers: Mapping[str, object], station_stats: StationStats | None):
        self.batchers, self.station_stats = batchers, station_stats

    def collect(self) -> Iterator:
        depth = GaugeMetricFamily("winclip_queue_depth", "Jobs waiting for the engine", labels=["product"])
        sizes = HistogramMetricFamily("winclip_engine_batch_size", "Images per engine call", labels=["product"])
        for product, batcher in list(self.batchers.items()):  # a copy: POST /v1/products may add one meanwhile
            stats = batcher.stats()
            depth.add_metric([product], stats.queue_depth)
            buckets = [(str(b), float(sum(n for s, n in stats.batch_sizes.items() if s <= b))) for b in BATCH_BUCKETS]
            buckets.append(("+Inf", float(sum(stats.batch_sizes.values()))))
            sizes.add_metric([product], buckets, float(sum(s * n for s, n in stats.batch_sizes.items())))
        yield depth
        yield sizes
        station = self.station_stats() if self.station_stats is not None else {}
        if dataclasses.is_dataclass(station):
            station = dataclasses.asdict(station)
        for key, name, help_text, label in (
                ("dropped", "winclip_dropped_frames", "Frames a live source dropped (engine behind)", "source"),
                ("reconnects", "winclip_source_reconnects", "Reconnections of a live source", "source"),
                ("incomplete", "winclip_incomplete_frames", "Frames a camera delivered incomplete (dropped unscored)",
                 "source"),
                ("spool_overflow", "winclip_spool_overflow", "Messages a sink's full spool could not keep", "sink")):
            family = CounterMetricFamily(name, help_text, labels=[label])
            for who, n in station.get(key, {}).items():
                family.add_metric([who], n)
            yield family
        pending = GaugeMetricFamily("winclip_spool_pending", "Messages waiting in a sink's spool", labels=["sink"])
        for sink, n in station.get("spool_pending", {}).items():
            pending.add_metric([sink], n)
        yield pending


class _Review:
    """Collector for the review loop, read at scrape time: product versions served, the review queue, drift."""

    def __init__(self, versions: Callable[[], Mapping[str, Any]], queue: Callable[[], Mapping[str, int]],
                 drift: Callable[[], Mapping[str, dict]] | None):
        self.versions, self.queue, self.drift = versions, queue, drift

    def collect(self) -> Iterator:
        version = GaugeMetricFamily("winclip_product_version", "Product version served (0: unversioned files)",
                                    labels=["product"])
        for product, number in self.versions().items():
            version.add_metric([product], float(number or 0))
        yield version
        waiting = GaugeMetricFamily("winclip_review_queue", "Flagged results kept that no operator reviewed yet",
                                    labels=["product"])
        for product, n in self.queue().items():
            waiting.add_metric([product], float(n))
        yield waiting
        if self.drift is None:
            return
        value = GaugeMetricFamily("winclip_drift", "Drift statistic over the window (NaN: too few samples): "
                                  "false_alarm_rate, ks, share_above", labels=["product", "statistic"])
        alert = GaugeMetricFamily("winclip_drift_alert", "1 while the statistic's alert is raised (hysteresis)",
                                  labels=["product", "statistic"])
        limit = GaugeMetricFamily("winclip_drift_limit", "The levels that raise (on) and clear (off) an alert",
                                  labels=["product", "statistic", "level"])
        samples = GaugeMetricFamily("winclip_drift_samples", "Observations in the window: scores, reviewed_goods",
                                    labels=["product", "kind"])
        for product, state in self.drift().items():
            for statistic, x in state["values"].items():
                value.add_metric([product, statistic], float("nan") if x is None else x)
                alert.add_metric([product, statistic], float(state["active"][statistic]))
                levels = state["limits"][statistic]
                for level in ("on", "off"):
                    if levels is not None:
                        limit.add_metric([product, statistic, level], levels[level])
            for kind in ("scores", "reviewed_goods"):
                samples.add_metric([product, kind], float(state[kind]))
        yield from (value, alert, limit, samples)


class ServiceMetrics:
    """The station's metrics; ``render()`` is the /metrics body."""

    def __init__(self, batchers: Mapping[str, object], station_stats: StationStats | None = None):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("winclip_http_requests", "HTTP requests by route and status", ["route", "status"], registry=r)
        self.latency = Histogram("winclip_inspection_latency_seconds",
                                 "End to end: request received (or frame captured) to result stored",
                                 ["product", "source"], buckets=LATENCY_BUCKETS, registry=r)
        self.stage = Histogram("winclip_stage_latency_seconds", f"Time per stage ({', '.join(STAGES)}; engine and "
                               "scoring are the image's share of its batch)", ["stage"], buckets=LATENCY_BUCKETS, registry=r)
        self.verdicts = Counter("winclip_inspections", "Inspections by product and verdict "
                                "(anomalous, normal, undecided = no threshold, error)", ["product", "verdict"], registry=r)
        self.errors = Counter("winclip_errors", "Failed requests and inspections by kind", ["kind"], registry=r)
        self.reloads = Counter("winclip_product_reloads", "Product reloads by outcome", ["product", "outcome"], registry=r)
        self.reviews = Counter("winclip_verdicts", "Operators' verdicts recorded (good, defect)", ["product", "verdict"],
                               registry=r)
        self.changes = Counter("winclip_product_changes", "Teach and rollback requests by outcome",
                               ["product", "action", "outcome"], registry=r)
        r.register(_Pulled(batchers, station_stats))

    def watch_review(self, versions: Callable[[], Mapping[str, Any]], queue: Callable[[], Mapping[str, int]],
                     drift: Callable[[], Mapping[str, dict]] | None) -> None:
        """Add the review loop's gauges (product versions, review queue, drift) read from these at scrape time."""
        self.registry.register(_Review(versions, queue, drift))

    def observe_result(self, product: str, source: str, anomalous: bool | None, error: str | None,
                       timings_ms: Mapping[str, float], end_to_end_s: float | None) -> None:
        self.verdicts.labels(product, verdict_of(anomalous, error)).inc()
        for stage, ms in timings_ms.items():
            if stage in STAGES:
                self.stage.labels(stage).observe(ms / 1e3)
        if end_to_end_s is not None:
            self.latency.labels(product, source).observe(end_to_end_s)

    def render(self) -> bytes:
        return generate_latest(self.registry)
