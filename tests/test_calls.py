"""The call state machine (node/calls.py), pushed through in-memory books: no sockets.

``Net`` wires one CallBook per node back to back, the way the glue will: a Relay to
a local user lands in that user's devices' inboxes, a Relay to a remote user is
handed to that user's node's book. Time is whatever the test says it is.
"""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from collections import defaultdict
from dataclasses import replace
from typing import Any

import pytest

from node.calls import (
    NODE_DEVICE,
    TRANSITIONS,
    CallBook,
    CallError,
    Ended,
    Party,
    Relay,
    Signal,
    State,
)
from tests.nodes import REPO

RING = 30.0
GRACE = 10.0
ALICE, BOB, CAROL = "alice@riverside", "bob@hill", "carol@hill"
_ids = itertools.count(1)


def new_id() -> str:
    return f"call-{next(_ids):04d}"


def sig(call_id: str, kind: str, sender: str, device: str, to: str, **extra: Any) -> Signal:
    return Signal(call_id=call_id, kind=kind, sender=sender, sender_device=device, to=to, **extra)  # type: ignore[arg-type]


def offer(call_id: str, sender: str, device: str, to: str, media: str = "audio") -> Signal:
    return sig(call_id, "offer", sender, device, to, media=media, payload=b"sdp-offer")


class Net:
    """Nodes by name, each with a CallBook; users' devices with inboxes."""

    def __init__(self, *names: str, max_hops: int = 8) -> None:
        self.books = {
            name: CallBook(ring_timeout_s=RING, remote_grace_s=GRACE, is_local=lambda a, n=name: a.endswith("@" + n))
            for name in names
        }
        self.devices: dict[str, tuple[str, ...]] = {}
        self.inbox: dict[tuple[str, str], list[Signal]] = defaultdict(list)
        self.ended: dict[str, list[Ended]] = defaultdict(list)
        self.cut: set[str] = set()  # nodes whose incoming federation traffic is lost
        self.max_hops = max_hops

    def user(self, address: str, *devices: str) -> None:
        self.devices[address] = devices

    def book_of(self, address: str) -> CallBook:
        return self.books[address.split("@")[1]]

    def send(self, signal: Signal, now: float) -> None:
        """A device (or a node) hands a signal to its own node."""
        self._run(signal.sender.split("@")[1], self.book_of(signal.sender).handle(signal, now), now)

    def expire(self, node: str, now: float) -> None:
        self._run(node, self.books[node].expire(now), now)

    def gone(self, user: str, device: str, now: float) -> None:
        node = user.split("@")[1]
        self._run(node, self.books[node].device_gone(user, device, now), now)

    def _run(self, node: str, actions: list[Any], now: float) -> None:
        queue = [(node, a) for a in actions]
        hops = 0
        while queue:
            hops += 1
            assert hops <= self.max_hops * 4, "relays do not settle"
            where, action = queue.pop(0)
            if isinstance(action, Ended):
                self.ended[where].append(action)
                continue
            assert isinstance(action, Relay)
            home = action.to_user.split("@")[1]
            if home == where:
                targets = action.devices if action.devices is not None else self.devices[action.to_user]
                for device in targets:
                    if device != action.except_device:
                        self.inbox[(action.to_user, device)].append(action.signal)
            elif home not in self.cut:
                queue += [(home, a) for a in self.books[home].handle(action.signal, now)]

    def kinds(self, user: str, device: str) -> list[str]:
        return [s.kind + (f"/{s.reason}" if s.reason else "") for s in self.inbox[(user, device)]]

    def clear(self) -> None:
        self.inbox.clear()


@pytest.fixture
def one() -> Net:
    net = Net("hill")
    net.user(BOB, "bob-phone", "bob-laptop")
    net.user(CAROL, "carol-phone")
    return net


@pytest.fixture
def two() -> Net:
    net = Net("riverside", "hill")
    net.user(ALICE, "alice-phone", "alice-laptop")
    net.user(BOB, "bob-phone", "bob-laptop")
    net.user(CAROL, "carol-phone")
    return net


