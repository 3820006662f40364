"""Call signalling through real nodes: devices on one node and across two federated
nodes (libp2p on loopback), with end-to-end encrypted payloads, every callee device
ringing, the first accept winning, busy, reject, missed, and call-history entries."""

from __future__ import annotations

import json
import secrets

import trio

from cli.client import CallEvent, CallLogEvent, ErrorEvent, LiveSession, MootClient
from tests.nodes import PASSWORD, new_user, next_of, running_node
from tests.test_federation import two_nodes


def call_id() -> str:
    return secrets.token_urlsafe(16)


async def second_device(base_url: str, username: str) -> MootClient:
    client = MootClient(base_url)
    await client.login(username, PASSWORD)
    await client.create_device(f"{username}-second")
    return client


async def sealed(client: MootClient, peer: str, cid: str, n: int, body: dict) -> str:
    """A call payload encrypted to ``peer``'s devices, as JSON."""
    return json.dumps(await client.encrypt_payload(peer, body, f"{cid}-{n}", own_devices=False))


async def test_every_device_rings_the_first_accept_wins_and_both_sides_log_the_call(tmp_path):
    async with two_nodes(tmp_path, call_ring_timeout_s=30) as (riverside, hilltop):
        alice = await new_user(riverside.web_url, "alice")
        bob = await new_user(hilltop.web_url, "bob")
        bob2 = await second_device(hilltop.web_url, "bob")
        async with alice.connect() as la, bob.connect() as lb, bob2.connect() as lb2:
            cid = call_id()
            offer = await sealed(alice, "bob@hilltop", cid, 1, {"type": "offer", "sdp": "v=0 alice's offer"})
            await la.call_signal(cid, "offer", "bob@hilltop", media="video", payload=offer)
            rung = [await next_of(live, CallEvent, call_id=cid, kind="offer") for live in (lb, lb2)]
            assert all(r.sender == "alice@riverside" and r.media == "video" for r in rung)
            assert (await bob.open_call_payload(rung[0]))["sdp"] == "v=0 alice's offer"  # end-to-end, via two nodes
            for live in (lb, lb2):
                await live.call_signal(cid, "ringing", "alice@riverside")
            assert (await next_of(la, CallEvent, call_id=cid, kind="ringing")).sender == "bob@hilltop"

            answer = await sealed(bob2, "alice@riverside", cid, 2, {"type": "answer", "sdp": "v=0 bob's answer"})
            await lb2.call_signal(cid, "accept", "alice@riverside", payload=answer)
            accepted = await next_of(la, CallEvent, call_id=cid, kind="accept")
            assert accepted.sender_device == bob2.device
            assert (await alice.open_call_payload(accepted))["sdp"] == "v=0 bob's answer"
            elsewhere = await next_of(lb, CallEvent, call_id=cid, kind="hangup")
            assert elsewhere.reason == "answered_elsewhere" and elsewhere.sender_device == ""
            # the other device is out of the call now
            await lb.call_signal(cid, "accept", "alice@riverside", payload=answer)
            refused = await next_of(lb, ErrorEvent, ref=cid)
            assert refused.code == "answered_elsewhere"

            # candidates go between the two devices in the call only
            await la.call_signal(cid, "candidate", "bob@hilltop", payload=await sealed(alice, "bob@hilltop", cid, 3, {"c": 1}))
            assert (await next_of(lb2, CallEvent, call_id=cid, kind="candidate")).sender == "alice@riverside"
            await lb2.call_signal(cid, "hangup", "alice@riverside")
            assert (await next_of(la, CallEvent, call_id=cid, kind="hangup")).sender == "bob@hilltop"

            mine = await next_of(la, CallLogEvent, call_id=cid)
            theirs = await next_of(lb, CallLogEvent, call_id=cid)
            assert (mine.reason, mine.direction, mine.peer, mine.media) == ("completed", "outgoing", "bob@hilltop", "video")
            assert (theirs.reason, theirs.direction, theirs.peer) == ("completed", "incoming", "alice@riverside")
            assert mine.answered_at is not None and mine.started_at <= mine.answered_at <= mine.ended_at
        # the entry is stored in bob's stream (a device that was offline gets it on reconnect)
        bob_id = (await hilltop.account_repo.get_user("bob")).id
        logged = [e for e in await hilltop.message_repo.backlog(bob_id, 0, 100) if e.kind == "call"]
        assert [e.payload["call_id"] for e in logged] == [cid]
        for client in (alice, bob, bob2):
            await client.aclose()


