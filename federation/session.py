"""The two ends of a federation stream as sans-IO state machines.

A node that has events for a peer opens a stream and runs an ``OutboundSession``:
it sends ``hello``, waits for the peer's ``hello``, then sends ``batch`` frames of
signed events and learns from ``ack`` what the peer has durably stored. The peer
runs an ``InboundSession``: it checks the frames, hands each batch up, and sends
``ack`` once the caller has stored it. Neither does any I/O: ``receive_data``
takes bytes and returns what happened; methods that send return the bytes to
write. A ``ProtocolViolation`` means the stream must be closed (after writing
``violation_frame``); one bad *event* is not a violation (see events.py).

``Misbehaviour`` decides when a peer that keeps sending bad events is cut off.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from federation import wire
from federation.wire import Ack, Batch, Error, Hello, Ping, Pong, ProtocolViolation, Reject, SignedEvent


@dataclass(frozen=True, slots=True)
class PeerReady:
    """The peer's ``hello`` arrived: it is ``node``."""

    node: str


@dataclass(frozen=True, slots=True)
class BatchReceived:
    events: list[SignedEvent]

    @property
    def upto(self) -> int:
        return self.events[-1].oid


@dataclass(frozen=True, slots=True)
class Acked:
    """The peer holds every event up to ``upto``."""

    upto: int


@dataclass(frozen=True, slots=True)
class Rejected:
    oid: int
    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PeerClosing:
    """The peer sent ``error``: it is closing the stream."""

    code: str
    message: str


@dataclass(frozen=True, slots=True)
class PresenceReceived:
    """The peer's users' presence; ``snapshot``: every user we watch (the rest are offline).
    An empty list without ``snapshot`` is a heartbeat."""

    users: list[wire.PresenceUser]
    snapshot: bool


@dataclass(frozen=True, slots=True)
class TypingReceived:
    sender: str
    to: str
    active: bool


@dataclass(frozen=True, slots=True)
class SignalReceived:
    signal: wire.Signal


SessionEvent = PeerReady | BatchReceived | Acked | Rejected | PeerClosing | PresenceReceived | TypingReceived | SignalReceived