# -- one node --------------------------------------------------------------------


def test_offer_rings_every_device_and_the_first_accept_wins(one: Net) -> None:
    c = new_id()
    one.send(offer(c, CAROL, "carol-phone", BOB, "video"), now=100)
    assert one.kinds(BOB, "bob-phone") == one.kinds(BOB, "bob-laptop") == ["offer"]
    assert one.inbox[(BOB, "bob-phone")][0].payload == b"sdp-offer"
    book = one.books["hill"]
    assert book.state_of(c) is State.RINGING and book.call_of(BOB) == c == book.call_of(CAROL)
    one.send(sig(c, "ringing", BOB, "bob-phone", CAROL), now=100.1)
    one.send(sig(c, "ringing", BOB, "bob-laptop", CAROL), now=100.1)
    # The caller's trickled candidates reach every ringing device.
    one.send(sig(c, "candidate", CAROL, "carol-phone", BOB, payload=b"c1"), now=100.2)
    assert one.kinds(CAROL, "carol-phone") == ["ringing", "ringing"]
    assert one.kinds(BOB, "bob-laptop") == ["offer", "candidate"]
    one.clear()

    one.send(sig(c, "accept", BOB, "bob-laptop", CAROL, payload=b"sdp-answer"), now=105)
    assert one.kinds(CAROL, "carol-phone") == ["accept"]
    assert one.inbox[(CAROL, "carol-phone")][0].payload == b"sdp-answer"
    assert one.inbox[(CAROL, "carol-phone")][0].to_device == "carol-phone"
    assert one.kinds(BOB, "bob-phone") == ["hangup/answered_elsewhere"]
    assert one.inbox[(BOB, "bob-phone")][0].sender_device == NODE_DEVICE
    assert one.kinds(BOB, "bob-laptop") == []
    assert book.state_of(c) is State.ACTIVE
    # The loser's late accept is refused as the race it is, and changes nothing.
    with pytest.raises(CallError) as lost:
        one.send(sig(c, "accept", BOB, "bob-phone", CAROL), now=105.01)
    assert lost.value.code == "answered_elsewhere"
    one.clear()

    # From now on only the two devices in the call hear each other.
    one.send(sig(c, "candidate", CAROL, "carol-phone", BOB, payload=b"c2"), now=106)
    one.send(sig(c, "candidate", BOB, "bob-laptop", CAROL, payload=b"c3"), now=106)
    one.send(sig(c, "answer", BOB, "bob-laptop", CAROL, payload=b"again"), now=106)
    assert one.kinds(BOB, "bob-laptop") == ["candidate"] and one.kinds(BOB, "bob-phone") == []
    assert one.kinds(CAROL, "carol-phone") == ["candidate", "answer"]
    with pytest.raises(CallError) as other:
        one.send(sig(c, "candidate", BOB, "bob-phone", CAROL), now=106)
    assert other.value.code == "answered_elsewhere"

    one.send(sig(c, "hangup", CAROL, "carol-phone", BOB), now=160)
    assert one.kinds(BOB, "bob-laptop")[-1] == "hangup"
    assert one.ended["hill"] == [Ended(c, CAROL, BOB, "video", "completed", 100, 105, 160)]
    assert len(book) == 0 and book.call_of(BOB) is None and book.call_of(CAROL) is None
    with pytest.raises(CallError) as late:
        one.send(sig(c, "hangup", BOB, "bob-laptop", CAROL), now=160.1)
    assert late.value.code == "call_ended"


