"""Media of messages: downloading what users send, uploading what the bot sends.

**Inbound** (reference 6.4). Pictures, audio, video, files and the pictures of rich text arrive as
``Media(download_code=...)``. With ``[dingtalk.media] download = true`` (the default) the connector's
middleware fetches them before any plugin sees the message, so plugins simply read ``Media.path``
(a local file), ``Media.size``, ``Media.mime_type`` and ``Media.name``:

1. ``POST /v1.0/robot/messageFiles/download {downloadCode, robotCode}`` -> a temporary ``downloadUrl``;
2. ``GET downloadUrl``, streamed into a private temporary directory (``dir``, else the system's),
   refused beyond ``max_bytes`` (a file over the limit keeps ``path = None`` and is logged);
3. when the message has been handled (its replies sent, streams finished) the directory is deleted.

A file that cannot be fetched leaves ``Media.path`` at ``None``; the message is still handled.
Plugins that want the bytes later, or of another message, call ``MediaDownloader.download``.

**Outbound** (reference 6.5). ``MediaUploader.upload_file`` posts a file to
``{oapi}/media/upload?access_token=`` (``image`` <= 20 MB jpg/gif/png/bmp, ``voice`` <= 2 MB,
``video`` <= 20 MB, ``file`` <= 20 MB) and returns its ``media_id``, usable as a markdown image URL or
in ``sampleImageMsg``/``sampleFile`` robot messages (``DingTalkConnector.send_media``).
"""

from __future__ import annotations

import mimetypes
import os
import re
import shutil
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import msgspec
import trio

from host.logs import logger
from host.model import AudioPart, FilePart, ImagePart, Media, Message, RichTextPart, VideoPart
from host_dingtalk_connector.errors import MediaError, OpenApiError
from host_dingtalk_connector.retry import Retrying

if TYPE_CHECKING:
    from host_dingtalk_connector.metrics import OutboundMetrics
    from host_dingtalk_connector.openapi import OpenApiClient

__all__ = [
    "DOWNLOAD_PATH",
    "UPLOAD_LIMITS",
    "MediaDownloader",
    "MediaSettings",
    "MediaUploader",
    "media_of",
]

DOWNLOAD_PATH = "/v1.0/robot/messageFiles/download"
#: Upload size limits per media type (reference 6.5).
UPLOAD_LIMITS = {"image": 20 << 20, "voice": 2 << 20, "video": 20 << 20, "file": 20 << 20}
#: oapi errcodes meaning the access token is invalid or expired.
_BAD_TOKEN = frozenset({40001, 40014, 42001, 88})
_SAFE_NAME = re.compile(r"[^\w.\- ()\[\]]+", re.UNICODE)
_MAGIC: tuple[tuple[bytes, str, str], ...] = (
    (b"\x89PNG\r\n\x1a\n", "image/png", ".png"),
    (b"\xff\xd8\xff", "image/jpeg", ".jpg"),
    (b"GIF8", "image/gif", ".gif"),
    (b"BM", "image/bmp", ".bmp"),
    (b"RIFF", "audio/wav", ".wav"),
    (b"#!AMR", "audio/amr", ".amr"),
    (b"OggS", "audio/ogg", ".ogg"),
    (b"%PDF", "application/pdf", ".pdf"),
    (b"PK\x03\x04", "application/zip", ".zip"),
)


class MediaSettings(msgspec.Struct, forbid_unknown_fields=True):
    """``[dingtalk.media]``: downloading and uploading files."""

    #: Fetch the files of inbound messages before plugins run (fills ``Media.path``).
    download: bool = True
    #: Largest file downloaded, bytes (larger ones keep ``Media.path = None``).
    max_bytes: int = 20 << 20
    #: Where temporary files go (a private directory per message is made inside); empty: the
    #: system's temporary directory.
    dir: str = ""
    #: Downloads running at once (all messages together).
    concurrency: int = 4
    #: Upload images given as ``![alt](file:///path)`` in markdown replies and use their media ids.
    upload_local_images: bool = True

    def __post_init__(self) -> None:
        if self.max_bytes < 1:
            raise ValueError("max_bytes: must be at least 1")
        if self.concurrency < 1:
            raise ValueError("concurrency: must be at least 1")


