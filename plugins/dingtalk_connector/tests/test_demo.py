"""``python -m host demo``: run as a user would, in a subprocess (stdin pipe and pseudo-terminal).

Each run starts in an empty directory (the demo writes ``logs/demo.log`` there, and the audit plugin,
when installed, its log) with no DingTalk credentials in the environment. Every wait is bounded.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

LIMIT = 60.0
HAS_BRIDGE = importlib.util.find_spec("host_nlp_bridge") is not None and not os.environ.get(
    "DINGTALK_TESTS_WITHOUT_NLP_BRIDGE"
)
#: Without the NLP bridge installed (a fresh environment with only this plugin), the demo's answers
#: come from this drop-in plugin instead ([host.reload] plugins_dir): the same echo, streamed.
ECHO_DROPIN = """
import re

import trio

from host import hookimpl

DELAY = {delay}


@hookimpl
async def on_message(message):
    if not message.text:
        return "I can only read text messages for now."
    answer = "[echo] " + message.text

    async def words():
        for i, word in enumerate(re.findall(r"\\S+\\s*", answer)):
            if i and DELAY:
                await trio.sleep(DELAY)
            yield word

    return words()
"""


def prepare(cwd: Path, *, delay: float = 0.0) -> None:
    """Give the demo in ``cwd`` an answering plugin: the NLP bridge's echo (slowed down by ``delay``),
    or the drop-in stand-in when the bridge is not installed."""
    if HAS_BRIDGE:
        if delay:
            (cwd / "host.toml").write_text(
                f'[nlp_bridge.backends.echo]\ntype = "echo"\nchunk_delay = {delay}\n'
            )
        return
    (cwd / "plugins").mkdir()
    (cwd / "plugins" / "demo_echo.py").write_text(ECHO_DROPIN.format(delay=delay))
    # (The deny list matters only when pretending the bridge is absent while it is installed.)
    (cwd / "host.toml").write_text(
        '[plugins]\ndeny = ["nlp_bridge"]\n[host.reload]\nplugins_dir = "plugins"\n'
    )


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, object]]:
    return ("trio", {})  # real sockets: the real clock


def demo_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DINGTALK_", "NLP_", "HOST_"))}  # fmt: skip
    env.update(PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost", **extra)
    return env


def run_demo(
    cwd: Path, *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "host", "demo", "--port", "0", *args],
        cwd=cwd, input=stdin, capture_output=True, text=True, timeout=LIMIT, env=env or demo_env(),
    )  # fmt: skip


def test_say_prints_the_reply_and_exits_0(tmp_path: Path) -> None:
    prepare(tmp_path)
    result = run_demo(tmp_path, "--say", "hello there")
    assert result.returncode == 0, result.stderr
    assert result.stdout == "[echo] hello there\n"  # only the reply on stdout: usable in scripts
    log = (tmp_path / "logs" / "demo.log").read_text()
    assert "host started" in log and "connected to ws://127.0.0.1" in log
    group = run_demo(tmp_path, "--say", "in a group", "--group")
    assert (group.returncode, group.stdout) == (0, "[echo] in a group\n"), group.stderr


def test_say_without_any_answer_exits_1_with_a_clear_message(tmp_path: Path) -> None:
    # Nothing answers when the NLP bridge is not allowed to load (or not installed).
    env = demo_env(HOST_PLUGINS_DENY="nlp_bridge")
    result = run_demo(tmp_path, "--say", "anyone?", "--timeout", "2", env=env)
    assert result.returncode == 1
    assert result.stdout == ""
    assert "no reply within 2s" in result.stderr


def test_bad_configuration_exits_2(tmp_path: Path) -> None:
    (tmp_path / "host.toml").write_text("[dingtalk.cards]\nupdates_per_second = 50\n")
    result = run_demo(tmp_path, "--say", "x", "--timeout", "5")
    assert result.returncode == 2
    assert "updates_per_second" in result.stderr


def test_interactive_chat_through_a_pipe(tmp_path: Path) -> None:
    prepare(tmp_path)
    result = run_demo(
        tmp_path, stdin="hello card\n/group\nin the group\n/nonsense\n/single\n/quit\n"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert re.search(r"chat page  http://127\.0\.0\.1:\d+/", out)
    assert "bot (AI card)> [echo] hello card\n" in out
    assert "(now in a group chat)" in out and "you (group)> " in out
    assert "bot (AI card)> [echo] in the group\n" in out
    assert "unknown command /nonsense" in out
    assert out.rstrip().endswith("bye")
    assert (
        "INFO" not in out and "INFO" not in result.stderr
    )  # logs go to the file, not the terminal


def test_interactive_chat_in_a_terminal_streams_into_a_card_and_stops_on_ctrl_c(
    tmp_path: Path,
) -> None:
    """A pseudo-terminal: the prompt, a streamed answer, the card on the chat page, then Ctrl-C."""
    prepare(tmp_path, delay=0.05)  # a slow echo: the answer is still streaming when we look
    master, slave = pty.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "host", "demo", "--port", "0"],
        cwd=tmp_path, stdin=slave, stdout=slave, stderr=subprocess.PIPE, env=demo_env(), start_new_session=True,
    )  # fmt: skip
    os.close(slave)
    output = ""

    def read_until(pattern: str) -> re.Match[str]:
        nonlocal output
        deadline = time.monotonic() + LIMIT
        while (found := re.search(pattern, output)) is None:
            assert time.monotonic() < deadline, f"{pattern!r} not seen in {output!r}"
            ready, _, _ = select.select([master], [], [], 0.5)
            if ready:
                try:
                    output += os.read(master, 4096).decode(errors="replace")
                except OSError:  # the process closed the terminal
                    assert process.poll() is not None
        return found

    try:
        url = read_until(r"chat page  (http://127\.0\.0\.1:\d+)/").group(1)
        read_until(r"you \(1:1\)> ")
        words = " ".join(f"w{i}" for i in range(30))
        os.write(master, f"{words}\n".encode())
        read_until(r"bot \(AI card\)> \[echo\]")
        # The card is on the emulator's page while it streams, then finished.
        with urllib.request.urlopen(f"{url}/_emulator/cards", timeout=10) as response:
            cards = json.loads(response.read())
        assert len(cards) == 1 and cards[0]["state"] in ("PROCESSING", "INPUTING", "FINISHED")
        read_until(re.escape(f"[echo] {words}") + r"\s*\r?\n")
        read_until(r"you \(1:1\)> $")
        with urllib.request.urlopen(f"{url}/_emulator/cards", timeout=10) as response:
            (card,) = json.loads(response.read())
        assert card["state"] == "FINISHED" and card["text"] == f"[echo] {words}"
        assert len(card["streams"]) >= 2  # it streamed, it did not arrive in one piece
        os.kill(process.pid, signal.SIGINT)  # Ctrl-C
        read_until(r"bye")
        assert process.wait(timeout=LIMIT) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
        os.close(master)
        if process.stderr is not None:
            process.stderr.close()


@pytest.mark.anyio
async def test_demo_configuration_replaces_credentials_and_keeps_the_rest() -> None:
    """Configured credentials, apps and mode are replaced by the emulator's; other settings stay."""
    import trio
    from host_dingtalk_connector.demo import DEMO_TEMPLATE, demo_config
    from host_dingtalk_connector.emulator import open_emulator

    user = {
        "dingtalk": {
            "client_id": "dingrealapp",
            "client_secret": {"env": "REAL_SECRET"},
            "mode": "webhook",
            "replies": {"mention_sender": True},
            "apps": {"other": {"client_id": "x"}},
        },
        "http": {"addr": "0.0.0.0:9464"},
        "host": {"control_socket": ".host/control.sock", "concurrency": 4},
    }
    with trio.fail_after(30):
        async with open_emulator() as emu:
            data = demo_config(user, emu, "logs/x.log")
    dingtalk = data["dingtalk"]
    assert (
        dingtalk["client_id"] == emu.settings.client_id
        and dingtalk["openapi_endpoint"] == emu.base_url
    )
    assert "apps" not in dingtalk and dingtalk["mode"] == "stream"
    assert (
        dingtalk["replies"] == {"mention_sender": True}
        and dingtalk["cards"]["template_id"] == DEMO_TEMPLATE
    )
    assert data["http"]["enabled"] is False and data["host"]["control_socket"] == ""
    assert data["host"]["concurrency"] == 4 and data["logging"]["file"] == "logs/x.log"
    assert user["dingtalk"]["client_id"] == "dingrealapp"  # the caller's data is not modified
