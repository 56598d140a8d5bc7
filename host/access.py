"""Access control: who may use the bot, in which conversations, and who may use admin commands.

A built-in middleware, always the outermost one (``Host.configure`` puts it first), configured by
``[access]`` (``host.config.AccessSection``). For each message it decides, in this order:

1. **conversation**: 1:1 chats allowed unless ``allow_direct_chats = false``; group chats allowed
   unless ``allow_group_chats = false``, the group is in ``deny_groups``, or ``allow_groups`` is
   non-empty and does not list it;
2. **sender denied**: ``message.sender.identity`` in ``deny_users`` or one of
   ``message.sender.departments`` in ``deny_departments``;
3. **sender allowed**: when ``allow_users`` or ``allow_departments`` is non-empty, the sender must be
   listed in one of them (an unresolved identity, ``None``, matches no user list);
4. **admin-only commands**: a message whose text starts with one of ``admin_commands`` (compared
   case-insensitively, after leading whitespace) needs the ``admin`` role
   (``[access.roles.admin] users / departments``).

A denied message does not reach any plugin. The sender gets ``refusal`` (1:1), ``group_refusal``
(groups; empty by default: a bot added to a group it may not serve stays quiet) or
``command_refusal``; an empty text means no reply. Each denial is logged with its reason (identities
and conversation ids are internal ids, not secrets) and counted in
``host_access_denied_total{reason}``. The policy is rebuilt live when ``[access]`` changes on
configuration reload; the change is audited (``config/change`` and ``access/policy_change``).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from host.config import AccessSection
from host.logs import logger
from host.model import Message, Reply, Sender

if TYPE_CHECKING:
    from host.runtime import Host

__all__ = ["DENIAL_REASONS", "AccessControl", "AccessPolicy", "Decision", "policy_changes"]

#: Every reason a message can be denied for (the bounded ``reason`` metric label).
DENIAL_REASONS: Final = (
    "direct_chats_disabled",
    "group_chats_disabled",
    "group_denied",
    "group_not_allowed",
    "user_denied",
    "department_denied",
    "user_not_allowed",
    "admin_command",
)

#: The role admin-only commands need.
ADMIN_ROLE: Final = "admin"


@dataclass(frozen=True, slots=True)
class Decision:
    """What the policy decided for one message. ``reason`` is one of ``DENIAL_REASONS`` or ``""``."""

    allowed: bool
    reason: str = ""
    detail: str = ""


_ALLOW: Final = Decision(True)


class AccessPolicy:
    """One immutable ``[access]`` configuration, compiled into sets for cheap per-message checks."""

    def __init__(self, section: AccessSection) -> None:
        self.section = section
        self._allow_users = frozenset(section.allow_users)
        self._allow_departments = frozenset(section.allow_departments)
        self._deny_users = frozenset(section.deny_users)
        self._deny_departments = frozenset(section.deny_departments)
        self._allow_groups = frozenset(section.allow_groups)
        self._deny_groups = frozenset(section.deny_groups)
        self._restricted = bool(self._allow_users or self._allow_departments)
        self._roles = {
            name: (frozenset(role.users), frozenset(role.departments)) for name, role in section.roles.items()
        }
        self._admin_commands = tuple(p.strip().casefold() for p in section.admin_commands)

    def roles_of(self, sender: Sender) -> frozenset[str]:
        """Every role ``sender`` has (by identity or department)."""
        return frozenset(name for name in self._roles if self.has_role(sender, name))

    def has_role(self, sender: Sender, role: str) -> bool:
        users, departments = self._roles.get(role, (frozenset(), frozenset()))
        if sender.identity is not None and sender.identity in users:
            return True
        return not departments.isdisjoint(sender.departments)

    def is_admin_command(self, text: str) -> bool:
        folded = text.lstrip().casefold()
        return any(folded.startswith(prefix) for prefix in self._admin_commands)

    def check(self, message: Message) -> Decision:
        """Decide whether ``message`` may be handled."""
        section = self.section
        conversation = message.conversation
        if conversation.type == "group":
            if not section.allow_group_chats:
                return Decision(False, "group_chats_disabled", "group chats are disabled")
            if conversation.id in self._deny_groups:
                return Decision(False, "group_denied", "the group is in deny_groups")
            if self._allow_groups and conversation.id not in self._allow_groups:
                return Decision(False, "group_not_allowed", "the group is not in allow_groups")
        elif not section.allow_direct_chats:
            return Decision(False, "direct_chats_disabled", "1:1 chats are disabled")
        sender = message.sender
        identity = sender.identity
        if identity is not None and identity in self._deny_users:
            return Decision(False, "user_denied", "the sender is in deny_users")
        if not self._deny_departments.isdisjoint(sender.departments):
            return Decision(False, "department_denied", "a department of the sender is in deny_departments")
        if self._restricted and not (
            (identity is not None and identity in self._allow_users)
            or not self._allow_departments.isdisjoint(sender.departments)
        ):
            detail = "the sender's identity is unresolved" if identity is None else "not in the allow lists"
            return Decision(False, "user_not_allowed", detail)
        if self._admin_commands and self.is_admin_command(message.text) and not self.has_role(sender, ADMIN_ROLE):
            return Decision(False, "admin_command", "admin-only command from a sender without role admin")
        return _ALLOW

    def refusal_for(self, message: Message, decision: Decision) -> str:
        """The reply a denied message gets ("" for none)."""
        if decision.reason == "admin_command":
            return self.section.command_refusal
        if message.conversation.type == "group":
            return self.section.group_refusal
        return self.section.refusal


class AccessControl:
    """The access-control middleware of one host; ``policy`` is swapped on configuration reload."""

    def __init__(self, host: Host, section: AccessSection) -> None:
        self._host = host
        self.policy = AccessPolicy(section)
        self._denied = host.metrics.counter(
            "access_denied_total", "Messages refused by [access], by reason.", ["reason"]
        )
        for reason in DENIAL_REASONS:
            self._denied.labels(reason)  # export zeros, so dashboards and alerts see the series

    def update(self, section: AccessSection) -> None:
        """Use a new ``[access]`` configuration from the next message on."""
        self.policy = AccessPolicy(section)

    async def __call__(self, message: Message, call_next: Callable[[Message], Awaitable[None]]) -> None:
        policy = self.policy  # one policy for the whole decision, even if a reload swaps it meanwhile
        decision = policy.check(message)
        if decision.allowed:
            await call_next(message)
            return
        self._denied.labels(decision.reason).inc()
        conversation = message.conversation
        logger.info(
            "access denied ({}): sender {} in {} conversation {}: {}",
            decision.reason,
            message.sender.identity or "<unresolved>",
            conversation.type,
            conversation.id,
            decision.detail,
        )
        message.context["_outcome"] = "denied"
        refusal = policy.refusal_for(message, decision)
        if refusal:
            await self._host._deliver(message, Reply.text_(refusal))


_LIST_KEYS: Final = (
    "allow_users",
    "allow_departments",
    "deny_users",
    "deny_departments",
    "allow_groups",
    "deny_groups",
    "admin_commands",
)


def policy_changes(old: AccessSection, new: AccessSection) -> dict[str, Any]:
    """What changed between two ``[access]`` sections, list by list (for the audit record)."""
    changes: dict[str, Any] = {}
    for key in _LIST_KEYS:
        _diff(changes, key, getattr(old, key), getattr(new, key))
    for role in sorted(set(old.roles) | set(new.roles)):
        before, after = old.roles.get(role), new.roles.get(role)
        _diff(changes, f"roles.{role}.users", before.users if before else [], after.users if after else [])
        _diff(
            changes,
            f"roles.{role}.departments",
            before.departments if before else [],
            after.departments if after else [],
        )
    for key in ("allow_direct_chats", "allow_group_chats", "refusal", "group_refusal", "command_refusal"):
        if getattr(old, key) != getattr(new, key):
            changes[key] = {"old": getattr(old, key), "new": getattr(new, key)}
    return changes


def _diff(changes: dict[str, Any], key: str, old: Iterable[str], new: Iterable[str]) -> None:
    before, after = set(old), set(new)
    if before != after:
        changes[key] = {"added": sorted(after - before), "removed": sorted(before - after)}