def media_of(message: Message) -> Iterator[tuple[Media, str]]:
    """Every ``Media`` of ``message`` with its kind (picture, audio, video, file)."""
    for part in message.parts:
        if isinstance(part, ImagePart):
            yield part.media, "picture"
        elif isinstance(part, AudioPart):
            yield part.media, "audio"
        elif isinstance(part, VideoPart):
            yield part.media, "video"
        elif isinstance(part, FilePart):
            yield part.media, "file"
        elif isinstance(part, RichTextPart):
            for inner in part.parts:
                if isinstance(inner, ImagePart):
                    yield inner.media, "picture"


def _sniff(head: bytes, content_type: str | None) -> tuple[str | None, str]:
    """(MIME type, file extension) from the first bytes, else from the Content-Type."""
    for magic, mime, ext in _MAGIC:
        if head.startswith(magic):
            if magic == b"RIFF" and head[8:12] == b"WEBP":
                return "image/webp", ".webp"
            return mime, ext
    if len(head) >= 12 and head[4:8] == b"ftyp":
        return "video/mp4", ".mp4"
    if content_type:
        mime = content_type.split(";")[0].strip().lower()
        if mime and mime not in ("application/octet-stream", "binary/octet-stream"):
            return mime, mimetypes.guess_extension(mime) or ""
    return None, ""


def _safe_name(name: str | None, fallback: str) -> str:
    """A file name safe to create: no directories, no odd characters, not too long."""
    base = Path((name or "").replace("\\", "/")).name
    base = _SAFE_NAME.sub("_", base).strip(" .")
    return base[:120] or fallback


