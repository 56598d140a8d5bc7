"""What every backend is, and the HTTP plumbing the HTTP backends share.

A backend is any object with the attributes and methods of ``Backend``. ``generate`` returns an
async iterator of answer text (``str``) and token counts (``Usage``); it raises a ``BackendError``
subclass (never an httpx exception) when the call fails, classified so the bridge knows whether to
retry. Timeouts for a whole attempt and the overall deadline are the bridge's job; a backend only
applies the connect and read timeouts of its HTTP client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Protocol

import httpx
import trio

from host.tls import client_context
from host_nlp_bridge.config import BackendConfig
from host_nlp_bridge.errors import (
    BackendHTTPError,
    BackendRateLimited,
    BackendTimeout,
    BackendUnavailable,
)
from host_nlp_bridge.model import ChatRequest, Usage
from host_nlp_bridge.retry import parse_retry_after

__all__ = [
    "Backend",
    "Item",
    "auth_headers",
    "close_stream",
    "make_client",
    "raise_for_status",
    "translate_errors",
]

Item = str | Usage

_ERROR_SNIPPET = 300
#: Seconds allowed for closing a response (never blocks in practice: the socket is just closed).
_CLOSE_TIMEOUT = 5.0


class Backend(Protocol):
    """One NLP service."""

    name: str
    #: ``openai``, ``http_json`` or ``echo``.
    kind: str
    #: The model name as it goes into cache keys (may be resolved lazily).
    model: str
    #: Can answer token by token.
    can_stream: bool
    #: Longest silence the backend itself tolerates before failing (its read timeout), or ``None``;
    #: ``0.0`` for a backend that never waits (then the bridge puts no time limit around its items).
    stall_timeout: float | None

    def generate(self, request: ChatRequest) -> AsyncIterator[Item]:
        """The answer to ``request``: text chunks in order, and ``Usage`` when reported."""
        ...

    def describe(self) -> str:
        """One line for the startup log (no secrets)."""
        ...

    def key_extra(self, request: ChatRequest) -> tuple[str, ...]:
        """What besides the context makes two requests different for this backend.

        Cache and coalescing keys include it: a backend that sends the user's id along must not
        share answers between users.
        """
        ...

    async def aclose(self) -> None:
        """Release connections."""
        ...


def make_client(settings: BackendConfig) -> httpx.AsyncClient:
    """An httpx client with the backend's connect/read timeouts and connection limit."""
    timeout = httpx.Timeout(
        connect=settings.connect_timeout,
        read=settings.read_timeout,
        write=settings.read_timeout,
        # Waiting for a pooled connection counts as waiting for the backend.
        pool=settings.read_timeout,
    )
    limits = httpx.Limits(
        max_connections=settings.max_connections, max_keepalive_connections=settings.max_connections
    )
    # trust_env=False: proxies for a private NLP service come from explicit config, not a stray HTTP_PROXY.
    # verify: the host's TLS policy (TLS 1.2+, verified certificates, [tls] ca_file for private CAs).
    return httpx.AsyncClient(
        timeout=timeout, limits=limits, trust_env=False, follow_redirects=False, verify=client_context()
    )


def auth_headers(settings: BackendConfig) -> dict[str, str]:
    """Configured headers plus the API key (revealed here, at the point of use only)."""
    headers = dict(settings.headers)
    for name, secret in settings.secret_headers.items():
        headers[name] = secret.reveal()
    if settings.api_key:
        key = settings.api_key.reveal()
        is_auth = settings.api_key_header.lower() == "authorization"
        headers[settings.api_key_header] = f"Bearer {key}" if is_auth else key
    return headers


@contextmanager
def translate_errors(backend: str) -> Iterator[None]:
    """Turn httpx's exceptions into the bridge's, classified for retrying."""
    try:
        yield
    except httpx.TimeoutException as exc:
        raise BackendTimeout(backend, f"{_timeout_kind(exc)} timed out") from exc
    except httpx.TransportError as exc:
        # Connection refused/reset, peer closed mid-body, protocol errors: the transport failed.
        raise BackendUnavailable(backend, f"{type(exc).__name__}: {exc}") from exc
    except httpx.DecodingError as exc:
        raise BackendUnavailable(backend, f"undecodable response body: {exc}") from exc


def _timeout_kind(exc: httpx.TimeoutException) -> str:
    return {
        httpx.ConnectTimeout: "connecting",
        httpx.ReadTimeout: "reading",
        httpx.WriteTimeout: "sending",
        httpx.PoolTimeout: "waiting for a free connection",
    }.get(type(exc), "the request")


async def raise_for_status(backend: str, response: httpx.Response) -> None:
    """Raise the classified error for a non-2xx response (reading a little of its body for detail)."""
    status = response.status_code
    if 200 <= status < 300:
        return
    with translate_errors(backend):
        body = (await response.aread())[:_ERROR_SNIPPET].decode("utf-8", "replace").strip()
    retry_after = parse_retry_after(response.headers.get("retry-after"))
    if status == 429:
        raise BackendRateLimited(backend, f"HTTP 429: {body}".rstrip(": "), retry_after=retry_after)
    if status in (502, 503, 504):
        raise BackendUnavailable(backend, f"HTTP {status}: {body}".rstrip(": "), retry_after=retry_after)
    if status == 408:
        raise BackendTimeout(backend, "HTTP 408: the server timed out waiting for the request")
    raise BackendHTTPError(backend, status, body)


async def close_stream(response: httpx.Response, reader: AsyncIterator[object] | None = None) -> None:
    """Close a streamed response, also when we stop reading it early (or are being cancelled).

    httpx reads a body through a chain of async generators. Stopping early leaves the inner ones
    suspended, and trio warns when it garbage-collects them; so after closing the response we pull
    ``reader`` (the outermost iterator) once more: the read fails on the closed stream and the
    failure unwinds, and so finishes, every generator of the chain.
    """
    if reader is None and response.is_closed:
        return  # read to the end: httpx already closed it and the connection is back in the pool
    with trio.CancelScope(shield=True), trio.move_on_after(_CLOSE_TIMEOUT):
        await response.aclose()
        if reader is not None:
            try:
                while True:
                    await reader.__anext__()
            except Exception:
                pass  # StopAsyncIteration or the closed stream's read error: both end the chain
