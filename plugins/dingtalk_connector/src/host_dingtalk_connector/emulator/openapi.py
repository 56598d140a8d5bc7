"""DingTalk's OpenAPIs as the emulator serves them: the request pipeline (access token, per-app
per-API QPS limit, JSON body, error shapes, call log), tokens, robot send/recall, file download and
media upload. Cards live in ``cards.py``, the session webhook in ``webhook.py``.

Error shapes (reference §9.1): new APIs (``/v1.0/...``) answer ``{"requestid", "code", "message"}``
with a 4xx/5xx status; old ones (``/gettoken``, ``/media/upload``, ``/robot/...``) answer HTTP 200 with
``{"errcode", "errmsg"}``.
"""

from __future__ import annotations

import hmac
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

import msgspec
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from .errors import ApiError, OapiError
from .faults import FaultSwitches
from .settings import EmulatorSettings
from .state import BotMessage, CallRecord, EmulatorState

__all__ = ["MSG_KEYS", "Call", "JsonAnswer", "OpenApi", "render_msg_param"]

Auth = Literal["token", "oapi", "none"]
_BAD_JSON = object()
_JSON_UTF8 = "application/json;charset=utf-8"
_encode_json = msgspec.json.Encoder().encode


class JsonAnswer(Response):
    """Starlette's ``JSONResponse`` rendered by msgspec: the same compact UTF-8 bytes for the
    emulator's answers (objects of strings, numbers, booleans, lists), at a fraction of the cost
    of ``json.dumps`` on every API call."""

    media_type = _JSON_UTF8

    def render(self, content: Any) -> bytes:
        return _encode_json(content)

#: msgKey -> required msgParam fields (reference §6.3).
MSG_KEYS: dict[str, tuple[str, ...]] = {
    "sampleText": ("content",),
    "sampleMarkdown": ("title", "text"),
    "sampleImageMsg": ("photoURL",),
    "sampleLink": ("text", "title", "messageUrl"),
    "sampleActionCard": ("title", "text", "singleTitle", "singleURL"),
    **{f"sampleActionCard{n}": ("title", "text",
                                *[f"action{kind}{i}" for i in range(1, n + 1) for kind in ("Title", "URL")])
       for n in (2, 3, 4, 5)},
    "sampleActionCard6": ("title", "text", "buttonTitle1", "buttonUrl1", "buttonTitle2", "buttonUrl2"),
    "sampleAudio": ("mediaId", "duration"),
    "sampleFile": ("mediaId", "fileName", "fileType"),
    "sampleVideo": ("duration", "videoMediaId", "videoType", "picMediaId"),
}

_MEDIA_LIMITS = {"image": 20 << 20, "voice": 2 << 20, "video": 20 << 20, "file": 20 << 20}


def render_msg_param(msg_key: str, param: dict[str, Any]) -> tuple[str, str]:
    """(title, readable text) of an OpenAPI robot message."""
    title = str(param.get("title", ""))
    if msg_key == "sampleText":
        return "", str(param.get("content", ""))
    if msg_key == "sampleImageMsg":
        return "", f"[image] {param.get('photoURL', '')}"
    if msg_key == "sampleAudio":
        return "", f"[audio] {param.get('mediaId', '')}"
    if msg_key == "sampleFile":
        return "", f"[file] {param.get('fileName', '')}"
    if msg_key == "sampleVideo":
        return "", f"[video] {param.get('videoMediaId', '')}"
    return title, str(param.get("text", ""))


@dataclass
class Call:
    """One API call as a handler sees it."""

    request: Request
    record: CallRecord
    body: Any
    client_id: str

    def obj(self) -> dict[str, Any]:
        """The body as a JSON object (new-API error otherwise)."""
        if not isinstance(self.body, dict):
            raise ApiError(400, "InvalidParameter", "request body must be a JSON object")
        return self.body


Handler = Callable[[Call], Awaitable[Any]]


