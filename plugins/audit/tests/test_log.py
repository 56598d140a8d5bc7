"""The writer: files and modes, resuming, rotation, crashes, failed writes, clocks, keys, secrets."""

from __future__ import annotations

import itertools
import os
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from _logtools import FakeClock, all_records, entry, lines_of
from host_audit.errors import AuditWriteError, KeyFileError, LogClosedError, LogLockedError
from host_audit.keys import (
    load_public_key_file,
    load_signing_key,
    retired_key_path,
    rotate_key_file,
)
from host_audit.log import AuditLog
from host_audit.records import MASK
from host_audit.segments import CHECKPOINTS_FILE, list_segments
from host_audit.settings import LogSettings
from host_audit.verify import verify_log

from host import Secret
from host.model import AuditEntry


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _settings(directory: Path, **overrides: object) -> LogSettings:
    return LogSettings.for_directory(directory, **overrides)


def _fill(directory: Path, count: int, clock: FakeClock, **overrides: object) -> LogSettings:
    settings = _settings(directory, **overrides)
    log = AuditLog.open(settings, clock=clock)
    for i in range(count):
        log.append(entry(i))
    log.close()
    return settings


def test_first_run_creates_private_files_and_a_genesis_segment(tmp_path: Path, clock: FakeClock) -> None:
    directory = tmp_path / "nested" / "audit"
    _fill(directory, 3, clock)
    assert _mode(directory) == 0o700
    for name in ("signing.key", CHECKPOINTS_FILE, ".lock", "segment-00000000.jsonl"):
        assert _mode(directory / name) == 0o600, name
    kinds = [(r["type"], r.get("reason")) for r in all_records(directory)]
    assert kinds[0] == ("segment", "genesis")
    assert kinds[1] == ("checkpoint", "start")
    assert kinds[-1] == ("checkpoint", "shutdown")
    assert [r["seq"] for r in all_records(directory)] == list(range(len(kinds)))
    assert verify_log(directory).ok


def test_reopening_starts_a_new_segment_that_continues_the_chain(tmp_path: Path, clock: FakeClock) -> None:
    settings = _fill(tmp_path, 5, clock)
    log = AuditLog.open(settings, clock=clock)
    seq = log.append(entry(99))
    log.close()
    first, _ = list_segments(tmp_path)
    header = all_records(tmp_path)[len(lines_of(first))]
    assert header["type"] == "segment" and header["reason"] == "start"
    assert header["prev_segment"] == first.name
    assert header["prev_hash"] == lines_of(first)[-1][-66:-2].decode()
    assert seq == header["seq"] + 2  # header, start checkpoint, then the entry
    report = verify_log(tmp_path)
    assert report.ok and report.segments == 2 and report.findings == []


def test_entry_fields_are_recorded_as_given(tmp_path: Path, clock: FakeClock) -> None:
    log = AuditLog.open(_settings(tmp_path), clock=clock)
    log.append(AuditEntry(category="config", action="change", actor="user:bob", target="[nlp_bridge]",
                          details={"diff": {"timeout": [30, 60]}}, request_id="abc", at_ms=123))
    log.close()
    (record,) = [r for r in all_records(tmp_path) if r["type"] == "entry"]
    assert record["category"] == "config" and record["action"] == "change"
    assert record["actor"] == "user:bob" and record["target"] == "[nlp_bridge]"
    assert record["details"] == {"diff": {"timeout": [30, 60]}}
    assert record["request_id"] == "abc" and record["at"] == 123
    assert record["ts"] > 123


