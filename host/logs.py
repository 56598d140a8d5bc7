"""Logging: loguru, JSON lines in production, readable text on a terminal.

Every record carries ``request_id`` (one per inbound message, bound by the runtime and carried by
context variables through every hook and outbound call) and ``plugin`` (the plugin whose code is
running, bound by the dispatcher). Standard-library logging (httpx, trio-websocket, hypercorn) is
routed into loguru. Every known secret value is masked in every sink.

JSON line fields: ``ts`` (ISO 8601, milliseconds, UTC), ``level``, ``message``, ``module``,
``function``, ``line``, ``plugin``, ``request_id``, any extra bound values, and ``exception`` (the
formatted traceback) when there is one.
"""

from __future__ import annotations

import contextvars
import logging
import sys
from datetime import UTC
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Any, TextIO

import msgspec
from loguru import logger

from host.config import LoggingSection, known_secret_values

if TYPE_CHECKING:
    from loguru import Message, Record

__all__ = ["current_plugin", "current_request_id", "logger", "setup_logging"]

#: The request id of the inbound message being handled ("" outside of one).
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar("request_id", default="")
#: The plugin whose hook implementation is running ("" for host code).
current_plugin: contextvars.ContextVar[str] = contextvars.ContextVar("plugin", default="")

_json = msgspec.json.Encoder()
_MASK = "**********"


def mask_secrets(text: str) -> str:
    for secret in known_secret_values():
        if secret in text:
            text = text.replace(secret, _MASK)
    return text


def _patch(record: Record) -> None:
    extra = record["extra"]
    extra.setdefault("request_id", current_request_id.get())
    extra.setdefault("plugin", current_plugin.get())


def _json_line(record: Record) -> str:
    payload: dict[str, Any] = {
        "ts": record["time"].astimezone(UTC).isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "message": record["message"],
        "module": record["name"],
        "function": record["function"],
        "line": record["line"],
    }
    for key, value in record["extra"].items():
        if key.startswith("_"):
            continue
        payload[key] = value if isinstance(value, str | int | float | bool | None) else repr(value)
    exc = record["exception"]
    if exc is not None and exc.type is not None:
        import traceback

        payload["exception"] = "".join(
            traceback.format_exception(exc.type, exc.value, exc.traceback)
        )
    return mask_secrets(_json.encode(payload).decode())


class _JsonSink:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, message: Message) -> None:
        self.stream.write(_json_line(message.record) + "\n")
        self.stream.flush()


class _MaskingTextSink:
    def __init__(self, stream: TextIO) -> None:
        self.stream = stream

    def write(self, message: Message) -> None:
        self.stream.write(mask_secrets(str(message)))
        self.stream.flush()


class _InterceptHandler(logging.Handler):
    """Route stdlib logging into loguru (the recipe from loguru's documentation)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        frame: FrameType | None = logging.currentframe()
        depth = 2
        while frame is not None and frame.f_code.co_filename == logging.__file__:
            frame, depth = frame.f_back, depth + 1
        logger.opt(depth=depth, exception=record.exc_info).log(level, record.getMessage())


_TEXT_FORMAT = (
    "<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{name}</cyan>{extra[plugin]: >1} <dim>{extra[request_id]}</dim> {message}"
)


def setup_logging(
    settings: LoggingSection,
    *,
    development: bool = False,
    stream: TextIO | None = None,
) -> None:
    """(Re)configure loguru for the host. Safe to call again (replaces the sinks)."""
    stream = sys.stderr if stream is None else stream
    logger.remove()
    logger.configure(patcher=_patch)
    use_json = settings.format == "json" or (
        settings.format == "auto" and not (hasattr(stream, "isatty") and stream.isatty())
    )
    # diagnose=True prints local variables in tracebacks, which can include secrets.
    if settings.file:
        Path(settings.file).parent.mkdir(parents=True, exist_ok=True)
        logger.add(
            _JsonSink(open(settings.file, "a", encoding="utf-8")).write,  # noqa: SIM115
            level=settings.level,
            diagnose=False,
            backtrace=False,
        )
    else:
        sink = _JsonSink(stream) if use_json else _MaskingTextSink(stream)
        logger.add(
            sink.write,
            level=settings.level,
            format="{message}" if use_json else _TEXT_FORMAT,
            colorize=not use_json and stream.isatty(),
            diagnose=development,
            backtrace=development,
        )
    if settings.dir:
        log_dir = Path(settings.dir)
        log_dir.mkdir(parents=True, exist_ok=True)
        logger.add(
            str(log_dir / "error.log"),
            level="ERROR",
            format=lambda record: "{extra[_json]}\n",
            filter=_with_json,
            rotation=settings.error_rotation,
            retention=f"{settings.error_retention_days} days",
            diagnose=False,
            backtrace=False,
            enqueue=False,
        )
    logging.basicConfig(handlers=[_InterceptHandler()], level=logging.INFO, force=True)
    for name in ("httpx", "httpcore", "trio-websocket", "hypercorn.error", "hypercorn.access"):
        logging.getLogger(name).handlers = []
        logging.getLogger(name).propagate = True
    # httpx logs every request URL at INFO/DEBUG, and some URLs carry credentials (DingTalk's session
    # webhooks): keep it at WARNING whatever our level.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    logging.getLogger("httpcore").setLevel(logging.WARNING)


def _with_json(record: Record) -> bool:
    # File sinks need a format string; the JSON line is rendered here and substituted once.
    record["extra"]["_json"] = _json_line(record)
    return True
