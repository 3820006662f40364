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
    assert table.update("hilltop", Seen("bob@hilltop", "online", 500), now=0) == Seen("bob@hilltop", "online", 500)
    assert table.update("meadow", Seen("carol@meadow", "away", None), now=10) is not None
    assert table.next_expiry() == 30
    table.heartbeat("meadow", now=25)  # meadow keeps talking, hilltop does not
    assert table.expire(now=29.9) == []
    assert table.expire(now=30) == [Seen("bob@hilltop", "offline", 500)]
    assert table.state_of("bob@hilltop", "hilltop") is None
    assert table.state_of("carol@meadow", "meadow") == Seen("carol@meadow", "away", None)
    assert table.expire(now=54.9) == [] and table.expire(now=55) == [Seen("carol@meadow", "offline", None)]
    assert table.next_expiry() is None


def test_updates_show_only_what_changed():
    table = RemotePresence(lease_s=30)
    assert table.update("hilltop", BOB_ON, now=0) == BOB_ON
    assert table.update("hilltop", BOB_ON, now=1) is None  # the same again: nothing to show
    assert table.update("hilltop", BOB_OFF, now=2) == BOB_OFF
    assert table.update("hilltop", BOB_OFF, now=3) is None  # offline is not remembered, nor repeated
    assert table.expire(now=100) == []  # bob was already offline: nothing more to say


def test_a_node_cannot_make_us_hold_unbounded_presence():
    table = RemotePresence(lease_s=30, max_users_per_node=3)
    shown = [table.update("hilltop", Seen(f"u{i}@hilltop", "online", None), now=0) for i in range(10)]
    assert sum(s is not None for s in shown) == 3
    assert len(table.forget("hilltop")) == 3


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
