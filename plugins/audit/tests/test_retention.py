"""Retention: old segments expire, the expiry is recorded, and what remains still verifies."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest
from _logtools import FakeClock, all_records, entry
from host_audit import plugin
from host_audit.log import AuditLog
from host_audit.segments import CHECKPOINTS_FILE, list_segments
from host_audit.settings import AuditSection, LogSettings
from host_audit.verify import verify_log

from host.config import load_config
from host.errors import ConfigError
from host.runtime import build_host

HOUR = 3_600_000
DAY = 24 * HOUR


def _forty_days(directory: Path, clock: FakeClock) -> LogSettings:
    """One entry an hour for 40 days, a segment a day."""
    settings = LogSettings.for_directory(directory, segment_max_seconds=86_400, checkpoint_every_records=50,
                                         checkpoint_every_seconds=6 * 3600)
    log = AuditLog.open(settings, clock=clock)
    for i in range(40 * 24):
        log.append(entry(i))
        clock.advance(HOUR)
    log.close()
    return settings


@pytest.fixture(scope="module")
def forty_day_log(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """Built once: the 40-day log, and the clock reading at its end."""
    clock = FakeClock()
    directory = tmp_path_factory.mktemp("forty") / "audit"
    _forty_days(directory, clock)
    return directory, clock.now


@pytest.fixture
def expired_log(forty_day_log: tuple[Path, int], tmp_path: Path) -> tuple[Path, Path, list[str]]:
    """The 40-day log after a 30-day retention pass; returns (dir, backup before expiry, expired names)."""
    source, now = forty_day_log
    shutil.copytree(source, tmp_path / "audit")
    backup = tmp_path / "before"
    shutil.copytree(source, backup)
    log = AuditLog.open(LogSettings.for_directory(tmp_path / "audit", retention_days=30), clock=FakeClock(start=now))
    expired = log.expire()
    log.close()
    return tmp_path / "audit", backup, expired


def test_segments_older_than_the_retention_expire_and_the_expiry_is_recorded(
    expired_log: tuple[Path, Path, list[str]],
) -> None:
    directory, backup, expired = expired_log
    before = list_segments(backup)
    assert 9 <= len(expired) <= 11  # ~10 of the 40 daily segments are older than 30 days
    assert [p.name for p in before[: len(expired)]] == expired
    remaining = list_segments(directory)
    assert all(p.name not in expired for p in remaining)
    records = all_records(directory)
    (expiry,) = [r for r in records if r["type"] == "expiry"]
    assert [s["name"] for s in expiry["segments"]] == expired
    assert expiry["retention_days"] == 30
    newest_expired = max(s["last_ts"] for s in expiry["segments"])
    assert newest_expired < expiry["ts"] - 30 * DAY
    assert records[records.index(expiry) + 1]["reason"] == "expiry"  # checkpointed at once

    report = verify_log(directory)
    assert report.ok, report.summary()
    assert report.first_seq == records[0]["seq"] > 0
    assert report.expired and "anchored by an expiry record" in report.expired


def test_offhost_checkpoints_of_expired_records_still_verify(expired_log: tuple[Path, Path, list[str]]) -> None:
    directory, backup, _ = expired_log
    report = verify_log(directory, checkpoint_files=[backup / CHECKPOINTS_FILE, directory / CHECKPOINTS_FILE])
    assert report.ok, report.summary()


def test_removing_the_first_remaining_segment_is_detected(expired_log: tuple[Path, Path, list[str]]) -> None:
    directory, _, _ = expired_log
    list_segments(directory)[0].unlink()
    report = verify_log(directory)
    assert report.problem is not None and report.problem.kind == "head_missing"


def test_crash_before_the_files_were_deleted_still_verifies(expired_log: tuple[Path, Path, list[str]]) -> None:
    directory, backup, expired = expired_log
    for name in expired:
        shutil.copy(backup / name, directory / name)
    assert verify_log(directory).ok
    # ...and a crash half-way through the deletions, too.
    for name in expired[:-3]:
        (directory / name).unlink()
    report = verify_log(directory)
    assert report.ok, report.summary()


def test_the_next_retention_pass_finishes_an_interrupted_one(expired_log: tuple[Path, Path, list[str]]) -> None:
    directory, backup, expired = expired_log
    for name in expired[-2:]:
        shutil.copy(backup / name, directory / name)
    clock = FakeClock(start=all_records(directory)[-1]["ts"] + 1)
    log = AuditLog.open(LogSettings.for_directory(directory, retention_days=30), clock=clock)
    assert log.expire() == expired[-2:]
    log.close()
    assert verify_log(directory).ok


def test_nothing_expires_without_retention_or_within_it(forty_day_log: tuple[Path, int], tmp_path: Path) -> None:
    source, now = forty_day_log
    shutil.copytree(source, tmp_path, dirs_exist_ok=True)
    clock = FakeClock(start=now)
    count = len(list_segments(tmp_path))
    log = AuditLog.open(LogSettings.for_directory(tmp_path), clock=clock)
    assert log.expire() == []  # retention_days = 0: keep forever
    log.close()
    log = AuditLog.open(LogSettings.for_directory(tmp_path, retention_days=60), clock=clock)
    assert log.expire() == []
    log.close()
    assert len(list_segments(tmp_path)) == count + 2


def test_retention_shorter_than_the_minimum_is_a_config_error() -> None:
    with pytest.raises(msgspec.ValidationError, match="at least 7"):
        msgspec.convert({"retention_days": 3}, AuditSection)
    config = load_config(data={"logging": {"dir": ""}, "audit": {"retention_days": 3}}, environ={})
    with pytest.raises(ConfigError, match=r"\[audit\].*retention_days must be 0 \(keep forever\) or at least 7"):
        build_host(config, plugins=[("audit", plugin)], entry_points=False)
