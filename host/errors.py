"""The host's exceptions.

::

    HostError
    ├── ConfigError          invalid configuration (message names file, key and expected type)
    ├── PluginError          a plugin could not be loaded or registered
    │   └── IncompatiblePlugin   the plugin's declared host API range excludes this host
    └── DeliveryError        a connector could not deliver a reply (after its own retries)
"""

from __future__ import annotations

__all__ = ["ConfigError", "DeliveryError", "HostError", "IncompatiblePlugin", "PluginError"]


class HostError(Exception):
    """Base of every error the host raises on purpose."""


class ConfigError(HostError):
    """The configuration is invalid; the message is meant for the operator as is."""


class PluginError(HostError):
    """A plugin could not be loaded or registered."""


class IncompatiblePlugin(PluginError):
    """The plugin declares a host API range this host is not in."""


class DeliveryError(HostError):
    """A reply could not be delivered. Connectors raise it after their own retries."""
