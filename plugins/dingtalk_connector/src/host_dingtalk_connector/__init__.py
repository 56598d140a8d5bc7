"""DingTalk connector for host: Stream mode (this package), replies, and a local DingTalk emulator.

* ``DingTalkConnector`` (``connector.py``): the host ``Connector``; one per host, any number of apps.
* ``AppStream`` (``stream.py``): the connection engine of one app (register, connect, keepalive,
  reconnect with backoff, make-before-break hand-over).
* ``FrameRouter`` (``router.py``): what each frame means (ACK, dedup, backpressure, events).
* ``frames.py`` (envelope and ACKs), ``convert.py`` (payload -> ``Message``/``Event``),
  ``dedup.py``, ``backoff.py``, ``identity.py`` (sender -> site user), ``replies.py`` (outbound),
  ``config.py`` (``[dingtalk]``), ``metrics.py``, ``errors.py``.
* ``emulator`` (subpackage): a local DingTalk for development and tests.
"""

from __future__ import annotations

from host_dingtalk_connector.config import AppConfig, DingTalkSection, StreamSettings
from host_dingtalk_connector.connector import DingTalkConnector
from host_dingtalk_connector.identity import IdentityResolver, MappingFileResolver

__version__ = "0.1.0"

__all__ = [
    "AppConfig",
    "DingTalkConnector",
    "DingTalkSection",
    "IdentityResolver",
    "MappingFileResolver",
    "StreamSettings",
    "__version__",
]
