"""What the emulator remembers: users, conversations, what was said in them, tokens, sessions,
files, registrations and every API call, plus the ``Notifier`` that wakes ``wait_*`` helpers.

Records render themselves with ``to_dict()`` into the JSON shapes of the control API (camelCase, like
DingTalk). All expiries are judged on ``EmulatorClock.now()``.
"""

from __future__ import annotations

import hashlib
import hmac
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import trio

from .clock import EmulatorClock
from .errors import NotFound
from .ids import IdFactory
from .settings import EmulatorSettings

if TYPE_CHECKING:
    from .cards import Card

__all__ = [
    "BotMessage",
    "CallRecord",
    "Conversation",
    "EmulatorState",
    "Notifier",
    "Registration",
    "Session",
    "StoredFile",
    "Ticket",
    "Token",
    "User",
    "UserMessage",
]

T = TypeVar("T")


class Notifier:
    """Wakes everyone waiting for "something changed"; ``wait_until`` re-checks a predicate."""

    def __init__(self) -> None:
        self._event = trio.Event()
        self._waiting = 0

    def notify(self) -> None:
        # Called on every push and ACK: costs nothing while nobody waits.
        if self._waiting:
            self._event.set()
            self._event = trio.Event()

    async def wait_until(self, predicate: Callable[[], T | None]) -> T:
        """Return the predicate's first non-None result (checked now and after every change)."""
        while True:
            result = predicate()
            if result is not None:
                return result
            self._waiting += 1
            try:
                await self._event.wait()
            finally:
                self._waiting -= 1


@dataclass
class User:
    staff_id: str
    nick: str
    sender_id: str
    union_id: str
    platform: str = "Mac"
    is_admin: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {"staffId": self.staff_id, "nick": self.nick, "senderId": self.sender_id,
                "unionId": self.union_id, "platform": self.platform, "isAdmin": self.is_admin}


@dataclass
class UserMessage:
    """A message a user sent (what the bot was pushed)."""

    seq: int
    conversation_id: str
    msg_id: str
    msgtype: str
    text: str
    sender: User
    created_ms: int
    payload: dict[str, Any]
    delivered: bool = False
    message_ids: list[str] = field(default_factory=list)
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "from": "user", "conversationId": self.conversation_id,
                "msgId": self.msg_id, "msgtype": self.msgtype, "text": self.text,
                "senderStaffId": self.sender.staff_id, "senderNick": self.sender.nick,
                "createAt": self.created_ms, "delivered": self.delivered,
                "messageIds": list(self.message_ids), "note": self.note}


@dataclass
class BotMessage:
    """Something the bot sent into a conversation (webhook reply, OpenAPI send or card)."""

    seq: int
    conversation_id: str
    via: str  # sessionWebhook | oToMessages | groupMessages | card | interactiveCard
    msgtype: str
    text: str
    created_ms: int
    body: dict[str, Any]
    title: str = ""
    at: dict[str, Any] = field(default_factory=dict)
    process_query_key: str = ""
    card: Card | None = None
    recalled: bool = False

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "seq": self.seq, "from": "bot", "conversationId": self.conversation_id, "via": self.via,
            "msgtype": self.msgtype, "text": self.text, "title": self.title,
            "createAt": self.created_ms, "at": self.at, "body": self.body,
            "processQueryKey": self.process_query_key, "recalled": self.recalled,
        }
        if self.card is not None:
            card = self.card.to_dict()
            data.update(text=card["text"], state=card["state"], outTrackId=card["outTrackId"],
                        card=card)
        return data


@dataclass
class Conversation:
    id: str
    type: str  # "1" = 1:1 with the robot, "2" = group
    title: str
    members: list[str] = field(default_factory=list)  # staff ids
    timeline: list[UserMessage | BotMessage] = field(default_factory=list)
    created_ms: int = 0

    def bot_messages(self) -> list[BotMessage]:
        return [m for m in self.timeline if isinstance(m, BotMessage)]

    def summary(self) -> dict[str, Any]:
        return {"conversationId": self.id, "conversationType": self.type,
                "kind": "single" if self.type == "1" else "group", "title": self.title,
                "members": list(self.members), "messages": len(self.timeline),
                "botMessages": len(self.bot_messages())}


