"""Federation between real nodes: libp2p hosts on loopback, each node its own database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio

from cli.client import ClientError, IncomingMessage, ReceiptEvent
from tests.nodes import new_user, next_of, running_node

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