class OpenApi:
    def __init__(self, state: EmulatorState, faults: Callable[[], FaultSwitches]) -> None:
        self.state = state
        self.settings = state.settings
        self._faults = faults
        self._windows: dict[tuple[str, str], deque[float]] = {}

    # --- the pipeline -------------------------------------------------------------------------
    def route(self, method: str, path: str, handler: Handler, *, auth: Auth = "token",
              json_body: bool = True) -> Route:
        return Route(path, self.endpoint(f"{method} {path}", handler, auth=auth, json_body=json_body),
                     methods=[method])

    def endpoint(self, api_name: str, handler: Handler, *, auth: Auth = "token",
                 json_body: bool = True) -> Callable[[Request], Awaitable[Response]]:
        """An ASGI endpoint running ``handler`` behind the OpenAPI pipeline."""

        async def endpoint(request: Request) -> Response:
            method = request.method
            body: Any = None
            # Always read the whole body first: answering before it is consumed makes the server
            # drop the keep-alive connection under a client that is about to reuse it.
            raw = await request.body()
            if json_body and method in ("POST", "PUT", "PATCH"):
                try:
                    body = msgspec.json.decode(raw) if raw else None
                except msgspec.DecodeError:
                    body = _BAD_JSON
            shown = raw[:2000].decode("utf-8", "replace") if body is _BAD_JSON else body
            # scope["path"] is request.url.path without building the whole URL object.
            record = self.state.record_call(method, request.scope["path"], api_name, shown)
            try:
                client_id = self._authenticate(request, auth)
                if auth == "token":
                    self._check_qps(client_id, api_name)
                if body is _BAD_JSON:
                    if auth == "token":
                        raise ApiError(400, "InvalidParameter", "request body is not valid JSON")
                    raise OapiError(40035, "缺少参数 json")
                result = await handler(Call(request, record, body, client_id))
                if isinstance(result, Response):
                    response = result
                else:
                    response = JsonAnswer(result)
                    record.response = result
                    if isinstance(result, dict) and result.get("errcode") not in (None, 0):
                        record.code = str(result["errcode"])
            except ApiError as exc:
                response = JsonAnswer(exc.body(), status_code=exc.status)
                record.code, record.response = exc.code, exc.body()
            except OapiError as exc:
                response = JsonAnswer(exc.body())
                record.code, record.response = str(exc.errcode), exc.body()
            record.status = response.status_code
            self.state.notifier.notify()
            return response

        return endpoint

    def _authenticate(self, request: Request, auth: Auth) -> str:
        if auth == "none":
            return ""
        if auth == "token":
            value = request.headers.get("x-acs-dingtalk-access-token", "")
            if not value:
                raise ApiError(400, "AuthenticationFailed.MissingParameter",
                               "缺少参数：x-acs-dingtalk-access-token")
            token = self.state.valid_token(value)
            if token is None:
                raise ApiError(400, "InvalidAuthentication", "不合法的access_token")
            return token.client_id
        value = request.query_params.get("access_token", "")
        token = self.state.valid_token(value)
        if token is None:
            known = self.state.tokens.get(value)
            if known is not None:
                raise OapiError(42001, "access_token超时")
            raise OapiError(40014, "不合法的access_token")
        return token.client_id

    def _check_qps(self, client_id: str, api: str) -> None:
        limit = self.settings.qps_limits.get(api, self.settings.qps_limit)
        forced = self._faults().take_qps(api)
        now = self.state.clock.now()
        window = self._windows.setdefault((client_id, api), deque())
        while window and window[0] <= now - 1.0:
            window.popleft()
        if forced or len(window) >= limit:
            raise ApiError(403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi",
                           "调用频率超过限制（应用+接口维度），请稍后重试")
        window.append(now)

    # --- routes -------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        return [
            self.route("POST", "/v1.0/oauth2/accessToken", self.access_token, auth="none"),
            self.route("POST", "/v1.0/oauth2/{corpId}/token", self.corp_token, auth="none"),
            self.route("GET", "/gettoken", self.get_token, auth="none"),
            self.route("POST", "/v1.0/robot/oToMessages/batchSend", self.batch_send),
            self.route("POST", "/v1.0/robot/groupMessages/send", self.group_send),
            self.route("POST", "/v1.0/robot/groupMessages/recall", self.group_recall),
            self.route("POST", "/v1.0/robot/otoMessages/batchRecall", self.oto_recall),
            self.route("POST", "/v1.0/robot/messageFiles/download", self.file_download),
            self.route("POST", "/media/upload", self.media_upload, auth="oapi", json_body=False),
            self.route("POST", "/v1.0/innerApi/robot/stream/away/template/update",
                       self.away_template),
            Route("/files/{name}", self.serve_file, methods=["GET"]),
        ]

    def fallback_route(self) -> Route:
        """Any other ``/v1.0/`` path: token checked, then DingTalk's unknown-API answer."""

        async def not_found(call: Call) -> Any:
            raise ApiError(404, "InvalidAction.NotFound",
                           "Specified api is not found, please check your url and method.")

        return Route("/v1.0/{rest:path}", self.endpoint("unknown", not_found),
                     methods=["GET", "POST", "PUT", "DELETE", "PATCH"])

    # --- tokens -------------------------------------------------------------------------------
    def _credentials_ok(self, key: Any, secret: Any) -> bool:
        return credentials_match(self.settings, key, secret)

    async def access_token(self, call: Call) -> Any:
        body = call.body if isinstance(call.body, dict) else {}
        if not self._credentials_ok(body.get("appKey"), body.get("appSecret")):
            raise ApiError(400, "invalidClientIdOrSecret", "无效的clientId或者clientSecret")
        token = self.state.issue_token(self.settings.client_id)
        return {"accessToken": token.value, "expireIn": self._expires_in(token.expires_at)}

    async def corp_token(self, call: Call) -> Any:
        body = call.body if isinstance(call.body, dict) else {}
        if body.get("grant_type") != "client_credentials":
            raise ApiError(400, "invalidParameter.grantType", "grant_type must be client_credentials")
        if not self._credentials_ok(body.get("client_id"), body.get("client_secret")):
            raise ApiError(400, "invalidClientIdOrSecret", "无效的clientId或者clientSecret")
        token = self.state.issue_token(self.settings.client_id)
        return {"access_token": token.value, "expires_in": self._expires_in(token.expires_at)}

    async def get_token(self, call: Call) -> Any:
        q = call.request.query_params
        if not self._credentials_ok(q.get("appkey"), q.get("appsecret")):
            raise OapiError(40096, "不合法的appKey或appSecret")
        token = self.state.issue_token(self.settings.client_id)
        return {"errcode": 0, "access_token": token.value, "errmsg": "ok",
                "expires_in": self._expires_in(token.expires_at)}

    def _expires_in(self, expires_at: float) -> int:
        return max(0, round(expires_at - self.state.clock.now()))

    # --- robot messages -----------------------------------------------------------------------
    def _robot_code(self, body: dict[str, Any]) -> None:
        code = body.get("robotCode")
        if not code:
            raise ApiError(400, "invalidParameter.robotCode.empty", "robotCode不能为空")
        if code != self.settings.effective_robot_code:
            raise ApiError(400, "invalidParameter.robotCode.notExsit", f"robotCode {code!r} 不存在")

    def _msg(self, body: dict[str, Any], *, max_bytes: int | None = None) -> tuple[str, dict[str, Any]]:
        key = body.get("msgKey")
        if not key:
            raise ApiError(400, "invalidParameter.msgKey.empty", "msgKey不能为空")
        if key not in MSG_KEYS:
            raise ApiError(400, "invalidParameter.msgKey.invalid", f"msgKey {key!r} 不合法")
        raw = body.get("msgParam")
        if not isinstance(raw, str):
            raise ApiError(400, "invalidParameter.msgParam.invalid",
                           "msgParam must be a JSON string (an object serialized into a string)")
        if max_bytes is not None and len(raw.encode()) > max_bytes:
            raise ApiError(400, "invalidParameter.msgParam.tooLong",
                           f"msgParam is {len(raw.encode())} bytes, over {max_bytes}")
        try:
            param = msgspec.json.decode(raw)
        except msgspec.DecodeError:
            raise ApiError(400, "invalidParameter.msgParam.invalid", "msgParam is not valid JSON") from None
        if not isinstance(param, dict):
            raise ApiError(400, "invalidParameter.msgParam.invalid", "msgParam must be a JSON object")
        missing = [f for f in MSG_KEYS[key] if param.get(f) in (None, "")]
        if missing:
            raise ApiError(400, "invalidParameter.msgParam.invalid",
                           f"msgParam of {key} misses {', '.join(missing)}")
        return key, param

    def _record_sent(self, conversation_id: str, via: str, key: str, param: dict[str, Any],
                     body: dict[str, Any], pqk: str) -> BotMessage:
        title, text = render_msg_param(key, param)
        return self.state.add_bot_message(BotMessage(
            seq=self.state.next_seq(), conversation_id=conversation_id, via=via, msgtype=key,
            text=text, title=title, created_ms=self.state.clock.epoch_ms(), body=body,
            process_query_key=pqk))

    async def batch_send(self, call: Call) -> Any:
        body = call.obj()
        self._robot_code(body)
        users = body.get("userIds")
        if not isinstance(users, list) or not users:
            raise ApiError(400, "invalidParameter.userIds.empty", "userIds不能为空")
        if len(users) > self.settings.batch_send_max_users:
            raise ApiError(400, "invalidParameter.userIds.overMax",
                           f"userIds最多{self.settings.batch_send_max_users}个")
        key, param = self._msg(body)
        pqk = self.state.ids.process_query_key()
        invalid = []
        for user_id in users:
            conv = self.state.single_chat_of(str(user_id))
            if conv is None:
                invalid.append(user_id)
                continue
            self._record_sent(conv.id, "oToMessages", key, param, body, pqk)
        return {"processQueryKey": pqk, "invalidStaffIdList": invalid, "flowControlledStaffIdList": []}

    async def group_send(self, call: Call) -> Any:
        body = call.obj()
        self._robot_code(body)
        cid = body.get("openConversationId")
        conv = self.state.conversations.get(cid) if isinstance(cid, str) else None
        if conv is None or conv.type != "2":
            raise ApiError(400, "invalid.openConversationId", f"openConversationId {cid!r} 不合法")
        key, param = self._msg(body, max_bytes=self.settings.group_msg_param_max_bytes)
        pqk = self.state.ids.process_query_key()
        self._record_sent(conv.id, "groupMessages", key, param, body, pqk)
        return {"processQueryKey": pqk}

    def _recall(self, keys: Any, conversation_id: str | None) -> Any:
        if not isinstance(keys, list) or not keys:
            raise ApiError(400, "invalidParameter.processQueryKeys.empty", "processQueryKeys不能为空")
        success, failed = [], {}
        for key in keys:
            hits = [m for c in self.state.conversations.values()
                    if conversation_id is None or c.id == conversation_id
                    for m in c.bot_messages() if m.process_query_key == key]
            if not hits:
                failed[key] = "processQueryKey not found"
                continue
            for msg in hits:
                msg.recalled = True
            success.append(key)
        return {"successResult": success, "failedResult": failed}

    async def group_recall(self, call: Call) -> Any:
        body = call.obj()
        self._robot_code(body)
        cid = body.get("openConversationId")
        if not isinstance(cid, str) or cid not in self.state.conversations:
            raise ApiError(400, "invalid.openConversationId", f"openConversationId {cid!r} 不合法")
        return self._recall(body.get("processQueryKeys"), cid)

    async def oto_recall(self, call: Call) -> Any:
        body = call.obj()
        self._robot_code(body)
        return self._recall(body.get("processQueryKeys"), None)

    async def away_template(self, call: Call) -> Any:
        body = call.obj()
        self._robot_code(body)
        return {"success": True, "result": True}

    # --- files --------------------------------------------------------------------------------
    async def file_download(self, call: Call) -> Any:
        body = call.obj()
        code = body.get("robotCode")
        if not code:
            raise ApiError(400, "invalidParameter.robotCode.empty", "robotCode不能为空")
        stored = self.state.files_by_code.get(str(body.get("downloadCode", "")))
        if stored is None:
            raise ApiError(400, "invalidParameter.robotCode.downloadCode", "下载码有误或者已经过期")
        if stored.robot_code != code:
            raise ApiError(400, "invalidParameter.robotCode.auth",
                           "downloadCode does not belong to this robot")
        return {"downloadUrl": self.state.download_url(stored)}

    async def serve_file(self, request: Request) -> Response:
        name = request.path_params["name"]
        file_id = name.removesuffix(".file")
        stored = self.state.files.get(file_id)
        q = request.query_params
        expires = q.get("Expires", "")
        if stored is None or not expires.isdigit() or q.get("Signature") != self.state.file_signature(
                file_id, int(expires)):
            return _oss_error(403, "SignatureDoesNotMatch",
                              "The request signature we calculated does not match the signature you provided.")
        if int(expires) < self.state.clock.epoch():
            return _oss_error(403, "AccessDenied", "Request has expired.")
        if self._faults().take_download_failure():
            return _oss_error(500, "InternalError", "We encountered an internal error. Please try again.")
        return Response(stored.content, media_type=stored.mime,
                        headers={"Content-Disposition": f'attachment; filename="{file_id}.file"'})

    async def media_upload(self, call: Call) -> Any:
        content_type = call.request.headers.get("content-type", "")
        fields = parse_multipart(await call.request.body(), content_type)
        kind = fields.get("type", (None, None, b""))[2].decode(errors="replace") or \
            call.request.query_params.get("type", "")
        if kind not in _MEDIA_LIMITS:
            raise OapiError(40004, f"不合法的媒体文件类型: type must be one of {', '.join(_MEDIA_LIMITS)}")
        media = fields.get("media")
        if media is None or media[0] is None:
            raise OapiError(40035, "缺少参数 media (multipart file field)")
        filename, mime, content = media
        if len(content) > _MEDIA_LIMITS[kind]:
            raise OapiError(40006, f"不合法的文件大小: {len(content)} bytes")
        stored = self.state.add_file(content, filename or "media", mime or "application/octet-stream",
                                     kind=kind, with_download_code=False, with_media_id=True)
        call.record.request = {"type": kind, "filename": stored.name, "size": len(content)}
        return {"errcode": 0, "errmsg": "ok", "media_id": stored.media_id,
                "created_at": self.state.clock.epoch_ms(), "type": kind}


