"""Counters and histograms of the inference service, per task.

Kept in a prometheus_client registry, so the same numbers feed ``/stats``,
``lmbot stats`` and the optional Prometheus text endpoint.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server

_SECONDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, math.inf)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, math.inf)


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

    def prometheus_text(self) -> bytes:
        return generate_latest(self.registry)

    def serve(self, port: int) -> None:
        """Expose ``/metrics`` on 127.0.0.1:``port`` (a daemon thread)."""
        # LMBOT_METRICS_ADDR=0.0.0.0 in the Docker image: reachable through a published port.
        start_http_server(port, addr=os.environ.get("LMBOT_METRICS_ADDR", "127.0.0.1"), registry=self.registry)

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
            if sample.name == "lmbot_requests_total":
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
            if short in ("request_seconds", "queue_wait_seconds"):
                row[f"{short}_p50"] = _quantile(hist["buckets"], count, 0.5)
                row[f"{short}_p95"] = _quantile(hist["buckets"], count, 0.95)
        out[task] = row
    return {"tasks": out, **service}


def read_running(port: int, timeout: float = 5.0) -> dict[str, Any]:
    """The summary a running bot serves on 127.0.0.1:``port`` (raises OSError if none answers)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as response:
        return summarize(text_string_to_metric_families(response.read().decode()))


def _quantile(buckets: list[tuple[float, float]], count: float, q: float) -> float:
    """Upper bound of the bucket holding the q-quantile (what Prometheus histograms allow)."""
    target = q * count
    finite = [b for b in sorted(buckets) if math.isfinite(b[0])]
    for bound, cumulative in finite:
        if cumulative >= target:
            return bound
    return finite[-1][0] if finite else math.nan
