"""Call signalling, sans-IO: which signal goes to whom, and when a call ends.

A ``CallBook`` tracks every live call that involves a user of this node. The glue
feeds it signals (from this node's devices, or from other nodes over federation)
with ``handle(signal, now)``, tells it when a device disconnects
(``device_gone``) and when time passes (``expire`` at ``next_deadline()``), and
carries out the actions it returns: ``Relay`` a signal to a user's devices (a local
user) or to that user's node (a remote user), and record ``Ended`` calls in the
history. No clock, no I/O: every method takes ``now`` in seconds, from one clock
(the glue's choice; the wall clock makes ``Ended`` timestamps usable as history).

Who decides what (docs/calls.md has the whole story): the callee's node decides
for its user's devices (busy, which device's accept wins, the ring timeout); the
caller's node relays and records what it is told, with a longer safety timeout
for a callee node that never answers. A call between two users of this node is
tracked once, and both roles are this node's.

Trust: a signal whose ``sender`` is a local user must come from that user's
authenticated device (the web layer checks ``sender_device``); one whose sender
is remote must come from the sender's own node (the federation layer checks).
Payloads are end-to-end ciphertext: the book only bounds their size.
"""

from __future__ import annotations

import enum
import heapq
import re
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Literal, get_args

from node.errors import MootError

Kind = Literal["offer", "answer", "candidate", "ringing", "accept", "reject", "busy", "hangup", "missed"]
Media = Literal["audio", "video"]
EndReason = Literal["completed", "missed", "rejected", "busy", "cancelled", "failed"]

KINDS: frozenset[str] = frozenset(get_args(Kind))
MEDIA: frozenset[str] = frozenset(get_args(Media))

# The sender_device of a signal a node makes itself (busy, missed, "answered
# elsewhere"): never a device id, which the web layer never lets be empty.
NODE_DEVICE = ""

DEFAULT_RING_TIMEOUT_S = 45.0
# The caller's node gives the callee's node this long beyond the ring timeout to
# say how a call ended before it gives up on it (a node that went away).
DEFAULT_REMOTE_GRACE_S = 15.0
DEFAULT_MAX_CALLS = 10_000
# An encrypted SDP offer with video and a dozen candidates is ~10 KiB.
DEFAULT_MAX_PAYLOAD_BYTES = 64 * 1024

CALL_ID_RE = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
ADDRESS_RE = re.compile(r"^[a-z0-9_.-]{1,64}@[a-z0-9][a-z0-9-]{0,62}$")
DEVICE_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
REASON_MAX = 64


class CallError(MootError):
    """A signal that cannot be taken: the code is what the client or peer node sees.

    Codes: ``bad_signal``, ``too_large``, ``unknown_call``, ``call_ended``,
    ``call_exists``, ``not_in_call``, ``answered_elsewhere``, ``unexpected_signal``,
    ``already_in_call``, ``not_ours``, ``too_many_calls``. Raising changes nothing
    in the book. ``call_ended`` and ``answered_elsewhere`` are normal races (both
    ends hang up at once, two devices accept at once): glue may drop them quietly.
    """

    _STATUS = {"bad_signal": 400, "too_large": 413, "unknown_call": 404, "not_ours": 404, "too_many_calls": 503}

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.status = self._STATUS.get(code, 409)


