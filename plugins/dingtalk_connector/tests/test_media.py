"""Media: inbound files downloaded into temporary files (size limits, cleanup), uploads for replies.

Against the emulator's ``messageFiles/download``, its presigned file URLs and ``/media/upload``.
Real clock, real files under pytest's ``tmp_path``.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import pytest
import trio
from host_dingtalk_connector.emulator import open_emulator
from host_dingtalk_connector.emulator.media import png
from host_dingtalk_connector.errors import MediaError
from host_dingtalk_connector.media import MediaSettings, media_of
from outkit import metric, open_outbound, user_message

from host.metrics import Metrics
from host.model import Conversation, FilePart, ImagePart, Message, Reply, RichTextPart

LIMIT = 30


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


def sha(path: str | None) -> str:
    assert path is not None
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stored(emu: Any, download_code: str | None) -> dict[str, Any]:
    return next(f for f in emu.files() if f["downloadCode"] == download_code)


@pytest.mark.anyio
async def test_every_media_type_is_downloaded_and_removed_after_handling(tmp_path: Path) -> None:
    settings = MediaSettings(dir=str(tmp_path))
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with (
            open_emulator() as emu,
            open_outbound(emu, media=settings, metrics=metrics) as outbound,
        ):
            messages = [
                (await user_message(emu, "", msgtype=msgtype, conversation_type="single"))[0]
                for msgtype in ("picture", "audio", "video", "file")
            ]
            rich, _ = await user_message(
                emu, "", msgtype="richText", conversation_type="single",
                rich_text=[{"text": "look:"}, {"type": "picture"}, {"text": "and"}, {"type": "picture"}],
            )  # fmt: skip
            messages.append(rich)
            middleware = outbound.media_middleware()
            seen: list[tuple[str, str | None, str | None, int | None]] = []

            async def plugin(message: Message) -> None:
                # What a plugin sees: local files, with their size and type.
                for media, kind in media_of(message):
                    assert media.path is not None and os.path.exists(media.path)
                    assert sha(media.path) == stored(emu, media.download_code)["sha256"]
                    seen.append((kind, media.mime_type, media.name, media.size))

            for message in messages:
                await middleware(message, plugin)
            kinds = [s[0] for s in seen]
            assert kinds == ["picture", "audio", "video", "file", "picture", "picture"]
            mimes = {kind: mime for kind, mime, _, _ in seen}
            assert mimes == {
                "picture": "image/png",
                "audio": "audio/wav",
                "video": "video/mp4",
                "file": "text/plain",
            }
            assert seen[3][2] == "report.txt"  # a file keeps its name
            # Handled: every temporary file and directory is gone.
            assert list(tmp_path.iterdir()) == []
            assert (
                metric(
                    metrics,
                    "host_dingtalk_media_total",
                    app="default",
                    direction="download",
                    outcome="ok",
                )
                == 6
            )


@pytest.mark.anyio
async def test_too_large_files_are_refused_and_leave_nothing_behind(tmp_path: Path) -> None:
    settings = MediaSettings(dir=str(tmp_path), max_bytes=1000)
    big = {"name": "big.bin", "content": os.urandom(5000), "mime": "application/octet-stream"}
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with (
            open_emulator() as emu,
            open_outbound(emu, media=settings, metrics=metrics) as outbound,
        ):
            message, _ = await user_message(
                emu, "", msgtype="file", file=big, conversation_type="single"
            )
            handled: list[str | None] = []

            async def plugin(message: Message) -> None:
                part = message.parts[0]
                assert isinstance(part, FilePart)
                handled.append(part.media.path)
                assert [
                    p.name for p in tmp_path.iterdir() for _ in p.iterdir()
                ] == []  # no partial file

            await outbound.media_middleware()(message, plugin)
            assert handled == [None]  # still handled, just without the file
            assert list(tmp_path.iterdir()) == []
            assert (
                metric(
                    metrics,
                    "host_dingtalk_media_total",
                    app="default",
                    direction="download",
                    outcome="too_large",
                )
                == 1
            )


@pytest.mark.anyio
async def test_failing_downloads_are_retried_and_bad_codes_refused(tmp_path: Path) -> None:
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_outbound(emu, media=MediaSettings(dir=str(tmp_path))) as outbound,
        ):
            client = outbound.clients["default"]
            message, _ = await user_message(emu, "", msgtype="picture", conversation_type="single")
            (part,) = message.parts
            assert isinstance(part, ImagePart)
            emu.faults.download_failures(2)  # the file server answers 500 twice
            path = await outbound.downloader.download(client, part.media, tmp_path)
            assert (
                path.exists() and sha(str(path)) == stored(emu, part.media.download_code)["sha256"]
            )
            part.media.path = None
            emu.faults.download_failures(50)
            with pytest.raises(MediaError) as caught:
                await outbound.downloader.download(client, part.media, tmp_path)
            assert caught.value.reason == "unavailable"
            emu.faults.reset()
            part.media.download_code = "not-a-real-download-code"
            with pytest.raises(MediaError) as caught:
                await outbound.downloader.download(client, part.media, tmp_path)
            assert (
                caught.value.reason == "refused"
                and "invalidParameter.robotCode.downloadCode" in str(caught.value)
            )


@pytest.mark.anyio
async def test_hostile_file_names_stay_inside_the_temporary_directory(tmp_path: Path) -> None:
    spec = {"name": "../../etc/passwd", "content": b"root:x:0:0", "mime": "text/plain"}
    with trio.fail_after(LIMIT):
        async with (
            open_emulator() as emu,
            open_outbound(emu, media=MediaSettings(dir=str(tmp_path))) as outbound,
        ):
            message, _ = await user_message(
                emu, "", msgtype="file", file=spec, conversation_type="single"
            )
            directory = tmp_path / "one"
            directory.mkdir()
            assert await outbound.download_media(message, directory) == 1
            part = message.parts[0]
            assert isinstance(part, FilePart) and part.media.path is not None
            assert (
                Path(part.media.path).parent == directory
                and Path(part.media.path).name == "passwd.txt"
            )  # type added from the content


@pytest.mark.anyio
async def test_uploads_images_and_files_and_sends_them(tmp_path: Path) -> None:
    image = tmp_path / "chart.png"
    image.write_bytes(png(8, 8))
    report = tmp_path / "report.pdf"
    report.write_bytes(b"%PDF-1.4 tiny")
    with trio.fail_after(LIMIT):
        metrics = Metrics()
        async with open_emulator() as emu, open_outbound(emu, metrics=metrics) as outbound:
            media_id = await outbound.upload_media(image, kind="image")
            uploaded = next(f for f in emu.files() if f["mediaId"] == media_id)
            assert uploaded["sha256"] == hashlib.sha256(image.read_bytes()).hexdigest()
            group = Conversation(id=emu.state.default_group.id, type="group")
            await outbound.send_media(group, image, kind="image")
            await outbound.send_media(group, report, kind="file")
            sent = emu.bot_messages(group.id)
            assert [m["msgtype"] for m in sent] == ["sampleImageMsg", "sampleFile"]
            assert sent[1]["text"] == "[file] report.pdf"
            # Markdown replies may name local images: uploaded, replaced by their media id.
            message, info = await user_message(
                emu, "chart?", conversation_type="group", conversation_id="cidCharts"
            )
            await outbound.deliver(message, Reply.markdown(f"Here:\n![chart](file://{image})"))
            (reply,) = emu.bot_messages(info["conversationId"])
            assert "file://" not in reply["text"]
            used = reply["text"].split("![chart](", 1)[1].rstrip(")")
            assert (
                next(f for f in emu.files() if f["mediaId"] == used)["sha256"] == uploaded["sha256"]
            )
            # Over the size limit: refused before any call.
            big = tmp_path / "voice.amr"
            big.write_bytes(b"#!AMR" + b"\0" * (2 << 20))
            with pytest.raises(MediaError) as caught:
                await outbound.upload_media(big, kind="voice")
            assert caught.value.reason == "too_large"
            assert (
                metric(
                    metrics,
                    "host_dingtalk_media_total",
                    app="default",
                    direction="upload",
                    outcome="ok",
                )
                == 4
            )


def test_media_of_walks_rich_text() -> None:
    from host.model import Media, Sender, TextPart

    message = Message(
        id="m", platform="dingtalk", connector="dingtalk",
        conversation=Conversation(id="c", type="single"), sender=Sender(platform_ids={}),
        parts=[RichTextPart(parts=[TextPart(text="a"), ImagePart(media=Media(download_code="x"))])],
    )  # fmt: skip
    assert [(m.download_code, kind) for m, kind in media_of(message)] == [("x", "picture")]
