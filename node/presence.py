"""Presence of this node's users, derived from their live connections.

There is no presence table: a user is online while the hub has a connection of
theirs. Changes go through one task that coalesces bursts (a user who reconnects
quickly produces one change, not two) and pushes them to the user's contacts.
The last-seen time is persisted so it survives restarts.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import trio

from node.hub import Hub
from node.logs import get_logger
from storage.repos import AccountRepo, MessageRepo
from web import frames

log = get_logger("moot.presence")


class PresenceService:
    def __init__(self, hub: Hub, accounts: AccountRepo, messages: MessageRepo, node_name: str, *, clock_ms: Callable[[], int]) -> None:
        self.hub = hub
        self.accounts = accounts
        self.messages = messages
        self.node_name = node_name
        self._clock_ms = clock_ms
        self._send, self._receive = trio.open_memory_channel[int | tuple[int, int]](math.inf)
        self._pending: set[int] = set()
        self._announced: dict[int, bool] = {}

    def changed(self, user_id: int) -> None:
        """Note that the user's connection set changed (called by the web layer)."""
        if user_id not in self._pending:
            self._pending.add(user_id)
            self._send.send_nowait(user_id)

    def introduce(self, a: int, b: int) -> None:
        """Two users now share a conversation: each learns the other's presence at once,
        not only at their next change (called by messaging when a conversation is first used)."""
        self._send.send_nowait((a, b))

    async def frame_for(self, user_id: int, username: str, last_seen: int | None) -> frames.Presence:
        online = self.hub.is_online(user_id)
        return frames.Presence(user=f"{username}@{self.node_name}", state="online" if online else "offline", last_seen=None if online else last_seen)

    async def snapshot(self, user_id: int) -> list[frames.Presence]:
        """Presence of every contact of the user, for a connection that just opened."""
        out = []
        for contact in await self.messages.contacts_of(user_id):
            user = await self.accounts.get_user_by_id(contact)
            if user is not None:
                out.append(await self.frame_for(user.id, user.username, user.last_seen))
        return out

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async for item in self._receive:
            if isinstance(item, tuple):
                try:
                    await self._introduce(*item)
                except Exception:
                    log.exception("presence.introduce_failed")
                continue
            user_id = item
            self._pending.discard(user_id)
            online = self.hub.is_online(user_id)
            if self._announced.get(user_id, False) == online:
                continue
            self._announced[user_id] = online
            if not online:
                del self._announced[user_id]
            try:
                await self._announce(user_id, online)
            except Exception:
                log.exception("presence.announce_failed", user_id=user_id)

    async def _introduce(self, a: int, b: int) -> None:
        users = {u: await self.accounts.get_user_by_id(u) for u in (a, b)}
        for viewer, subject in ((a, b), (b, a)):
            user = users[subject]
            if user is not None and self.hub.is_online(viewer):
                self.hub.push(viewer, frames.encode(await self.frame_for(subject, user.username, user.last_seen)))

    async def _announce(self, user_id: int, online: bool) -> None:
        now = self._clock_ms()
        if not online:
            await self.accounts.set_last_seen(user_id, now)
        user = await self.accounts.get_user_by_id(user_id)
        if user is None:
            return
        frame = frames.encode(await self.frame_for(user_id, user.username, now))
        contacts = await self.messages.contacts_of(user_id)
        for contact in contacts:
            self.hub.push(contact, frame)
        log.debug("presence.changed", user=user.username, online=online, watchers=len(contacts))
