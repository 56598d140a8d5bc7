"""Identity mapping: the ids DingTalk gives a sender, resolved into one site-wide user id.

A bot message names its sender three ways (reference dingtalk-protocol.md 4.1): ``senderStaffId``
(the user id inside the robot's corp, absent for external users), ``senderUnionId`` (stable across
the developer's apps, not always present) and ``senderId`` (encrypted, per robot). Keying allow lists
or memories on the wrong one silently fails (LangBot PR #1630), so the connector hands every id to
one resolver and stores the answer in ``Sender.identity``; the raw ids stay in
``Sender.platform_ids`` under the keys ``staffId``, ``unionId``, ``senderId``.

Resolvers are pluggable. The default, ``MappingFileResolver``, reads a TOML or JSON file::

    # users.toml: DingTalk id -> site user id, one table per kind of id
    [staffId]
    manager1234 = "alice@example.com"
    [unionId]
    ZPbvexample = "alice@example.com"
    [senderId]
    "$:LWCP_v1:$S3nderEnc==" = "bob@example.com"

Lookup order: ``staffId``, then ``unionId``, then ``senderId``; the first hit wins, no hit gives
``None``. A site can plug its own resolver with ``[dingtalk.identity] resolver = "pkg.module:factory"``:
``factory(settings)`` must return an object with ``resolve(ids) -> str | None``. ``resolve`` runs on
the connection's reader for every message, so it must be fast and do no I/O (load or cache in the
factory).
"""

from __future__ import annotations

import importlib
import json
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from host_dingtalk_connector.errors import DingTalkConfigError

if TYPE_CHECKING:
    from host_dingtalk_connector.config import IdentitySettings

__all__ = ["ID_KINDS", "IdentityResolver", "MappingFileResolver", "NullResolver", "load_resolver"]

#: The kinds of sender id, in lookup order.
ID_KINDS: tuple[str, ...] = ("staffId", "unionId", "senderId")


@runtime_checkable
class IdentityResolver(Protocol):
    """Maps a sender's DingTalk ids (``{"staffId": ..., "unionId": ..., "senderId": ...}``, any
    subset) to a site user id, or ``None``. Called on the reader: no I/O, no blocking."""

    def resolve(self, ids: Mapping[str, str]) -> str | None: ...


class NullResolver:
    """Resolves nobody (the default when no mapping is configured)."""

    def resolve(self, ids: Mapping[str, str]) -> str | None:
        return None


class MappingFileResolver:
    """Looks ids up in tables loaded from a TOML (or ``.json``) mapping file."""

    def __init__(self, tables: Mapping[str, Mapping[str, str]], *, source: str = "<mapping>") -> None:
        self.source = source
        self._tables = {kind: dict(tables.get(kind, {})) for kind in ID_KINDS}

    @classmethod
    def from_file(cls, path: str | Path) -> MappingFileResolver:
        """Load and validate a mapping file; ``DingTalkConfigError`` names the file and the problem."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise DingTalkConfigError(f"identity mapping file {str(path)!r}: cannot read it: {exc.strerror}") from None
        try:
            data = json.loads(text) if path.suffix.lower() == ".json" else tomllib.loads(text)
        except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
            raise DingTalkConfigError(f"identity mapping file {str(path)!r}: invalid syntax: {exc}") from None
        if not isinstance(data, dict):
            raise DingTalkConfigError(f"identity mapping file {str(path)!r}: expected a table at the top level")
        unknown = sorted(set(data) - set(ID_KINDS))
        if unknown:
            raise DingTalkConfigError(
                f"identity mapping file {str(path)!r}: unknown table(s) {unknown}; expected {list(ID_KINDS)}"
            )
        for kind, table in data.items():
            if not isinstance(table, dict):
                raise DingTalkConfigError(f"identity mapping file {str(path)!r}: [{kind}] must be a table")
            for key, value in table.items():
                if not isinstance(value, str) or not value:
                    raise DingTalkConfigError(
                        f"identity mapping file {str(path)!r}: [{kind}] {key!r} must map to a non-empty string"
                    )
        return cls(data, source=str(path))

    def resolve(self, ids: Mapping[str, str]) -> str | None:
        for kind in ID_KINDS:
            value = ids.get(kind)
            if value:
                hit = self._tables[kind].get(value)
                if hit is not None:
                    return hit
        return None

    def __len__(self) -> int:
        return sum(len(t) for t in self._tables.values())


def load_resolver(settings: IdentitySettings) -> IdentityResolver:
    """Build the configured resolver: a custom factory, else the mapping file, else ``NullResolver``."""
    if settings.resolver:
        module_name, _, attr = settings.resolver.partition(":")
        if not module_name or not attr:
            raise DingTalkConfigError(
                f"[dingtalk.identity] resolver: expected 'package.module:factory', got {settings.resolver!r}"
            )
        try:
            factory = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise DingTalkConfigError(
                f"[dingtalk.identity] resolver: cannot import {settings.resolver!r}: {exc}"
            ) from None
        resolver = factory(settings)
        if not isinstance(resolver, IdentityResolver):
            raise DingTalkConfigError(
                f"[dingtalk.identity] resolver: {settings.resolver!r} returned {type(resolver).__name__}, "
                "which has no resolve(ids) method"
            )
        return resolver
    if settings.mapping_file:
        return MappingFileResolver.from_file(settings.mapping_file)
    return NullResolver()