class _Session:
    def __init__(self, local_node: str, *, expected_peer: str | None = None, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        self.local_node = local_node
        self.expected_peer = expected_peer
        self.peer_node: str | None = None
        self._deframer = wire.Deframer(max_frame)
        self._outgoing = bytearray()
        self.closed = False

    def start(self) -> bytes:
        """The opening ``hello``: write it first."""
        return wire.encode(Hello(v=wire.VERSION, node=self.local_node))

    def data_to_send(self) -> bytes:
        """Bytes the session produced by itself (``pong``): write them soon."""
        data = bytes(self._outgoing)
        self._outgoing.clear()
        return data

    def violation_frame(self, exc: ProtocolViolation) -> bytes:
        """The last frame to write before closing because of ``exc``."""
        self.closed = True
        return wire.encode(Error(code=exc.code, message=exc.message[:1000]))

    def ping(self, n: int = 0) -> bytes:
        return wire.encode(Ping(n=n))

    def receive_data(self, data: bytes) -> list[SessionEvent]:
        """Everything ``data`` completes; raises ProtocolViolation."""
        if self.closed:
            raise ProtocolViolation("closed", "data after the stream was closed")
        events: list[SessionEvent] = []
        for body in self._deframer.feed(data):
            frame = wire.decode(body)
            if self.peer_node is None:
                events.append(self._hello(frame))
                continue
            if isinstance(frame, Hello):
                raise ProtocolViolation("unexpected", "a second hello")
            if isinstance(frame, Ping):
                self._outgoing += wire.encode(Pong(n=frame.n))
            elif isinstance(frame, Pong):
                pass
            elif isinstance(frame, Error):
                self.closed = True
                events.append(PeerClosing(frame.code, frame.message))
                break
            else:
                event = self._frame(frame)
                if event is not None:
                    events.append(event)
        return events

    def _hello(self, frame: wire.Frame) -> SessionEvent:
        if isinstance(frame, Error):
            self.closed = True
            return PeerClosing(frame.code, frame.message)
        if not isinstance(frame, Hello):
            raise ProtocolViolation("unexpected", f"{type(frame).__name__.lower()} before hello")
        if frame.v != wire.VERSION:
            raise ProtocolViolation("unsupported_version", f"protocol version {frame.v}")
        if self.expected_peer is not None and frame.node != self.expected_peer:
            raise ProtocolViolation("wrong_node", f"this peer is {self.expected_peer!r}, not {frame.node!r}")
        if frame.node == self.local_node:
            raise ProtocolViolation("wrong_node", f"the peer claims this node's own name {frame.node!r}")
        self.peer_node = frame.node
        return PeerReady(frame.node)

    def _frame(self, frame: wire.Frame) -> SessionEvent | None:
        raise NotImplementedError


class OutboundSession(_Session):
    """The sending end: batches out, acks in.

    ``acked`` is the highest oid the peer holds; ``sent`` the highest written. The
    caller keeps at most ``window`` unacknowledged events in flight and resends from
    ``acked + 1`` on a new stream after this one fails.
    """

    def __init__(
        self, local_node: str, *, acked: int = 0, window: int = 5000, expected_peer: str | None = None,
        max_frame: int = wire.DEFAULT_MAX_FRAME,
    ) -> None:
        super().__init__(local_node, expected_peer=expected_peer, max_frame=max_frame)
        self.acked = acked
        self.sent = acked
        self.window = window
        self._batch_ends: deque[int] = deque()

    @property
    def ready(self) -> bool:
        return self.peer_node is not None and not self.closed

    @property
    def room(self) -> int:
        """How many more events may be sent before an ack."""
        return max(0, self.window - (self.sent - self.acked))

    def send_batch(self, events: list[SignedEvent]) -> bytes:
        if not self.ready:
            raise RuntimeError("send_batch before the peer's hello (or after close)")
        if not events:
            raise ValueError("an empty batch")
        previous = self.sent
        for item in events:
            if item.oid <= previous:
                raise ValueError(f"oids must increase: {item.oid} after {previous}")
            previous = item.oid
        self.sent = previous
        self._batch_ends.append(previous)
        return wire.encode(Batch(events=events))

    def _frame(self, frame: wire.Frame) -> SessionEvent | None:
        if isinstance(frame, Ack):
            if frame.upto > self.sent:
                raise ProtocolViolation("bad_ack", f"ack of {frame.upto}, but only {self.sent} was sent")
            if frame.upto <= self.acked:
                return None  # repeated or stale: harmless
            self.acked = frame.upto
            while self._batch_ends and self._batch_ends[0] <= frame.upto:
                self._batch_ends.popleft()
            return Acked(frame.upto)
        if isinstance(frame, Reject):
            if not (self.acked < frame.oid <= self.sent):
                raise ProtocolViolation("bad_reject", f"reject of {frame.oid}, which is not in flight")
            return Rejected(frame.oid, frame.code, frame.message)
        raise ProtocolViolation("unexpected", f"{type(frame).__name__.lower()} on an outbound stream")


class InboundSession(_Session):
    """The receiving end: batches in, acks out. Oids must increase across batches."""

    def __init__(self, local_node: str, *, expected_peer: str | None = None, max_frame: int = wire.DEFAULT_MAX_FRAME) -> None:
        super().__init__(local_node, expected_peer=expected_peer, max_frame=max_frame)
        self.received = 0
        self.acked = 0

    def _frame(self, frame: wire.Frame) -> SessionEvent | None:
        if isinstance(frame, Batch):
            for item in frame.events:
                if item.oid <= self.received:
                    raise ProtocolViolation("bad_oid", f"oid {item.oid} after {self.received}")
                self.received = item.oid
            return BatchReceived(frame.events)
        raise ProtocolViolation("unexpected", f"{type(frame).__name__.lower()} on an inbound stream")

    def ack(self, upto: int) -> bytes:
        """Everything up to ``upto`` is stored (or rejected): tell the sender."""
        if upto > self.received:
            raise ValueError(f"cannot ack {upto}: only {self.received} arrived")
        self.acked = max(self.acked, upto)
        return wire.encode(Ack(upto=upto))

    def reject(self, oid: int, code: str, message: str = "") -> bytes:
        return wire.encode(Reject(oid=oid, code=code, message=message[:1000]))


class LiveOutbound(_Session):
    """The sending end of ``/moot/live/1``: presence, typing and call signals out, nothing but the
    peer's ``hello`` (and ``pong``) in. Nothing is acknowledged: what is lost with a
    broken stream is stale by the time a new one is open (a snapshot follows)."""

    def presence(self, users: list[wire.PresenceUser], *, snapshot: bool = False) -> bytes:
        """Frames for ``users`` (several when there are many); with no users and no
        ``snapshot`` a heartbeat."""
        if self.peer_node is None or self.closed:
            raise RuntimeError("presence before the peer's hello (or after close)")
        size = wire.MAX_PRESENCE_USERS
        chunks = [users[i:i + size] for i in range(0, len(users), size)] or [[]]
        return wire.encode_many([
            wire.Presence(users=chunk, snapshot=snapshot, more=snapshot and i < len(chunks) - 1)
            for i, chunk in enumerate(chunks)
        ])

    def typing(self, sender: str, to: str, active: bool) -> bytes:
        if self.peer_node is None or self.closed:
            raise RuntimeError("typing before the peer's hello (or after close)")
        return wire.encode(wire.Typing(sender=sender, to=to, active=active))

    def signal(self, signal: wire.Signal) -> bytes:
        if self.peer_node is None or self.closed:
            raise RuntimeError("signal before the peer's hello (or after close)")
        return wire.encode(signal)

    def _frame(self, frame: wire.Frame) -> SessionEvent | None:
        raise ProtocolViolation("unexpected", f"{type(frame).__name__.lower()} on an outbound live stream")


class LiveInbound(_Session):
    """The receiving end of ``/moot/live/1``. A peer speaks only for its own users:
    a frame about anyone else's is a violation (the stream ends). A snapshot's parts
    are put together (at most ``max_snapshot`` users) and handed up whole."""

    def __init__(self, local_node: str, *, expected_peer: str | None = None, max_snapshot: int = 100_000) -> None:
        super().__init__(local_node, expected_peer=expected_peer, max_frame=256 * 1024)
        self.max_snapshot = max_snapshot
        self._snapshot: list[wire.PresenceUser] | None = None

    def _own(self, address: str) -> None:
        if address.rpartition("@")[2] != self.peer_node:
            raise ProtocolViolation("wrong_origin", f"{self.peer_node!r} cannot speak for {address!r}")

    def _frame(self, frame: wire.Frame) -> SessionEvent | None:
        if isinstance(frame, wire.Presence):
            for user in frame.users:
                self._own(user.user)
            if self._snapshot is not None or frame.snapshot:
                if not frame.snapshot:
                    raise ProtocolViolation("bad_snapshot", "an update in the middle of a snapshot")
                parts = (self._snapshot or []) + frame.users
                if len(parts) > self.max_snapshot:
                    raise ProtocolViolation("too_large", f"a snapshot of more than {self.max_snapshot} users")
                if frame.more:
                    self._snapshot = parts
                    return None
                self._snapshot = None
                return PresenceReceived(parts, snapshot=True)
            if frame.more:
                raise ProtocolViolation("bad_snapshot", "more without snapshot")
            return PresenceReceived(list(frame.users), snapshot=False)
        if isinstance(frame, wire.Typing):
            self._own(frame.sender)
            return TypingReceived(frame.sender, frame.to, frame.active)
        if isinstance(frame, wire.Signal):
            self._own(frame.sender)
            return SignalReceived(frame)
        raise ProtocolViolation("unexpected", f"{type(frame).__name__.lower()} on an inbound live stream")


class Misbehaviour:
    """Counts a peer's bad events in a sliding window; says when to cut it off.

    Sans-IO: the caller passes ``now`` (seconds, any monotonic clock).
    """

    def __init__(self, *, limit: int = 20, window_s: float = 60.0) -> None:
        self.limit = limit
        self.window_s = window_s
        self._times: deque[float] = deque()

    def record(self, now: float) -> bool:
        """Note one bad event; True when the peer should be disconnected."""
        self._times.append(now)
        while self._times and self._times[0] <= now - self.window_s:
            self._times.popleft()
        return len(self._times) >= self.limit


class Backoff:
    """Exponential backoff with jitter, capped: ``delay(failures)`` seconds.

    ``initial_s`` for the first retry, doubling up to ``max_s``; the jitter draws
    uniformly from the upper half so that peers that failed together spread out.
    """

    def __init__(self, *, initial_s: float = 1.0, max_s: float = 300.0) -> None:
        self.initial_s = initial_s
        self.max_s = max_s

    def delay(self, failures: int, random: float) -> float:
        """The wait after ``failures`` consecutive failures; ``random`` is in [0, 1)."""
        if failures <= 0:
            return 0.0
        ceiling = min(self.max_s, self.initial_s * 2 ** min(failures - 1, 62))
        return ceiling / 2 + random * ceiling / 2