def test_secrets_are_never_written(tmp_path: Path, clock: FakeClock) -> None:
    log = AuditLog.open(_settings(tmp_path), clock=clock)
    log.append(AuditEntry(category="config", action="change", details={
        "app_secret": Secret("s3cr3t-literal-value"),
        "nested": {"accessToken": "tok-123456", "X-Api-Key": "key-987654", "password_changed": True},
        "list": [Secret("another-secret-value")],
        "blob": b"\x00binary",
    }))
    log.close()
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.suffix == ".jsonl")
    for secret in (b"s3cr3t-literal-value", b"tok-123456", b"key-987654", b"another-secret-value"):
        assert secret not in raw
    (record,) = [r for r in all_records(tmp_path) if r["type"] == "entry"]
    assert record["details"]["app_secret"] == MASK
    assert record["details"]["nested"] == {"accessToken": MASK, "X-Api-Key": MASK, "password_changed": True}
    assert record["details"]["list"] == [MASK]
    assert record["details"]["blob"] == "<7 bytes>"


def test_a_second_writer_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    log = AuditLog.open(_settings(tmp_path), clock=clock)
    try:
        with pytest.raises(LogLockedError, match=f"pid {os.getpid()}"):
            AuditLog.open(_settings(tmp_path), clock=clock)
    finally:
        log.close()
    with pytest.raises(LogClosedError):
        log.append(entry(1))


def test_key_readable_by_others_is_refused(tmp_path: Path, clock: FakeClock) -> None:
    _fill(tmp_path, 1, clock)
    (tmp_path / "signing.key").chmod(0o644)
    with pytest.raises(KeyFileError, match="chmod 600"):
        AuditLog.open(_settings(tmp_path), clock=clock)


@pytest.mark.parametrize(
    ("limit", "expected_min_segments"),
    [({"segment_max_records": 40}, 5), ({"segment_max_bytes": 8192}, 5), ({"segment_max_seconds": 1.0}, 5)],
)
def test_rotation_keeps_the_chain(tmp_path: Path, limit: dict[str, float], expected_min_segments: int) -> None:
    clock = FakeClock(step=20)  # 20 ms per clock reading: a 1 s segment holds ~25 readings
    settings = _fill(tmp_path, 200, clock, checkpoint_every_records=1000, **limit)
    segments = list_segments(tmp_path)
    assert len(segments) >= expected_min_segments
    for older, newer in itertools.pairwise(segments):
        closing = lines_of(older)[-1]
        header = lines_of(newer)[0]
        assert b'"reason":"rotate"' in closing and b'"type":"checkpoint"' in closing
        assert b'"prev_hash":"' + closing[-66:-2] + b'"' in header
    if "segment_max_records" in limit:
        assert all(len(lines_of(p)) <= 41 for p in segments)
    report = verify_log(tmp_path, public_keys=[load_signing_key(settings.key_file).public])
    assert report.ok, report.summary()
    assert report.segments == len(segments)


def test_checkpoints_every_n_records_and_when_the_interval_passed(tmp_path: Path, clock: FakeClock) -> None:
    log = AuditLog.open(_settings(tmp_path, checkpoint_every_records=10, checkpoint_every_seconds=60), clock=clock)
    for i in range(25):
        log.append(entry(i))
    assert not log.checkpoint_if_due()  # 5 waiting, but the interval has not passed
    clock.advance(61_000)
    assert log.checkpoint_if_due()
    assert not log.checkpoint_if_due()  # nothing new since
    log.close()
    reasons = [r["reason"] for r in all_records(tmp_path) if r["type"] == "checkpoint"]
    assert reasons == ["start", "count", "count", "time", "shutdown"]
    notes = lines_of(tmp_path / CHECKPOINTS_FILE)
    assert len(notes) == len(reasons)


