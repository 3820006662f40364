"""``/moot/live/1``: what nodes tell each other as it happens and never store.

Presence, typing indicators and call signals do not go through the
durable outbox: a presence update that waited out a node's absence would be a lie
by the time it arrived. Each node keeps one live stream per remote node it has
something to tell, beside (not inside) its ``/moot/federation/1`` stream, on the
same libp2p connection: a long batch of stored events never delays a live frame.

- **Sending** (``LiveLinks.send_*``): frames are queued per node and written by
  that node's link task, everything queued at once in one write. When the stream
  cannot be opened or breaks, what was queued is dropped (it is stale), and the
  link waits (backoff with jitter, cut short when the node is seen again). Each new
  stream starts with a presence snapshot from the handler, so nothing dropped is
  missed for long.
- **Receiving**: the opener must be who it says (its hello name pinned to its peer
  id) and speaks only for its own users (session.LiveInbound); a peer that breaks
  the protocol is cut off and refused for a while, like on the federation stream.
  Frames go to the ``LiveHandler`` (node/presence.py) and call signals to the
  ``SignalHandler`` (node/signalling.py).
- Call signals are written ahead of anything else queued for the node.
"""

from __future__ import annotations

import random
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import trio

from federation import wire
from federation.host import FederationStream, HostError
from federation.session import (
    LiveInbound,
    LiveOutbound,
    PeerClosing,
    PresenceReceived,
    SignalReceived,
    TypingReceived,
)
from federation.wire import ProtocolViolation
from node.nursery import first_error
from node.errors import MootError
from node.logs import get_logger

if TYPE_CHECKING:
    from federation.service import FederationService

log = get_logger("moot.federation.live")

MAX_QUEUED = 5000  # frames waiting for one node; beyond that the oldest are dropped
RECEIVE_BYTES = 64 * 1024


class SignalHandler(Protocol):
    """The node's call signalling (node/signalling.py)."""

    async def remote_signal(self, node: str, signal: wire.Signal) -> None:
        """A call signal from ``node``'s user (live.LiveInbound checked the sender)."""


class LiveHandler(Protocol):
    """The node's side of live frames (node/presence.py implements it)."""

    async def live_snapshot(self, node: str) -> list[wire.PresenceUser]:
        """Every local user ``node`` watches, as they are now: sent first on each new stream."""

    async def remote_presence(self, node: str, users: list[wire.PresenceUser], snapshot: bool) -> None:
        """``node`` told us about its users (an empty update is a heartbeat)."""

    async def remote_typing(self, node: str, sender: str, to: str, active: bool) -> None:
        """``sender`` on ``node`` is typing to ``to`` (a local user), or stopped."""


@dataclass
class _Item:
    kind: str  # "presence" | "typing" | "signal"
    users: list[wire.PresenceUser] = field(default_factory=list)
    typing: tuple[str, str, bool] | None = None
    signal: wire.Signal | None = None


@dataclass
class _Link:
    node: str
    queue: deque[_Item] = field(default_factory=deque)
    urgent: deque[_Item] = field(default_factory=deque)  # call signals: written before the rest
    wake: trio.Event = field(default_factory=trio.Event)
    seen: trio.Event = field(default_factory=trio.Event)
    connected: bool = False
    failures: int = 0