def test_reject_on_one_device_ends_the_call_and_stops_the_others(one: Net) -> None:
    c = new_id()
    one.send(offer(c, CAROL, "carol-phone", BOB), now=0)
    one.clear()
    one.send(sig(c, "reject", BOB, "bob-phone", CAROL), now=3)
    assert one.kinds(CAROL, "carol-phone") == ["reject"]
    assert one.kinds(BOB, "bob-laptop") == ["hangup/rejected"]
    assert one.kinds(BOB, "bob-phone") == []
    assert one.ended["hill"] == [Ended(c, CAROL, BOB, "audio", "rejected", 0, None, 3)]
    assert one.books["hill"].next_deadline() is None


def test_a_device_may_say_busy(one: Net) -> None:
    c = new_id()
    one.send(offer(c, CAROL, "carol-phone", BOB), now=0)
    one.send(sig(c, "busy", BOB, "bob-laptop", CAROL), now=1)
    assert one.kinds(CAROL, "carol-phone") == ["busy"]
    assert one.kinds(BOB, "bob-phone")[-1] == "hangup/busy"
    assert one.ended["hill"][0].reason == "busy"


def test_a_user_in_a_call_is_busy_without_ringing() -> None:
    net = Net("hill")
    net.user(BOB, "bob-phone")
    net.user(CAROL, "carol-phone")
    net.user("dave@hill", "dave-phone")
    first, second = new_id(), new_id()
    net.send(offer(first, CAROL, "carol-phone", BOB), now=0)
    net.clear()
    net.send(offer(second, "dave@hill", "dave-phone", BOB), now=1)
    assert net.kinds(BOB, "bob-phone") == []
    assert net.kinds("dave@hill", "dave-phone") == ["busy/in_call"]
    assert net.ended["hill"] == [Ended(second, "dave@hill", BOB, "audio", "busy", 1, None, 1)]
    assert net.books["hill"].call_of("dave@hill") is None and net.books["hill"].call_of(BOB) == first
    with pytest.raises(CallError) as again:  # the id is spent
        net.send(offer(second, "dave@hill", "dave-phone", BOB), now=2)
    assert again.value.code == "call_ended"
    # A caller is busy too: whoever carol calls while her call rings is not rung.
    with pytest.raises(CallError) as twice:
        net.send(offer(new_id(), CAROL, "carol-phone", "dave@hill"), now=2)
    assert twice.value.code == "already_in_call"


def test_caller_hangup_while_ringing_cancels(one: Net) -> None:
    c = new_id()
    one.send(offer(c, CAROL, "carol-phone", BOB), now=0)
    one.clear()
    one.send(sig(c, "hangup", CAROL, "carol-phone", BOB), now=4)
    assert one.kinds(BOB, "bob-phone") == one.kinds(BOB, "bob-laptop") == ["hangup"]
    assert one.ended["hill"] == [Ended(c, CAROL, BOB, "audio", "cancelled", 0, None, 4)]


def test_ring_timeout_is_missed_on_both_sides(one: Net) -> None:
    c = new_id()
    book = one.books["hill"]
    one.send(offer(c, CAROL, "carol-phone", BOB), now=10)
    assert book.next_deadline() == 10 + RING  # a local callee: no grace
    one.clear()
    one.expire("hill", now=10 + RING - 0.001)
    assert book.state_of(c) is State.RINGING and one.inbox == {}
    one.expire("hill", now=10 + RING)
    assert one.kinds(CAROL, "carol-phone") == ["missed/no_answer"]
    assert one.kinds(BOB, "bob-phone") == one.kinds(BOB, "bob-laptop") == ["missed/no_answer"]
    assert one.ended["hill"] == [Ended(c, CAROL, BOB, "audio", "missed", 10, None, 10 + RING)]
    assert book.next_deadline() is None
    one.expire("hill", now=1000)
    assert len(one.ended["hill"]) == 1


def test_an_answered_call_does_not_time_out(one: Net) -> None:
    c = new_id()
    one.send(offer(c, CAROL, "carol-phone", BOB), now=0)
    one.send(sig(c, "accept", BOB, "bob-phone", CAROL), now=RING - 1)
    assert one.books["hill"].next_deadline() is None
    one.expire("hill", now=RING * 10)
    assert one.books["hill"].state_of(c) is State.ACTIVE and one.ended["hill"] == []


