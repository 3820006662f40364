"""Live client connections: who is connected from which device, and pushing to them.

A ``Connection`` holds an outbound queue of encoded frames; the web layer's sender
task drains it. Pushing never blocks: a consumer that falls too far behind is
disconnected and will catch up from its durable backlog when it reconnects.

Stream events (messages, receipts) carry the per-user stream ``seq``. While a
connection is still replaying its backlog, live stream events are not queued (the
backlog replay reads them from the database, in order); the connection remembers
the highest one it skipped so replay knows when it has caught up.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

import trio

from node.accounts import Session


class Connection:
    __slots__ = (
        "session", "device_id", "device_public_id", "queue", "urgent", "max_queue", "closed", "close_code",
        "close_reason", "syncing", "sent_seq", "missed_seq", "inflight", "away", "typing_budget", "_wake", "_drained",
        "_slot",
    )

    def __init__(self, session: Session, device_id: int, device_public_id: str, *, max_queue: int) -> None:
        self.session = session
        self.device_id = device_id
        self.device_public_id = device_public_id
        self.queue: deque[bytes] = deque()
        self.urgent: deque[bytes] = deque()  # call signals: sent ahead of the queue
        self.max_queue = max_queue
        self.closed = False
        self.close_code = 1000
        self.close_reason = ""
        self.syncing = True
        self.sent_seq = 0  # highest stream seq queued to this connection
        self.missed_seq = 0  # highest live stream seq skipped while syncing
        self.inflight = 0  # writes submitted and not yet committed
        self.away = False  # the client says its user is not at this device
        self.typing_budget = (0.0, 0.0)  # (tokens, when counted): see PresenceService.typing
        self._wake = trio.Event()
        self._drained: trio.Event | None = None
        self._slot: trio.Event | None = None

    @property
    def user_id(self) -> int:
        return self.session.user_id

    def push(self, data: bytes) -> None:
        """Queue an encoded frame; disconnects a consumer that fell too far behind."""
        self._append(self.queue, data)

    def push_urgent(self, data: bytes) -> None:
        """Queue a frame to go out before everything already queued (call signalling)."""
        self._append(self.urgent, data)

    def _append(self, queue: deque[bytes], data: bytes) -> None:
        if self.closed:
            return
        if len(queue) >= self.max_queue:
            self.close(4008, "slow consumer: reconnect to catch up")
            return
        queue.append(data)
        self._wake.set()

    def push_event(self, seq: int, data: bytes) -> None:
        """Queue a stream event unless replay will deliver it, or it was sent already."""
        if self.syncing:
            self.missed_seq = max(self.missed_seq, seq)
        elif seq > self.sent_seq:
            self.sent_seq = seq
            self.push(data)

    def close(self, code: int = 1000, reason: str = "") -> None:
        if not self.closed:
            self.closed = True
            self.close_code, self.close_reason = code, reason
            self._wake.set()

    async def next_batch(self) -> list[bytes] | None:
        """Wait for queued frames and take them all; None once closed and empty."""
        while not (self.queue or self.urgent):
            if self.closed:
                return None
            await self._wake.wait()
            self._wake = trio.Event()
        batch = [*self.urgent, *self.queue]
        self.urgent.clear()
        self.queue.clear()
        if self._drained is not None:
            self._drained.set()
            self._drained = None
        return batch

    async def wait_queue_below(self, size: int) -> None:
        while len(self.queue) >= size and not self.closed:
            if self._drained is None:
                self._drained = trio.Event()
            await self._drained.wait()

    # Pipelined writes: a connection may have up to N writes waiting for commit.
    async def acquire_write_slot(self, limit: int) -> None:
        while self.inflight >= limit and not self.closed:
            if self._slot is None:
                self._slot = trio.Event()
            await self._slot.wait()
        self.inflight += 1

    def release_write_slot(self) -> None:
        self.inflight -= 1
        if self._slot is not None:
            self._slot.set()
            self._slot = None


class Hub:
    """Registry of live connections by user and session."""

    def __init__(self) -> None:
        self._by_user: dict[int, list[Connection]] = {}

    def add(self, conn: Connection) -> bool:
        """Register; True if this is the user's first live connection (came online)."""
        conns = self._by_user.setdefault(conn.user_id, [])
        conns.append(conn)
        return len(conns) == 1

    def remove(self, conn: Connection) -> bool:
        """Unregister; True if it was the user's last live connection (went offline)."""
        conns = self._by_user.get(conn.user_id)
        if not conns or conn not in conns:
            return False
        conns.remove(conn)
        if not conns:
            del self._by_user[conn.user_id]
            return True
        return False

    def is_online(self, user_id: int) -> bool:
        return user_id in self._by_user

    def state(self, user_id: int) -> str:
        """online (a connection is in use), away (all are idle) or offline (none)."""
        conns = self._by_user.get(user_id)
        if not conns:
            return "offline"
        return "away" if all(c.away for c in conns) else "online"

    def connections(self, user_id: int) -> list[Connection]:
        return self._by_user.get(user_id, [])

    def all(self) -> Iterator[Connection]:
        for conns in self._by_user.values():
            yield from conns

    def push(self, user_id: int, data: bytes, *, skip: Connection | None = None) -> None:
        for conn in self._by_user.get(user_id, ()):
            if conn is not skip:
                conn.push(data)

    def push_event(self, user_id: int, seq: int, data: bytes, *, skip: Connection | None = None) -> None:
        for conn in self._by_user.get(user_id, ()):
            if conn is not skip:
                conn.push_event(seq, data)

    def close_sessions(self, user_id: int, session_id: int | None, reason: str) -> int:
        """Close the user's connections (of one session, or all); returns how many."""
        closed = 0
        for conn in list(self._by_user.get(user_id, ())):
            if session_id is None or conn.session.id == session_id:
                conn.close(4401, reason)
                closed += 1
        return closed

    @property
    def connection_count(self) -> int:
        return sum(len(c) for c in self._by_user.values())

    @property
    def online_users(self) -> int:
        return len(self._by_user)
