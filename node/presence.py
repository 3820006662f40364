"""Presence and typing: of this node's users (derived from their live connections),
and of other nodes' users (what their nodes tell us, under a lease).

There is no presence table and no presence server. A local user is online while
the hub has a connection of theirs that is not idle, away while all of them are,
offline otherwise; only the last-seen time is stored, so that it survives
restarts. Changes go through one task that coalesces bursts, pushes them to the
user's local conversation partners, and queues them for the other nodes whose
users share a conversation with the user (federation/presence.py's outbox:
coalesced per node, renewed by heartbeat). What other nodes say is held in
``RemotePresence``: when a node falls silent for a lease its users are shown
offline, last seen when it was last heard from.

Presence is shown only to conversation partners, and a user may hide it (others
see them offline, with no last-seen time). Typing indicators go only between two
users who share a conversation, are never stored, and are rate-limited.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import trio

from federation.presence import PresenceOutbox, RemotePresence, Seen
from federation.wire import PresenceUser
from node.config import NodeConfig
from node.hub import Connection, Hub
from node.logs import get_logger
from storage.repos import AccountRepo, MessageRepo
from web import frames

log = get_logger("moot.presence")

TYPING_BURST = 5.0  # typing frames a connection may send at once ...
TYPING_RATE = 2.0  # ... and per second after that; the rest are dropped
WATCHERS_CACHED = 10_000  # addresses whose conversation partners are known


class LivePort(Protocol):
    """What presence needs from federation (federation/live.py's LiveLinks)."""

    def send_presence(self, node: str, users: list[PresenceUser]) -> None: ...

    def send_typing(self, node: str, sender: str, to: str, active: bool) -> None: ...


def _node_of(address: str) -> str:
    return address.rpartition("@")[2]


def _wire(seen: Seen) -> PresenceUser:
    return PresenceUser(user=seen.user, state=seen.state, last_seen=seen.last_seen)


def _frame(seen: Seen) -> bytes:
    return frames.encode(frames.Presence(user=seen.user, state=seen.state, last_seen=seen.last_seen))


@dataclass(frozen=True, slots=True)
class _Introduce:
    """Two local users started a conversation."""

    a: int
    b: int


@dataclass(frozen=True, slots=True)
class _IntroduceRemote:
    """A local user started a conversation with a user of another node."""

    user_id: int
    peer: str


class PresenceService:
    def __init__(
        self, hub: Hub, accounts: AccountRepo, messages: MessageRepo, node_name: str, config: NodeConfig, *,
        clock_ms: Callable[[], int], live: LivePort | None = None,
    ) -> None:
        self.hub = hub
        self.accounts = accounts
        self.messages = messages
        self.node_name = node_name
        self.live = live
        self._clock_ms = clock_ms
        self.remote = RemotePresence(lease_s=config.presence_lease_s)
        self.outbox = PresenceOutbox(heartbeat_s=config.presence_heartbeat_s, min_interval_s=min(0.2, config.presence_heartbeat_s))
        self._send, self._receive = trio.open_memory_channel[int | _Introduce | _IntroduceRemote](math.inf)
        self._pending: set[int] = set()
        self._announced: dict[int, Seen] = {}  # what others were last told about each local user
        self._connected: set[int] = set()  # local users with a connection at their last announcement
        self._kick = trio.Event()  # the outbox or the leases changed: the pump looks again
        # address -> who shares a conversation with it; dropped when a conversation starts
        self._watchers: OrderedDict[str, list[tuple[str, int | None]]] = OrderedDict()

    # -- this node's users --------------------------------------------------------------

    def changed(self, user_id: int) -> None:
        """Note that the user's connections (or their presence setting) changed."""
        if user_id not in self._pending:
            self._pending.add(user_id)
            self._send.send_nowait(user_id)

    def set_away(self, conn: Connection, away: bool) -> None:
        """The client says whether its user is at this device (``presence`` frame)."""
        if conn.away != away:
            conn.away = away
            self.changed(conn.user_id)

    def introduce(self, user_id: int, address: str, peer: str, peer_id: int | None) -> None:
        """A local user now shares a conversation with ``peer`` (called by messaging when
        a conversation is first used): each learns the other's presence at once, not
        only at their next change. A peer on another node: its node is told about the
        user, and watched from now on."""
        self._watchers.pop(peer, None)
        self._watchers.pop(address, None)
        if peer_id is not None:
            self._send.send_nowait(_Introduce(user_id, peer_id))
        elif self.live is not None:
            self.outbox.watch(_node_of(peer), trio.current_time())
            self._send.send_nowait(_IntroduceRemote(user_id, peer))
            self._kick.set()

    async def _seen_of(self, user_id: int) -> Seen | None:
        """The local user as others may see them."""
        user = await self.accounts.get_user_by_id(user_id)
        if user is None:
            return None
        address = f"{user.username}@{self.node_name}"
        if not user.show_presence:
            return Seen(address, "offline", None)
        state = self.hub.state(user_id)
        return Seen(address, state, user.last_seen if state == "offline" else None)  # type: ignore[arg-type]

    async def snapshot(self, address: str) -> list[frames.Presence]:
        """Presence of every conversation partner of the user, for a connection that just opened."""
        out = []
        for partner, local in await self._watchers_of(address):
            seen = await self._seen_of(local) if local is not None else self.remote.state_of(partner, _node_of(partner))
            if seen is not None:
                out.append(frames.Presence(user=seen.user, state=seen.state, last_seen=seen.last_seen))
        return out

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce local changes and run the cross-node pump until cancelled."""
        if self.live is not None:
            now = trio.current_time()
            for node in await self.messages.remote_nodes():
                self.outbox.watch(node, now)
        async with trio.open_nursery() as nursery:
            if self.live is not None:
                nursery.start_soon(self._pump)
            task_status.started()
            async for item in self._receive:
                try:
                    if isinstance(item, _Introduce):
                        await self._introduce(item.a, item.b)
                    elif isinstance(item, _IntroduceRemote):
                        await self._introduce_remote(item.user_id, item.peer)
                    else:
                        self._pending.discard(item)
                        await self._announce(item)
                except Exception:
                    log.exception("presence.update_failed", item=str(item))

    async def _introduce(self, a: int, b: int) -> None:
        for viewer, subject in ((a, b), (b, a)):
            seen = await self._seen_of(subject)
            if seen is not None and self.hub.is_online(viewer):
                self.hub.push(viewer, _frame(seen))

    async def _watchers_of(self, address: str) -> list[tuple[str, int | None]]:
        """Who shares a conversation with ``address`` (cached until one starts with it)."""
        watchers = self._watchers.get(address)
        if watchers is None:
            watchers = self._watchers[address] = await self.messages.watchers_of(address)
            if len(self._watchers) > WATCHERS_CACHED:
                self._watchers.popitem(last=False)
        else:
            self._watchers.move_to_end(address)
        return watchers

    async def _introduce_remote(self, user_id: int, peer: str) -> None:
        # What the peer's node said may have come before the conversation existed here.
        seen = self.remote.state_of(peer, _node_of(peer))
        if seen is not None:
            self.hub.push(user_id, _frame(seen))
        await self._announce(user_id, force=True)  # its node learns about the user now

    async def _announce(self, user_id: int, *, force: bool = False) -> None:
        state = self.hub.state(user_id)
        if state == "offline" and user_id in self._connected:
            await self.accounts.set_last_seen(user_id, self._clock_ms())  # (also for a hidden user)
        before = self._announced.get(user_id)
        seen = await self._seen_of(user_id)
        if state == "offline":
            self._connected.discard(user_id)
        else:
            self._connected.add(user_id)
        if seen is not None:
            self._announced[user_id] = seen  # (at most one entry per local user)
        # Nothing visible changed (a hidden user's comings and goings never show).
        if seen is None or (seen == before and not force):
            return
        watchers = await self._watchers_of(seen.user)
        frame = _frame(seen)
        nodes = set()
        for address, local in watchers:
            if local is not None:
                self.hub.push(local, frame)
            else:
                nodes.add(_node_of(address))
        if nodes and self.live is not None:
            self.outbox.changed(seen, nodes, trio.current_time())
            self._kick.set()
        log.debug("presence.changed", user=seen.user, state=seen.state, watchers=len(watchers), nodes=len(nodes))

    # -- other nodes' users (the LiveHandler of federation/live.py) ----------------------

    async def _pump(self) -> None:
        """Send what the outbox says is due, and end the leases that ran out."""
        assert self.live is not None
        while True:
            now = trio.current_time()
            for node, changes in self.outbox.due(now).items():
                self.live.send_presence(node, [_wire(seen) for seen in changes])
            gone = self.remote.expire(now)
            if gone:
                log.info("presence.lease_expired", users=len(gone), nodes=len({_node_of(s.user) for s in gone}))
                await self._show_remote(gone)
            times = [t for t in (self.outbox.next_due(), self.remote.next_expiry()) if t is not None]
            self._kick = trio.Event()
            with trio.move_on_at(min(times, default=math.inf)):
                await self._kick.wait()

    async def live_snapshot(self, node: str) -> list[PresenceUser]:
        """Every local user that users of ``node`` watch, as they are now (a new live stream)."""
        out = []
        for user_id in await self.messages.users_watched_by(node):
            seen = await self._seen_of(user_id)
            if seen is not None:
                out.append(_wire(seen))
        self.outbox.watch(node, trio.current_time())
        return out

    async def remote_presence(self, node: str, users: list[PresenceUser], snapshot: bool) -> None:
        """``node`` told us about its users (live.LiveInbound checked that they are its own)."""
        now, wall = trio.current_time(), self._clock_ms()
        seen = [Seen(u.user, u.state, u.last_seen) for u in users]
        if snapshot:
            changes = self.remote.replace(node, seen, now, wall)
        elif not seen:
            self.remote.heartbeat(node, now, wall)
            changes = []
        else:
            changes = [c for s in seen if (c := self.remote.update(node, s, now, wall)) is not None]
        self._kick.set()  # the lease moved
        await self._show_remote(changes)

    async def _show_remote(self, changes: list[Seen]) -> None:
        """Push other nodes' users' changes to their local conversation partners."""
        for seen in changes:
            frame = _frame(seen)
            for _, local in await self._watchers_of(seen.user):
                if local is not None:
                    self.hub.push(local, frame)

    # -- typing ----------------------------------------------------------------------------

    async def typing(self, conn: Connection, frame: frames.TypingTo) -> None:
        """A client's ``typing`` frame: to the peer if they share a conversation."""
        if not self._spend(conn):
            return
        me, to = conn.session.address, frame.conversation
        partner = await self._partner(me, to)
        if partner is None:
            return
        if partner[1] is not None:
            self._show_typing(partner[1], me, frame.active)
        elif self.live is not None:
            self.live.send_typing(_node_of(to), me, to, frame.active)

    async def remote_typing(self, node: str, sender: str, to: str, active: bool) -> None:
        partner = await self._partner(sender, to) if _node_of(to) == self.node_name else None
        if partner is not None and partner[1] is not None:
            self._show_typing(partner[1], sender, active)

    def _show_typing(self, user_id: int, sender: str, active: bool) -> None:
        self.hub.push(user_id, frames.encode(frames.Typing(conversation=sender, user=sender, active=active)))

    async def _partner(self, a: str, b: str) -> tuple[str, int | None] | None:
        """``b`` and its local user id (None: another node's user) if it shares a conversation with ``a``."""
        return next(((address, local) for address, local in await self._watchers_of(a) if address == b), None)

    @staticmethod
    def _spend(conn: Connection) -> bool:
        """A token bucket per connection: TYPING_BURST at once, TYPING_RATE per second."""
        tokens, then = conn.typing_budget
        now = trio.current_time()
        tokens = min(TYPING_BURST, tokens + (now - then) * TYPING_RATE) if then else TYPING_BURST
        if tokens < 1:
            conn.typing_budget = (tokens, now)
            return False
        conn.typing_budget = (tokens - 1, now)
        return True