def test_a_device_that_goes_away_ends_only_its_own_call(one: Net) -> None:
    book = one.books["hill"]
    c = new_id()
    one.send(offer(c, CAROL, "carol-phone", BOB), now=0)
    one.gone(BOB, "bob-laptop", now=1)  # one ringing device of several: the others ring on
    one.gone("zed@hill", "zed-phone", now=1)
    assert book.state_of(c) is State.RINGING and one.ended["hill"] == []
    one.send(sig(c, "accept", BOB, "bob-phone", CAROL), now=2)
    one.gone(BOB, "bob-laptop", now=3)
    assert book.state_of(c) is State.ACTIVE
    one.clear()
    one.gone(BOB, "bob-phone", now=9)
    assert one.kinds(CAROL, "carol-phone") == ["hangup/failed"]
    assert one.ended["hill"] == [Ended(c, CAROL, BOB, "audio", "failed", 0, 2, 9)]

    c2 = new_id()
    one.send(offer(c2, CAROL, "carol-phone", BOB), now=20)
    one.clear()
    one.gone(CAROL, "carol-phone", now=21)
    assert one.kinds(BOB, "bob-phone") == ["hangup/failed"]
    assert one.ended["hill"][-1].reason == "failed" and len(book) == 0


# -- bad input -------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"call_id": "short"},
        {"call_id": "has space in it"},
        {"kind": "dial"},
        {"sender": "alice"},
        {"to": "Bob@hill"},
        {"sender_device": "a/b"},
        {"to_device": ""},
        {"media": "smell"},
        {"kind": "offer", "media": None},
        {"payload": "not bytes"},
        {"reason": "x" * 65},
        {"reason": ""},
    ],
)
def test_malformed_signals_are_refused_when_made(fields: dict[str, Any]) -> None:
    base: dict[str, Any] = {
        "call_id": "call-abcdef", "kind": "hangup", "sender": ALICE, "sender_device": "d1", "to": BOB,
    }
    with pytest.raises(CallError) as bad:
        Signal(**{**base, **fields})
    assert bad.value.code == "bad_signal" and bad.value.status == 400


def test_bad_signals_are_refused_and_change_nothing(one: Net) -> None:
    book = one.books["hill"]
    c = new_id()
    one.send(offer(c, CAROL, "carol-phone", BOB), now=0)
    before = (len(book), book.state_of(c), book.next_deadline(), dict(one.inbox))

    def refused(signal: Signal) -> str:
        with pytest.raises(CallError) as err:
            book.handle(signal, 1)
        return err.value.code

    assert refused(sig("call-nosuch", "hangup", CAROL, "carol-phone", BOB)) == "unknown_call"
    assert refused(offer(c, CAROL, "carol-phone", BOB)) == "call_exists"
    assert refused(sig(c, "hangup", "mallory@hill", "m-phone", BOB)) == "not_in_call"
    assert refused(sig(c, "hangup", CAROL, "carol-tablet", BOB)) == "not_in_call"  # not the calling device
    assert refused(sig(c, "accept", CAROL, "carol-phone", BOB)) == "unexpected_signal"  # only the callee accepts
    assert refused(sig(c, "reject", CAROL, "carol-phone", BOB)) == "unexpected_signal"
    assert refused(sig(c, "accept", BOB, "bob-phone", "mallory@hill")) == "not_in_call"
    assert refused(sig(c, "answer", BOB, "bob-phone", CAROL)) == "unexpected_signal"  # accept comes first
    assert refused(sig(c, "candidate", BOB, "bob-phone", CAROL)) == "unexpected_signal"
    assert refused(sig(c, "hangup", BOB, "bob-phone", CAROL)) == "unexpected_signal"  # reject, not hangup
    assert refused(sig(c, "missed", BOB, NODE_DEVICE, CAROL)) == "bad_signal"  # a local user's node is this one
    big = CallBook(is_local=lambda a: True, max_payload_bytes=100)
    with pytest.raises(CallError) as large:
        big.handle(replace(offer(new_id(), CAROL, "carol-phone", BOB), payload=b"x" * 101), 0)
    assert large.value.code == "too_large" and len(big) == 0
    assert refused(offer(new_id(), "x@elsewhere", "x1", "y@elsewhere")) == "not_ours"
    assert refused(offer(new_id(), BOB, "bob-phone", BOB)) == "bad_signal"
    assert refused(sig(new_id(), "offer", "x@elsewhere", NODE_DEVICE, BOB, media="audio")) == "bad_signal"
    assert (len(book), book.state_of(c), book.next_deadline(), dict(one.inbox)) == before