def parse_multipart(body: bytes, content_type: str) -> dict[str, tuple[str | None, str | None, bytes]]:
    """``multipart/form-data`` -> {field name: (file name or None, content type, bytes)}.

    Parsed in memory with python-multipart's low-level parser (Starlette's ``form()`` spools big
    uploads to disk through worker threads, which a virtual-clock test cannot wait for).
    """
    from python_multipart.multipart import MultipartParser, parse_options_header

    ctype, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise OapiError(43004, "无效的HTTP HEADER Content-Type (use multipart/form-data)")
    parts: dict[str, tuple[str | None, str | None, bytes]] = {}
    headers: dict[bytes, bytes] = {}
    field, value, data = bytearray(), bytearray(), bytearray()

    def on_header_end() -> None:
        headers[bytes(field).lower()] = bytes(value)
        field.clear()
        value.clear()

    def on_part_end() -> None:
        _, disposition = parse_options_header(headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"").decode(errors="replace")
        filename = disposition.get(b"filename")
        part_type = headers.get(b"content-type")
        parts[name] = (None if filename is None else filename.decode(errors="replace"),
                       None if part_type is None else part_type.decode(errors="replace"), bytes(data))
        headers.clear()
        data.clear()

    callbacks: Any = {
        "on_header_field": lambda buf, start, end: field.extend(buf[start:end]),
        "on_header_value": lambda buf, start, end: value.extend(buf[start:end]),
        "on_header_end": on_header_end,
        "on_part_data": lambda buf, start, end: data.extend(buf[start:end]),
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except Exception as exc:  # python-multipart raises its own and ValueError for broken bodies
        raise OapiError(40035, f"缺少参数 media: the multipart body is malformed ({exc})") from None
    return parts


def credentials_match(settings: EmulatorSettings, key: Any, secret: Any) -> bool:
    """Whether ``key``/``secret`` are the app's credentials (constant-time secret comparison)."""
    if not isinstance(key, str) or not isinstance(secret, str):
        return False
    return key == settings.client_id and hmac.compare_digest(secret.encode(), settings.client_secret.encode())


def _oss_error(status: int, code: str, message: str) -> Response:
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error>\n  <Code>{code}</Code>\n'
            f"  <Message>{message}</Message>\n</Error>\n")
    return Response(body, status_code=status, media_type="application/xml")
