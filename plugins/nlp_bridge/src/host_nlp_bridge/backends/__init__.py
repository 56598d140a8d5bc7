"""The backends: OpenAI-compatible, generic HTTP JSON, and the built-in echo."""

from __future__ import annotations

from host_nlp_bridge.backends.base import Backend
from host_nlp_bridge.backends.echo import EchoBackend
from host_nlp_bridge.backends.http_json import HttpJsonBackend
from host_nlp_bridge.backends.openai import OpenAIBackend
from host_nlp_bridge.config import BackendConfig

__all__ = ["Backend", "EchoBackend", "HttpJsonBackend", "OpenAIBackend", "create_backend"]


def create_backend(name: str, settings: BackendConfig) -> Backend:
    """The backend object for one ``[nlp_bridge.backends.<name>]`` table."""
    if settings.type == "openai":
        return OpenAIBackend(name, settings)
    if settings.type == "http_json":
        return HttpJsonBackend(name, settings)
    return EchoBackend(name, settings)
