"""Prometheus metrics of the audit log, read from ``AuditLog.stats`` at scrape time.

Nothing is observed on the append path (a prometheus-client call costs about a microsecond, a large
share of an append); the collector turns the log's plain counters into metric families when scraped.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from host_audit.log import LogStats

if TYPE_CHECKING:
    from host_audit.service import AuditService

__all__ = ["AuditCollector"]


class AuditCollector(Collector):
    """Exports the current service's log statistics (``service`` is swapped on restart/reload)."""

    def __init__(self) -> None:
        self.service: AuditService | None = None

    def collect(self) -> Iterator[Any]:
        log = self.service.log if self.service is not None else None
        stats = log.stats if log is not None else LogStats()
        records = CounterMetricFamily("host_audit_records", "Records written to the audit log, by type.",
                                      labels=["type"])
        records.add_metric(["entry"], stats.entries)
        records.add_metric(["checkpoint"], stats.checkpoints)
        records.add_metric(["segment"], stats.segments)
        records.add_metric(["finding"], stats.findings)
        yield records
        yield CounterMetricFamily("host_audit_write_errors", "Records or checkpoints that could not be written.",
                                  value=stats.write_errors)
        yield CounterMetricFamily("host_audit_fsyncs", "fsync batches of the audit log.", value=stats.syncs)
        yield CounterMetricFamily("host_audit_fsync_errors", "fsync batches that failed.", value=stats.sync_errors)
        yield CounterMetricFamily("host_audit_expired_segments", "Segments deleted by retention.",
                                  value=stats.expired_segments)
        yield CounterMetricFamily("host_audit_clock_steps",
                                  "Times the wall clock went back further than the tolerance.",
                                  value=stats.clock_steps)
        is_open = log is not None and not log.closed
        yield GaugeMetricFamily("host_audit_open", "1 while the audit log is open for writing.", value=int(is_open))
        yield GaugeMetricFamily("host_audit_next_seq", "Sequence number of the next record (= records in the log).",
                                value=log.next_seq if log is not None else 0)
        yield GaugeMetricFamily("host_audit_unanchored_records",
                                "Records written since the last signed checkpoint.",
                                value=log.records_since_checkpoint if log is not None else 0)
        yield GaugeMetricFamily("host_audit_last_checkpoint_timestamp_seconds",
                                "Unix time of the last signed checkpoint.",
                                value=(log.last_checkpoint_ts / 1000) if log is not None else 0)
