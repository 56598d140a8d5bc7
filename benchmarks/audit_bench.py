"""Audit log: append latency and verification throughput, each against a raw baseline.

Measured in the same run and process (``python benchmarks/audit_bench.py``, about 20-40 s):

1. **Append** (``AuditLog.append``: sanitize, canonical encode, SHA-256 chain, one ``write()``;
   a signed checkpoint every 1,000 records is included in the samples) versus the baseline
   **raw write**: ``os.write`` of the very same line bytes to another file. Goal (issue 7): p99 <= 50 us.
2. **Through the host**: ``await host.audit(...)`` (redaction, queue, dispatcher, ``on_audit``) and
   ``host.audit_soon(...)`` (what a message handler pays: it only queues), in a real host with the
   audit plugin.
3. **Strict fsync** (``fsync = "strict"``, the fsync in a worker thread) versus raw write+fsync.
   Disk-bound; shown for information.
4. **Verify** (``verify_log``: read, split, decode, SHA-256 chain, sequence, timestamps, every
   checkpoint signature) versus the baseline **raw read + split + sha256 of every line** over the
   same files. Goal (issue 7): >= 200,000 records/s.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import trio
import trio.lowlevel
from host_audit import plugin
from host_audit.log import AuditLog
from host_audit.records import ZERO_HASH, encode, entry_record, seal
from host_audit.segments import list_segments
from host_audit.service import AuditService
from host_audit.settings import LogSettings
from host_audit.verify import verify_log

from host.config import load_config
from host.model import AuditEntry
from host.runtime import build_host

ENTRY = AuditEntry(
    category="permission",
    action="grant",
    actor="user:alice@example.com",
    target="role:admin",
    details={"plugin": "rbac", "reason": "ticket OPS-1234", "scope": ["read", "write"], "ttl_s": 3600},
    request_id="9f8e7d6c5b4a3210",
)


def pct(samples: list[int], q: float) -> float:
    """Percentile of nanosecond samples, in microseconds."""
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] / 1000


def row(name: str, samples: list[int]) -> tuple[str, float, float, float, float]:
    return (name, pct(samples, 0.5), pct(samples, 0.99), pct(samples, 0.999), statistics.fmean(samples) / 1000)


def print_rows(rows: list[tuple[str, float, float, float, float]]) -> None:
    print(f"  {'':34} {'p50 us':>9} {'p99 us':>9} {'p99.9 us':>9} {'mean us':>9}")
    for name, p50, p99, p999, mean in rows:
        print(f"  {name:34} {p50:9.2f} {p99:9.2f} {p999:9.2f} {mean:9.2f}")


def bench_append(root: Path, n: int) -> tuple[list[int], list[int]]:
    log = AuditLog.open(LogSettings.for_directory(root / "append"))
    for _ in range(2000):  # warm up caches and the allocator
        log.append(ENTRY)
    clock = time.perf_counter_ns
    samples = []
    for _ in range(n):
        start = clock()
        log.append(ENTRY)
        samples.append(clock() - start)
    log.close()
    # Baseline: the same line bytes (same size, same seq range) written with one os.write each.
    lines = [seal(ZERO_HASH, encode(entry_record(ENTRY, i, 1_700_000_000_000 + i)))[0] for i in range(n)]
    fd = os.open(root / "raw.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    for line in lines[:2000]:
        os.write(fd, line)
    raw = []
    for line in lines:
        start = clock()
        os.write(fd, line)
        raw.append(clock() - start)
    os.close(fd)
    return samples, raw


async def bench_host(root: Path, n: int) -> tuple[list[int], list[int]]:
    data = {"logging": {"dir": ""}, "http": {"enabled": False}, "audit": {"dir": str(root / "host")}}
    config = load_config(data=data, environ={})
    host = build_host(config, plugins=[("audit", plugin)], entry_points=False)
    clock = time.perf_counter_ns
    awaited, queued = [], []
    async with trio.open_nursery() as nursery:
        await nursery.start(host.run)
        for _ in range(500):
            await host.audit("admin", "warmup", details=ENTRY.details)
        for _ in range(n):
            start = clock()
            await host.audit("permission", "grant", actor=ENTRY.actor, target=ENTRY.target, details=ENTRY.details)
            awaited.append(clock() - start)
        for _ in range(n):
            start = clock()
            host.audit_soon("permission", "grant", actor=ENTRY.actor, target=ENTRY.target, details=ENTRY.details)
            queued.append(clock() - start)
            if len(queued) % 100 == 0:
                await trio.lowlevel.checkpoint()  # let the flusher drain, as between messages
        host.request_shutdown()
    return awaited, queued


async def bench_strict(root: Path, n: int) -> tuple[list[int], list[int]]:
    """Alternating, so both see the same disk: a strict append, then a raw write+fsync (also in a
    worker thread, as the plugin does it)."""
    service = AuditService(LogSettings.for_directory(root / "strict", fsync="strict"))
    await service.open()
    line = seal(ZERO_HASH, encode(entry_record(ENTRY, 0, 0)))[0]
    fd = os.open(root / "raw-fsync.jsonl", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)

    def write_and_fsync() -> None:
        os.write(fd, line)
        os.fsync(fd)

    clock = time.perf_counter_ns
    strict, raw = [], []
    for _ in range(n):
        start = clock()
        await service.append(ENTRY)
        strict.append(clock() - start)
        start = clock()
        await trio.to_thread.run_sync(write_and_fsync)
        raw.append(clock() - start)
    await service.close()
    os.close(fd)
    return strict, raw


def raw_read_and_hash(directory: Path) -> int:
    """The baseline: read every segment, split it into lines, SHA-256 each line."""
    count = 0
    for path in list_segments(directory):
        for line in path.read_bytes().split(b"\n")[:-1]:
            hashlib.sha256(line).digest()
            count += 1
    return count


def bench_verify(root: Path, n: int) -> dict[str, Any]:
    directory = root / "verify"
    log = AuditLog.open(LogSettings.for_directory(directory))
    for _ in range(n):
        log.append(ENTRY)
    log.close()
    best: dict[str, Any] = {"bytes": sum(p.stat().st_size for p in list_segments(directory))}

    def keep_best(name: str, wall: float, cpu: float) -> None:
        # Best of the rounds: the machine is shared, and other load only ever adds time.
        best[f"{name}_wall"] = min(wall, best.get(f"{name}_wall", wall))
        best[f"{name}_cpu"] = min(cpu, best.get(f"{name}_cpu", cpu))

    for _ in range(3):
        for jobs in (1, 2):
            wall, cpu = time.perf_counter(), time.process_time()
            report = verify_log(directory, jobs=jobs)
            keep_best(f"verify{jobs}", time.perf_counter() - wall, time.process_time() - cpu)
            assert report.ok, report.summary()
            best.update(records=report.records, checkpoints=report.checkpoints_in_log)
        wall, cpu = time.perf_counter(), time.process_time()
        best["raw_records"] = raw_read_and_hash(directory)
        keep_best("raw", time.perf_counter() - wall, time.process_time() - cpu)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--appends", type=int, default=50_000)
    parser.add_argument("--host-appends", type=int, default=5_000)
    parser.add_argument("--strict-appends", type=int, default=300)
    parser.add_argument("--verify-records", type=int, default=300_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="audit-bench-") as tmp:
        root = Path(tmp)
        line = seal(ZERO_HASH, encode(entry_record(ENTRY, 123456, 1_700_000_000_000)))[0]
        print(f"audit benchmark: record line {len(line)} bytes, temp dir {root}")

        print(f"\n1. append, {args.appends:,} records (fsync none, checkpoint every 1,000 records)")
        append, raw = bench_append(root, args.appends)
        print_rows([row("AuditLog.append", append), row("baseline: os.write same bytes", raw)])
        print(f"  ratio append/raw: p50 {pct(append, .5) / pct(raw, .5):.1f}x, p99 {pct(append, .99) / pct(raw, .99):.1f}x")
        verdict = "PASS" if pct(append, 0.99) <= 50 else "FAIL"
        print(f"  goal p99 <= 50 us: {verdict} ({pct(append, 0.99):.1f} us)")

        print(f"\n2. through the host, {args.host_appends:,} entries each")
        awaited, queued = trio.run(bench_host, root, args.host_appends)
        print_rows([row("await host.audit(...)", awaited), row("host.audit_soon(...) (queue only)", queued)])

        print(f"\n3. strict fsync, {args.strict_appends} records (disk-bound)")
        strict, raw_fsync = trio.run(bench_strict, root, args.strict_appends)
        print_rows([row("AuditService.append (strict)", strict), row("baseline: write+fsync in a thread", raw_fsync)])
        print(f"  ratio strict/raw: p50 {pct(strict, .5) / pct(raw_fsync, .5):.2f}x")

        print(f"\n4. verify, {args.verify_records:,} entries (best of 3 rounds)")
        v = bench_verify(root, args.verify_records)
        print(f"  {'':34} {'records/s':>12} {'per CPU-s':>12} {'MB/s':>8}")
        rows = (("verify1", "verify_log, 1 process", v["records"]),
                ("raw", "baseline: read+split+sha256", v["raw_records"]),
                ("verify2", "verify_log, 2 worker processes", v["records"]))
        for name, label, records in rows:
            cpu = f"{records / v[name + '_cpu']:12,.0f}" if name != "verify2" else f"{'(n/a)':>12}"
            print(f"  {label:34} {records / v[name + '_wall']:12,.0f} {cpu} {v['bytes'] / v[name + '_wall'] / 1e6:8.1f}")
        rate = v["records"] / v["verify1_wall"]
        print(f"  ({v['records']:,} records, {v['checkpoints']} checkpoint signatures verified)")
        print(f"  ratio verify (1 process) / raw, wall: {rate / (v['raw_records'] / v['raw_wall']):.2f}x; "
              f"2 processes / 1: {v['verify1_wall'] / v['verify2_wall']:.2f}x")
        best_rate = v["records"] / min(v["verify1_wall"], v["verify2_wall"])
        print(f"  goal >= 200,000 records/s: {'PASS' if best_rate >= 200_000 else 'FAIL'} ({best_rate:,.0f}/s wall; "
              f"1 process: {v['records'] / v['verify1_cpu']:,.0f}/s per CPU-second)")


if __name__ == "__main__":
    main()