@dataclass
class Session:
    """A ``sessionWebhook``: the credential is the ``session`` query parameter."""

    id: str
    conversation_id: str
    sender_staff_id: str
    expires_at: float  # emulator clock
    expired_by_fault: bool = False


@dataclass
class Token:
    value: str
    client_id: str
    expires_at: float


@dataclass
class Ticket:
    value: str
    registration: Registration
    issued_at: float
    used: bool = False
    expired_by_fault: bool = False


@dataclass
class Registration:
    """One ``POST /v1.0/gateway/connections/open`` (kept whatever the outcome)."""

    seq: int
    at_ms: int
    client_id: str
    subscriptions: list[dict[str, Any]] | None  # as sent (None when the body had none)
    ua: str | None
    local_ip: str | None
    extras: Any
    user_agent: str
    status: int
    outcome: str  # ok | authFailed | badRequest | fault
    ticket: str = ""

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at_ms, "clientId": self.client_id,
                "subscriptions": self.subscriptions, "ua": self.ua, "localIp": self.local_ip,
                "extras": self.extras, "userAgent": self.user_agent, "status": self.status,
                "outcome": self.outcome, "ticket": self.ticket}


@dataclass
class StoredFile:
    id: str
    name: str
    content: bytes
    mime: str
    robot_code: str
    download_code: str = ""
    media_id: str = ""
    kind: str = "file"

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "name": self.name, "size": len(self.content), "mime": self.mime,
                "kind": self.kind, "downloadCode": self.download_code, "mediaId": self.media_id,
                "sha256": hashlib.sha256(self.content).hexdigest()}


@dataclass
class CallRecord:
    """One call of a DingTalk API (OpenAPI, oapi, webhook), for assertions."""

    seq: int
    at_ms: int
    method: str
    path: str
    api: str
    status: int = 0
    code: str = ""  # error code (new API) or errcode (old API) as a string; "" on success
    request: Any = None
    response: Any = None

    def to_dict(self) -> dict[str, Any]:
        return {"seq": self.seq, "at": self.at_ms, "method": self.method, "path": self.path,
                "api": self.api, "status": self.status, "code": self.code,
                "request": self.request, "response": self.response}


_SECRET_KEYS = frozenset({"appSecret", "clientSecret", "client_secret", "appsecret"})


def redact(value: Any) -> Any:
    """Copy of a request body with credential fields masked (call records are inspectable)."""
    if isinstance(value, dict):
        return {k: ("**********" if k in _SECRET_KEYS else redact(v)) for k, v in value.items()}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