@dataclass(frozen=True, kw_only=True)
class Signal:
    """One call signal, as a device sends it and as the node relays it.

    ``sender``/``sender_device``: who sent it (``NODE_DEVICE`` when a node made it).
    ``to``: the other party of the call; ``to_device`` is filled in by the node on
    relayed signals when one device is meant, and ignored on what clients send.
    ``media`` is required on an offer. ``payload`` is opaque end-to-end ciphertext
    (SDP, candidates); ``reason`` a short machine word (e.g. "answered_elsewhere").
    Raises CallError("bad_signal") when malformed.
    """

    call_id: str
    kind: Kind
    sender: str
    sender_device: str
    to: str
    to_device: str | None = None
    media: Media | None = None
    payload: bytes = b""
    reason: str | None = None

    def __post_init__(self) -> None:
        def bad(what: str) -> CallError:
            return CallError("bad_signal", f"{what} (call {self.call_id!r}, {self.kind!r})")

        if not isinstance(self.call_id, str) or not CALL_ID_RE.match(self.call_id):
            raise bad("call_id must be 8-64 characters of A-Z a-z 0-9 _ -")
        if self.kind not in KINDS:
            raise bad(f"kind must be one of {sorted(KINDS)}")
        for name in ("sender", "to"):
            value = getattr(self, name)
            if not isinstance(value, str) or not ADDRESS_RE.match(value):
                raise bad(f"{name} must be an address user@node")
        if not isinstance(self.sender_device, str) or (self.sender_device and not DEVICE_RE.match(self.sender_device)):
            raise bad("sender_device must be a device id")
        if self.to_device is not None and (not isinstance(self.to_device, str) or not DEVICE_RE.match(self.to_device)):
            raise bad("to_device must be a device id")
        if self.media is not None and self.media not in MEDIA:
            raise bad("media must be audio or video")
        if self.kind == "offer" and self.media is None:
            raise bad("an offer says which media: audio or video")
        if not isinstance(self.payload, bytes):
            raise bad("payload must be bytes")
        if self.reason is not None and (not isinstance(self.reason, str) or not 0 < len(self.reason) <= REASON_MAX):
            raise bad(f"reason must be a string of 1-{REASON_MAX} characters")

    @property
    def by_node(self) -> bool:
        return self.sender_device == NODE_DEVICE


@dataclass(frozen=True)
class Relay:
    """Deliver ``signal`` to ``to_user``: for a local user to ``devices`` (None: every
    device but ``except_device``); for a remote user to that user's node, whose own
    book decides which devices."""

    signal: Signal
    to_user: str
    devices: tuple[str, ...] | None
    except_device: str | None = None


@dataclass(frozen=True)
class Ended:
    """A call ended: what a call-history entry needs. Times are the ``now`` given."""

    call_id: str
    caller: str
    callee: str
    media: Media
    reason: EndReason
    started_at: float
    answered_at: float | None
    ended_at: float


Action = Relay | Ended


class State(enum.Enum):
    RINGING = "ringing"  # offered; the callee's devices ring
    ACTIVE = "active"  # one callee device accepted; the two devices talk


class Party(enum.Enum):
    """Who a signal comes from, as far as one call is concerned."""

    CALLER = "the calling device"
    CALLEE = "a device of the callee"  # while ringing: any of them
    ANSWERER = "the device that accepted"
    CALLER_NODE = "the caller's node"
    CALLEE_NODE = "the callee's node"


@dataclass
class _Call:
    call_id: str
    caller: str
    caller_device: str
    callee: str
    media: Media
    started_at: float
    deadline: float
    state: State = State.RINGING
    callee_device: str | None = None
    answered_at: float | None = None
    local_users: tuple[str, ...] = field(default=())


class _Step(enum.Enum):
    """What a legal (state, kind, party) does; the table below is every legal one."""

    RELAY_TO_CALLER = enum.auto()  # ringing: the caller sees "ringing"
    RELAY_TO_CALLEE = enum.auto()  # the caller's candidates reach every ringing device
    ACCEPT = enum.auto()
    DECLINE = enum.auto()  # reject, busy, missed: the call ends unanswered
    CANCEL = enum.auto()  # the caller hangs up while it rings
    RELAY_TO_PEER = enum.auto()  # answer, candidate between the two devices in the call
    HANG_UP = enum.auto()


C, E, A, CN, EN = Party.CALLER, Party.CALLEE, Party.ANSWERER, Party.CALLER_NODE, Party.CALLEE_NODE
R, X = State.RINGING, State.ACTIVE

TRANSITIONS: dict[tuple[State, str, Party], _Step] = {
    (R, "ringing", E): _Step.RELAY_TO_CALLER,
    (R, "candidate", C): _Step.RELAY_TO_CALLEE,
    (R, "accept", E): _Step.ACCEPT,
    (R, "reject", E): _Step.DECLINE,
    (R, "busy", E): _Step.DECLINE,
    (R, "reject", EN): _Step.DECLINE,
    (R, "busy", EN): _Step.DECLINE,
    (R, "missed", EN): _Step.DECLINE,
    (R, "hangup", C): _Step.CANCEL,
    (R, "hangup", CN): _Step.CANCEL,
    (X, "answer", C): _Step.RELAY_TO_PEER,
    (X, "answer", A): _Step.RELAY_TO_PEER,
    (X, "candidate", C): _Step.RELAY_TO_PEER,
    (X, "candidate", A): _Step.RELAY_TO_PEER,
    (X, "hangup", C): _Step.HANG_UP,
    (X, "hangup", A): _Step.HANG_UP,
    # The caller's node gave up (its safety timeout) on a call whose accept it never heard.
    (X, "hangup", CN): _Step.HANG_UP,
}
"""Every legal transition. An offer starts a call (``CallBook._offer``); anything
not listed raises CallError. Ended calls leave the book."""