async def test_reject_busy_and_missed_calls_across_nodes(tmp_path):
    async with two_nodes(tmp_path, call_ring_timeout_s=1.5) as (riverside, hilltop):
        alice = await new_user(riverside.web_url, "alice")
        carol = await new_user(riverside.web_url, "carol")
        bob = await new_user(hilltop.web_url, "bob")
        async with alice.connect() as la, carol.connect() as lc, bob.connect() as lb:
            # rejected
            cid = call_id()
            await la.call_signal(cid, "offer", "bob@hilltop", media="audio", payload="x")
            await next_of(lb, CallEvent, call_id=cid, kind="offer")
            await lb.call_signal(cid, "reject", "alice@riverside")
            assert (await next_of(la, CallEvent, call_id=cid, kind="reject")).sender == "bob@hilltop"
            assert (await next_of(la, CallLogEvent, call_id=cid)).reason == "rejected"
            assert (await next_of(lb, CallLogEvent, call_id=cid)).reason == "rejected"

            # busy: bob is in a call with carol, alice calls him
            busy_call = call_id()
            await lc.call_signal(busy_call, "offer", "bob@hilltop", media="audio", payload="x")
            await next_of(lb, CallEvent, call_id=busy_call, kind="offer")
            await lb.call_signal(busy_call, "accept", "carol@riverside", payload="y")
            await next_of(lc, CallEvent, call_id=busy_call, kind="accept")
            cid = call_id()
            await la.call_signal(cid, "offer", "bob@hilltop", media="video", payload="x")
            busy = await next_of(la, CallEvent, call_id=cid, kind="busy")
            assert busy.sender == "bob@hilltop" and busy.sender_device == ""  # said by bob's node; bob never rang
            assert (await next_of(la, CallLogEvent, call_id=cid)).reason == "busy"
            await lc.call_signal(busy_call, "hangup", "bob@hilltop")
            await next_of(lb, CallEvent, call_id=busy_call, kind="hangup")

            # missed: nobody answers within the ring timeout
            cid = call_id()
            await la.call_signal(cid, "offer", "bob@hilltop", media="audio", payload="x")
            await next_of(lb, CallEvent, call_id=cid, kind="offer")
            missed = await next_of(la, CallEvent, call_id=cid, kind="missed", timeout=10)
            assert missed.sender == "bob@hilltop"
            assert (await next_of(lb, CallEvent, call_id=cid, kind="missed")).sender_device == ""
            assert (await next_of(lb, CallLogEvent, call_id=cid)).reason == "missed"
            assert (await next_of(la, CallLogEvent, call_id=cid)).reason == "missed"
        for client in (alice, carol, bob):
            await client.aclose()


async def test_bad_call_signals_get_clear_errors_and_harm_no_one(tmp_path):
    async with running_node(tmp_path / "solo", node_name="solo") as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        async with alice.connect() as la, bob.connect() as lb:
            await la.call_signal(call_id(), "offer", "nobody@solo", media="audio")
            assert (await next_of(la, ErrorEvent)).code == "unknown_user"
            await la.call_signal(call_id(), "offer", "bob@elsewhere", media="audio")
            assert (await next_of(la, ErrorEvent)).code == "unknown_node"
            await la.call_signal(call_id(), "offer", "bob@solo")  # no media
            assert (await next_of(la, ErrorEvent)).code == "bad_signal"
            await la.call_signal(call_id(), "hangup", "bob@solo")
            assert (await next_of(la, ErrorEvent)).code == "unknown_call"
            await la.call_signal(call_id(), "offer", "bob@solo", media="audio", payload="p" * (70 * 1024))
            assert (await next_of(la, ErrorEvent)).code == "too_large"
            # the connection and the node carry on: a local call rings and is accepted
            cid = call_id()
            await la.call_signal(cid, "offer", "bob@solo", media="audio", payload="sdp")
            got = await next_of(lb, CallEvent, call_id=cid, kind="offer")
            assert got.payload == "sdp" and got.sender_device == alice.device
            await lb.call_signal(cid, "accept", "alice@solo", payload="sdp2")
            assert (await next_of(la, CallEvent, call_id=cid, kind="accept")).payload == "sdp2"
            await la.call_signal(cid, "hangup", "bob@solo")
            assert (await next_of(lb, CallLogEvent, call_id=cid)).reason == "completed"
        for client in (alice, bob):
            await client.aclose()


async def test_a_device_that_drops_out_of_a_call_ends_it_after_the_grace(tmp_path):
    async with running_node(tmp_path / "solo", node_name="solo", call_reconnect_grace_s=0.5) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        async with alice.connect() as la:
            cid = call_id()
            async with bob.connect() as lb:
                await la.call_signal(cid, "offer", "bob@solo", media="audio", payload="sdp")
                await next_of(lb, CallEvent, call_id=cid, kind="offer")
                await lb.call_signal(cid, "accept", "alice@solo", payload="sdp2")
                await next_of(la, CallEvent, call_id=cid, kind="accept")
            # bob's only connection is gone and does not come back
            hangup = await next_of(la, CallEvent, call_id=cid, kind="hangup", timeout=10)
            assert hangup.reason == "failed"
            assert (await next_of(la, CallLogEvent, call_id=cid)).reason == "failed"
        for client in (alice, bob):
            await client.aclose()
