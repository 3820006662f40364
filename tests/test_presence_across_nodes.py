"""Presence and typing across two real nodes (libp2p on loopback, each its own database):
online, away, offline with last seen, hidden presence, typing. A node that falls silent
(SIGKILL) is in test_presence_processes.py."""

from __future__ import annotations

import trio

from cli.client import IncomingMessage, PresenceEvent, TypingEvent
from tests.nodes import new_user, next_of
from tests.test_federation import two_nodes

FAST = {"presence_heartbeat_s": 0.3, "presence_lease_s": 1.5}


async def test_presence_and_typing_cross_nodes_and_hidden_presence_stays_hidden(tmp_path):
    async with two_nodes(tmp_path, **FAST) as (riverside, hilltop):
        alice = await new_user(riverside.web_url, "alice")
        bob = await new_user(hilltop.web_url, "bob")
        carol = await new_user(hilltop.web_url, "carol")  # shares no conversation with alice
        async with alice.connect() as la:
            async with bob.connect() as lb:
                mid = await la.send_text("bob@hilltop", "hi bob")
                await next_of(lb, IncomingMessage, id=mid)
                # bob is online, as alice sees him (his node told hers)
                await next_of(la, PresenceEvent, user="bob@hilltop", state="online")
                await lb.set_presence("away")
                await next_of(la, PresenceEvent, user="bob@hilltop", state="away")
                await lb.set_presence("online")
                await next_of(la, PresenceEvent, user="bob@hilltop", state="online")
                # typing, both ways
                await lb.typing("alice@riverside")
                typing = await next_of(la, TypingEvent, user="bob@hilltop")
                assert typing.active and typing.conversation == "bob@hilltop"
                await la.typing("bob@hilltop", False)
                assert (await next_of(lb, TypingEvent, user="alice@riverside")).active is False
                # carol shares no conversation with alice: her typing reaches no one
                async with carol.connect() as lc:
                    await lc.typing("alice@riverside")
                    await lb.typing("alice@riverside", False)
                    after = await next_of(la, TypingEvent)
                    assert after.user == "bob@hilltop" and not after.active
            # bob closed his connection: offline, with the time he was last seen
            gone = await next_of(la, PresenceEvent, user="bob@hilltop", state="offline")
            assert gone.last_seen is not None and gone.last_seen > 0
            # bob hides his presence: alice (on riverside) and carol (on bob's own node) see
            # him offline with no last seen, and from then on nothing of his comings and goings
            async with carol.connect() as lc:
                await lc.send_text("bob@hilltop", "hi bob, carol here")
                await bob.set_show_presence(False)
                for watcher in (la, lc):
                    hidden = await next_of(watcher, PresenceEvent, user="bob@hilltop", last_seen=None)
                    assert hidden.state == "offline"
                for _ in range(2):
                    async with bob.connect() as lb:
                        await lb.set_presence("away")
                        await lb.set_presence("online")
                for watcher in (la, lc):
                    with trio.move_on_after(1.0):  # (bounded: no news is what is expected)
                        leaked = await next_of(watcher, PresenceEvent, user="bob@hilltop")
                        raise AssertionError(f"hidden presence leaked: {leaked}")
            # a new connection of alice's gets bob's presence from what hilltop said
        async with alice.connect() as la2:
            snap = await next_of(la2, PresenceEvent, user="bob@hilltop")
            assert snap.state == "offline" and snap.last_seen is None
        for client in (alice, bob, carol):
            await client.aclose()
