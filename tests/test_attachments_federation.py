"""``/moot/blobs/1`` between real libp2p hosts: a node serves its blobs only to nodes it
admitted, only for their own users, and only to users in the blob's conversation."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
import trio

from cli.client import IncomingMessage
from federation import blobwire as bw
from federation import wire
from federation.host import open_host
from federation.session import OutboundSession
from node.errors import NotFound
from tests.nodes import new_user, next_of
from tests.test_federation import LOOPBACK, read_frames, two_nodes


async def ask(host: Any, peer: str, request: bw.GetBlob) -> tuple[Any, bytes]:
    """One get_blob on a new stream: the answer frame and the body bytes after it."""
    stream = await host.open_stream(peer, bw.PROTOCOL_ID)
    await stream.send_all(bw.encode_frame(request))
    receiver = bw.BlobReceiver(request)
    body = b""
    with trio.fail_after(10):
        while True:
            data = await stream.receive_some(65536)
            if not data:
                break
            body += receiver.feed(data)
    await stream.aclose()
    return receiver.refused or receiver.header, body


async def test_blobs_go_only_to_admitted_nodes_for_their_own_users_in_the_conversation(tmp_path: Path) -> None:
    async with two_nodes(tmp_path) as (riverside, hilltop):
        alice = await new_user(riverside.web_url, "alice")
        bob = await new_user(hilltop.web_url, "bob")
        await new_user(hilltop.web_url, "carol")
        source = tmp_path / "f.bin"
        source.write_bytes(os.urandom(100_000))
        async with alice.connect() as la, bob.connect() as lb:
            mid, payload = await la.send_attachment("bob@hilltop", source)
            await next_of(lb, IncomingMessage, id=mid)
        digest = payload["blob"]

        # hilltop's own fetch, for bob: the blob; for carol, who is not in the conversation: nothing.
        blob = await hilltop.federation.blobs.fetch("riverside", digest, "bob@hilltop", "alice@riverside", 0, None)
        try:
            got = b"".join([chunk async for chunk in blob.chunks()])
        finally:
            await blob.aclose()
        assert len(got) == blob.size == blob.length and hashlib.sha256(got).hexdigest() == digest
        with pytest.raises(NotFound):
            await hilltop.federation.blobs.fetch("riverside", digest, "carol@hilltop", "alice@riverside", 0, None)
        part = await hilltop.federation.blobs.fetch("riverside", digest, "bob@hilltop", "alice@riverside", 10, 5)
        try:
            assert b"".join([c async for c in part.chunks()]) == got[10:15] and part.size == len(got)
        finally:
            await part.aclose()

        request = bw.GetBlob(digest=digest, user="bob@hilltop", conversation="alice@riverside")
        rogue_key = nacl.signing.SigningKey.generate()
        async with open_host(rogue_key, [LOOPBACK], protocols={}) as rogue:
            peer = await rogue.connect(riverside.federation.host.addrs[0])
            # A node riverside never admitted gets nothing, whatever it asks.
            answer, body = await ask(rogue, peer, request)
            assert answer == bw.Refused("forbidden", answer.message) and body == b""
            # Once admitted as meadow (hello on /moot/federation/1) ...
            stream = await rogue.open_stream(peer, wire.PROTOCOL_ID)
            await stream.send_all(OutboundSession("meadow").start())
            [hello] = await read_frames(stream, wire.Deframer(), 1)
            assert isinstance(hello, wire.Hello)
            # ... it may not ask on behalf of hilltop's bob (a node speaks for its own users),
            answer, body = await ask(rogue, peer, request)
            assert isinstance(answer, bw.Refused) and answer.code == "bad_request" and body == b""
            # and its own user is in no conversation with the blob.
            answer, _ = await ask(rogue, peer, bw.GetBlob(digest=digest, user="eve@meadow", conversation="alice@riverside"))
            assert isinstance(answer, bw.Refused) and answer.code == "not_found"
            answer, _ = await ask(rogue, peer, bw.GetBlob(digest="0" * 64, user="eve@meadow", conversation="alice@riverside"))
            assert isinstance(answer, bw.Refused) and answer.code == "not_found"
            # Garbage is refused with a frame, and the node carries on.
            stream = await rogue.open_stream(peer, bw.PROTOCOL_ID)
            await stream.send_all(wire.encode(wire.Ping(n=1)))
            [refusal] = await read_frames(stream, wire.Deframer(), 1)
            assert isinstance(refusal, wire.Error) and refusal.code in ("unexpected", "unknown_type")
            await stream.aclose()
        assert riverside.federation.blobs.served == 2 and riverside.federation.blobs.refused >= 5
        # bob still gets it through hilltop.
        out = await bob.download_attachment(payload, "alice@riverside", tmp_path / "out.bin")
        assert out.read_bytes() == source.read_bytes()
        for client in (alice, bob):
            await client.aclose()
