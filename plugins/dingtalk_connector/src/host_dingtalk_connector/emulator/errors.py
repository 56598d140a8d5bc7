"""The emulator's exceptions.

::

    EmulatorError            bad use of the emulator's own API (Python or /_emulator/ control API)
    ├── NotFound             a connection / conversation / card / file id the emulator does not know
    └── NoConnection         nothing to push to: no open Stream connection subscribed to the topic
    ApiError                 a DingTalk "new OpenAPI" error answer: HTTP status + ``code`` + ``message``
    OapiError                a DingTalk "old OpenAPI" answer: HTTP 200 + ``errcode`` + ``errmsg``

``ApiError`` and ``OapiError`` are not failures of the emulator: they are the answers DingTalk would
give to a bad request, raised inside request handlers and turned into responses at the edge.
"""

from __future__ import annotations

import uuid

__all__ = ["ApiError", "EmulatorError", "NoConnection", "NotFound", "OapiError"]


class EmulatorError(Exception):
    """Bad use of the emulator (a test or control-API mistake); the message says what is wrong."""

    status = 400


class NotFound(EmulatorError):
    """An id the emulator does not know."""

    status = 404


class NoConnection(EmulatorError):
    """No open Stream connection of the app subscribes to the topic being pushed."""

    status = 409


class ApiError(Exception):
    """DingTalk's new-API error body ``{"requestid", "code", "message"}`` with an HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message

    def body(self) -> dict[str, str]:
        return {"requestid": str(uuid.uuid4()).upper(), "code": self.code, "message": self.message}


class OapiError(Exception):
    """DingTalk's old-API (oapi) error: HTTP 200 with ``{"errcode", "errmsg"}``."""

    def __init__(self, errcode: int, errmsg: str) -> None:
        super().__init__(f"errcode {errcode}: {errmsg}")
        self.errcode = errcode
        self.errmsg = errmsg

    def body(self) -> dict[str, object]:
        return {"errcode": self.errcode, "errmsg": self.errmsg}