ALL_KINDS = ("offer", "answer", "candidate", "ringing", "accept", "reject", "busy", "hangup", "missed")


@pytest.mark.parametrize("caller_local", [True, False], ids=["on-callers-node", "on-callees-node"])
@pytest.mark.parametrize("state", list(State))
def test_exactly_the_listed_transitions_are_legal(caller_local: bool, state: State) -> None:
    """Every (state, kind, party) a book can see: legal iff it is in TRANSITIONS."""
    home = "riverside" if caller_local else "hill"

    def fresh() -> tuple[CallBook, str]:
        book = CallBook(ring_timeout_s=RING, is_local=lambda a: a.endswith("@" + home))
        c = new_id()
        book.handle(offer(c, ALICE, "alice-phone", BOB), 0)
        if state is State.ACTIVE:
            book.handle(sig(c, "accept", BOB, "bob-phone", ALICE), 1)
        return book, c

    parties = {
        Party.CALLER: (ALICE, "alice-phone", BOB),
        Party.CALLEE: (BOB, "bob-laptop", ALICE),
        Party.ANSWERER: (BOB, "bob-phone", ALICE),
        # Only the other node speaks for its user.
        **({Party.CALLEE_NODE: (BOB, NODE_DEVICE, ALICE)} if caller_local else {Party.CALLER_NODE: (ALICE, NODE_DEVICE, BOB)}),
    }
    checked = 0
    for kind in ALL_KINDS:
        if kind == "offer":
            continue  # offers make calls; refused on a live id above
        for party, (sender, device, to) in parties.items():
            if party is Party.ANSWERER and state is State.RINGING:
                continue  # nobody has answered yet
            book, c = fresh()
            signal = sig(c, kind, sender, device, to)
            legal = (state, kind, party) in TRANSITIONS
            try:
                actions = book.handle(signal, 2)
            except CallError as err:
                assert not legal, f"{kind} from {party} while {state} refused: {err.code}"
                assert book.state_of(c) is state
            else:
                assert legal, f"{kind} from {party} while {state} taken: {actions}"
                assert actions and all(isinstance(a, (Relay, Ended)) for a in actions)
            checked += 1
    assert checked >= 24


# -- two nodes -------------------------------------------------------------------


def agree(net: Net, call_id: str) -> Ended:
    """Both nodes ended the call for the same reason; their records are the same but for clocks."""
    (a,) = [e for e in net.ended["riverside"] if e.call_id == call_id]
    (b,) = [e for e in net.ended["hill"] if e.call_id == call_id]
    assert (a.caller, a.callee, a.media, a.reason, a.answered_at is None) == (
        b.caller, b.callee, b.media, b.reason, b.answered_at is None,
    )
    assert len(net.books["riverside"]) == len(net.books["hill"]) == 0
    return a


