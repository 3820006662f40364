"""Presence across nodes without a clock or a network: leases, expiry, coalescing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from federation.presence import PresenceOutbox, RemotePresence, Seen
from tests.nodes import REPO

BOB_ON = Seen("bob@hilltop", "online", None)
BOB_OFF = Seen("bob@hilltop", "offline", 1_000)


def test_a_silent_node_loses_its_lease_and_its_users_go_offline_with_last_seen():
    table = RemotePresence(lease_s=30)
    assert table.update("hilltop", Seen("bob@hilltop", "online", None), now=0, wall_ms=5_000) == Seen("bob@hilltop", "online", None)
    assert table.update("meadow", Seen("carol@meadow", "away", None), now=10) is not None
    assert table.next_expiry() == 30
    table.heartbeat("meadow", now=25)  # meadow keeps talking, hilltop does not
    table.heartbeat("hilltop", now=1, wall_ms=6_000)  # (its last words, at 6 s past the epoch)
    assert table.expire(now=30.9) == []
    # bob shows offline, last seen when his node was last heard from
    assert table.expire(now=31) == [Seen("bob@hilltop", "offline", 6_000)]
    assert table.state_of("bob@hilltop", "hilltop") == Seen("bob@hilltop", "offline", 6_000)
    assert not table.live("hilltop") and table.live("meadow")
    assert table.state_of("carol@meadow", "meadow") == Seen("carol@meadow", "away", None)
    assert table.expire(now=54.9) == [] and table.expire(now=55) == [Seen("carol@meadow", "offline", None)]
    assert table.next_expiry() is None
    # hilltop speaks again: a new lease
    assert table.update("hilltop", Seen("bob@hilltop", "online", None), now=60) == Seen("bob@hilltop", "online", None)
    assert table.next_expiry() == 90


def test_updates_show_only_what_changed():
    table = RemotePresence(lease_s=30)
    assert table.update("hilltop", BOB_ON, now=0) == BOB_ON
    assert table.update("hilltop", BOB_ON, now=1) is None  # the same again: nothing to show
    assert table.update("hilltop", BOB_OFF, now=2) == BOB_OFF
    assert table.update("hilltop", BOB_OFF, now=3) is None
    assert table.state_of("bob@hilltop", "hilltop") == BOB_OFF  # remembered, with last seen
    assert table.expire(now=100) == []  # bob was already offline: nothing more to say


def test_a_snapshot_replaces_what_a_node_said_and_unlisted_users_go_offline():
    table = RemotePresence(lease_s=30)
    table.update("hilltop", BOB_ON, now=0, wall_ms=1_000)
    table.update("hilltop", Seen("dan@hilltop", "away", None), now=0)
    # hilltop restarted: its snapshot lists dan online and erin offline, not bob
    changes = table.replace("hilltop", [Seen("dan@hilltop", "online", None), Seen("erin@hilltop", "offline", 900)], now=5, wall_ms=2_000)
    assert sorted(changes, key=lambda s: s.user) == [
        Seen("bob@hilltop", "offline", 2_000), Seen("dan@hilltop", "online", None), Seen("erin@hilltop", "offline", 900),
    ]
    assert table.replace("hilltop", [Seen("dan@hilltop", "online", None)], now=6) == []  # nothing changed
    assert table.next_expiry() == 36


def test_a_node_cannot_make_us_hold_unbounded_presence():
    table = RemotePresence(lease_s=30, max_users_per_node=3)
    shown = [table.update("hilltop", Seen(f"u{i}@hilltop", "online", None), now=0) for i in range(10)]
    assert sum(s is not None for s in shown) == 3
    assert len(table.forget("hilltop")) == 3
    assert table.forget("hilltop") == []


def test_changes_are_coalesced_per_node_and_heartbeats_fill_the_silence():
    out = PresenceOutbox(heartbeat_s=10, min_interval_s=1)
    alice = "alice@riverside"
    out.changed(Seen(alice, "online", None), {"hilltop", "meadow"}, now=0)
    assert out.due(now=0) == {"hilltop": [Seen(alice, "online", None)], "meadow": [Seen(alice, "online", None)]}
    # alice flickers: within the interval only her newest state goes, once
    out.changed(Seen(alice, "away", None), {"hilltop"}, now=0.2)
    out.changed(Seen(alice, "offline", 700), {"hilltop"}, now=0.5)
    assert out.due(now=0.5) == {}
    assert out.next_due() == 1
    assert out.due(now=1) == {"hilltop": [Seen(alice, "offline", 700)]}
    # nothing new: a heartbeat when each node has heard nothing for 10 s
    assert out.due(now=9.9) == {}
    assert out.due(now=10) == {"meadow": []}
    assert out.due(now=11) == {"hilltop": []}
    out.unwatch("meadow")
    assert set(out.due(now=100)) == {"hilltop"}


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        RemotePresence(lease_s=0)
    with pytest.raises(ValueError):
        PresenceOutbox(heartbeat_s=1, min_interval_s=2)


def test_presence_module_imports_no_io_library():
    code = "import sys, json; import federation.presence; print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert set(json.loads(out)) & {"trio", "libp2p", "socket", "zeroconf", "sqlalchemy"} == set()


def _live_pair():
    from federation.session import LiveInbound, LiveOutbound

    out, inb = LiveOutbound("riverside"), LiveInbound("hilltop", max_snapshot=2500)
    assert [type(e).__name__ for e in inb.receive_data(out.start())] == ["PeerReady"]
    assert [type(e).__name__ for e in out.receive_data(inb.start())] == ["PeerReady"]
    return out, inb


def test_live_frames_cross_a_stream_and_big_snapshots_arrive_whole():
    from federation import wire
    from federation.session import PresenceReceived, TypingReceived

    out, inb = _live_pair()
    users = [wire.PresenceUser(user=f"u{i}@riverside", state="online") for i in range(2100)]
    data = out.presence(users, snapshot=True)
    events = []
    for i in range(0, len(data), 777):  # arbitrary cuts
        events += inb.receive_data(data[i:i + 777])
    assert events == [PresenceReceived(users, snapshot=True)]
    assert inb.receive_data(out.presence([])) == [PresenceReceived([], snapshot=False)]  # a heartbeat
    assert inb.receive_data(out.typing("alice@riverside", "bob@hilltop", True)) == [TypingReceived("alice@riverside", "bob@hilltop", True)]


@pytest.mark.parametrize("frame, code", [
    ('{"type":"presence","users":[{"user":"bob@meadow","state":"online"}]}', "wrong_origin"),
    ('{"type":"typing","sender":"bob@meadow","to":"x@hilltop","active":true}', "wrong_origin"),
    ('{"type":"presence","users":[],"more":true}', "bad_snapshot"),
    ('{"type":"presence","users":[{"user":"a@riverside","state":"asleep"}]}', "bad_frame"),
    ('{"type":"batch","events":[{"oid":1,"event":{},"sig":"' + "A" * 86 + '"}]}', "unexpected"),
    ('{"type":"gossip"}', "unknown_type"),
])
def test_a_live_peer_that_lies_or_breaks_the_protocol_is_cut_off(frame, code):
    from federation import wire
    from federation.wire import ProtocolViolation

    _, inb = _live_pair()
    body = frame.encode()
    with pytest.raises(ProtocolViolation) as caught:
        inb.receive_data(len(body).to_bytes(wire.LENGTH_BYTES, "big") + body)
    assert caught.value.code == code


def test_a_snapshot_cannot_grow_without_bound():
    from federation import wire
    from federation.wire import ProtocolViolation

    out, inb = _live_pair()
    users = [wire.PresenceUser(user=f"u{i}@riverside", state="online") for i in range(3000)]
    with pytest.raises(ProtocolViolation) as caught:
        inb.receive_data(out.presence(users, snapshot=True))
    assert caught.value.code == "too_large"
