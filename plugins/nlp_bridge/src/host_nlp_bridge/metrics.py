"""The bridge's metrics, registered on the host's metrics API (names get the ``host_`` prefix).

Labels are bounded: backend names come from the configuration, outcomes and reasons from the fixed
sets below; never a user or conversation id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from host.metrics import Metrics

__all__ = ["ANSWER_OUTCOMES", "CALL_OUTCOMES", "BridgeMetrics"]

#: ``nlp_calls_total`` outcomes: one per backend call (all its retries together).
CALL_OUTCOMES = ("success", "timeout", "error", "rejected", "incomplete")
#: ``nlp_answers_total`` outcomes: one per message the bridge handled.
ANSWER_OUTCOMES = (
    "answered", "cached", "coalesced", "incomplete", "apology", "busy", "rate_limited", "merged", "reset",
    "non_text",
)  # fmt: skip
_BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}


class BridgeMetrics:
    """Every metric the bridge updates."""

    def __init__(self, metrics: Metrics) -> None:
        m = metrics
        self.calls = m.counter(
            "nlp_calls_total", "Backend calls (retries included) by outcome.", ["backend", "outcome"]
        )
        self.call_duration = m.histogram(
            "nlp_call_duration_seconds", "Backend call duration, retries and streaming included.", ["backend"]
        )
        self.time_to_first_token = m.histogram(
            "nlp_time_to_first_token_seconds", "From the start of a backend call to its first text.", ["backend"]
        )
        self.tokens = m.counter(
            "nlp_tokens_total", "Tokens used (as reported by the backend, else estimated).", ["backend", "kind"]
        )
        self.retries = m.counter("nlp_retries_total", "Retried attempts by cause.", ["backend", "reason"])
        self.breaker_state = m.gauge(
            "nlp_circuit_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open.", ["backend"]
        )
        self.breaker_opened = m.counter("nlp_circuit_opened_total", "Times a circuit breaker opened.", ["backend"])
        self.cache_hits = m.counter("nlp_cache_hits_total", "Answers served from the result cache.")
        self.cache_misses = m.counter("nlp_cache_misses_total", "Cacheable requests not in the cache.")
        self.coalesced = m.counter("nlp_coalesced_total", "Requests served by an identical request in flight.")
        self.queue_depth = m.gauge("nlp_queue_depth", "Messages waiting for their turn or a call slot.")
        self.in_flight = m.gauge("nlp_in_flight", "Backend calls in progress (holding a call slot).")
        self.queue_wait = m.histogram("nlp_queue_wait_seconds", "Time messages waited before their backend call.")
        self.rejected = m.counter(
            "nlp_rejected_total", "Messages refused before any backend call, by reason.", ["reason"]
        )
        self.answers = m.counter("nlp_answers_total", "Messages handled by the bridge, by outcome.", ["outcome"])
        self.memory_conversations = m.gauge("nlp_memory_conversations", "Conversations held in memory.")

        # prometheus-client's labels() validates and locks on every call; children are cached here
        # (the label sets are bounded, so is the cache).
        self._children: dict[tuple[int, tuple[str, ...]], Any] = {}

    def child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, cached."""
        key = (id(metric), labels)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*labels)
        return found

    def call(self, backend: str, outcome: str, seconds: float | None = None) -> None:
        self.child(self.calls, backend, outcome).inc()
        if seconds is not None:
            self.child(self.call_duration, backend).observe(seconds)

    def first_token(self, backend: str, seconds: float) -> None:
        self.child(self.time_to_first_token, backend).observe(seconds)

    def used_tokens(self, backend: str, prompt: int, completion: int) -> None:
        self.child(self.tokens, backend, "prompt").inc(prompt)
        self.child(self.tokens, backend, "completion").inc(completion)

    def retry(self, backend: str, reason: str) -> None:
        self.child(self.retries, backend, reason).inc()

    def reject(self, reason: str) -> None:
        self.child(self.rejected, reason).inc()

    def answer(self, outcome: str) -> None:
        self.child(self.answers, outcome).inc()

    def breaker_changed(self, backend: str, state: str) -> None:
        self.breaker_state.labels(backend).set(_BREAKER_VALUES[state])
        if state == "open":
            self.breaker_opened.labels(backend).inc()
