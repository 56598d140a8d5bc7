"""Callback signatures (reference 8.1), the replay guard and the refusal reporter, without I/O."""

from __future__ import annotations

import inspect

import pytest
from host_dingtalk_connector import signing
from host_dingtalk_connector.emulator.callbacks import sign_callback
from host_dingtalk_connector.signing import (
    ReplayGuard,
    SignatureError,
    compute_sign,
    match_signature,
)
from host_dingtalk_connector.webhook import RejectionReporter, WebhookSettings
from hypothesis import given, settings
from hypothesis import strategies as st

# Vectors computed with OpenSSL, independently of any Python code:
#   printf '1577262236757\nSECabc' | openssl dgst -sha256 -hmac 'SECabc' -binary | base64
VECTORS = [
    ("SECabc", "1577262236757", "I5TKCOTTj6fad4sJ4q9RsIffw0PAChVQZQGTdtRbNEQ="),
    ("emulator-secret-0123456789", "1577262236757", "Fah0qeLtnPqQkVG+R5zn76vWuZIEjQYi15JsKDqq/gM="),
]
NOW = 1_577_262_236.757  # the vectors' timestamp, in seconds


def clock(at: float = NOW) -> float:
    return at


@pytest.mark.parametrize(("secret", "timestamp", "expected"), VECTORS)
def test_sign_matches_openssl(secret: str, timestamp: str, expected: str) -> None:
    assert compute_sign(secret, timestamp) == expected
    assert sign_callback(secret, timestamp) == expected  # the emulator's own implementation


@given(secret=st.text(min_size=1, max_size=64), timestamp=st.integers(min_value=0, max_value=10**14))
@settings(max_examples=200, deadline=None)
def test_connector_and_emulator_agree(secret: str, timestamp: int) -> None:
    assert compute_sign(secret, timestamp) == sign_callback(secret, timestamp)


def test_match_picks_the_app_whose_secret_signed() -> None:
    secrets = {"sales": "SECsales", "support": "SECabc"}
    app, ts = match_signature("1577262236757", VECTORS[0][2], secrets, window_seconds=3600, now=clock)
    assert (app, ts) == ("support", 1577262236757)


@pytest.mark.parametrize(
    ("timestamp", "sign", "reason"),
    [
        (None, VECTORS[0][2], "missing_headers"),
        ("1577262236757", None, "missing_headers"),
        ("", "", "missing_headers"),
        ("15772622367x7", VECTORS[0][2], "bad_timestamp"),
        ("-1577262236757", VECTORS[0][2], "bad_timestamp"),
        ("١٥٧٧٢٦٢٢٣٦٧٥٧", VECTORS[0][2], "bad_timestamp"),  # Arabic-Indic digits
        ("9" * 40, VECTORS[0][2], "bad_timestamp"),
        ("1577262236758", VECTORS[0][2], "bad_sign"),  # signed for another millisecond
        ("1577262236757", VECTORS[0][2].lower(), "bad_sign"),
        ("1577262236757", "x" * 10_000, "bad_sign"),
        ("1577262236757", "ü" + VECTORS[0][2][1:], "bad_sign"),
    ],
)
def test_refusals_name_their_reason(timestamp: str | None, sign: str | None, reason: str) -> None:
    with pytest.raises(SignatureError) as caught:
        match_signature(timestamp, sign, {"a": "SECabc"}, window_seconds=3600, now=clock)
    assert caught.value.reason == reason
    assert "SECabc" not in str(caught.value)


@pytest.mark.parametrize("offset", [3600.5, -3600.5, 86_400.0])
def test_outside_the_window_is_refused_in_both_directions(offset: float) -> None:
    with pytest.raises(SignatureError) as caught:
        match_signature("1577262236757", VECTORS[0][2], {"a": "SECabc"}, window_seconds=3600,
                        now=lambda: NOW + offset)  # fmt: skip
    assert caught.value.reason == "outside_window"


@pytest.mark.parametrize("offset", [3599.0, -3599.0, 0.0])
def test_inside_the_window_is_accepted(offset: float) -> None:
    app, _ = match_signature("1577262236757", VECTORS[0][2], {"a": "SECabc"}, window_seconds=3600,
                             now=lambda: NOW + offset)  # fmt: skip
    assert app == "a"


def test_comparison_is_constant_time() -> None:
    assert "hmac.compare_digest" in inspect.getsource(signing.match_signature)
    assert "hmac.compare_digest" in inspect.getsource(signing.ReplayGuard.check)


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_replay_guard_verdicts() -> None:
    wall = Clock(NOW)
    guard = ReplayGuard(window_seconds=3600, max_entries=10, clock=wall)
    ts = 1577262236757
    assert guard.check("a", ts, "sig", b"body") == "new"
    assert guard.check("a", ts, "sig", b"body") == "replay"
    assert guard.check("a", ts, "sig", b"other body") == "reused"
    assert guard.check("b", ts, "sig", b"body") == "new"  # another app's signature space
    assert guard.check("a", ts + 1, "sig2", b"body") == "new"
    # Remembered exactly as long as the window check would still pass the timestamp.
    wall.now = ts / 1000 + 3600  # the window check still accepts this timestamp
    assert match_signature(str(ts), compute_sign("k", ts), {"a": "k"}, window_seconds=3600, now=wall)
    assert guard.check("a", ts, "sig", b"body") == "replay"
    wall.now = ts / 1000 + 3600.0005
    assert guard.check("a", ts, "sig", b"x") == "new"
    assert len(guard) == 2  # "b" expired; "a"@ts+1 still has half a millisecond


