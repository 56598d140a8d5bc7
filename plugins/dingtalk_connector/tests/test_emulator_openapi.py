"""Emulator: access tokens, token checks, QPS limit, robot send APIs, session webhook, files, media.

Same rules as test_emulator_gateway.py (real sockets, MockClock jumping after 50 ms of real idleness).
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import trio
from emulator_support import data_of, socket_clock, stream_client
from host_dingtalk_connector.emulator import open_emulator

pytestmark = pytest.mark.anyio
VIRTUAL_BUDGET = 20000


@pytest.fixture
def anyio_backend() -> tuple[str, dict[str, Any]]:
    return socket_clock()


def new_api_error(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"requestid", "code", "message"}, body
    assert body["code"] == code and body["message"], body
    return body


async def test_access_token_is_stable_while_valid_and_renewed_after_expiry() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator(token_refresh_extends=False) as emu, \
                httpx.AsyncClient(base_url=emu.base_url) as http:
            creds = {"appKey": emu.settings.client_id, "appSecret": emu.settings.client_secret}
            first = (await http.post("/v1.0/oauth2/accessToken", json=creds)).json()
            assert set(first) == {"accessToken", "expireIn"} and first["expireIn"] == 7200
            await trio.sleep(3600)
            again = (await http.post("/v1.0/oauth2/accessToken", json=creds)).json()
            assert again["accessToken"] == first["accessToken"] and again["expireIn"] == 3600
            old = (await http.get("/gettoken", params={"appkey": emu.settings.client_id,
                                                        "appsecret": emu.settings.client_secret})).json()
            assert old == {"errcode": 0, "access_token": first["accessToken"], "errmsg": "ok", "expires_in": 3600}
            await trio.sleep(3601)
            renewed = (await http.post("/v1.0/oauth2/accessToken", json=creds)).json()
            assert renewed["accessToken"] != first["accessToken"] and renewed["expireIn"] == 7200
            corp = await http.post(f"/v1.0/oauth2/{emu.settings.corp_id}/token", json={
                "client_id": emu.settings.client_id, "client_secret": emu.settings.client_secret,
                "grant_type": "client_credentials"})
            assert corp.json() == {"access_token": renewed["accessToken"], "expires_in": 7200}

            bad = await http.post("/v1.0/oauth2/accessToken", json={**creds, "appSecret": "nope"})
            new_api_error(bad, 400, "invalidClientIdOrSecret")
            wrong_old = await http.get("/gettoken", params={"appkey": "x", "appsecret": "y"})
            assert wrong_old.status_code == 200 and wrong_old.json()["errcode"] == 40096
            assert "nope" not in json.dumps(emu.calls()) and emu.settings.client_secret not in json.dumps(emu.calls())


async def test_default_token_renewal_extends_the_same_token() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            creds = {"appKey": emu.settings.client_id, "appSecret": emu.settings.client_secret}
            first = (await http.post("/v1.0/oauth2/accessToken", json=creds)).json()
            await trio.sleep(7000)
            again = (await http.post("/v1.0/oauth2/accessToken", json=creds)).json()
            assert again == first  # same token, lifetime renewed to 7200 s
            await trio.sleep(7000)
            h = {"x-acs-dingtalk-access-token": first["accessToken"]}
            r = await http.post("/v1.0/robot/groupMessages/send", headers=h, json={})
            assert r.json()["code"] != "InvalidAuthentication"


async def test_openapis_check_the_access_token_header() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            body = {"robotCode": emu.settings.client_id, "msgKey": "sampleText",
                    "msgParam": json.dumps({"content": "hi"}), "openConversationId": emu.state.default_group.id}
            url = "/v1.0/robot/groupMessages/send"
            new_api_error(await http.post(url, json=body), 400, "AuthenticationFailed.MissingParameter")
            token = emu.issue_access_token()
            # Query parameter and bearer header are not what the new APIs read.
            new_api_error(await http.post(url, json=body, params={"access_token": token}), 400,
                          "AuthenticationFailed.MissingParameter")
            new_api_error(await http.post(url, json=body, headers={"Authorization": f"Bearer {token}"}), 400,
                          "AuthenticationFailed.MissingParameter")
            new_api_error(await http.post(url, json=body, headers={"x-acs-dingtalk-access-token": "forged"}),
                          400, "InvalidAuthentication")
            ok = await http.post(url, json=body, headers={"x-acs-dingtalk-access-token": token})
            assert ok.status_code == 200 and set(ok.json()) == {"processQueryKey"}
            await trio.sleep(7201)
            new_api_error(await http.post(url, json=body, headers={"x-acs-dingtalk-access-token": token}),
                          400, "InvalidAuthentication")
            fresh = emu.issue_access_token()
            assert emu.faults.expire_tokens() == 1
            new_api_error(await http.post(url, json=body, headers={"x-acs-dingtalk-access-token": fresh}),
                          400, "InvalidAuthentication")
            unknown = await http.get("/v1.0/contact/users/me", headers={"x-acs-dingtalk-access-token":
                                                                         emu.issue_access_token()})
            new_api_error(unknown, 404, "InvalidAction.NotFound")
            codes = [c["code"] for c in emu.calls(f"POST {url}")]
            assert codes == ["AuthenticationFailed.MissingParameter"] * 3 + ["InvalidAuthentication", "",
                                                                               "InvalidAuthentication",
                                                                               "InvalidAuthentication"]


async def test_qps_limit_per_app_and_api() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator(qps_limits={"POST /v1.0/robot/groupMessages/recall": 2}) as emu, \
                httpx.AsyncClient(base_url=emu.base_url) as http:
            h = {"x-acs-dingtalk-access-token": emu.issue_access_token()}
            send = {"robotCode": emu.settings.client_id, "msgKey": "sampleText",
                    "msgParam": json.dumps({"content": "x"}), "openConversationId": emu.state.default_group.id}
            statuses = [(await http.post("/v1.0/robot/groupMessages/send", headers=h, json=send)).status_code
                        for _ in range(21)]
            assert statuses == [200] * 20 + [403]
            r = await http.post("/v1.0/robot/groupMessages/send", headers=h, json=send)
            new_api_error(r, 403, "Forbidden.AccessDenied.QpsLimitForAppkeyAndApi")
            # Another API has its own budget; the limit is a one-second window.
            other = await http.post("/v1.0/robot/oToMessages/batchSend", headers=h, json={
                "robotCode": emu.settings.client_id, "userIds": ["user0001"], "msgKey": "sampleText",
                "msgParam": json.dumps({"content": "x"})})
            assert other.status_code == 200
            await trio.sleep(1.0)
            assert (await http.post("/v1.0/robot/groupMessages/send", headers=h, json=send)).status_code == 200
            recall = {"robotCode": emu.settings.client_id, "openConversationId": emu.state.default_group.id,
                      "processQueryKeys": ["k"]}
            assert [(await http.post("/v1.0/robot/groupMessages/recall", headers=h, json=recall)).status_code
                    for _ in range(3)] == [200, 200, 403]
            emu.faults.qps_errors(2, api="POST /v1.0/robot/oToMessages/batchSend")
            await trio.sleep(1.0)
            assert (await http.post("/v1.0/robot/groupMessages/send", headers=h, json=send)).status_code == 200
            forced = [(await http.post("/v1.0/robot/oToMessages/batchSend", headers=h, json={
                "robotCode": emu.settings.client_id, "userIds": ["user0001"], "msgKey": "sampleText",
                "msgParam": json.dumps({"content": "x"})})).status_code for _ in range(3)]
            assert forced == [403, 403, 200]


async def test_session_webhook_accepts_every_msgtype_and_records_it() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, stream_client(emu) as client:
            await emu.wait_for_connection()
            sent = await emu.send_user_message("hi", conversation_type="group")
            hook = data_of(await client.receive())["sessionWebhook"]
            bodies = [
                {"msgtype": "text", "text": {"content": "@user0001 done"},
                 "at": {"atUserIds": ["user0001"], "isAtAll": False}},
                {"msgtype": "markdown", "markdown": {"title": "Build", "text": "#### Build 42\n> **passed**"}},
                {"msgtype": "actionCard", "actionCard": {"title": "Release", "text": "### v1.2",
                                                         "singleTitle": "Open", "singleURL": "https://e.x"}},
                {"msgtype": "actionCard", "actionCard": {"title": "Approve?", "text": "...", "btnOrientation": "1",
                                                         "btns": [{"title": "Yes", "actionURL": "https://e.x/y"}]}},
                {"msgtype": "link", "link": {"title": "T", "text": "linked", "messageUrl": "https://e.x"}},
                {"msgtype": "feedCard", "feedCard": {"links": [{"title": "F1", "messageURL": "https://e.x/1",
                                                                 "picURL": "https://e.x/1.png"}]}},
            ]
            for body in bodies:
                r = await client.http.post(hook, json=body)
                assert r.status_code == 200 and r.json() == {"errcode": 0, "errmsg": "ok"}, r.text
            messages = emu.bot_messages(sent["conversationId"])
            assert [m["msgtype"] for m in messages] == [b["msgtype"] for b in bodies]
            assert [m["text"] for m in messages] == ["@user0001 done", "#### Build 42\n> **passed**", "### v1.2",
                                                     "...", "linked", "F1"]
            assert messages[0]["at"] == {"atUserIds": ["user0001"], "isAtAll": False}
            assert all(m["via"] == "sessionWebhook" for m in messages)


@pytest.mark.parametrize(("body", "errcode"), [
    ({"msgtype": "image", "image": {}}, 400105),
    ({"msgtype": "text", "text": {}}, 40035),
    ({"msgtype": "text"}, 40035),
    ({"msgtype": "markdown", "markdown": {"title": "only title"}}, 40035),
    ({"msgtype": "actionCard", "actionCard": {"title": "t", "text": "x"}}, 40035),
    ({"msgtype": "actionCard", "actionCard": {"title": "t", "text": "x", "btns": []}}, 40035),
    ({"msgtype": "feedCard", "feedCard": {"links": [{"title": "no url"}]}}, 40035),
    ({"msgtype": "text", "text": {"content": "x"}, "at": {"atUserIds": "user0001"}}, 40035),
])
async def test_session_webhook_rejects_bad_bodies(body: dict[str, Any], errcode: int) -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient() as http:
            sent = await emu.send_user_message("hi")
            r = await http.post(sent["sessionWebhook"], json=body)
            assert r.status_code == 200 and r.json()["errcode"] == errcode, r.text
            assert r.json()["errmsg"]
            assert emu.bot_messages(sent["conversationId"]) == []


async def test_session_webhook_expires_after_90_minutes_and_on_demand() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient() as http:
            reply = {"msgtype": "text", "text": {"content": "late"}}
            sent = await emu.send_user_message("hi")
            await trio.sleep(5399)
            assert (await http.post(sent["sessionWebhook"], json=reply)).json()["errcode"] == 0
            await trio.sleep(2)
            expired = (await http.post(sent["sessionWebhook"], json=reply)).json()
            assert expired == {"errcode": emu.settings.session_expired_errcode, "errmsg": "session已过期"}
            fresh = await emu.send_user_message("again")
            assert emu.faults.expire_sessions(fresh["conversationId"]) == 1
            assert (await http.post(fresh["sessionWebhook"], json=reply)).json()["errcode"] == 300001
            unknown = sent["sessionWebhook"].split("session=")[0] + "session=0123"
            assert (await http.post(unknown, json=reply)).json()["errcode"] == 300002
            plain = await http.post(fresh["sessionWebhook"], content=b"x", headers={"content-type": "text/plain"})
            assert plain.json()["errcode"] == 43004
            another = await emu.send_user_message("third")
            emu.faults.advance_clock(5401)
            assert (await http.post(another["sessionWebhook"], json=reply)).json()["errcode"] == 300001


async def test_robot_send_apis_validate_like_dingtalk() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            h = {"x-acs-dingtalk-access-token": emu.issue_access_token()}
            rc = emu.settings.client_id
            await emu.send_user_message("hi", sender_staff_id="manager1234")
            oto = "/v1.0/robot/oToMessages/batchSend"
            cases = [
                ({"userIds": ["user0001"], "msgKey": "sampleText", "msgParam": "{}"}, "invalidParameter.robotCode.empty"),
                ({"robotCode": "other", "userIds": ["u"], "msgKey": "sampleText", "msgParam": "{}"},
                 "invalidParameter.robotCode.notExsit"),
                ({"robotCode": rc, "userIds": [], "msgKey": "sampleText", "msgParam": "{}"}, "invalidParameter.userIds.empty"),
                ({"robotCode": rc, "userIds": [f"u{i}" for i in range(21)], "msgKey": "sampleText",
                  "msgParam": "{}"}, "invalidParameter.userIds.overMax"),
                ({"robotCode": rc, "userIds": ["u"], "msgParam": "{}"}, "invalidParameter.msgKey.empty"),
                ({"robotCode": rc, "userIds": ["u"], "msgKey": "sampleHtml", "msgParam": "{}"},
                 "invalidParameter.msgKey.invalid"),
                ({"robotCode": rc, "userIds": ["u"], "msgKey": "sampleText", "msgParam": {"content": "x"}},
                 "invalidParameter.msgParam.invalid"),
                ({"robotCode": rc, "userIds": ["u"], "msgKey": "sampleMarkdown",
                  "msgParam": json.dumps({"title": "t"})}, "invalidParameter.msgParam.invalid"),
            ]
            for body, code in cases:
                new_api_error(await http.post(oto, headers=h, json=body), 400, code)
            ok = await http.post(oto, headers=h, json={
                "robotCode": rc, "userIds": ["manager1234", "user0001", "ghost"], "msgKey": "sampleMarkdown",
                "msgParam": json.dumps({"title": "hello title", "text": "hello **text**"})})
            assert ok.status_code == 200
            result = ok.json()
            assert result["invalidStaffIdList"] == ["ghost"] and result["flowControlledStaffIdList"] == []
            single = emu.state.single_chat_of("manager1234")
            assert single is not None
            (msg,) = emu.bot_messages(single.id)
            assert (msg["via"], msg["msgtype"], msg["title"], msg["text"]) == (
                "oToMessages", "sampleMarkdown", "hello title", "hello **text**")
            assert msg["processQueryKey"] == result["processQueryKey"]

            group = "/v1.0/robot/groupMessages/send"
            base = {"robotCode": rc, "msgKey": "sampleText", "openConversationId": emu.state.default_group.id}
            new_api_error(await http.post(group, headers=h, json={**base, "openConversationId": "cidNOPE",
                                                                  "msgParam": '{"content": "x"}'}),
                          400, "invalid.openConversationId")
            new_api_error(await http.post(group, headers=h, json={**base, "openConversationId": single.id,
                                                                  "msgParam": '{"content": "x"}'}),
                          400, "invalid.openConversationId")
            new_api_error(await http.post(group, headers=h, json={
                **base, "msgParam": json.dumps({"content": "x" * 15001})}), 400, "invalidParameter.msgParam.tooLong")
            sent = await http.post(group, headers=h, json={**base, "msgParam": json.dumps({"content": "hello group"})})
            pqk = sent.json()["processQueryKey"]
            assert emu.bot_messages(emu.state.default_group.id)[-1]["text"] == "hello group"
            recall = await http.post("/v1.0/robot/groupMessages/recall", headers=h, json={
                "robotCode": rc, "openConversationId": emu.state.default_group.id,
                "processQueryKeys": [pqk, "unknown"]})
            assert recall.json() == {"successResult": [pqk], "failedResult": {"unknown": "processQueryKey not found"}}
            assert emu.bot_messages(emu.state.default_group.id)[-1]["recalled"] is True
            oto_recall = await http.post("/v1.0/robot/otoMessages/batchRecall", headers=h, json={
                "robotCode": rc, "processQueryKeys": [result["processQueryKey"]]})
            assert oto_recall.json()["successResult"] == [result["processQueryKey"]]
            bad_json = await http.post(group, headers={**h, "content-type": "application/json"}, content=b"{oops")
            new_api_error(bad_json, 400, "InvalidParameter")


async def test_file_download_codes_urls_and_faults() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            h = {"x-acs-dingtalk-access-token": emu.issue_access_token()}
            sent = await emu.send_user_message(msgtype="picture", file={"name": "cat.png", "content": b"\x89PNGcat",
                                                                         "mime": "image/png"})
            code = sent["payload"]["content"]["downloadCode"]
            url = "/v1.0/robot/messageFiles/download"
            new_api_error(await http.post(url, headers=h, json={"downloadCode": "nope", "robotCode": emu.settings.client_id}),
                          400, "invalidParameter.robotCode.downloadCode")
            new_api_error(await http.post(url, headers=h, json={"downloadCode": code, "robotCode": "dingother"}),
                          400, "invalidParameter.robotCode.auth")
            new_api_error(await http.post(url, headers=h, json={"downloadCode": code}), 400,
                          "invalidParameter.robotCode.empty")
            link = (await http.post(url, headers=h, json={"downloadCode": code,
                                                          "robotCode": emu.settings.client_id})).json()["downloadUrl"]
            got = await http.get(link)
            assert got.status_code == 200 and got.content == b"\x89PNGcat"
            tampered = await http.get(link.replace("Signature=", "Signature=0"))
            assert tampered.status_code == 403 and b"SignatureDoesNotMatch" in tampered.content
            emu.faults.download_failures(1)
            assert (await http.get(link)).status_code == 500
            assert (await http.get(link)).status_code == 200
            await trio.sleep(3601)
            late = await http.get(link)
            assert late.status_code == 403 and b"Request has expired" in late.content


async def test_media_upload_takes_multipart_and_old_style_tokens() -> None:
    with trio.fail_after(VIRTUAL_BUDGET):
        async with open_emulator() as emu, httpx.AsyncClient(base_url=emu.base_url) as http:
            token = emu.issue_access_token()
            r = await http.post("/media/upload", params={"access_token": token}, data={"type": "image"},
                                files={"media": ("a.png", b"\x89PNG....", "image/png")})
            body = r.json()
            assert body["errcode"] == 0 and body["errmsg"] == "ok" and body["type"] == "image"
            assert body["media_id"].startswith("@") and isinstance(body["created_at"], int)
            assert emu.state.files_by_media[body["media_id"]].content == b"\x89PNG...."
            no_token = await http.post("/media/upload", data={"type": "image"}, files={"media": ("a", b"x")})
            assert no_token.status_code == 200 and no_token.json()["errcode"] == 40014
            bad_type = await http.post("/media/upload", params={"access_token": token}, data={"type": "gif"},
                                       files={"media": ("a", b"x")})
            assert bad_type.json()["errcode"] == 40004
            too_big = await http.post("/media/upload", params={"access_token": token}, data={"type": "voice"},
                                      files={"media": ("a.amr", b"0" * (2 * 1024 * 1024 + 1))})
            assert too_big.json()["errcode"] == 40006
            missing = await http.post("/media/upload", params={"access_token": token}, data={"type": "file"},
                                      files={"attachment": ("a.txt", b"x")})
            assert missing.json()["errcode"] == 40035
            not_multipart = await http.post("/media/upload", params={"access_token": token}, data={"type": "file"})
            assert not_multipart.json()["errcode"] == 43004
            emu.faults.expire_tokens()
            expired = await http.post("/media/upload", params={"access_token": token}, data={"type": "image"},
                                      files={"media": ("a.png", b"x")})
            assert expired.json()["errcode"] == 42001
