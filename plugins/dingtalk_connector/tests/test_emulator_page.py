"""The chat page at ``/`` driven in headless Chromium: a person picks group or 1:1, clicks, types,
sends, and sees the bot's replies and an AI card update live; checked in the DOM and a screenshot.

Chromium is driven over the DevTools protocol (a WebSocket, with trio-websocket). Needs Debian's
``chromium`` package (``apt-get install -y chromium chromium-driver``); the test is skipped only
when it is not installed. Real clock (a browser is another process); everything under fail_after.
"""

from __future__ import annotations

import base64
import json
import shutil
import struct
import subprocess
import zlib
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio
from emulator_support import MiniBot, open_ws
from host_dingtalk_connector.emulator import open_emulator
from trio_websocket import WebSocketConnection

pytestmark = pytest.mark.anyio
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
WIDTH, HEIGHT = 1000, 800


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return ("trio", {})


class DevTools:
    """Just enough of the Chrome DevTools Protocol: commands on one page, events ignored."""

    def __init__(self, ws: WebSocketConnection) -> None:
        self.ws = ws
        self.next_id = 0

    async def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.next_id += 1
        await self.ws.send_message(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(await self.ws.get_message())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise AssertionError(f"{method} failed: {reply['error']}")
                return dict(reply.get("result", {}))

    async def js(self, expression: str) -> Any:
        result = await self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    async def wait_js(self, expression: str) -> Any:
        """Wait until the page makes ``expression`` truthy (the page updates itself by polling)."""
        while not (value := await self.js(expression)):
            await trio.sleep(0.1)
        return value

    async def click(self, selector: str) -> None:
        box = await self.wait_js(
            f"(() => {{ const el = document.querySelector({json.dumps(selector)}); if (!el) return null;"
            " const r = el.getBoundingClientRect(); return {x: r.x + r.width / 2, y: r.y + r.height / 2}; })()")
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.call("Input.dispatchMouseEvent", type=kind, x=box["x"], y=box["y"], button="left",
                            clickCount=1)

    async def type(self, text: str) -> None:
        for char in text:
            await self.call("Input.dispatchKeyEvent", type="keyDown", key=char, text=char)
            await self.call("Input.dispatchKeyEvent", type="keyUp", key=char)

    async def press_enter(self) -> None:
        for kind in ("keyDown", "keyUp"):
            await self.call("Input.dispatchKeyEvent", type=kind, key="Enter", code="Enter",
                            windowsVirtualKeyCode=13, nativeVirtualKeyCode=13,
                            **({"text": "\r"} if kind == "keyDown" else {}))


def png_facts(data: bytes) -> tuple[int, int, int]:
    """(width, height, distinct byte values in the decompressed image data) of a PNG."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    width, height = struct.unpack("!II", data[16:24])
    pos, idat = 8, b""
    while pos < len(data):
        length = struct.unpack("!I", data[pos:pos + 4])[0]
        kind = data[pos + 4:pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8:pos + 8 + length]
        pos += 12 + length
    return width, height, len(set(zlib.decompress(idat)))


async def _devtools_port(profile: Path) -> int:
    marker = profile / "DevToolsActivePort"
    while not marker.exists() or not marker.read_text().strip():
        await trio.sleep(0.05)
    return int(marker.read_text().splitlines()[0])


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (apt-get install -y chromium chromium-driver)")
async def test_a_person_chats_with_the_bot_in_headless_chromium(tmp_path: Path) -> None:
    assert CHROMIUM is not None
    profile = tmp_path / "profile"
    profile.mkdir()
    with trio.fail_after(120):
        async with open_emulator() as emu, trio.open_nursery() as nursery:
            await nursery.start(MiniBot(emu).run)
            browser = await trio.lowlevel.open_process(
                [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={profile}", "--remote-debugging-port=0",
                 f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                port = await _devtools_port(profile)
                async with httpx.AsyncClient() as http:
                    targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
                page_url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
                async with open_ws(page_url) as ws:
                    cdp = DevTools(ws)
                    await cdp.call("Emulation.setDeviceMetricsOverride", width=WIDTH, height=HEIGHT,
                                   deviceScaleFactor=1, mobile=False)
                    await cdp.call("Page.navigate", url=emu.base_url + "/")
                    await cdp.wait_js("document.readyState === 'complete' && !!document.getElementById('send')")
                    await cdp.wait_js("document.getElementById('status').textContent.includes('online')")

                    # Group chat: click the radio button, click the input, type, click Send.
                    await cdp.click("#mode-group")
                    await cdp.wait_js("document.getElementById('mode-group').checked")
                    await cdp.click("#input")
                    await cdp.type("hello from the page")
                    await cdp.click("#send")
                    group = emu.state.default_group.id
                    (reply,) = await emu.wait_for_bot_message(group)
                    assert reply["text"] == "echo: hello from the page"
                    await cdp.wait_js("document.getElementById('messages').innerText.includes('echo: hello from the page')")
                    user_msg = emu.timeline(group)[0]
                    assert (user_msg["text"], user_msg["senderNick"]) == ("hello from the page", "Emulator User")

                    # An AI card streams in and finishes; the page shows its final text and state.
                    await cdp.click("#input")
                    await cdp.type("card please")
                    await cdp.press_enter()
                    card = await emu.wait_for_card(conversation_id=group, state="FINISHED")
                    assert card["text"] == "Streaming answer to: card please"
                    await cdp.wait_js(
                        "(() => { const c = document.querySelector('.card'); return c &&"
                        " c.innerText.includes('Streaming answer to: card please') && c.innerText.includes('FINISHED'); })()")

                    # Switch to the 1:1 chat.
                    await cdp.click("#mode-single")
                    await cdp.click("#input")
                    await cdp.type("just us")
                    await cdp.press_enter()
                    single = emu.state.single_chat_of("user0001")
                    assert single is not None
                    await emu.wait_for_bot_message(single.id)
                    text = await cdp.wait_js(
                        "(() => { const t = document.getElementById('messages').innerText;"
                        " return t.includes('echo: just us') ? t : null; })()")
                    assert "hello from the page" not in text  # the group's messages are not shown here

                    await cdp.click("#mode-group")
                    await cdp.wait_js("document.querySelectorAll('.card').length === 1")
                    shot = base64.b64decode((await cdp.call("Page.captureScreenshot", format="png"))["data"])
                    (tmp_path / "chat.png").write_bytes(shot)
                    width, height, distinct = png_facts(shot)
                    assert (width, height) == (WIDTH, HEIGHT)
                    assert distinct > 30, "the screenshot looks blank"
            finally:
                browser.kill()
                await browser.wait()
                nursery.cancel_scope.cancel()