class MediaDownloader:
    """Fetches inbound files for one connector (every app)."""

    def __init__(
        self, settings: MediaSettings, http: httpx.AsyncClient, metrics: OutboundMetrics
    ) -> None:
        self.settings = settings
        self.http = http
        self.metrics = metrics
        self._limiter = trio.CapacityLimiter(settings.concurrency)

    def temp_dir(self) -> Path:
        """A new private (0700) temporary directory."""
        root = self.settings.dir or None
        if root is not None:
            os.makedirs(root, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="host-dingtalk-", dir=root))

    async def fill(self, client: OpenApiClient, message: Message, directory: Path) -> int:
        """Download every file of ``message`` into ``directory``; returns how many were fetched."""
        fetched = 0
        items = [(m, kind) for m, kind in media_of(message) if m.download_code and not m.path]
        for index, (media, kind) in enumerate(items, start=1):
            try:
                await self.download(client, media, directory, stem=f"{kind}-{index}")
            except MediaError as exc:
                logger.warning("message {}: {} {} not downloaded: {}", message.id, kind, index, exc)
            else:
                fetched += 1
        return fetched

    async def download(
        self, client: OpenApiClient, media: Media, directory: Path, *, stem: str = "file"
    ) -> Path:
        """Fetch ``media`` into ``directory``; fills ``media.path``/``size``/``mime_type``/``name``.

        Raises ``MediaError`` (``too_large``, ``refused``, ``unavailable``, ``io``).
        """
        if not media.download_code:
            raise MediaError("refused", "the media has no downloadCode")
        app = client.app.name
        try:
            async with self._limiter:
                path = await self._download(client, media, directory, stem)
        except MediaError as exc:
            self.metrics.media.labels(app, "download", exc.reason).inc()
            raise
        self.metrics.media.labels(app, "download", "ok").inc()
        return path

    async def _download(
        self, client: OpenApiClient, media: Media, directory: Path, stem: str
    ) -> Path:
        try:
            answer = await client.call(
                "POST",
                DOWNLOAD_PATH,
                {"downloadCode": media.download_code, "robotCode": client.app.robot_code},
                what="file download",
            )
        except OpenApiError as exc:
            raise MediaError("unavailable" if exc.transient else "refused", str(exc)) from None
        url = answer.get("downloadUrl")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise MediaError("refused", "messageFiles/download answered without a downloadUrl")
        retrying = Retrying(client.retry, trio.current_time)
        while True:
            try:
                return await self._fetch(url, media, directory, stem, client.retry.timeout)
            except MediaError as exc:
                delay = retrying.next_delay() if exc.reason == "unavailable" else None
                if delay is None:
                    raise
                await trio.sleep(delay)

    async def _fetch(
        self, url: str, media: Media, directory: Path, stem: str, request_timeout: float
    ) -> Path:
        timeout = request_timeout
        limit = self.settings.max_bytes
        partial = directory / f".{stem}.part"
        try:
            async with self.http.stream("GET", url, timeout=timeout) as response:
                if response.status_code != 200:
                    reason = "unavailable" if response.status_code >= 500 else "refused"
                    # The URL is presigned (a credential): never put it in the error.
                    raise MediaError(reason, f"file server answered HTTP {response.status_code}")
                declared = response.headers.get("content-length", "")
                if declared.isdigit() and int(declared) > limit:
                    raise MediaError(
                        "too_large", f"file is {int(declared)} bytes, over the {limit}-byte limit"
                    )
                size = 0
                head = b""
                async with await trio.open_file(partial, "wb") as out:
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > limit:
                            raise MediaError("too_large", f"file is over the {limit}-byte limit")
                        if len(head) < 16:
                            head = (head + chunk)[:16]
                        await out.write(chunk)
                content_type = response.headers.get("content-type")
        except httpx.TimeoutException:
            await _unlink(partial)
            raise MediaError(
                "unavailable", f"file download did not finish within {timeout}s"
            ) from None
        except httpx.HTTPError as exc:
            await _unlink(partial)
            raise MediaError("unavailable", f"file download failed: {type(exc).__name__}") from None
        except OSError as exc:
            await _unlink(partial)
            raise MediaError("io", f"cannot write the file: {exc.strerror or exc}") from None
        except BaseException:
            await _unlink(partial)
            raise
        mime, ext = _sniff(head, content_type)
        name = _safe_name(media.name, stem + ext)
        if "." not in name and ext:
            name += ext
        target = directory / name
        counter = 1
        while await trio.Path(target).exists():
            counter += 1
            target = directory / f"{Path(name).stem}-{counter}{Path(name).suffix}"
        await trio.Path(partial).rename(target)
        media.path = str(target)
        media.size = size
        media.name = media.name or name
        if mime and (media.mime_type is None or media.mime_type.endswith("/*")):
            media.mime_type = mime
        return target

    def middleware(
        self, connector_name: str, client_for: Callable[[str | None], OpenApiClient]
    ) -> Callable[[Message, Callable[[Message], Awaitable[None]]], Awaitable[None]]:
        """Host middleware: fetch the files of this connector's messages, delete them afterwards."""

        async def fetch_media(
            message: Message, call_next: Callable[[Message], Awaitable[None]]
        ) -> None:
            if message.connector != connector_name or not self.settings.download:
                await call_next(message)
                return
            if not any(m.download_code and not m.path for m, _ in media_of(message)):
                await call_next(message)
                return
            directory = self.temp_dir()
            try:
                await self.fill(client_for(message.app_id), message, directory)
                await call_next(message)
            finally:
                with trio.CancelScope(shield=True):
                    await trio.to_thread.run_sync(shutil.rmtree, directory, True)

        return fetch_media


