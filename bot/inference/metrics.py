"""Counters and histograms of the inference service, per task.

Kept in a prometheus_client registry, so the same numbers feed ``/stats``,
``lmbot stats`` and the optional Prometheus text endpoint.

Percentiles (p50, p95 of a request's time and of its queue wait) are computed
from the last :data:`RECENT` measurements themselves, never from histogram
bucket bounds: a bucket bound (10 s) is not a measurement, and showing it beside
a measured compute time (753 ms) misleads. They are exported as the gauges
``lmbot_request_seconds_recent{task,quantile}`` and
``lmbot_queue_wait_seconds_recent{task,quantile}`` so a running bot's
``/metrics`` carries them too.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import threading
from collections import deque
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.inf)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, math.inf)
RECENT = 2048  # measurements per (figure, task) that percentiles are computed from
QUANTILES = (0.5, 0.95)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of measured ``values`` (linear between the two nearest ranks)."""
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


class RecentMeasurements(Collector):
    """The last :data:`RECENT` measurements of a figure per task; collected as percentile gauges."""

    def __init__(self, name: str, documentation: str) -> None:
        self.name = name
        self.documentation = documentation
        self._values: dict[str, deque[float]] = {}
        self._lock = threading.Lock()  # collected from the metrics server's thread

    def observe(self, task: str, value: float) -> None:
        with self._lock:
            self._values.setdefault(task, deque(maxlen=RECENT)).append(value)

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=["task", "quantile"])
        with self._lock:
            snapshot = {task: sorted(values) for task, values in self._values.items() if values}
        for task, values in snapshot.items():
            for q in QUANTILES:
                family.add_metric([task, str(q)], percentile(values, q))
        yield family


class ServiceMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmbot_requests", "Requests by task and outcome", ["task", "outcome"], registry=r)
        self.queue_wait = Histogram(
            "lmbot_queue_wait_seconds", "Time queued before dispatch", ["task"], buckets=_SECONDS, registry=r
        )
        self.batch_size = Histogram(
            "lmbot_batch_size", "Requests per forward pass", ["task"], buckets=_SIZES, registry=r
        )
        self.compute = Histogram(
            "lmbot_compute_seconds", "Worker compute time per batch", ["task"], buckets=_SECONDS, registry=r
        )
        self.latency = Histogram(
            "lmbot_request_seconds", "Submit to result, per request", ["task"], buckets=_SECONDS, registry=r
        )
        self.queue_depth = Gauge("lmbot_queue_depth", "Requests waiting for a worker", registry=r)
        self.workers_alive = Gauge("lmbot_workers_alive", "Worker processes running", registry=r)
        self.worker_restarts = Counter("lmbot_worker_restarts", "Workers restarted after dying", registry=r)
        self.worker_stalls = Counter(
            "lmbot_worker_stalls", "Workers killed by the watchdog: a batch ran far past its deadline", registry=r
        )
        self.requests_retried = Counter(
            "lmbot_requests_retried", "Requests run again alone after a worker crashed with them in a batch", registry=r
        )
        self.last_progress = Gauge(
            "lmbot_last_progress_timestamp_seconds", "Unix time the service last finished a batch", registry=r
        )
        self.last_progress.set_to_current_time()
        self.recent_latency = RecentMeasurements(
            "lmbot_request_seconds_recent", "Submit to result, per request: percentiles of the last measurements"
        )
        self.recent_queue_wait = RecentMeasurements(
            "lmbot_queue_wait_seconds_recent", "Time queued before dispatch: percentiles of the last measurements"
        )
        r.register(self.recent_latency)
        r.register(self.recent_queue_wait)

    def observe_latency(self, task: str, seconds: float) -> None:
        """A request's submit-to-result time (histogram and percentile window)."""
        self.latency.labels(task).observe(seconds)
        self.recent_latency.observe(task, seconds)

    def observe_queue_wait(self, task: str, seconds: float) -> None:
        """A request's time queued before its batch went to a runner."""
        self.queue_wait.labels(task).observe(seconds)
        self.recent_queue_wait.observe(task, seconds)

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int) -> bool:
        """Expose ``/metrics`` on ``port`` (a daemon thread); a taken port is one logged line.

        The address is 127.0.0.1 unless ``LMBOT_METRICS_ADDR`` says otherwise (0.0.0.0 in the Docker
        image: reachable through a published port). The bot runs on without ``/metrics`` rather than
        stop: the port may have been taken after ``lmbot run`` checked it.
        """
        addr = os.environ.get("LMBOT_METRICS_ADDR", "127.0.0.1")
        try:
            start_http_server(port, addr=addr, registry=self.registry)
        except OSError as exc:
            log.warning("metrics are off: cannot listen on %s:%d (%s)", addr, port, exc.strerror or exc)
            return False
        return True

    def summary(self) -> dict[str, Any]:
        return summarize(self.registry.collect())


def summarize(families: Iterable[Any]) -> dict[str, Any]:
    """Per-task figures for humans (counts, errors, means, p50/p95 latency) from
    metric families, read from a live registry or parsed from ``/metrics`` text."""
    tasks: dict[str, dict[str, Any]] = {}
    service: dict[str, float] = {}
    for family in families:
        for sample in family.samples:
            task = sample.labels.get("task")
            if task is None:
                if not sample.name.endswith("_created"):
                    service[sample.name.removeprefix("lmbot_").removesuffix("_total")] = sample.value
                continue
            entry = tasks.setdefault(task, {"ok": 0, "errors": {}, "hist": {}})
            if sample.name.endswith("_seconds_recent"):
                short = sample.name.removeprefix("lmbot_").removesuffix("_recent")
                label = f"p{round(float(sample.labels['quantile']) * 100)}"
                entry.setdefault("recent", {})[f"{short}_{label}"] = sample.value
            elif sample.name == "lmbot_requests_total":
                outcome = sample.labels["outcome"]
                if outcome == "ok":
                    entry["ok"] += int(sample.value)
                else:
                    entry["errors"][outcome] = int(sample.value)
            elif sample.name.endswith(("_sum", "_count", "_bucket")):
                base, _, part = sample.name.rpartition("_")
                hist = entry["hist"].setdefault(base, {"buckets": []})
                if part == "bucket":
                    hist["buckets"].append((float(sample.labels["le"]), sample.value))
                else:
                    hist[part] = sample.value
    out: dict[str, Any] = {}
    for task, entry in tasks.items():
        row: dict[str, Any] = {"ok": entry["ok"], "errors": entry["errors"]}
        for name, hist in entry["hist"].items():
            short = name.removeprefix("lmbot_")
            count = hist.get("count", 0)
            if not count:
                continue
            row[f"{short}_mean"] = hist["sum"] / count
        row.update(entry.get("recent", {}))  # measured percentiles, never bucket bounds
        out[task] = row
    return {"tasks": out, **service}


def read_running(port: int, timeout: float = 5.0) -> dict[str, Any]:
    """The summary a running bot serves on 127.0.0.1:``port`` (raises OSError if none answers)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        return summarize(text_string_to_metric_families(response.read().decode()))
