"""The streamed answer handed to the host, and collecting one into a single text."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from contextlib import aclosing

__all__ = ["AnswerStream", "collect"]


class AnswerStream:
    """An async iterator of answer chunks that calls ``on_end`` exactly once, however it ends.

    The host iterates it into the connector's streamed reply (an AI card on DingTalk) and always
    closes it; ``on_end`` then gives back the message's queue ticket and call slot, whether the
    answer completed, failed, was cut by the host's ``stream_timeout`` or by a shutdown, or was never
    read at all.
    """

    __slots__ = ("_chunks", "_ended", "_on_end")

    def __init__(self, chunks: AsyncGenerator[str, None], on_end: Callable[[], None]) -> None:
        self._chunks = chunks
        self._on_end = on_end
        self._ended = False

    def __aiter__(self) -> AnswerStream:
        return self

    async def __anext__(self) -> str:
        try:
            return await self._chunks.__anext__()
        except BaseException:
            # Exhausted, failed or cancelled: nothing more will come out of it.
            self._end()
            raise

    async def aclose(self) -> None:
        try:
            await self._chunks.aclose()
        finally:
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._on_end()


async def collect(chunks: AsyncIterator[str]) -> str:
    """All of ``chunks`` joined (closing the iterator whatever happens)."""
    parts: list[str] = []
    async with aclosing(chunks) as iterator:  # type: ignore[type-var]
        async for part in iterator:
            parts.append(part)
    return "".join(parts)
