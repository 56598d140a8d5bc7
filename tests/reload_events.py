"""Shared, reload-proof state for connector reload tests (not a plugin)."""

EVENTS: list[str] = []
