"""Hostile input on the webhook endpoint (issue 10, point 6), through the host's real HTTP server.

Hypothesis runs in a worker thread; each example is one real HTTP request to the host running in
the test's trio loop (``trio.from_thread.run``), so what is tested is exactly what DingTalk (or an
attacker) reaches: hypercorn, Starlette, the route, the receiver. Properties:

* random headers and bodies (no valid signature): a 4xx JSON answer naming a known reason,
  never a 5xx, never a hang;
* validly signed callbacks with random bodies: 200 or 400 (with a reason), never a 5xx;

and afterwards the host still serves and logged no error.
"""

from __future__ import annotations

import base64
import string
import time
from collections.abc import Callable
from itertools import count
from typing import Any

import httpx
import msgspec
import trio
from host_dingtalk_connector.emulator.callbacks import sign_callback
from host_dingtalk_connector.webhook import REJECTION_STATUS
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from streamkit import QUIET_STREAM, Recorder
from webhookkit import open_webhook_host

SECRET = "SEC-property-tests-0123456789"
PER_REQUEST = 10  # seconds: a request taking longer than this is a hang
CONFIG = {
    "client_id": "dingproperty",
    "client_secret": SECRET,
    "openapi_endpoint": "http://127.0.0.1:9",  # never called: answers go inline
    "mode": "webhook",
    "webhook": {"inline_reply_timeout": 5.0, "callback_response_timeout": 10.0, "max_body_bytes": 16_384},
    "stream": QUIET_STREAM,
}
PROPERTY_SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large]
)

# -- strategies ------------------------------------------------------------------------------------

_header_text = st.text(alphabet=string.printable.replace("\r", "").replace("\n", "").replace("\x0b", "")
                       .replace("\x0c", ""), max_size=80).map(lambda s: s.strip(" \t"))  # fmt: skip
# (h11, under httpx, refuses header values with surrounding whitespace before anything is sent.)
_timestamps = st.one_of(
    st.integers(min_value=-(10**16), max_value=10**16).map(str),
    st.integers(min_value=-7_200_000, max_value=7_200_000).map(lambda d: str(int(time.time() * 1000) + d)),
    st.integers(min_value=-1000, max_value=1000).map(lambda d: str(int(time.time() * 1000) + d)),
    _header_text,
)
_signs = st.one_of(st.binary(min_size=32, max_size=32).map(lambda b: base64.b64encode(b).decode()),
                   _header_text)  # fmt: skip
_header_names = st.sampled_from(["timestamp", "sign", "content-type", "x-anything", "Timestamp", "SIGN", "accept"])
_headers = st.dictionaries(_header_names, _header_text, max_size=5).flatmap(
    lambda extra: st.fixed_dictionaries(
        {}, optional={"timestamp": _timestamps, "sign": _signs}
    ).map(lambda signed: {**extra, **signed})
)
_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=15), inner, max_size=5),
    max_leaves=25,
)
_FIELDS = ["msgId", "msgtype", "conversationId", "conversationType", "conversationTitle", "senderId",
           "senderStaffId", "senderNick", "robotCode", "text", "content", "atUsers", "isInAtList", "createAt",
           "sessionWebhook", "sessionWebhookExpiredTime", "chatbotUserId", "isAdmin"]  # fmt: skip


def _bot_message(i: int) -> dict[str, Any]:
    return {"msgId": f"msgprop{i}==", "msgtype": "text", "text": {"content": "hi"}, "conversationId": "cidprop=",
            "conversationType": "1", "senderStaffId": "u1", "senderId": "$:LWCP_v1:$x", "robotCode": "dingproperty",
            "sessionWebhook": "http://127.0.0.1:9/robot/sendBySession?session=x", "createAt": 1}  # fmt: skip


_mutated_messages = st.tuples(
    st.integers(0, 50), st.dictionaries(st.sampled_from(_FIELDS), _json, max_size=4), st.sets(st.sampled_from(_FIELDS))
).map(lambda t: {k: v for k, v in {**_bot_message(t[0]), **t[1]}.items() if k not in t[2]})
_bodies = st.one_of(
    st.binary(max_size=2048),
    _json.map(msgspec.json.encode),
    _mutated_messages.map(msgspec.json.encode),
    st.just(b"[" * 5000 + b"]" * 5000),
    st.just(b'{"msgId": 1e400}'),
)


# -- harness ---------------------------------------------------------------------------------------


def run_against_host(check: Callable[[Callable[[dict[str, str], bytes], httpx.Response]], None]) -> list[str]:
    """Run a host in webhook mode; call ``check(post)`` in a worker thread; return error log lines."""
    from loguru import logger

    errors: list[str] = []
    sink = logger.add(lambda m: errors.append(m), level="ERROR")
    recorder = Recorder()

    async def main() -> None:
        with trio.fail_after(120):  # the whole run; each request also has its own PER_REQUEST limit
            await run(recorder)

    async def run(recorder: Recorder) -> None:
        async with open_webhook_host(CONFIG, ("recorder", recorder)) as running, httpx.AsyncClient() as client:
            url = running.callback_url

            async def post(headers: dict[str, str], body: bytes) -> httpx.Response:
                with trio.fail_after(PER_REQUEST):
                    return await client.post(url, content=body, headers=headers)

            def post_from_thread(headers: dict[str, str], body: bytes) -> httpx.Response:
                return trio.from_thread.run(post, headers, body)

            await trio.to_thread.run_sync(check, post_from_thread)
            health = await client.get(running.host.http.url + "/healthz")
            assert health.status_code == 200  # still serving

    try:
        trio.run(main)
    finally:
        logger.remove(sink)
    return errors


def assert_reasoned(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert isinstance(body, dict) and body["error"] in REJECTION_STATUS, body
    assert REJECTION_STATUS[body["error"]] == response.status_code
    assert isinstance(body["detail"], str) and body["detail"]
    return body


# -- properties ------------------------------------------------------------------------------------


def test_random_requests_get_a_4xx_json_reason() -> None:
    def check(post: Callable[[dict[str, str], bytes], httpx.Response]) -> None:
        @PROPERTY_SETTINGS
        @given(headers=_headers, body=_bodies)
        def prop(headers: dict[str, str], body: bytes) -> None:
            response = post(headers, body)
            assert 400 <= response.status_code < 500, (response.status_code, response.text)
            body_json = assert_reasoned(response)
            assert body_json["error"] in ("missing_headers", "bad_timestamp", "outside_window", "bad_sign")
            assert SECRET not in response.text

        prop()

    assert run_against_host(check) == []


def test_signed_random_bodies_get_200_or_400() -> None:
    counter = count()

    def check(post: Callable[[dict[str, str], bytes], httpx.Response]) -> None:
        @PROPERTY_SETTINGS
        @given(body=_bodies)
        def prop(body: bytes) -> None:
            # A distinct millisecond per request: a signature is only good once.
            timestamp = str(int(time.time() * 1000) + next(counter))
            headers = {"content-type": "application/json", "timestamp": timestamp,
                       "sign": sign_callback(SECRET, timestamp)}  # fmt: skip
            response = post(headers, body)
            assert response.status_code in (200, 400), (response.status_code, response.text)
            if response.status_code == 400:
                assert assert_reasoned(response)["error"] in ("bad_json", "not_object", "robot_mismatch", "bad_payload")
            else:
                answer = response.json()
                assert answer == {"msgtype": "empty"} or answer["msgtype"] == "text", answer

        prop()

    assert run_against_host(check) == []