def test_replay_guard_is_bounded_and_fails_closed() -> None:
    wall = Clock(NOW)
    guard = ReplayGuard(window_seconds=60, max_entries=3, clock=wall)
    ts = int(NOW * 1000)
    for i in range(3):
        assert guard.check("a", ts + i, f"s{i}", b"") == "new"
    assert guard.check("a", ts + 9, "s9", b"") == "full"
    assert guard.check("a", ts, "s0", b"") == "replay"  # still protected: nothing was evicted
    wall.now = NOW + 61
    assert guard.check("a", ts + 9 + 61_000, "s9", b"") == "new"
    assert len(guard) == 1


def test_forget_allows_a_retry_of_an_unprocessed_request() -> None:
    guard = ReplayGuard(window_seconds=60, clock=Clock(NOW))
    ts = int(NOW * 1000)
    assert guard.check("a", ts, "s", b"b") == "new"
    guard.forget("a", ts, "s")
    assert guard.check("a", ts, "s", b"b") == "new"


@given(ops=st.lists(st.tuples(st.integers(0, 5), st.integers(0, 3), st.integers(0, 120)), max_size=60))
@settings(max_examples=150, deadline=None)
def test_replay_guard_matches_a_naive_model(ops: list[tuple[int, int, int]]) -> None:
    """Against a dict that remembers forever and forgets by expiry: same verdicts."""
    base = NOW
    wall = Clock(base)
    guard = ReplayGuard(window_seconds=30, max_entries=10_000, clock=wall)
    model: dict[tuple[int, str], tuple[float, int]] = {}
    for key, body, advance in ops:
        wall.now += advance / 10
        ts = int(base * 1000) + key * 1000
        model = {k: v for k, v in model.items() if v[0] >= wall.now}
        known = model.get((ts, "s"))
        expected = "new" if known is None else ("replay" if known[1] == body else "reused")
        if known is None:
            model[(ts, "s")] = (ts / 1000 + 30, body)
        assert guard.check("a", ts, "s", bytes([body])) == expected


def test_settings_refuse_nonsense() -> None:
    import msgspec

    for bad in ({"path": "callback"}, {"path": "/metrics"}, {"window_seconds": 0}, {"inline_reply_timeout": -1},
                {"max_body_bytes": 10}, {"replay_cache_max": 1}):  # fmt: skip
        with pytest.raises(msgspec.ValidationError):
            msgspec.convert(bad, WebhookSettings)
    assert msgspec.convert({}, WebhookSettings).window_seconds == 3600


def test_inline_answers_must_be_written_before_dingtalk_stops_waiting() -> None:
    import msgspec

    # An inline answer written after DingTalk's 2.5 s wait reaches nobody: refused at config time.
    with pytest.raises(msgspec.ValidationError, match=r"busy_wait \+ inline_reply_timeout .* below callback_response"):
        msgspec.convert({"inline_reply_timeout": 2.2}, WebhookSettings)  # + busy_wait 0.5 = 2.7 s
    assert msgspec.convert({"inline_reply_timeout": 1.9}, WebhookSettings).inline_reply_timeout == 1.9
    longer = {"inline_reply_timeout": 5.0, "callback_response_timeout": 10.0}  # a client known to wait
    assert msgspec.convert(longer, WebhookSettings).inline_reply_timeout == 5.0


def test_reporter_bounds_audit_records_and_summarises() -> None:
    emitted: list[tuple[str, str, dict[str, object]]] = []
    now = Clock(0.0)

    def audit(category: str, action: str, **kw: object) -> None:
        emitted.append((category, action, kw))

    reporter = RejectionReporter(audit, target="/cb", audit_interval=60, log_interval=5, clock=now)
    for i in range(1000):
        now.now = i * 0.01  # 1000 refusals in 10 s
        reporter.record("bad_sign" if i % 2 else "replay", "detail", f"10.0.0.{i % 50}")
    reporter.record("busy", "queue full", "10.0.0.1")  # our own state: not a security event
    assert [e[1] for e in emitted] == ["webhook_rejected"]
    assert emitted[0][0] == "security"
    reporter.flush()
    assert [e[1] for e in emitted] == ["webhook_rejected", "webhook_rejected_summary"]
    summary = emitted[1][2]["details"]
    assert isinstance(summary, dict)
    assert summary["total"] == 999
    assert summary["counts"] == {"bad_sign": 500, "replay": 499}
    assert len(summary["remotes_sample"]) <= 10
    reporter.flush()
    assert len(emitted) == 2  # nothing new to summarise
    now.now = 61.0
    reporter.record("bad_sign", "detail", "10.0.0.9")
    assert len(emitted) == 3 and emitted[2][1] == "webhook_rejected"