def test_across_nodes_a_call_is_answered_on_one_device_and_hung_up(two: Net) -> None:
    c = new_id()
    two.send(offer(c, ALICE, "alice-phone", BOB, "video"), now=0)
    assert two.kinds(BOB, "bob-phone") == two.kinds(BOB, "bob-laptop") == ["offer"]
    assert two.kinds(ALICE, "alice-laptop") == []
    two.send(sig(c, "ringing", BOB, "bob-phone", ALICE), now=0.1)
    two.send(sig(c, "candidate", ALICE, "alice-phone", BOB, payload=b"c"), now=0.2)
    assert two.kinds(ALICE, "alice-phone") == ["ringing"]
    assert two.kinds(BOB, "bob-laptop") == ["offer", "candidate"]
    two.clear()
    two.send(sig(c, "accept", BOB, "bob-laptop", ALICE, payload=b"sdp-answer"), now=2)
    with pytest.raises(CallError):
        two.send(sig(c, "accept", BOB, "bob-phone", ALICE), now=2)
    assert two.kinds(ALICE, "alice-phone") == ["accept"] and two.kinds(ALICE, "alice-laptop") == []
    assert two.kinds(BOB, "bob-phone") == ["hangup/answered_elsewhere"]
    for book in two.books.values():
        assert book.state_of(c) is State.ACTIVE
    two.send(sig(c, "candidate", BOB, "bob-laptop", ALICE), now=3)
    two.send(sig(c, "candidate", ALICE, "alice-phone", BOB), now=3)
    assert two.kinds(BOB, "bob-laptop") == ["candidate"] and two.kinds(BOB, "bob-phone") == ["hangup/answered_elsewhere"]
    two.send(sig(c, "hangup", BOB, "bob-laptop", ALICE), now=50)
    assert two.kinds(ALICE, "alice-phone")[-1] == "hangup"
    assert agree(two, c).reason == "completed"


@pytest.mark.parametrize("how", ["reject", "busy-device", "cancel", "caller-gone"])
def test_across_nodes_both_books_record_the_same_end(two: Net, how: str) -> None:
    c = new_id()
    two.send(offer(c, ALICE, "alice-phone", BOB), now=0)
    two.clear()
    if how == "reject":
        two.send(sig(c, "reject", BOB, "bob-phone", ALICE), now=1)
        assert two.kinds(ALICE, "alice-phone") == ["reject"] and two.kinds(BOB, "bob-laptop") == ["hangup/rejected"]
        assert agree(two, c).reason == "rejected"
    elif how == "busy-device":
        two.send(sig(c, "busy", BOB, "bob-phone", ALICE), now=1)
        assert agree(two, c).reason == "busy"
    elif how == "cancel":
        two.send(sig(c, "hangup", ALICE, "alice-phone", BOB), now=1)
        assert two.kinds(BOB, "bob-phone") == two.kinds(BOB, "bob-laptop") == ["hangup"]
        assert agree(two, c).reason == "cancelled"
    else:
        two.gone(ALICE, "alice-phone", now=1)
        assert two.kinds(BOB, "bob-phone") == ["hangup/failed"]
        assert agree(two, c).reason == "failed"


def test_across_nodes_the_callees_node_says_busy(two: Net) -> None:
    first, second = new_id(), new_id()
    two.send(offer(first, CAROL, "carol-phone", BOB), now=0)  # a call on hill
    two.clear()
    two.send(offer(second, ALICE, "alice-phone", BOB), now=1)
    assert two.kinds(BOB, "bob-phone") == []
    assert two.kinds(ALICE, "alice-phone") == ["busy/in_call"]
    (a,) = two.ended["riverside"]
    (b,) = two.ended["hill"]
    assert a.reason == b.reason == "busy" and a.call_id == b.call_id == second
    assert two.books["hill"].call_of(BOB) == first


def test_across_nodes_the_callees_node_times_out_first_and_both_miss(two: Net) -> None:
    c = new_id()
    two.send(offer(c, ALICE, "alice-phone", BOB), now=0)
    # The caller's node waits longer: the callee's node decides.
    assert two.books["hill"].next_deadline() == RING
    assert two.books["riverside"].next_deadline() == RING + GRACE
    two.clear()
    two.expire("riverside", now=RING)
    two.expire("hill", now=RING)
    assert two.kinds(ALICE, "alice-phone") == ["missed/no_answer"]
    assert two.kinds(BOB, "bob-laptop") == ["missed/no_answer"]
    assert agree(two, c).reason == "missed"
    two.expire("riverside", now=RING + GRACE)
    assert len(two.ended["riverside"]) == 1


