"""Federation between real nodes: libp2p hosts on loopback, each node its own database."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import nacl.signing
import pytest
import trio
from click.testing import CliRunner

from cli.client import ClientError, IncomingMessage, MootClient, ReceiptEvent
from cli.main import main
from federation import events as ev
from federation import wire
from federation.host import open_host
from federation.session import OutboundSession
from node.admin import AdminError, admin_call
from tests.nodes import PASSWORD, new_user, next_of, running_node

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


async def knows(node: Any, other: str, timeout: float = 15) -> None:
    """Wait (bounded) until ``node`` has met ``other`` over federation."""
    with trio.fail_after(timeout):
        while True:
            record = await node.federation.repo.node(other)
            if record is not None and record.peer_id is not None:
                return
            await trio.sleep(0.05)


@asynccontextmanager
async def two_nodes(tmp_path: Path, **overrides: Any) -> AsyncIterator[tuple[Any, Any]]:
    """riverside and hilltop; hilltop has riverside as a static peer."""
    async with running_node(tmp_path / "riverside", node_name="riverside", federation_listen=LOOPBACK, **overrides) as r:
        peers = (r.federation.host.addrs[0],)
        async with running_node(
            tmp_path / "hilltop", node_name="hilltop", federation_listen=LOOPBACK, federation_peers=peers, **overrides
        ) as h:
            await knows(h, "riverside")
            await knows(r, "hilltop")
            yield r, h


async def test_users_of_two_nodes_chat_with_delivered_and_read_receipts(tmp_path):
    async with two_nodes(tmp_path) as (riverside, hilltop):
        alice = await new_user(riverside.web_url, "alice")
        bob = await new_user(hilltop.web_url, "bob")
        # alice's node fetched bob's keys from hilltop for her
        [bob_device] = await alice.user_devices("bob@hilltop")
        assert bob_device["device"] == bob.device
        async with alice.connect() as la, bob.connect() as lb:
            mid = await la.send_text("bob@hilltop", "hello across the river")
            got = await next_of(lb, IncomingMessage, id=mid)
            assert got.text == "hello across the river" and got.sender == "alice@riverside"
            assert got.conversation == "alice@riverside"
            delivered = await next_of(la, ReceiptEvent, id=mid, kind="delivered")
            assert delivered.by == "bob@hilltop" and delivered.conversation == "bob@hilltop"
            await lb.mark_read("alice@riverside", mid)
            read = await next_of(la, ReceiptEvent, id=mid, kind="read")
            assert read.by == "bob@hilltop"

            reply = await lb.send_text("alice@riverside", "hello from the hill")
            back = await next_of(la, IncomingMessage, id=reply)
            assert back.text == "hello from the hill" and back.sender == "bob@hilltop"
            await next_of(lb, ReceiptEvent, id=reply, kind="delivered")

        history = await alice.history("bob@hilltop")
        assert {m["id"]: m.get("status") for m in history["messages"]} == {mid: "read", reply: None}
        [conv] = await bob.conversations()
        assert conv["peer"] == "alice@riverside"
        for c in (alice, bob):
            await c.aclose()


async def test_an_unknown_node_or_user_is_a_clear_error_for_the_sender(tmp_path):
    async with two_nodes(tmp_path) as (riverside, _hilltop):
        alice = await new_user(riverside.web_url, "alice")
        with pytest.raises(ClientError) as err:
            await alice.user_devices("carol@meadow")
        assert err.value.code == "unknown_node"
        with pytest.raises(ClientError) as err:
            await alice.user_devices("nobody@hilltop")
        assert err.value.code == "unknown_user"
        async with alice.connect() as la:
            envelope = {
                "v": 1, "id": "m-1", "sender": "alice@riverside", "sender_device": alice.device,
                "conversation": "carol@meadow", "keys": [{"to": "carol@meadow", "device": "d"}],
            }
            with pytest.raises(ClientError) as err:
                await la.send_envelope(envelope)
            assert err.value.code == "unknown_node" and "meadow" in err.value.message
        await alice.aclose()


async def read_frames(stream: Any, deframer: wire.Deframer, count: int) -> list[wire.Frame]:
    """The next ``count`` frames from a raw federation stream (bounded in time)."""
    frames: list[wire.Frame] = []
    with trio.fail_after(10):
        while len(frames) < count:
            data = await stream.receive_some(65536)
            if not data:
                break
            frames += [wire.decode(body) for body in deframer.feed(data)]
    return frames


async def test_forged_and_malformed_events_are_refused_and_harm_no_one(tmp_path):
    async with two_nodes(tmp_path) as (riverside, hilltop):
        alice = await new_user(riverside.web_url, "alice")
        bob = await new_user(hilltop.web_url, "bob")
        rogue_key = nacl.signing.SigningKey.generate()
        async with open_host(rogue_key, [LOOPBACK], protocols={}) as rogue:
            peer = await rogue.connect(riverside.federation.host.addrs[0])
            stream = await rogue.open_stream(peer, wire.PROTOCOL_ID)
            deframer = wire.Deframer()
            session = OutboundSession("rogue")
            await stream.send_all(session.start())
            [hello] = await read_frames(stream, deframer, 1)
            assert isinstance(hello, wire.Hello) and hello.node == "riverside"
            session.receive_data(wire.encode(hello))

            def message(origin: str, sender: str, to: str = "alice@riverside") -> ev.MessageEvent:
                envelope = json.dumps({"v": 1, "id": "x1", "sender": sender, "sender_device": "d", "conversation": to,
                                       "keys": [{"to": to, "device": "d"}]}).encode()
                return ev.MessageEvent(v=1, origin=origin, id=ev.message_event_id(sender, "x1"), ts=0, sender=sender,
                                       sender_device="d", to=to, message_id="x1", envelope=msgspec.Raw(envelope))

            hilltop_key = hilltop.key
            forged = [
                ev.signed(1, message("hilltop", "bob@hilltop"), hilltop_key),  # hilltop's real signature, wrong link
                ev.signed(2, message("rogue", "bob@hilltop"), rogue_key),  # speaks for another node's user
                ev.signed(3, message("hilltop", "bob@hilltop"), rogue_key),  # claims another origin
                ev.signed(4, message("rogue", "eve@rogue", to="nobody@riverside"), rogue_key),  # no such user
            ]
            await stream.send_all(session.send_batch(forged))
            answers = await read_frames(stream, deframer, 5)
            codes = {f.oid: f.code for f in answers if isinstance(f, wire.Reject)}
            assert codes == {1: "bad_signature", 2: "foreign_sender", 3: "wrong_origin", 4: "unknown_user"}
            assert isinstance(answers[-1], wire.Ack) and answers[-1].upto == 4

            # a malformed frame ends the stream, with the reason
            await stream.send_all(b"\x00\x00\x00\x05{oops")
            [goodbye] = await read_frames(stream, deframer, 1)
            assert isinstance(goodbye, wire.Error) and goodbye.code == "bad_frame"
            with trio.fail_after(10):
                assert await stream.receive_some(65536) == b""

        # another rogue, one that keeps sending bad events, is cut off
        rogue_key = nacl.signing.SigningKey.generate()
        async with open_host(rogue_key, [LOOPBACK], protocols={}) as rogue:
            peer = await rogue.connect(riverside.federation.host.addrs[0])
            stream = await rogue.open_stream(peer, wire.PROTOCOL_ID)
            deframer = wire.Deframer()
            session = OutboundSession("rogue2")
            await stream.send_all(session.start())
            session.receive_data(wire.encode((await read_frames(stream, deframer, 1))[0]))
            bad = [ev.signed(i, message("rogue2", "bob@hilltop"), rogue_key) for i in range(1, 31)]
            await stream.send_all(session.send_batch(bad))
            answers = await read_frames(stream, deframer, 40)
            assert isinstance(answers[-1], wire.Error) and answers[-1].code == "misbehaving"
            # and for a while it is not heard at all
            stream = await rogue.open_stream(peer, wire.PROTOCOL_ID)
            await stream.send_all(OutboundSession("rogue2").start())
            [refused] = await read_frames(stream, wire.Deframer(), 1)
            assert isinstance(refused, wire.Error) and refused.code == "backoff"

        # nothing forged was stored, and the real nodes still talk
        assert await alice.conversations() == []
        async with alice.connect() as la, bob.connect() as lb:
            mid = await la.send_text("bob@hilltop", "still here")
            assert (await next_of(lb, IncomingMessage, id=mid)).text == "still here"
        for c in (alice, bob):
            await c.aclose()


async def admin(node: Any, op: str, args: dict[str, Any] | None = None) -> Any:
    return await admin_call(node.config.admin_socket, op, args)


async def test_operators_list_block_unblock_retry_and_add_peers(tmp_path):
    async with two_nodes(tmp_path) as (riverside, hilltop):
        alice = await new_user(riverside.web_url, "alice")
        bob = await new_user(hilltop.web_url, "bob")
        status = await admin(riverside, "status")
        assert status["peer_id"] == riverside.federation.host.peer_id
        assert status["federation_addrs"] == riverside.federation.host.addrs
        [seen] = await admin(riverside, "peers.list")
        assert seen["node"] == "hilltop" and seen["found_by"] == "inbound" and seen["peer_id"] == hilltop.federation.host.peer_id
        assert seen["outbox"] == 0 and not seen["blocked"]
        [dialled] = await admin(hilltop, "peers.list")
        assert dialled["node"] == "riverside" and dialled["found_by"] == "static"
        # the table an operator reads
        result = await trio.to_thread.run_sync(
            lambda: CliRunner().invoke(main, ["--data-dir", str(riverside.config.data_dir), "peers", "list"])
        )
        assert result.exit_code == 0 and "hilltop" in result.stdout and "inbound" in result.stdout

        await admin(riverside, "peers.block", {"node": "hilltop"})
        async with alice.connect() as la, bob.connect() as lb:
            with pytest.raises(ClientError) as err:
                await alice.user_devices("bob@hilltop")
            assert err.value.code == "unknown_node" and "blocked" in err.value.message
            # bob's message is kept on hilltop (sent) but riverside refuses it for now
            mid = await lb.send_text("alice@riverside", "let me in")
            with trio.fail_after(10):
                while not (await admin(hilltop, "peers.list"))[0]["failures"]:
                    await trio.sleep(0.05)
            [waiting] = await admin(hilltop, "peers.list")
            assert waiting["outbox"] == 1 and waiting["retry_in_s"] is not None and not waiting["connected"]
            await admin(riverside, "peers.unblock", {"node": "hilltop"})
            await admin(hilltop, "peers.retry", {"node": "riverside"})  # no need to wait out the backoff
            assert (await next_of(la, IncomingMessage, id=mid, timeout=15)).text == "let me in"
        with pytest.raises(AdminError) as failed:
            await admin(hilltop, "peers.retry", {"node": "nowhere"})
        assert failed.value.code == "not_found"
        assert await admin(hilltop, "peers.add", {"address": riverside.federation.host.addrs[0]}) == {"node": "riverside"}
        with pytest.raises(AdminError) as failed:
            await admin(hilltop, "peers.add", {"address": "/ip4/127.0.0.1/tcp/1"})
        assert failed.value.code in ("bad_request", "unavailable")
        for c in (alice, bob):
            await c.aclose()


async def test_a_denied_node_cannot_federate(tmp_path):
    async with running_node(
        tmp_path / "riverside", node_name="riverside", federation_listen=LOOPBACK, federation_deny=("hilltop",)
    ) as riverside:
        async with running_node(tmp_path / "hilltop", node_name="hilltop", federation_listen=LOOPBACK) as hilltop:
            with pytest.raises(AdminError) as refused:
                await admin(hilltop, "peers.add", {"address": riverside.federation.host.addrs[0]})
            assert refused.value.code == "unavailable" and "forbidden" in refused.value.message
            assert await admin(riverside, "peers.list") == []
        async with running_node(tmp_path / "meadow", node_name="meadow", federation_listen=LOOPBACK) as meadow:
            assert await admin(meadow, "peers.add", {"address": riverside.federation.host.addrs[0]}) == {"node": "riverside"}


async def test_a_new_remote_device_reaches_the_other_nodes_cache(tmp_path):
    async with two_nodes(tmp_path) as (riverside, hilltop):
        alice = await new_user(riverside.web_url, "alice")
        bob = await new_user(hilltop.web_url, "bob")
        async with alice.connect() as la, bob.connect() as lb:
            first = await la.send_text("bob@hilltop", "first")  # riverside now caches bob's one device
            assert "bob@hilltop" in riverside.federation._devices_cache
            await next_of(lb, IncomingMessage, id=first)  # hilltop knows bob talks to riverside
            stale = await alice.encrypt_text("bob@hilltop", "to one device only", "m-stale")
            tablet = MootClient(hilltop.web_url)
            await tablet.login("bob", PASSWORD)
            await tablet.create_device("bob-tablet")
            # hilltop tells riverside, which forgets its copy...
            with trio.fail_after(10):
                while "bob@hilltop" in riverside.federation._devices_cache:
                    await trio.sleep(0.02)
            # ...so a message encrypted to the old list is refused instead of missing the tablet
            with pytest.raises(ClientError) as err:
                await la.send_envelope(stale)
            assert err.value.details["reason"] == "devices_changed"
            assert err.value.details["missing"] == [f"bob@hilltop/{tablet.device}"]
            await la.send_text("bob@hilltop", "to both")  # re-encrypted: accepted
        for c in (alice, bob, tablet):
            await c.aclose()


async def test_messages_from_several_nodes_at_once_reach_a_connected_device_all_and_in_order(tmp_path):
    # Events from two nodes commit in the same group commits; each connection must get
    # its stream in seq order (a later seq pushed first made it skip the earlier one).
    async with running_node(tmp_path / "hub", node_name="hub", federation_listen=LOOPBACK) as hub:
        peers = (hub.federation.host.addrs[0],)
        async with running_node(tmp_path / "east", node_name="east", federation_listen=LOOPBACK, federation_peers=peers) as east, \
                running_node(tmp_path / "west", node_name="west", federation_listen=LOOPBACK, federation_peers=peers) as west:
            await knows(hub, "east")
            await knows(hub, "west")
            carol = await new_user(hub.web_url, "carol")
            senders = [await new_user(node.web_url, f"s{i}") for node in (east, west) for i in range(3)]
            per_sender = 8
            async with carol.connect() as lc:
                lives = []
                async with AsyncExitStack() as stack:
                    for s in senders:
                        lives.append(await stack.enter_async_context(s.connect()))

                    async def send_all(live: Any) -> None:
                        for k in range(per_sender):
                            await live.send_text("carol@hub", f"{live.client.address} {k}")

                    async with trio.open_nursery() as nursery:
                        for live in lives:
                            nursery.start_soon(send_all, live)
                    seqs = []
                    with trio.fail_after(30):
                        while len(seqs) < per_sender * len(senders):
                            event = await lc.next_event()
                            if isinstance(event, IncomingMessage):
                                seqs.append(event.seq)
                assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
            for client in [carol, *senders]:
                await client.aclose()
