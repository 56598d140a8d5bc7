"""Conversation memory: the recent turns of each conversation, bounded and expiring.

A *thread* holds the turns (question + answer) of one conversation with one backend route. It keeps
at most ``max_turns`` turns; when a request is built, the newest turns that fit in ``max_tokens``
(estimated) are sent and older ones are left out. A conversation idle for ``idle_ttl`` seconds is
forgotten, and at most ``max_conversations`` are kept (least recently used forgotten first). ``/reset``
forgets a conversation at once; an answer still being produced for it is then not remembered.

Group chats and 1:1 chats never share memory: the conversation key includes the conversation type
(and, with ``group_scope = "user"``, the member).
"""

from __future__ import annotations

import re
from collections import OrderedDict, deque
from collections.abc import Callable

from host_nlp_bridge.model import ChatMessage

__all__ = ["ConversationMemory", "Thread", "estimate_tokens"]

# CJK ideographs, kana and hangul: about one token each. Everything else: about four characters each.
_WIDE = re.compile(r"[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uac00-\ud7af\uf900-\ufaff]")


def estimate_tokens(text: str) -> int:
    """A cheap, tokenizer-free estimate of ``text``'s token count (CJK-aware)."""
    wide = len(_WIDE.findall(text))
    return wide + (len(text) - wide + 3) // 4


class Thread:
    """The remembered turns of one conversation (with one route)."""

    __slots__ = ("last_used", "turns")

    def __init__(self, max_turns: int, now: float) -> None:
        self.turns: deque[tuple[ChatMessage, ChatMessage, int]] = deque(maxlen=max_turns)
        self.last_used = now

    def remember(self, question: str, answer: str) -> None:
        tokens = estimate_tokens(question) + estimate_tokens(answer)
        self.turns.append((ChatMessage("user", question), ChatMessage("assistant", answer), tokens))

    def history(self, max_tokens: int) -> list[ChatMessage]:
        """The newest turns whose estimated size fits in ``max_tokens``, oldest first."""
        picked: list[tuple[ChatMessage, ChatMessage, int]] = []
        budget = max_tokens
        for turn in reversed(self.turns):
            if turn[2] > budget:
                break
            budget -= turn[2]
            picked.append(turn)
        messages: list[ChatMessage] = []
        for question, answer, _ in reversed(picked):
            messages += (question, answer)
        return messages


class ConversationMemory:
    """Threads by conversation key and route, with idle expiry and an LRU bound."""

    def __init__(
        self,
        *,
        max_turns: int,
        max_tokens: int,
        idle_ttl: float,
        max_conversations: int,
        clock: Callable[[], float],
    ) -> None:
        self.max_turns = max_turns
        self.max_tokens = max_tokens
        self.idle_ttl = idle_ttl
        self.max_conversations = max_conversations
        self._clock = clock
        self._conversations: OrderedDict[str, dict[str, Thread]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._conversations)

    def thread(self, conversation: str, route: str) -> Thread:
        """The thread of ``conversation`` for ``route`` (a fresh one if none, or if it expired)."""
        now = self._clock()
        self._expire(now)
        threads = self._conversations.get(conversation)
        if threads is None:
            threads = self._conversations[conversation] = {}
            while len(self._conversations) > self.max_conversations:
                self._conversations.popitem(last=False)
        else:
            self._conversations.move_to_end(conversation)
        thread = threads.get(route)
        if thread is None or now - thread.last_used >= self.idle_ttl:
            thread = threads[route] = Thread(self.max_turns, now)
        thread.last_used = now
        return thread

    def forget(self, conversation: str) -> bool:
        """Forget everything about ``conversation``; ``True`` if there was something."""
        return self._conversations.pop(conversation, None) is not None

    def _expire(self, now: float) -> None:
        # The least recently used conversation is first: drop from the front while it is stale.
        while self._conversations:
            key, threads = next(iter(self._conversations.items()))
            if threads and max(t.last_used for t in threads.values()) > now - self.idle_ttl:
                return
            del self._conversations[key]