class MediaUploader:
    """Uploads files to DingTalk (``{oapi}/media/upload``) for one connector."""

    def __init__(self, http: httpx.AsyncClient, metrics: OutboundMetrics) -> None:
        self.http = http
        self.metrics = metrics

    async def upload_file(
        self, client: OpenApiClient, path: str | os.PathLike[str], *, kind: str = "file"
    ) -> str:
        """Upload the file at ``path`` as ``kind`` (image, voice, video, file); returns the media id."""
        if kind not in UPLOAD_LIMITS:
            raise MediaError(
                "refused", f"kind must be one of {', '.join(UPLOAD_LIMITS)}, not {kind!r}"
            )
        file = trio.Path(path)
        try:
            size = (await file.stat()).st_size
            if size > UPLOAD_LIMITS[kind]:
                self.metrics.media.labels(client.app.name, "upload", "too_large").inc()
                raise MediaError(
                    "too_large",
                    f"{kind} files are limited to {UPLOAD_LIMITS[kind]} bytes; this one has {size}",
                )
            data = await file.read_bytes()
        except OSError as exc:
            self.metrics.media.labels(client.app.name, "upload", "io").inc()
            raise MediaError(
                "io", f"cannot read {os.fspath(path)}: {exc.strerror or exc}"
            ) from None
        return await self.upload_bytes(client, data, filename=Path(path).name, kind=kind)

    async def upload_bytes(
        self, client: OpenApiClient, data: bytes, *, filename: str, kind: str = "file"
    ) -> str:
        """Upload ``data`` as ``kind`` named ``filename``; returns the media id."""
        app = client.app.name
        try:
            media_id = await self._upload(client, data, filename, kind)
        except MediaError as exc:
            self.metrics.media.labels(app, "upload", exc.reason).inc()
            raise
        self.metrics.media.labels(app, "upload", "ok").inc()
        return media_id

    async def _upload(self, client: OpenApiClient, data: bytes, filename: str, kind: str) -> str:
        if kind not in UPLOAD_LIMITS:
            raise MediaError(
                "refused", f"kind must be one of {', '.join(UPLOAD_LIMITS)}, not {kind!r}"
            )
        if len(data) > UPLOAD_LIMITS[kind]:
            raise MediaError(
                "too_large",
                f"{kind} files are limited to {UPLOAD_LIMITS[kind]} bytes; this one has {len(data)}",
            )
        mime = mimetypes.guess_type(filename)[0] or "application/octet-stream"
        url = client.oapi_endpoint + "/media/upload"
        retrying = Retrying(client.retry, trio.current_time)
        refreshed = False
        while True:
            try:
                token = await client.tokens.get()
            except OpenApiError as exc:
                raise MediaError("unavailable" if exc.transient else "refused", str(exc)) from None
            outcome = await self._attempt(
                url, token, kind, filename, mime, data, client.retry.timeout
            )
            if isinstance(outcome, str):
                return outcome
            transient, errcode, detail = outcome
            if errcode in _BAD_TOKEN and not refreshed:
                refreshed = True
                client.tokens.invalidate(token)
                continue
            delay = retrying.next_delay() if transient else None
            if delay is None:
                raise MediaError(
                    "unavailable" if transient else "refused", f"media upload failed: {detail}"
                )
            await trio.sleep(delay)

    async def _attempt(
        self,
        url: str,
        token: str,
        kind: str,
        filename: str,
        mime: str,
        data: bytes,
        request_timeout: float,
    ) -> str | tuple[bool, int | None, str]:
        timeout = request_timeout
        try:
            response = await self.http.post(
                url,
                params={"access_token": token, "type": kind},
                data={"type": kind},
                files={"media": (filename, data, mime)},
                timeout=timeout,
            )
        except httpx.TimeoutException:
            return True, None, f"no answer within {timeout}s"
        except httpx.HTTPError as exc:
            return True, None, f"network error {type(exc).__name__}"
        if response.status_code != 200:
            return response.status_code >= 500, None, f"HTTP {response.status_code}"
        try:
            payload: Any = response.json()
        except ValueError:
            return False, None, "an answer that is not JSON"
        if not isinstance(payload, dict):
            return False, None, "an answer that is not a JSON object"
        errcode = payload.get("errcode", 0)
        media_id = payload.get("media_id")
        if errcode == 0 and isinstance(media_id, str) and media_id:
            return media_id
        code = errcode if isinstance(errcode, int) else None
        return code == -1, code, f"errcode {errcode} {payload.get('errmsg', '')}".rstrip()


async def _unlink(path: Path) -> None:
    with trio.CancelScope(shield=True):
        await trio.Path(path).unlink(missing_ok=True)
