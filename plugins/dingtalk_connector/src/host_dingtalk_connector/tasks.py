"""``TaskRunner``: a nursery for the AI cards' update loops that outlives the connector's ``serve``.

The host stops connectors *before* it drains in-flight messages (replies are still being streamed
then), so the update loops cannot live in ``serve``'s nursery. The plugin starts one runner per host
as a host service (``host.start_service`` in ``on_startup``): it lives until the plugin is unloaded
or the host has stopped, and card services hand it their loops with ``spawn``. No detached tasks.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import trio

__all__ = ["TaskRunner"]


class TaskRunner:
    """Runs background loops in its own nursery while ``run`` runs."""

    def __init__(self) -> None:
        self._nursery: trio.Nursery | None = None

    @property
    def running(self) -> bool:
        return self._nursery is not None

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve ``spawn`` until cancelled (a host service)."""
        try:
            async with trio.open_nursery() as nursery:
                self._nursery = nursery
                task_status.started()
                await trio.sleep_forever()
        finally:
            self._nursery = None

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any, name: str | None = None) -> bool:
        """Start ``fn(*args)`` in the runner; ``False`` when the runner is not running."""
        if self._nursery is None:
            return False
        self._nursery.start_soon(fn, *args, name=name)
        return True