class EmulatorState:
    """The emulator's memory. One instance per emulator; only touched from the trio thread."""

    def __init__(self, settings: EmulatorSettings, clock: EmulatorClock, ids: IdFactory) -> None:
        self.settings = settings
        self.clock = clock
        self.ids = ids
        self.notifier = Notifier()
        self.base_url = ""
        self.webhook_base_url = ""
        self._seq = 0
        self.users: dict[str, User] = {}
        self.conversations: dict[str, Conversation] = {}
        self._single_by_staff: dict[str, str] = {}
        self.sessions: dict[str, Session] = {}
        self.tokens: dict[str, Token] = {}  # by value
        self.tickets: dict[str, Ticket] = {}
        self.registrations: list[Registration] = []
        self.files: dict[str, StoredFile] = {}
        self.files_by_code: dict[str, StoredFile] = {}
        self.files_by_media: dict[str, StoredFile] = {}
        self.calls: deque[CallRecord] = deque(maxlen=10000)
        self.url_key = ids.token().encode()
        self.chatbot_user_id = ids.encrypted_user_id()
        for staff_id, nick in settings.users.items():
            self.user(staff_id, nick)
        self.default_group = self.group(None, "Emulator group")

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    # --- directory --------------------------------------------------------------------------
    def user(self, staff_id: str, nick: str | None = None) -> User:
        """The user with ``staff_id`` (created on first use; ``nick`` renames)."""
        user = self.users.get(staff_id)
        if user is None:
            user = User(staff_id=staff_id, nick=nick or staff_id,
                        sender_id=self.ids.encrypted_user_id(), union_id=self.ids.union_id())
            self.users[staff_id] = user
        elif nick:
            user.nick = nick
        return user

    def single_chat(self, user: User) -> Conversation:
        """The 1:1 chat between ``user`` and the robot (one per user, like DingTalk)."""
        cid = self._single_by_staff.get(user.staff_id)
        if cid is None:
            cid = self.ids.conversation_id()
            self._single_by_staff[user.staff_id] = cid
            self.conversations[cid] = Conversation(cid, "1", user.nick, [user.staff_id],
                                                   created_ms=self.clock.epoch_ms())
        return self.conversations[cid]

    def single_chat_of(self, staff_id: str) -> Conversation | None:
        """The 1:1 chat with a known user (created if the user exists), else None."""
        if staff_id not in self.users:
            return None
        return self.single_chat(self.users[staff_id])

    def group(self, conversation_id: str | None, title: str | None = None) -> Conversation:
        """A group chat (created when ``conversation_id`` is None or new)."""
        if conversation_id is not None and conversation_id in self.conversations:
            conv = self.conversations[conversation_id]
            if conv.type != "2":
                raise NotFound(f"conversation {conversation_id!r} is a 1:1 chat, not a group")
            if title:
                conv.title = title
            return conv
        cid = conversation_id or self.ids.conversation_id()
        conv = Conversation(cid, "2", title or "Emulator group", created_ms=self.clock.epoch_ms())
        self.conversations[cid] = conv
        return conv

    def conversation(self, conversation_id: str) -> Conversation:
        try:
            return self.conversations[conversation_id]
        except KeyError:
            raise NotFound(f"no conversation {conversation_id!r}") from None

    def add_bot_message(self, message: BotMessage) -> BotMessage:
        self.conversation(message.conversation_id).timeline.append(message)
        self.notifier.notify()
        return message

    # --- sessions ---------------------------------------------------------------------------
    def new_session(self, conversation_id: str, sender_staff_id: str) -> Session:
        session = Session(self.ids.session(), conversation_id, sender_staff_id,
                          self.clock.now() + self.settings.session_webhook_ttl)
        self.sessions[session.id] = session
        return session

    def session_url(self, session: Session) -> str:
        # Session webhooks have a host of their own (like oapi.dingtalk.com): Emulator.webhook_url.
        return f"{self.webhook_base_url or self.base_url}/robot/sendBySession?session={session.id}"

    # --- tokens -----------------------------------------------------------------------------
    def issue_token(self, client_id: str) -> Token:
        """The app's valid token (same value while valid, renewed per settings) or a new one."""
        now = self.clock.now()
        for token in self.tokens.values():
            if token.client_id == client_id and token.expires_at > now:
                if self.settings.token_refresh_extends:
                    token.expires_at = now + self.settings.token_ttl
                return token
        token = Token(self.ids.token(), client_id, now + self.settings.token_ttl)
        self.tokens[token.value] = token
        return token

    def valid_token(self, value: str) -> Token | None:
        token = self.tokens.get(value)
        if token is None or token.expires_at <= self.clock.now():
            return None
        return token

    # --- files ------------------------------------------------------------------------------
    def add_file(self, content: bytes, name: str, mime: str, *, kind: str = "file",
                 with_download_code: bool = True, with_media_id: bool = False) -> StoredFile:
        stored = StoredFile(id=self.ids.uuid().replace("-", ""), name=name, content=content,
                            mime=mime, robot_code=self.settings.effective_robot_code, kind=kind)
        if with_download_code:
            stored.download_code = self.ids.download_code()
            self.files_by_code[stored.download_code] = stored
        if with_media_id:
            stored.media_id = self.ids.media_id()
            self.files_by_media[stored.media_id] = stored
        self.files[stored.id] = stored
        return stored

    def file_signature(self, file_id: str, expires: int) -> str:
        return hmac.new(self.url_key, f"{file_id}:{expires}".encode(), hashlib.sha256).hexdigest()[:32]

    def download_url(self, stored: StoredFile) -> str:
        expires = int(self.clock.epoch() + self.settings.download_url_ttl)
        sig = self.file_signature(stored.id, expires)
        return f"{self.base_url}/files/{stored.id}.file?Expires={expires}&Signature={sig}"

    # --- call log ---------------------------------------------------------------------------
    def record_call(self, method: str, path: str, api: str, request: Any) -> CallRecord:
        record = CallRecord(self.next_seq(), self.clock.epoch_ms(), method, path, api,
                            request=redact(request))
        self.calls.append(record)
        return record
