"""The NLP bridge's exceptions.

::

    NlpBridgeError
    ├── ConfigurationError            the [nlp_bridge] section or the NLP_* variables are unusable
    └── BackendError                  one backend call failed (``backend`` names it)
        ├── TransientBackendError     worth retrying: the same request may well succeed later
        │   ├── BackendTimeout        connect, read (first byte or mid-stream) or total timeout
        │   ├── BackendUnavailable    connection refused/reset/cut, HTTP 502/503/504, truncated stream
        │   └── BackendRateLimited    HTTP 429 (``retry_after`` = the server's Retry-After, if any)
        ├── PermanentBackendError     retrying the same request will not help
        │   ├── BackendHTTPError      any other non-2xx status (500, 400, 401, 404...)
        │   └── BadResponse           invalid JSON, malformed SSE, no answer where one was expected
        └── CircuitOpenError          the backend's circuit breaker refused the call (nothing was sent)

Only ``TransientBackendError`` is retried (timeouts, connection errors, 429 honouring Retry-After,
502/503/504). ``counts_against_backend`` tells the circuit breaker whether the failure says something
about the backend's health: a 400 says the request was bad, a 500 or a timeout says the backend is.
None of these ever reaches the host: the bridge turns them into an apology reply.
"""

from __future__ import annotations

__all__ = [
    "BackendError",
    "BackendHTTPError",
    "BackendRateLimited",
    "BackendTimeout",
    "BackendUnavailable",
    "BadResponse",
    "CircuitOpenError",
    "ConfigurationError",
    "NlpBridgeError",
    "PermanentBackendError",
    "TransientBackendError",
]


class NlpBridgeError(Exception):
    """Base of every error the bridge raises on purpose."""


class ConfigurationError(NlpBridgeError, ValueError):
    """The configuration cannot work; the message names the key and what is wrong."""


class BackendError(NlpBridgeError):
    """A call to ``backend`` failed. ``kind`` is a short, bounded label for metrics and logs."""

    kind = "error"
    counts_against_backend = True

    def __init__(self, backend: str, detail: str) -> None:
        super().__init__(f"backend {backend!r}: {detail}")
        self.backend = backend
        self.detail = detail


class TransientBackendError(BackendError):
    """A failure that may go away on its own; retried with backoff."""

    retry_after: float | None = None


class BackendTimeout(TransientBackendError):
    kind = "timeout"


class BackendUnavailable(TransientBackendError):
    kind = "unavailable"

    def __init__(self, backend: str, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(backend, detail)
        self.retry_after = retry_after


class BackendRateLimited(TransientBackendError):
    kind = "rate_limited"

    def __init__(self, backend: str, detail: str, *, retry_after: float | None = None) -> None:
        super().__init__(backend, detail)
        self.retry_after = retry_after


class PermanentBackendError(BackendError):
    """Retrying the same request would fail the same way."""


class BackendHTTPError(PermanentBackendError):
    kind = "http_error"

    def __init__(self, backend: str, status: int, detail: str) -> None:
        super().__init__(backend, f"HTTP {status}: {detail}" if detail else f"HTTP {status}")
        self.status = status
        # A 4xx means our request was refused, not that the backend is sick.
        self.counts_against_backend = status >= 500


class BadResponse(PermanentBackendError):
    kind = "bad_response"


class CircuitOpenError(BackendError):
    """The circuit breaker is open (or its half-open probe is already out); nothing was sent."""

    kind = "circuit_open"
    counts_against_backend = False