_CRASH = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from _logtools import entry
    from host_audit.log import AuditLog
    from host_audit.records import encode, entry_record, seal
    from host_audit.settings import LogSettings

    log = AuditLog.open(LogSettings.for_directory(Path(sys.argv[1])))
    for i in range(50):
        log.append(entry(i))
    if sys.argv[2] == "torn":
        # The process dies in the middle of writing the next record.
        line, _ = seal(bytes(32), encode(entry_record(entry(50), log.next_seq, 0)))
        os.write(os.open(log.segment_path, os.O_WRONLY | os.O_APPEND), line[: len(line) // 2])
    os._exit(9)
    """
)


def _crash(directory: Path, how: str) -> None:
    code = _CRASH.format(tests=str(Path(__file__).parent))
    result = subprocess.run([sys.executable, "-c", code, str(directory), how], capture_output=True, timeout=60)
    assert result.returncode == 9, result.stderr.decode()


def test_crash_mid_write_leaves_a_torn_line_that_is_reported_then_acknowledged(tmp_path: Path) -> None:
    _crash(tmp_path, "torn")
    segment = list_segments(tmp_path)[0]
    torn_size = segment.stat().st_size
    report = verify_log(tmp_path)
    assert not report.ok and report.problem is not None
    assert report.problem.kind == "torn_tail" and "crashed mid-write" in report.problem.reason

    log = AuditLog.open(_settings(tmp_path))
    kinds = {f.kind: f.details for f in log.opening_findings}
    log.close()
    assert set(kinds) == {"torn_tail", "unclean_shutdown"}
    torn = kinds["torn_tail"]
    assert torn["segment"] == segment.name and torn["offset"] + torn["length"] == torn_size
    assert kinds["unclean_shutdown"]["last_type"] == "entry"
    assert segment.stat().st_size == torn_size  # the torn bytes are left where they are...
    report = verify_log(tmp_path)
    assert report.ok, report.summary()  # ...and acknowledged by the new segment
    assert any(f.startswith("torn_tail:") for f in report.findings)
    assert any(f.startswith("unclean_shutdown:") for f in report.findings)


def test_crash_between_records_is_recorded_as_an_unclean_shutdown(tmp_path: Path) -> None:
    _crash(tmp_path, "clean-lines")
    report = verify_log(tmp_path)
    assert report.ok and not report.clean_end and report.unanchored == 50
    log = AuditLog.open(_settings(tmp_path))
    log.close()
    assert [f.kind for f in log.opening_findings] == ["unclean_shutdown"]
    report = verify_log(tmp_path)
    assert report.ok and report.clean_end


def test_empty_segment_left_by_a_crash_is_removed_and_recorded(tmp_path: Path, clock: FakeClock) -> None:
    settings = _fill(tmp_path, 3, clock)
    (tmp_path / "segment-00000001.jsonl").touch(mode=0o600)
    assert verify_log(tmp_path).problem.kind == "empty_segment"  # type: ignore[union-attr]
    log = AuditLog.open(settings, clock=clock)
    log.close()
    assert [f.kind for f in log.opening_findings] == ["empty_segment"]
    assert not (tmp_path / "segment-00000001.jsonl").exists()
    assert verify_log(tmp_path).ok


def test_torn_checkpoint_file_is_recorded_and_repaired(tmp_path: Path, clock: FakeClock) -> None:
    settings = _fill(tmp_path, 3, clock)
    with open(tmp_path / CHECKPOINTS_FILE, "ab") as f:
        f.write(b'{"head":"00ab')
    report = verify_log(tmp_path)
    assert report.ok and any("incomplete" in w for w in report.warnings)
    log = AuditLog.open(settings, clock=clock)
    log.close()
    (finding,) = log.opening_findings
    assert finding.kind == "torn_tail" and finding.details["segment"] == CHECKPOINTS_FILE
    report = verify_log(tmp_path)
    assert report.ok and not report.warnings


def test_failed_write_is_reported_and_the_log_continues_in_a_new_segment(tmp_path: Path, clock: FakeClock) -> None:
    log = AuditLog.open(_settings(tmp_path), clock=clock)
    log.append(entry(0))
    # A real ENOSPC: point the writer at /dev/full, after half a record reached the real file.
    with open(log.segment_path, "ab") as f:
        f.write(b'{"action":"half a rec')
    real_fd, full = log._fd, os.open("/dev/full", os.O_WRONLY)
    log._fd = full
    with pytest.raises(AuditWriteError, match="No space left"):
        log.append(entry(1))
    log._fd = real_fd  # the disk has room again
    os.close(full)
    seq = log.append(entry(2))  # recovers into a new segment
    log.close()
    segments = list_segments(tmp_path)
    assert len(segments) == 2
    records = all_records(tmp_path)
    kinds = [r["kind"] for r in records if r["type"] == "finding"]
    assert kinds == ["write_failed", "torn_tail"]
    assert [r["details"]["n"] for r in records if r["type"] == "entry"] == [0, 2]
    assert records[-2]["seq"] == seq
    report = verify_log(tmp_path)
    assert report.ok, report.summary()
    assert log.stats.write_errors == 1


def test_clock_going_back_is_tolerated_then_held_and_recorded(tmp_path: Path, clock: FakeClock) -> None:
    log = AuditLog.open(_settings(tmp_path, clock_tolerance_ms=5000), clock=clock)
    log.append(entry(0))
    clock.advance(-3000)  # a small NTP step: recorded as is
    log.append(entry(1))
    clock.advance(-60_000)  # a big one: held at the newest timestamp, and said so once
    log.append(entry(2))
    log.append(entry(3))
    log.close()
    records = all_records(tmp_path)
    entries = [r for r in records if r["type"] == "entry"]
    assert entries[1]["ts"] < entries[0]["ts"]
    assert entries[3]["ts"] >= entries[0]["ts"]
    steps = [r for r in records if r["type"] == "finding"]
    assert len(steps) == 1 and steps[0]["kind"] == "clock_step"
    assert log.stats.clock_steps == 1
    assert verify_log(tmp_path).ok
    assert verify_log(tmp_path, clock_tolerance_ms=1000).problem.kind == "time_reversed"  # type: ignore[union-attr]


def test_key_rotation_is_endorsed_by_the_old_key(tmp_path: Path, clock: FakeClock) -> None:
    settings = _fill(tmp_path, 3, clock)
    old, new = rotate_key_file(settings.key_file)
    assert retired_key_path(settings.key_file).exists()
    log = AuditLog.open(settings, clock=clock)
    log.append(entry(4))
    log.close()
    assert not retired_key_path(settings.key_file).exists()  # its only job is done
    header = [r for r in all_records(tmp_path) if r["type"] == "segment"][-1]
    assert header["key_id"] == new.key_id and header["endorsed_by"] == old.key_id
    report = verify_log(tmp_path)
    assert report.ok, report.summary()
    assert report.keys_used == [old.key_id, new.key_id]
    assert verify_log(tmp_path, public_keys=[old.public, new.public]).ok
    pinned_old = verify_log(tmp_path, public_keys=[old.public])
    assert pinned_old.problem is not None and pinned_old.problem.kind == "untrusted_key"


def test_key_replaced_without_endorsement_needs_pinning(tmp_path: Path, clock: FakeClock) -> None:
    settings = _fill(tmp_path, 3, clock)
    old = load_signing_key(settings.key_file)
    settings.key_file.unlink()
    log = AuditLog.open(settings, clock=clock)
    log.close()
    new = load_signing_key(settings.key_file)
    assert [f.kind for f in log.opening_findings] == ["key_change"]
    report = verify_log(tmp_path)
    assert report.problem is not None and report.problem.kind == "untrusted_key"
    assert "without an endorsement" in report.problem.reason
    assert verify_log(tmp_path, public_keys=[old.public, new.public]).ok


def test_exported_public_key_round_trips(tmp_path: Path) -> None:
    key = load_signing_key(_fill(tmp_path, 1, FakeClock()).key_file)
    (tmp_path / "pub.pem").write_bytes(key.public.pem())
    (tmp_path / "pub.b64").write_text(key.public.b64 + "\n")
    assert load_public_key_file(tmp_path / "pub.pem").key_id == key.key_id
    assert load_public_key_file(tmp_path / "pub.b64").key_id == key.key_id
    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(KeyFileError, match="neither PEM nor"):
        load_public_key_file(tmp_path / "bad.pem")
    assert "PRIVATE" not in repr(key) and key.key_id in repr(key)
