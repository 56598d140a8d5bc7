"""The host's metrics API, on prometheus-client.

Plugins get metrics through ``host.metrics``::

    calls = host.metrics.counter("nlp_calls_total", "NLP calls by outcome.", ["backend", "outcome"])
    calls.labels(backend="main", outcome="success").inc()

Creating a metric is idempotent (same name, same type and labels returns the existing one), so a
hot-reloaded plugin gets its metric back instead of a duplicate-registration error. Names are
prefixed with ``host_`` unless they already start with it. Labels must be bounded: never a user or
conversation id.

Per-plugin hook latency is not observed through prometheus-client on the hot path (that would cost
microseconds per call); the dispatcher keeps cheap counters and ``HookStatsCollector`` turns them into
``host_hook_duration_seconds`` / ``host_hook_errors_total`` at scrape time.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

__all__ = ["LATENCY_BUCKETS", "HookStats", "HookStatsCollector", "Metrics"]

#: Seconds; dense below 250 ms so P50/P99 of chat latency are resolvable.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.0075, 0.01, 0.015, 0.02, 0.03, 0.05, 0.075, 0.1,
    0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0,
)  # fmt: skip


class Metrics:
    """A registry of the host's metrics. One per ``Host``."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self._metrics: dict[str, Any] = {}
        self._collectors: dict[str, list[Collector]] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _full_name(name: str) -> str:
        return name if name.startswith("host_") else f"host_{name}"

    def _get(self, kind: type, name: str, documentation: str, labelnames: Sequence[str], **kw: Any) -> Any:
        full = self._full_name(name)
        with self._lock:
            existing = self._metrics.get(full)
            if existing is not None:
                existing_labels = tuple(getattr(existing, "_labelnames", ()))
                if not isinstance(existing, kind) or existing_labels != tuple(labelnames):
                    raise ValueError(
                        f"metric {full!r} already exists as {type(existing).__name__}"
                        f" with labels {existing_labels}"
                    )
                return existing
            metric = kind(full, documentation, labelnames=tuple(labelnames), registry=self.registry, **kw)
            self._metrics[full] = metric
            return metric

    def counter(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Counter:
        metric: Counter = self._get(Counter, name, documentation, labelnames)
        return metric

    def gauge(self, name: str, documentation: str, labelnames: Sequence[str] = ()) -> Gauge:
        metric: Gauge = self._get(Gauge, name, documentation, labelnames)
        return metric

    def histogram(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str] = (),
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> Histogram:
        metric: Histogram = self._get(Histogram, name, documentation, labelnames, buckets=tuple(buckets))
        return metric

    def register_collector(self, collector: Collector) -> None:
        """Add a custom collector; it belongs to the calling plugin and goes away with it (reload)."""
        from host.logs import current_plugin

        self.registry.register(collector)
        self._collectors.setdefault(current_plugin.get(), []).append(collector)

    def unregister_collectors(self, owner: str) -> int:
        """Remove every collector ``owner`` registered (called when a plugin is unloaded)."""
        collectors = self._collectors.pop(owner, [])
        for collector in collectors:
            self.registry.unregister(collector)
        return len(collectors)

    def render(self) -> bytes:
        """The Prometheus text exposition of every metric."""
        return generate_latest(self.registry)

    def names(self) -> set[str]:
        """Every metric family name currently exported (for tests and dashboards checks)."""
        return {m.name for m in self.registry.collect()}


@dataclass(slots=True)
class HookStats:
    """Latency and error counts of one (plugin, hook), kept without locks on the event loop."""

    count: int = 0
    total_seconds: float = 0.0
    errors: int = 0
    timeouts: int = 0
    buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))

    def observe(self, seconds: float) -> None:
        self.count += 1
        self.total_seconds += seconds
        self.buckets[bisect_left(LATENCY_BUCKETS, seconds)] += 1


class HookStatsCollector(Collector):
    """Exports a ``{(plugin, hook): HookStats}`` mapping at scrape time."""

    def __init__(self, stats: dict[tuple[str, str], HookStats]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[Any]:
        duration = HistogramMetricFamily(
            "host_hook_duration_seconds",
            "Time spent in each plugin's hook implementations.",
            labels=["plugin", "hook"],
        )
        errors = CounterMetricFamily(
            "host_hook_errors",
            "Hook implementation failures by kind (error or timeout).",
            labels=["plugin", "hook", "kind"],
        )
        for (plugin, hook), st in sorted(self._stats.items()):
            cumulative, acc = [], 0
            for bound, n in zip((*LATENCY_BUCKETS, float("inf")), st.buckets, strict=True):
                acc += n
                cumulative.append((_fmt(bound), acc))
            duration.add_metric([plugin, hook], cumulative, st.total_seconds)
            errors.add_metric([plugin, hook, "error"], st.errors)
            errors.add_metric([plugin, hook, "timeout"], st.timeouts)
        yield duration
        yield errors


def _fmt(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)
