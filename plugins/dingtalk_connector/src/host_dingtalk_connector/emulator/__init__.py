"""A faithful local DingTalk: Stream gateway, bot OpenAPIs, session webhooks, cards, faults.

Run it from Python (tests, the demo)::

    from host_dingtalk_connector.emulator import open_emulator

    async with open_emulator() as emu:          # inside a trio run
        sent = await emu.send_user_message("hello", conversation_type="group")
        replies = await emu.wait_for_bot_message(sent["conversationId"])

or from a shell: ``python -m host_dingtalk_connector.emulator --port 8780`` (chat page at ``/``,
control API under ``/_emulator/``). See the plugin README for every endpoint, setting and fault.
"""

from __future__ import annotations

from .callbacks import CallbackDriver, CallbackRecord, open_callbacks
from .errors import ApiError, EmulatorError, NoConnection, NotFound, OapiError
from .faults import MALFORMED_KINDS, Faults
from .gateway import BOT_TOPIC, CARD_CALLBACK_TOPIC
from .server import Emulator, open_emulator
from .settings import DEFAULT_CLIENT_ID, DEFAULT_CLIENT_SECRET, EmulatorSettings

__all__ = [
    "BOT_TOPIC",
    "CARD_CALLBACK_TOPIC",
    "DEFAULT_CLIENT_ID",
    "DEFAULT_CLIENT_SECRET",
    "MALFORMED_KINDS",
    "ApiError",
    "CallbackDriver",
    "CallbackRecord",
    "Emulator",
    "EmulatorError",
    "EmulatorSettings",
    "Faults",
    "NoConnection",
    "NotFound",
    "OapiError",
    "open_callbacks",
    "open_emulator",
]
