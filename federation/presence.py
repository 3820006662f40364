"""Presence across nodes, as sans-IO state: leases on what other nodes told us, and
the coalescing of what we tell them.

Each node is the only authority on its own users' presence. It tells the nodes
that have an interest (their users share a conversation) about changes, coalesced
per destination, and renews a lease on everything it said with a heartbeat. A node
that falls silent loses its lease: its users are shown offline, with the last time
they were seen, and nothing else breaks. There is no presence store anywhere but in
memory, on the node each user belongs to.

Nothing here does I/O or reads a clock: every method takes ``now`` (seconds, any
monotonic clock), so the timing rules are tested without waiting.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

State = Literal["online", "away", "offline"]


@dataclass(frozen=True, slots=True)
class Seen:
    """A remote user's presence as this node believes it."""

    user: str
    state: State
    last_seen: int | None  # ms since the epoch, as the user's node said


@dataclass
class _NodeLease:
    expires: float | None  # None: the lease ran out; its users are offline until the node speaks again
    heard_ms: int | None = None  # wall-clock time the node was last heard from
    users: dict[str, Seen] = field(default_factory=dict)


class RemotePresence:
    """What other nodes said about their users, valid while their lease runs.

    ``update``, ``replace`` and ``heartbeat`` renew a node's lease for ``lease_s``
    seconds; ``expire`` ends the leases that ran out and returns the users to show
    offline (last seen when their node was last heard from). Offline users are
    remembered with their last-seen time, within ``max_users_per_node``.

    ``now`` is a monotonic clock in seconds; ``wall_ms`` the time of day in
    milliseconds, used only for last-seen times.
    """

    def __init__(self, *, lease_s: float, max_users_per_node: int = 100_000) -> None:
        if lease_s <= 0:
            raise ValueError("lease_s must be positive")
        self.lease_s = lease_s
        self.max_users_per_node = max_users_per_node
        self._nodes: dict[str, _NodeLease] = {}

    def update(self, node: str, seen: Seen, now: float, wall_ms: int | None = None) -> Seen | None:
        """``node`` says this about one of its users. Returns the change to show, or
        None when nothing visible changed. The caller checks that ``seen.user``
        belongs to ``node`` (a node only speaks for its own users)."""
        lease = self._renew(node, now, wall_ms)
        return self._set(lease, seen)

    def replace(self, node: str, users: list[Seen], now: float, wall_ms: int | None = None) -> list[Seen]:
        """``node`` states every user of its that we watch (a snapshot): users it does
        not list are offline. Returns the changes to show."""
        lease = self._renew(node, now, wall_ms)
        listed = {seen.user for seen in users}
        changes = [change for seen in users if (change := self._set(lease, seen)) is not None]
        for user, before in list(lease.users.items()):
            if user not in listed and before.state != "offline":
                change = self._set(lease, Seen(user, "offline", before.last_seen or lease.heard_ms))
                if change is not None:
                    changes.append(change)
        return changes

    def heartbeat(self, node: str, now: float, wall_ms: int | None = None) -> None:
        """``node`` is alive and what it said still holds."""
        self._renew(node, now, wall_ms)

    def expire(self, now: float) -> list[Seen]:
        """End every lease that ran out; returns its users that were not offline, now offline."""
        gone: list[Seen] = []
        for lease in self._nodes.values():
            if lease.expires is None or lease.expires > now:
                continue
            lease.expires = None
            for user, seen in lease.users.items():
                if seen.state != "offline":
                    lease.users[user] = offline = Seen(user, "offline", lease.heard_ms or seen.last_seen)
                    gone.append(offline)
        return gone

    def next_expiry(self) -> float | None:
        """When ``expire`` next has something to do (None: no lease)."""
        return min((lease.expires for lease in self._nodes.values() if lease.expires is not None), default=None)

    def state_of(self, user: str, node: str) -> Seen | None:
        lease = self._nodes.get(node)
        return lease.users.get(user) if lease is not None else None

    def live(self, node: str) -> bool:
        """Whether ``node`` holds a lease now."""
        lease = self._nodes.get(node)
        return lease is not None and lease.expires is not None

    def forget(self, node: str) -> list[Seen]:
        """The node is blocked or gone for good: its users that were not offline, now offline."""
        lease = self._nodes.pop(node, None)
        if lease is None:
            return []
        return [Seen(s.user, "offline", s.last_seen or lease.heard_ms) for s in lease.users.values() if s.state != "offline"]

    def _set(self, lease: _NodeLease, seen: Seen) -> Seen | None:
        before = lease.users.get(seen.user)
        if before == seen:
            return None
        if before is None and len(lease.users) >= self.max_users_per_node:
            return None  # bounded memory: a node cannot make us hold more
        lease.users[seen.user] = seen
        return seen

    def _renew(self, node: str, now: float, wall_ms: int | None) -> _NodeLease:
        lease = self._nodes.get(node)
        if lease is None:
            lease = self._nodes[node] = _NodeLease(expires=now + self.lease_s)
        lease.expires = max(lease.expires or now, now + self.lease_s)
        if wall_ms is not None:
            lease.heard_ms = wall_ms
        return lease


class PresenceOutbox:
    """What this node still has to tell each interested node, coalesced.

    ``changed`` records a local user's new presence for the nodes interested in
    them; only the newest state per (node, user) is kept, so a user who flickers
    between states costs one update. ``due`` hands out what to send now: pending
    changes no more often than every ``min_interval_s`` per node, and a heartbeat
    for every node that heard nothing for ``heartbeat_s``.
    """

    def __init__(self, *, heartbeat_s: float, min_interval_s: float = 0.2) -> None:
        if not 0 < min_interval_s <= heartbeat_s:
            raise ValueError("need 0 < min_interval_s <= heartbeat_s")
        self.heartbeat_s = heartbeat_s
        self.min_interval_s = min_interval_s
        self._pending: dict[str, dict[str, Seen]] = {}
        self._last_sent: dict[str, float] = {}

    def watch(self, node: str, now: float) -> None:
        """``node`` has an interest from now on: it gets heartbeats."""
        self._last_sent.setdefault(node, now - self.heartbeat_s)

    def unwatch(self, node: str) -> None:
        self._pending.pop(node, None)
        self._last_sent.pop(node, None)

    def changed(self, seen: Seen, nodes: set[str], now: float) -> None:
        for node in nodes:
            self.watch(node, now)
            self._pending.setdefault(node, {})[seen.user] = seen

    def due(self, now: float) -> dict[str, list[Seen]]:
        """Per node: the changes to send now (an empty list is a heartbeat)."""
        out: dict[str, list[Seen]] = {}
        for node, last in self._last_sent.items():
            pending = self._pending.get(node)
            if pending and now - last >= self.min_interval_s:
                out[node] = list(pending.values())
            elif now - last >= self.heartbeat_s:
                out[node] = []
        for node in out:
            self._pending.pop(node, None)
            self._last_sent[node] = now
        return out

    def next_due(self) -> float | None:
        """When ``due`` next has something to hand out (None: nobody to tell)."""
        times = []
        for node, last in self._last_sent.items():
            times.append(last + (self.min_interval_s if self._pending.get(node) else self.heartbeat_s))
        return min(times, default=None)