_DECLINED: dict[str, EndReason] = {"reject": "rejected", "busy": "busy", "missed": "missed"}


def node_signal(call: _Call | Signal, kind: Kind, *, sender: str, to: str, reason: str | None) -> Signal:
    """A signal made by a node (``sender_device`` is ``NODE_DEVICE``) on behalf of ``sender``."""
    return Signal(call_id=call.call_id, kind=kind, sender=sender, sender_device=NODE_DEVICE, to=to, reason=reason)


class CallBook:
    """The live calls of this node's users, and the rules that move them.

    ``is_local(address)`` says whether a user lives on this node. ``ring_timeout_s``
    is how long a callee of this node rings before the call is missed. At most
    ``max_calls`` live calls; the ids of the last ``max_calls`` ended ones are kept
    so that late or replayed signals are told apart from unknown ones.
    """

    def __init__(
        self,
        *,
        ring_timeout_s: float = DEFAULT_RING_TIMEOUT_S,
        is_local: Callable[[str], bool],
        remote_grace_s: float = DEFAULT_REMOTE_GRACE_S,
        max_calls: int = DEFAULT_MAX_CALLS,
        max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES,
    ) -> None:
        if ring_timeout_s <= 0 or remote_grace_s < 0 or max_calls <= 0 or max_payload_bytes <= 0:
            raise ValueError("ring_timeout_s, max_calls and max_payload_bytes must be positive, remote_grace_s >= 0")
        self.ring_timeout_s = ring_timeout_s
        self.remote_grace_s = remote_grace_s
        self.max_calls = max_calls
        self.max_payload_bytes = max_payload_bytes
        self._is_local = is_local
        self._calls: dict[str, _Call] = {}
        self._by_user: dict[str, str] = {}  # local user -> their one live call
        self._ended: OrderedDict[str, None] = OrderedDict()
        self._deadlines: list[tuple[float, str]] = []  # heap; entries of calls no longer ringing are skipped

    # -- what the glue asks -------------------------------------------------------

    def __len__(self) -> int:
        return len(self._calls)

    def call_of(self, user: str) -> str | None:
        """The id of the live call a local user is in, if any."""
        return self._by_user.get(user)

    def state_of(self, call_id: str) -> State | None:
        """A live call's state; None when the call is unknown or over."""
        call = self._calls.get(call_id)
        return call.state if call else None

    def next_deadline(self) -> float | None:
        """When ``expire`` next has something to do (a ring timeout), or None."""
        self._drop_stale_deadlines()
        return self._deadlines[0][0] if self._deadlines else None

    # -- inputs -------------------------------------------------------------------

    def handle(self, signal: Signal, now: float) -> list[Action]:
        """Take one signal; return what to relay and which calls ended.

        Raises CallError (and changes nothing) for a signal that is malformed for
        this book, too large, for an unknown or ended call, from someone not in the
        call, or not legal in the call's state (``TRANSITIONS``).
        """
        if len(signal.payload) > self.max_payload_bytes:
            raise CallError("too_large", f"call signal payload exceeds {self.max_payload_bytes} bytes")
        if signal.kind == "offer":
            return self._offer(signal, now)
        call = self._live(signal.call_id)
        party = self._party(call, signal)
        if signal.to != (call.callee if signal.sender == call.caller else call.caller):
            raise CallError("not_in_call", f"{signal.to} is not the other party of call {call.call_id}")
        step = TRANSITIONS.get((call.state, signal.kind, party))
        if step is None:
            if call.state is State.ACTIVE and party is Party.CALLEE:
                raise CallError("answered_elsewhere", f"call {call.call_id} was answered on another device")
            raise CallError("unexpected_signal", f"{signal.kind} from {party.value} while the call is {call.state.value}")
        return self._apply(step, call, signal, now)

    def device_gone(self, user: str, device: str, now: float) -> list[Action]:
        """A device of a local user disconnected: a call it placed or answered ends
        as failed, as if the device had hung up with reason "failed". A device that was only ringing changes nothing: the others
        ring on. Returns the actions, like ``handle``."""
        call_id = self._by_user.get(user)
        call = self._calls.get(call_id) if call_id else None
        if call is None:
            return []
        if user == call.caller and device == call.caller_device:
            to = call.callee
        elif user == call.callee and device == call.callee_device:
            to = call.caller
        else:
            return []
        hangup = Signal(call_id=call.call_id, kind="hangup", sender=user, sender_device=device, to=to, reason="failed")
        return self.handle(hangup, now)

    def expire(self, now: float) -> list[Action]:
        """End every call whose ring timeout passed by ``now``.

        On the callee's node the call is missed: both sides get a node-made
        ``missed``. On the caller's node alone (the callee's node never said how it
        ended, ``remote_grace_s`` after the ring timeout) the call failed: the
        caller's device and the callee's node get a node-made ``hangup``.
        """
        actions: list[Action] = []
        while self._deadlines and self._deadlines[0][0] <= now:
            _, call_id = heapq.heappop(self._deadlines)
            call = self._calls.get(call_id)
            if call is None or call.state is not State.RINGING:
                continue
            if self._is_local(call.callee):
                missed = node_signal(call, "missed", sender=call.callee, to=call.caller, reason="no_answer")
                actions += self._decline(call, missed, now)
            else:
                failed = node_signal(call, "hangup", sender=call.caller, to=call.callee, reason="failed")
                to_caller = node_signal(call, "hangup", sender=call.callee, to=call.caller, reason="failed")
                actions.append(Relay(failed, call.callee, None))
                actions.append(Relay(replace(to_caller, to_device=call.caller_device), call.caller, (call.caller_device,)))
                actions.append(self._end(call, "failed", now))
        return actions

    # -- rules --------------------------------------------------------------------

    def _offer(self, signal: Signal, now: float) -> list[Action]:
        caller, callee = signal.sender, signal.to
        caller_local, callee_local = self._is_local(caller), self._is_local(callee)
        if signal.by_node:
            raise CallError("bad_signal", "an offer comes from a device")
        if not (caller_local or callee_local):
            raise CallError("not_ours", f"neither {caller} nor {callee} lives on this node")
        if caller == callee:
            raise CallError("bad_signal", "a user cannot call themselves")
        if signal.call_id in self._calls:
            raise CallError("call_exists", f"call {signal.call_id} is already under way")
        if signal.call_id in self._ended:
            raise CallError("call_ended", f"call {signal.call_id} is over; a new call needs a new id")
        if caller_local and caller in self._by_user:
            raise CallError("already_in_call", f"{caller} is already in a call")
        if len(self._calls) >= self.max_calls:
            raise CallError("too_many_calls", "this node has too many calls under way")
        assert signal.media is not None  # Signal checks that an offer has media
        call = _Call(
            call_id=signal.call_id, caller=caller, caller_device=signal.sender_device, callee=callee,
            media=signal.media, started_at=now,
            deadline=now + self.ring_timeout_s + (0 if callee_local else self.remote_grace_s),
            local_users=tuple(u for u, local in ((caller, caller_local), (callee, callee_local)) if local),
        )
        if callee_local and callee in self._by_user:
            # Busy is decided here, by the callee's node, without ringing anyone.
            busy = node_signal(signal, "busy", sender=callee, to=caller, reason="in_call")
            self._remember_ended(call.call_id)
            return [
                Relay(replace(busy, to_device=call.caller_device), caller, (call.caller_device,)),
                Ended(call.call_id, caller, callee, call.media, "busy", now, None, now),
            ]
        self._calls[call.call_id] = call
        for user in call.local_users:
            self._by_user[user] = call.call_id
        self._drop_stale_deadlines()
        heapq.heappush(self._deadlines, (call.deadline, call.call_id))
        return [Relay(replace(signal, to_device=None), callee, None)]

    def _apply(self, step: _Step, call: _Call, signal: Signal, now: float) -> list[Action]:
        if step is _Step.RELAY_TO_CALLER:
            return [self._to_caller(call, signal)]
        if step is _Step.RELAY_TO_CALLEE:
            return [Relay(replace(signal, to_device=None), call.callee, None)]
        if step is _Step.ACCEPT:
            return self._accept(call, signal, now)
        if step is _Step.DECLINE:
            return self._decline(call, signal, now)
        if step is _Step.CANCEL:
            actions: list[Action] = [Relay(replace(signal, to_device=None), call.callee, None)]
            return [*actions, self._end(call, "failed" if signal.reason == "failed" else "cancelled", now)]
        if step is _Step.RELAY_TO_PEER:
            return [self._to_peer(call, signal)]
        if step is _Step.HANG_UP:
            return [self._to_peer(call, signal), self._end(call, "failed" if signal.reason == "failed" else "completed", now)]
        raise AssertionError(step)

    def _accept(self, call: _Call, signal: Signal, now: float) -> list[Action]:
        call.state, call.callee_device, call.answered_at = State.ACTIVE, signal.sender_device, now
        actions: list[Action] = [self._to_caller(call, signal)]
        if self._is_local(call.callee):
            # The callee's node decides the race: this accept came first, the others stop ringing.
            elsewhere = node_signal(call, "hangup", sender=call.callee, to=call.callee, reason="answered_elsewhere")
            actions.append(Relay(elsewhere, call.callee, None, except_device=signal.sender_device))
        return actions

    def _decline(self, call: _Call, signal: Signal, now: float) -> list[Action]:
        actions: list[Action] = [self._to_caller(call, signal)]
        if self._is_local(call.callee):
            if signal.kind == "missed":
                actions.append(Relay(replace(signal, to=call.callee), call.callee, None))
            else:
                stop = node_signal(call, "hangup", sender=call.callee, to=call.callee, reason=_DECLINED[signal.kind])
                actions.append(Relay(stop, call.callee, None, except_device=None if signal.by_node else signal.sender_device))
        actions.append(self._end(call, _DECLINED[signal.kind], now))
        return actions

    def _to_caller(self, call: _Call, signal: Signal) -> Relay:
        return Relay(replace(signal, to_device=call.caller_device), call.caller, (call.caller_device,))

    def _to_peer(self, call: _Call, signal: Signal) -> Relay:
        if signal.sender == call.caller:
            devices = (call.callee_device,) if call.callee_device else None
            return Relay(replace(signal, to_device=call.callee_device), call.callee, devices)
        return self._to_caller(call, signal)

    # -- bookkeeping --------------------------------------------------------------

    def _live(self, call_id: str) -> _Call:
        call = self._calls.get(call_id)
        if call is not None:
            return call
        if call_id in self._ended:
            raise CallError("call_ended", f"call {call_id} is over")
        raise CallError("unknown_call", f"no call {call_id}")

    def _party(self, call: _Call, signal: Signal) -> Party:
        if signal.by_node:
            # Only the other node speaks for its user; this node's own signals are never handed back.
            if self._is_local(signal.sender):
                raise CallError("bad_signal", "a signal from this node's user must come from a device")
            if signal.sender == call.caller:
                return Party.CALLER_NODE
            if signal.sender == call.callee:
                return Party.CALLEE_NODE
        elif signal.sender == call.caller and signal.sender_device == call.caller_device:
            return Party.CALLER
        elif signal.sender == call.callee:
            return Party.ANSWERER if signal.sender_device == call.callee_device else Party.CALLEE
        raise CallError("not_in_call", f"{signal.sender} ({signal.sender_device or 'node'}) is not in call {call.call_id}")

    def _end(self, call: _Call, reason: EndReason, now: float) -> Ended:
        del self._calls[call.call_id]
        for user in call.local_users:
            if self._by_user.get(user) == call.call_id:
                del self._by_user[user]
        self._remember_ended(call.call_id)
        return Ended(call.call_id, call.caller, call.callee, call.media, reason, call.started_at, call.answered_at, now)

    def _remember_ended(self, call_id: str) -> None:
        self._ended[call_id] = None
        while len(self._ended) > self.max_calls:
            self._ended.popitem(last=False)

    def _drop_stale_deadlines(self) -> None:
        heap = self._deadlines
        while heap and (heap[0][1] not in self._calls or self._calls[heap[0][1]].state is not State.RINGING):
            heapq.heappop(heap)
        # Calls that ended early leave entries deeper in the heap: rebuild before it grows past the live set.
        if len(heap) > 2 * len(self._calls) + 64:
            self._deadlines = [e for e in heap if e[1] in self._calls and self._calls[e[1]].state is State.RINGING]
            heapq.heapify(self._deadlines)
