"""Structured logs: JSON lines with request ids and plugin names, stdlib routing, error log."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import sys
import time
from pathlib import Path

import pytest

from host import hookimpl
from host.config import LoggingSection
from host.logs import logger, setup_logging
from host.testing import open_test_host


@pytest.fixture
def json_logs(tmp_path: Path):
    out = io.StringIO()
    setup_logging(LoggingSection(format="json", dir=str(tmp_path / "logs"), level="DEBUG"), stream=out)
    yield out
    logger.remove()
    logger.add(sys.stderr)


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


@pytest.mark.anyio
async def test_request_id_and_plugin_on_every_line_of_a_message(json_logs: io.StringIO, tmp_path: Path) -> None:
    class Chatty:
        @hookimpl
        async def on_message(self, message):
            logger.info("thinking about {}", message.text)
            logging.getLogger("httpx").warning("stdlib logger inside a plugin")
            raise ValueError("nope")

    async with open_test_host(("chatty", Chatty()), config={"logging": {"dir": str(tmp_path / "logs")}}) as th:
        # open_test_host does not reconfigure logging; our JSON sink stays in place.
        result = await th.send("weather")
    records = lines(json_logs)
    mine = [r for r in records if r["request_id"] == result.message.request_id]
    assert [r["message"] for r in mine][:2] == ["thinking about weather", "stdlib logger inside a plugin"]
    assert all(r["plugin"] == "chatty" for r in mine[:3])
    failure = next(r for r in mine if r["level"] == "ERROR")
    assert "ValueError: nope" in failure["exception"]
    for record in records:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}\+00:00", record["ts"])
        assert {"level", "message", "module", "plugin", "request_id"} <= set(record)
    error_log = (tmp_path / "logs" / "error.log").read_text().splitlines()
    assert any(json.loads(line)["request_id"] == result.message.request_id for line in error_log)


def test_readable_text_on_a_tty(tmp_path: Path) -> None:
    class FakeTTY(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = FakeTTY()
    setup_logging(LoggingSection(format="auto", dir=""), stream=out)
    try:
        logger.info("hello humans")
    finally:
        logger.remove()
        logger.add(sys.stderr)
    text = out.getvalue()
    assert "hello humans" in text and not text.lstrip().startswith("{")


def test_error_log_rotates_and_keeps_30_days_or_more(tmp_path: Path) -> None:
    day = 86400
    now = time.time()
    old = tmp_path / "error.2020-01-01_00-00-00_000000.log"
    recent = tmp_path / "error.2026-01-01_00-00-00_000000.log"
    for path, age_days in ((old, 60), (recent, 31)):
        path.write_text("{}\n")
        os.utime(path, (now - age_days * day, now - age_days * day))
    out = io.StringIO()
    settings = LoggingSection(format="json", dir=str(tmp_path), error_rotation="1 KB", error_retention_days=45)
    setup_logging(settings, stream=out)
    try:
        logger.info("not in the error log")
        for i in range(20):
            logger.error("error number {} {}", i, "x" * 100)  # > 1 KB: rotates
    finally:
        logger.remove()
        logger.add(sys.stderr)
    assert not old.exists()  # older than the 45-day retention
    assert recent.exists()  # 31 days old: kept
    rotated = sorted(tmp_path.glob("error.*.log"))
    assert len(rotated) >= 2  # the kept old one and at least one rotation of ours
    content = "".join(p.read_text() for p in tmp_path.glob("error*.log"))
    assert "error number 19" in content and "not in the error log" not in content
