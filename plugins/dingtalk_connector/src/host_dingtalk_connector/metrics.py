"""The connector's Prometheus metrics (all through ``host.metrics``, so they get the ``host_`` prefix).

Labels are bounded: ``app`` is the configured app name, never a user or conversation id.
"""

from __future__ import annotations

from host.metrics import Metrics

__all__ = ["CONNECTION_STATES", "ConnectorMetrics", "OutboundMetrics"]

#: Values of ``dingtalk_connection_state``.
CONNECTION_STATES = {"disconnected": 0, "connecting": 1, "connected": 2}

#: ACK latencies are sub-millisecond on loopback; these buckets resolve them.
_ACK_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)


class ConnectorMetrics:
    """Every metric the connector exports, created once per host registry."""

    def __init__(self, metrics: Metrics) -> None:
        self.acks = metrics.counter(
            "dingtalk_acks_total", "ACKs sent, by frame kind (bot, event, card, system) and code.", ["app", "kind", "code"]
        )
        self.ack_latency = metrics.histogram(
            "dingtalk_ack_latency_seconds",
            "From a frame's arrival to its ACK written to the socket.",
            ["kind"],
            buckets=_ACK_BUCKETS,
        )
        self.messages = metrics.counter(
            "dingtalk_messages_total",
            "Bot messages by msgtype and outcome (accepted, deferred, duplicate, refused, bad).",
            ["app", "msgtype", "outcome"],
        )
        self.events = metrics.counter(
            "dingtalk_events_total",
            "EVENT frames and card callbacks by outcome (success, later, deferred, duplicate, bad).",
            ["app", "outcome"],
        )
        self.redeliveries = metrics.counter(
            "dingtalk_redeliveries_total", "Bot messages DingTalk delivered again (same msgId).", ["app"]
        )
        self.dedup_hits = metrics.counter(
            "dingtalk_dedup_hits_total", "Frames recognised as already handled, by key (frame, msg, event).", ["app", "key"]
        )
        self.reconnects = metrics.counter(
            "dingtalk_reconnects_total",
            "Connections replaced, by reason (disconnect, dropped, closed, pong_timeout, idle, app_idle, "
            "register_failed, handshake_failed, error).",
            ["app", "reason"],
        )
        self.connection_state = metrics.gauge(
            "dingtalk_connection_state", "0 disconnected, 1 connecting, 2 connected.", ["app"]
        )
        self.open_connections = metrics.gauge(
            "dingtalk_open_connections", "WebSocket connections currently open (2 during a hand-over).", ["app"]
        )
        self.bad_frames = metrics.counter(
            "dingtalk_bad_frames_total", "Frames that could not be used, by reason.", ["app", "reason"]
        )
        self.registrations = metrics.counter(
            "dingtalk_registrations_total", "Calls to connections/open by outcome (ok, refused, error).", ["app", "outcome"]
        )
        self.pings = metrics.counter("dingtalk_system_pings_total", "SYSTEM ping frames answered.", ["app"])
        self.dedup_entries = metrics.gauge("dingtalk_dedup_entries", "Ids remembered for deduplication.", ["app"])


class OutboundMetrics:
    """Metrics of everything the connector sends: replies, AI cards, tokens, media."""

    def __init__(self, metrics: Metrics) -> None:
        self.deliveries = metrics.counter(
            "dingtalk_deliveries_total",
            "Reply and message sends by route (session_webhook, openapi) and outcome (ok, expired, "
            "refused, error).",
            ["app", "route", "outcome"],
        )
        self.card_updates = metrics.counter(
            "dingtalk_card_updates_total",
            "AI card calls by outcome (created, create_failed, update, finalized, failed, error).",
            ["app", "outcome"],
        )
        self.card_qps_rejections = metrics.counter(
            "dingtalk_card_qps_rejections_total",
            "AI card calls DingTalk refused with 403 QpsLimit (each slows the card budget down).",
            ["app"],
        )
        self.token_refreshes = metrics.counter(
            "dingtalk_token_refreshes_total",
            "Access token requests by outcome (ok, refused, error).",
            ["app", "outcome"],
        )
        self.media = metrics.counter(
            "dingtalk_media_total",
            "Media files by direction (download, upload) and outcome (ok, too_large, refused, "
            "unavailable, io).",
            ["app", "direction", "outcome"],
        )