class LiveLinks:
    def __init__(self, service: FederationService, handler: LiveHandler | None = None) -> None:
        self.service = service
        self.handler = handler
        self.signals: SignalHandler | None = None
        self._links: dict[str, _Link] = {}
        self._nursery: trio.Nursery | None = None
        self.dropped = 0  # frames dropped because a queue was full

    # -- sending ---------------------------------------------------------------------

    def send_presence(self, node: str, users: list[wire.PresenceUser]) -> None:
        """Queue a presence update for ``node`` (no users: a heartbeat)."""
        self._queue(node, _Item("presence", users=users))

    def send_typing(self, node: str, sender: str, to: str, active: bool) -> None:
        self._queue(node, _Item("typing", typing=(sender, to, active)))

    def send_signal(self, node: str, signal: wire.Signal) -> None:
        """Queue a call signal for ``node``, ahead of presence and typing. Like them it is
        dropped if the node cannot be reached (the call then times out)."""
        self._queue(node, _Item("signal", signal=signal))

    def connected(self, node: str) -> bool:
        link = self._links.get(node)
        return link is not None and link.connected

    def seen(self, node: str) -> None:
        """``node`` is reachable again: a link waiting out a backoff tries now."""
        link = self._links.get(node)
        if link is not None:
            link.seen.set()

    def _queue(self, node: str, item: _Item) -> None:
        link = self._links.get(node)
        if link is None:
            link = self._links[node] = _Link(node)
            if self._nursery is not None:
                self._nursery.start_soon(self._run_link, link)
        queue = link.urgent if item.kind == "signal" else link.queue
        if len(queue) >= MAX_QUEUED:
            queue.popleft()
            self.dropped += 1
        queue.append(item)
        link.wake.set()

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Run every link until cancelled (the federation service's nursery owns this)."""
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
            for link in self._links.values():  # queued before we ran
                nursery.start_soon(self._run_link, link)
            task_status.started()
            try:
                await trio.sleep_forever()
            finally:
                self._nursery = None

    async def _run_link(self, link: _Link) -> None:
        service = self.service
        while True:
            while not (link.queue or link.urgent):
                link.wake = trio.Event()
                await link.wake.wait()
            try:
                try:
                    await self._stream(link)
                except BaseExceptionGroup as group:
                    raise first_error(group) from None
            except Exception as exc:
                if not isinstance(exc, (HostError, ProtocolViolation, trio.BrokenResourceError, trio.ClosedResourceError,
                                        trio.TooSlowError, MootError, OSError)):
                    log.exception("federation.live_failed", node=link.node)
                link.connected = False
                # Stale by the time a stream is open again (the snapshot replaces presence;
                # a call whose signals were lost times out).
                link.queue.clear()
                link.urgent.clear()
                link.failures += 1
                delay = service.backoff.delay(link.failures, random.random())
                log.info("federation.live_unreachable", node=link.node, error=str(exc)[:300], retry_s=round(delay, 1))
                link.seen = trio.Event()
                with trio.move_on_after(delay):
                    await link.seen.wait()

    async def _stream(self, link: _Link) -> None:
        """One live stream: hello, the snapshot, then whatever is queued, as it comes."""
        record = await self.service.repo.node(link.node)
        if record is None or record.peer_id is None or record.blocked:
            raise HostError(f"{link.node} is not a usable peer")
        if self.service.host is None:
            raise HostError("federation is not running")
        stream = await self.service._open(record, wire.LIVE_PROTOCOL_ID)
        session = LiveOutbound(self.service.name, expected_peer=link.node, max_frame=64 * 1024)
        try:
            await stream.send_all(session.start())
            await self.service._read_hello(stream, session)
            snapshot = await self.handler.live_snapshot(link.node) if self.handler is not None else []
            link.queue.clear()  # the snapshot says it all
            await stream.send_all(session.presence(snapshot, snapshot=True))
            link.connected = True
            link.failures = 0
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._read_until_closed, stream, session, link.node)
                while True:
                    while not (link.queue or link.urgent):
                        link.wake = trio.Event()
                        await link.wake.wait()
                    out = bytearray()
                    while link.urgent:
                        item = link.urgent.popleft()
                        assert item.signal is not None
                        out += session.signal(item.signal)
                    while link.queue:
                        item = link.queue.popleft()
                        if item.kind == "presence":
                            out += session.presence(item.users)
                        elif item.typing is not None:
                            out += session.typing(*item.typing)
                    await stream.send_all(bytes(out))
        finally:
            link.connected = False
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.aclose()

    @staticmethod
    async def _read_until_closed(stream: FederationStream, session: LiveOutbound, node: str) -> None:
        """The other end sends only pongs and, before closing, an error."""
        while True:
            data = await stream.receive_some(RECEIVE_BYTES)
            if not data:
                raise trio.BrokenResourceError(f"{node} closed the live stream")
            for event in session.receive_data(data):
                if isinstance(event, PeerClosing):
                    raise ProtocolViolation(event.code, f"{node} closed the live stream: {event.message}")

    # -- receiving -------------------------------------------------------------------

    async def inbound(self, stream: FederationStream) -> None:
        """Serve one live stream another node opened to us."""
        known = await self.service.repo.node_by_peer(stream.remote_peer_id)
        session = LiveInbound(self.service.name, expected_peer=known.name if known else None)

        async def handle(origin: str, event: Any) -> None:
            if isinstance(event, PresenceReceived) and self.handler is not None:
                await self.handler.remote_presence(origin, event.users, event.snapshot)
            elif isinstance(event, TypingReceived) and self.handler is not None:
                await self.handler.remote_typing(origin, event.sender, event.to, event.active)
            elif isinstance(event, SignalReceived) and self.signals is not None:
                await self.signals.remote_signal(origin, event.signal)

        await self.service.serve_inbound(stream, known, session, handle)
