"""host-nlp-bridge: answers chat messages through private NLP/LLM services.

OpenAI-compatible Chat Completions (with SSE streaming), generic HTTP JSON services, and a built-in
echo backend; with timeouts, retries, circuit breakers, a result cache, request coalescing, a
bounded queue with per-conversation ordering, per-user rate limits and conversation memory.

Start with ``plugin`` (the hooks), then ``bridge`` (the flow of one message). See the README.
"""

from __future__ import annotations

from host_nlp_bridge.bridge import Bridge, HostLimits
from host_nlp_bridge.config import BridgeSettings, NlpBridgeSection, resolve
from host_nlp_bridge.plugin import bridge_for

__version__ = "0.1.0"

__all__ = ["Bridge", "BridgeSettings", "HostLimits", "NlpBridgeSection", "__version__", "bridge_for", "resolve"]
