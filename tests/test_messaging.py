"""One-to-one messaging through a real node (HTTP + WebSocket on loopback), on SQLite and PostgreSQL."""

from __future__ import annotations

import pytest
import trio

from cli.client import ClientError, IncomingMessage, MootClient, PresenceEvent, ReceiptEvent
from tests.nodes import PASSWORD, new_user, next_of, running_node


async def test_chat_both_ways_with_receipts(tmp_path, db_url):
    async with running_node(tmp_path / "n", db_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        async with alice.connect() as la, bob.connect() as lb:
            mid = await la.send_text("bob@riverside", "hello bob")
            got = await next_of(lb, IncomingMessage, id=mid)
            assert got.text == "hello bob" and got.sender == "alice@riverside"
            assert got.conversation == "alice@riverside"
            # bob's client acknowledged automatically: alice sees delivered.
            delivered = await next_of(la, ReceiptEvent, id=mid, kind="delivered")
            assert delivered.by == "bob@riverside"
            await lb.mark_read("alice@riverside", mid)
            read = await next_of(la, ReceiptEvent, id=mid, kind="read")
            assert read.conversation == "bob@riverside"

            reply = await lb.send_text("alice@riverside", "hi alice")
            back = await next_of(la, IncomingMessage, id=reply)
            assert back.text == "hi alice"

        history = await alice.history("bob@riverside")
        statuses = {m["id"]: m.get("status") for m in history["messages"]}
        assert statuses[mid] == "read"
        assert reply in statuses and statuses[reply] is None  # bob's message: no status for alice
        convs = await bob.conversations()
        assert [c["peer"] for c in convs] == ["alice@riverside"]
        assert convs[0]["unread"] == 0  # bob read alice's only message; his own reply is not unread
        await alice.aclose()
        await bob.aclose()


async def test_offline_backlog_in_order_and_pagination(tmp_path, db_url):
    async with running_node(tmp_path / "n", db_url, backlog_batch=7) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        async with alice.connect() as la:
            ids = [await la.send_text("bob@riverside", f"message {i}") for i in range(30)]
        # bob was offline for all of it: he gets everything, in order, on connect.
        async with bob.connect() as lb:
            got = [await next_of(lb, IncomingMessage) for _ in ids]
            assert [m.id for m in got] == ids
            assert [m.text for m in got] == [f"message {i}" for i in range(30)]
        # acknowledged: a reconnect has no backlog left.
        async with bob.connect() as lb:
            assert lb.ready is not None and lb.ready.cursor >= got[-1].seq
            with trio.move_on_after(0.5):
                event = await lb.next_event()
                assert not isinstance(event, IncomingMessage)
        page1 = await bob.history("alice@riverside", limit=12)
        page2 = await bob.history("alice@riverside", before=page1["before"], limit=12)
        page3 = await bob.history("alice@riverside", before=page2["before"], limit=12)
        seen = [m["id"] for p in (page1, page2, page3) for m in p["messages"]]
        assert seen == list(reversed(ids))
        await alice.aclose()
        await bob.aclose()


async def test_multi_device_sync_and_presence(tmp_path, db_url):
    async with running_node(tmp_path / "n", db_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        # alice's second device: same user, its own keys.
        from cli.client import MootClient
        from tests.nodes import PASSWORD

        alice2 = MootClient(node.web_url)
        await alice2.login("alice", PASSWORD)
        await alice2.create_device("phone")
        async with alice.connect() as la, alice2.connect() as la2, bob.connect() as lb:
            mid = await la.send_text("bob@riverside", "from the laptop")
            # bob gets it; alice's phone gets a copy it can decrypt.
            assert (await next_of(lb, IncomingMessage, id=mid)).text == "from the laptop"
            synced = await next_of(la2, IncomingMessage, id=mid)
            assert synced.text == "from the laptop" and synced.conversation == "bob@riverside"
            # receipts reach both of alice's devices
            await next_of(la, ReceiptEvent, id=mid, kind="delivered")
            await next_of(la2, ReceiptEvent, id=mid, kind="delivered")
            # bob replies: both alice devices decrypt it
            rid = await lb.send_text("alice@riverside", "to both")
            assert (await next_of(la, IncomingMessage, id=rid)).text == "to both"
            assert (await next_of(la2, IncomingMessage, id=rid)).text == "to both"
            # presence: bob goes away -> alice sees offline with last seen
            pass
        async with alice.connect() as la:
            async with bob.connect() as lb:
                await next_of(la, PresenceEvent, user="bob@riverside", state="online")
                del lb
            gone = await next_of(la, PresenceEvent, user="bob@riverside", state="offline")
            assert gone.last_seen is not None
        for c in (alice, alice2, bob):
            await c.aclose()


async def test_read_receipts_can_be_turned_off(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        await bob.set_read_receipts(False)
        async with alice.connect() as la, bob.connect() as lb:
            first = await la.send_text("bob@riverside", "one")
            await next_of(lb, IncomingMessage, id=first)
            await lb.mark_read("alice@riverside", first)
            second = await la.send_text("bob@riverside", "two")
            await next_of(la, ReceiptEvent, id=second, kind="delivered")
            # the read of `first` never reached alice: only delivered receipts arrived
            with trio.move_on_after(0.5):
                while True:
                    event = await la.next_event()
                    assert not (isinstance(event, ReceiptEvent) and event.kind == "read")
        history = await alice.history("bob@riverside")
        assert {m["id"]: m["status"] for m in history["messages"]}[first] in ("delivered", "read")
        await alice.aclose()
        await bob.aclose()


async def test_read_state_stays_hidden_in_history_and_list_when_receipts_are_off(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        async with alice.connect() as la, bob.connect() as lb:
            mid = await la.send_text("bob@riverside", "one")
            await next_of(lb, IncomingMessage, id=mid)
            await next_of(la, ReceiptEvent, id=mid, kind="delivered")
            await lb.mark_read("alice@riverside", mid)
            await lb.flush()
            [conv] = await alice.conversations()
            assert conv["last"]["status"] == "read" and conv["last"]["sender_device"] == alice.device
            await bob.set_read_receipts(False)
        # bob's read marker exists, but alice may no longer learn from it
        history = await alice.history("bob@riverside")
        assert history["messages"][0]["status"] == "delivered"
        [conv] = await alice.conversations()
        assert conv["last"]["status"] == "delivered" and conv["last"]["id"] == mid
        [bconv] = await bob.conversations()
        assert "status" not in bconv["last"] and bconv["unread"] == 0
        await alice.aclose()
        await bob.aclose()


async def test_resend_after_a_device_change_is_a_duplicate_not_a_conflict(tmp_path, db_url):
    """A client that lost `sent` resends the same bytes; a device added meanwhile must
    not force it to re-encrypt (new bytes under the same id would be id_conflict)."""
    async with running_node(tmp_path / "n", db_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        async with alice.connect() as la:
            envelope = await alice.encrypt_text("bob@riverside", "once", "m-1")
            first = await la.send_envelope(envelope)
            assert not first.duplicate
            bob2 = MootClient(node.web_url)
            await bob2.login("bob", PASSWORD)
            await bob2.create_device("bob-tablet")
            again = await la.send_envelope(envelope)
            assert again.duplicate and again.ts == first.ts
            # a new message with stale keys is still refused, naming the new device
            stale = await alice.encrypt_text("bob@riverside", "twice", "m-2")
            stale["keys"] = [k for k in stale["keys"] if k["device"] != bob2.device]
            with pytest.raises(ClientError) as err:
                await la.send_envelope(stale)
            assert err.value.details["reason"] == "devices_changed"
            assert err.value.details["missing"] == [f"bob@riverside/{bob2.device}"]
        for c in (alice, bob, bob2):
            await c.aclose()


async def test_a_new_conversation_introduces_presence_both_ways(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        async with alice.connect() as la, bob.connect() as lb:
            # no conversation yet: neither was told about the other on connect
            await la.send_text("bob@riverside", "first")
            seen_by_alice = await next_of(la, PresenceEvent, user="bob@riverside")
            seen_by_bob = await next_of(lb, PresenceEvent, user="alice@riverside")
            assert seen_by_alice.state == "online" and seen_by_bob.state == "online"
        await alice.aclose()
        await bob.aclose()