def test_a_callee_node_that_never_answers_fails_the_call_on_the_callers_node(two: Net) -> None:
    c = new_id()
    two.cut.add("riverside")  # hill's messages to riverside are lost
    two.send(offer(c, ALICE, "alice-phone", BOB), now=0)
    two.send(sig(c, "accept", BOB, "bob-phone", ALICE), now=1)  # the accept never arrives
    assert two.books["riverside"].state_of(c) is State.RINGING
    two.clear()
    two.expire("riverside", now=RING + GRACE)
    assert two.kinds(ALICE, "alice-phone") == ["hangup/failed"]
    assert two.kinds(BOB, "bob-phone") == ["hangup/failed"]  # hill is told, and ends its side
    # Both say failed; only hill knew it had been answered.
    assert [e.reason for e in two.ended["riverside"] + two.ended["hill"]] == ["failed", "failed"]
    assert two.ended["riverside"][0].answered_at is None and two.ended["hill"][0].answered_at == 1
    assert len(two.books["riverside"]) == len(two.books["hill"]) == 0


def test_simultaneous_hangups_across_nodes_end_the_call_once_on_each(two: Net) -> None:
    c = new_id()
    two.send(offer(c, ALICE, "alice-phone", BOB), now=0)
    two.send(sig(c, "accept", BOB, "bob-phone", ALICE), now=1)
    # Each node takes its own user's hangup before the other's arrives.
    river, hill = two.books["riverside"], two.books["hill"]
    from_alice = river.handle(sig(c, "hangup", ALICE, "alice-phone", BOB), 5)
    from_bob = hill.handle(sig(c, "hangup", BOB, "bob-phone", ALICE), 5)
    for book, actions in ((hill, from_alice), (river, from_bob)):
        (relay,) = [a for a in actions if isinstance(a, Relay)]
        with pytest.raises(CallError) as late:
            book.handle(relay.signal, 5.1)
        assert late.value.code == "call_ended"
    assert [a.reason for a in from_alice + from_bob if isinstance(a, Ended)] == ["completed", "completed"]


# -- limits ----------------------------------------------------------------------


def test_memory_is_bounded() -> None:
    book = CallBook(ring_timeout_s=RING, is_local=lambda a: True, max_calls=3)
    for n in range(3):
        book.handle(offer(f"live-{n:04d}", f"u{n}@hill", "d", f"v{n}@hill"), 0)
    with pytest.raises(CallError) as full:
        book.handle(offer("live-9999", "w@hill", "d", "x@hill"), 0)
    assert full.value.code == "too_many_calls" and len(book) == 3
    book = CallBook(ring_timeout_s=RING, is_local=lambda a: True, max_calls=3)
    # One call rings on (its deadline stays first); thousands are placed and cancelled
    # behind it: the ended ids and the deadline heap stay small all the same.
    book.handle(offer("ringing-on", "r@hill", "d", "s@hill"), 0)
    for n in range(5000):
        c = f"gone-{n:05d}"
        book.handle(offer(c, "p@hill", "d", "q@hill"), 1 + n / 1000)
        book.handle(sig(c, "hangup", "p@hill", "d", "q@hill"), 1 + n / 1000)
        assert book.next_deadline() == RING
    assert len(book._ended) <= 3
    assert len(book._deadlines) <= 2 * 3 + 64 + 1


def test_the_module_does_no_io() -> None:
    code = "import sys, json; import node.calls; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert loaded & {"trio", "asyncio", "socket", "starlette", "sqlalchemy", "libp2p", "aiortc", "trio_asyncio"} == set()
