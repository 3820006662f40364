"""Attachments: the encryption format against its vectors, uploads and downloads on one
node (SQLite and PostgreSQL), orphans, refusals, and a file sent across two node
processes and fetched by the recipient through their own node."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import httpx
import pytest
import trio

from cli import attachments as a
from cli import crypto as c
from cli.main import format_storage
from node.admin import admin_call
from cli.client import ClientError, ErrorEvent, IncomingMessage
from tests.nodes import Clock, federating, new_user, next_of, running_node, until

ROOT = Path(__file__).resolve().parent.parent
VECTORS: dict[str, Any] = json.loads((ROOT / "docs" / "crypto_vectors_attachments_v1.json").read_text())


def pattern(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


# -- the format --------------------------------------------------------------------------


@pytest.mark.parametrize("vector", VECTORS["vectors"], ids=lambda v: v["name"])
def test_encryption_reproduces_the_vectors(vector: dict[str, Any]) -> None:
    key, prefix = bytes.fromhex(vector["key_hex"]), bytes.fromhex(vector["prefix_hex"])
    data = pattern(vector["size"])
    assert hashlib.sha256(data).hexdigest() == vector["plaintext_sha256_hex"]
    enc = a.AttachmentEncryptor(key, prefix=prefix)
    # Fed in odd pieces: the output does not depend on how the file is read.
    blob = b"".join(enc.update(data[i:i + 10_007]) for i in range(0, len(data), 10_007)) + enc.finish()
    assert len(blob) == vector["blob_size"] == a.encrypted_size(vector["size"])
    assert enc.digest == hashlib.sha256(blob).hexdigest() == vector["blob_sha256_hex"]
    assert a.plaintext_size(len(blob)) == vector["size"]
    if "blob_hex" in vector:
        assert blob.hex() == vector["blob_hex"]
    dec = a.AttachmentDecryptor(key)
    out = b"".join(dec.feed(blob[i:i + 7_001]) for i in range(0, len(blob), 7_001)) + dec.finish()
    assert out == data and dec.digest == vector["blob_sha256_hex"]


def negative_blob(name: str) -> bytes:
    """The recipes of docs/crypto.md 12.4 (the browser test builds the same bytes)."""
    n = VECTORS["negative"]
    key, prefix = bytes.fromhex(n["key_hex"]), bytes.fromhex(n["prefix_hex"])
    data = pattern(n["size"])
    blob, _ = a.encrypt_bytes(key, data, prefix=prefix)
    cut = a.PREFIX_LEN + a.SEALED_CHUNK
    first, second = blob[a.PREFIX_LEN:cut], blob[cut:]
    if name == "truncated_to_first_chunk":
        return prefix + first
    if name == "reordered_chunks":
        return prefix + second + first
    if name == "extended_with_a_chunk":
        middle = c.aes256gcm_encrypt(key, a.chunk_nonce(prefix, 1), data[a.CHUNK_SIZE:], a.chunk_aad(1, False))
        extra = c.aes256gcm_encrypt(key, a.chunk_nonce(prefix, 2), b"more", a.chunk_aad(2, True))
        return prefix + first + middle + extra
    if name == "flipped_bit":
        flipped = bytearray(blob)
        flipped[a.PREFIX_LEN + 5] ^= 1
        return bytes(flipped)
    if name == "last_byte_cut":
        return blob[:-1]
    if name == "other_prefix":
        return bytes.fromhex(n["other_prefix_hex"]) + blob[a.PREFIX_LEN:]
    if name == "prefix_only":
        return prefix
    raise AssertionError(name)


@pytest.mark.parametrize("case", VECTORS["negative"]["cases"], ids=lambda v: v["name"])
def test_damaged_blobs_do_not_decrypt(case: dict[str, Any]) -> None:
    blob = negative_blob(case["name"])
    assert hashlib.sha256(blob).hexdigest() == case["blob_sha256_hex"]
    with pytest.raises(c.CryptoError) as err:
        a.decrypt_bytes(bytes.fromhex(VECTORS["negative"]["key_hex"]), blob)
    assert err.value.code == case["error"] == "decryption_failed"


def test_a_blob_must_match_the_digest_the_message_names() -> None:
    key = a.new_file_key()
    blob, digest = a.encrypt_bytes(key, b"x" * 1000)
    assert a.decrypt_bytes(key, blob, digest) == b"x" * 1000
    with pytest.raises(c.DecryptionFailed):
        a.decrypt_bytes(key, blob, "0" * 64)
    with pytest.raises(c.CryptoError):
        a.plaintext_size(8 + 65552 + 16)  # an empty chunk after a full one is never made


# -- one node ------------------------------------------------------------------------------


def write_file(path: Path, size: int) -> Path:
    path.write_bytes(os.urandom(size))
    return path


def blob_files(data_dir: Path) -> list[Path]:
    root = data_dir / "blobs"
    return [p for p in root.rglob("*") if p.is_file()] if root.exists() else []


async def raw_upload(base_url: str, token: str, peer: str, body: bytes, **headers: str) -> httpx.Response:
    async with httpx.AsyncClient(base_url=base_url) as http:
        return await http.post(
            "/api/v1/attachments", params={"conversation": peer}, content=body,
            headers={"authorization": f"Bearer {token}", "content-type": "application/octet-stream", **headers},
        )


async def test_a_file_goes_to_the_peer_and_strangers_are_refused(tmp_path: Path, db_url: str) -> None:
    async with running_node(tmp_path / "n", db_url) as node:
        alice, bob, carol = [await new_user(node.web_url, u) for u in ("alice", "bob", "carol")]
        source = write_file(tmp_path / "photo.jpg", 200_000)
        async with alice.connect() as la, bob.connect() as lb:
            mid, payload = await la.send_attachment("bob@riverside", source, mime="image/jpeg", caption="look")
            got = await next_of(lb, IncomingMessage, id=mid)
            assert got.payload is not None and got.payload["type"] == "attachment"
            assert got.payload["blob"] == payload["blob"] and got.payload["text"] == "look"
            assert got.payload["name"] == "photo.jpg" and got.payload["size"] == 200_000
        out = await bob.download_attachment(got.payload, "alice@riverside", tmp_path / "got.jpg")
        assert out.read_bytes() == source.read_bytes()
        # The node stored ciphertext only: neither the file nor its name is on disk.
        [stored] = blob_files(node.config.data_dir)
        assert stored.name == payload["blob"] and source.read_bytes()[:64] not in stored.read_bytes()
        assert stored.stat().st_size == a.encrypted_size(200_000)
        # carol is in no conversation with it, whichever one she names.
        for peer in ("alice@riverside", "bob@riverside"):
            with pytest.raises(ClientError) as err:
                await carol.download_attachment(got.payload, peer, tmp_path / "stolen")
            assert err.value.code == "not_found"
        assert not (tmp_path / "stolen").exists()
        # A range of the ciphertext, with Content-Range.
        async with httpx.AsyncClient(base_url=node.web_url) as http:
            r = await http.get(
                f"/api/v1/attachments/{payload['blob']}", params={"conversation": "alice@riverside"},
                headers={"authorization": f"Bearer {bob.token}", "range": "bytes=10-19"},
            )
            assert r.status_code == 206 and r.content == stored.read_bytes()[10:20]
            assert r.headers["content-range"] == f"bytes 10-19/{stored.stat().st_size}"
            r = await http.get(
                f"/api/v1/attachments/{payload['blob']}", params={"conversation": "alice@riverside"},
                headers={"authorization": f"Bearer {bob.token}", "range": f"bytes={stored.stat().st_size}-"},
            )
            assert r.status_code == 416 and r.json()["error"]["code"] == "bad_range"
        used = await node.attachments.storage_used((await node.account_repo.get_user("alice")).id)
        assert used == {"attachments": 1, "attachment_bytes": a.encrypted_size(200_000)}
        # `moot user show` counts it in the user's storage.
        shown = await admin_call(node.config.admin_socket, "user.show", {"username": "alice"})
        assert shown["storage"]["attachment_bytes"] == a.encrypted_size(200_000)
        assert shown["storage"]["total_bytes"] > a.encrypted_size(200_000)
        assert "attachments 195.4 KiB (1)" in format_storage(shown["storage"])
        for client in (alice, bob, carol):
            await client.aclose()


async def test_bad_uploads_are_refused_and_leave_nothing_on_disk(tmp_path: Path, sqlite_url: str) -> None:
    limit = 64 * 1024
    async with running_node(tmp_path / "n", sqlite_url, max_attachment_bytes=limit) as node:
        alice = await new_user(node.web_url, "alice")
        await new_user(node.web_url, "bob")
        assert (await alice.limits())["max_attachment_bytes"] == limit
        # The client library refuses before sending; the node refuses by the header alone.
        with pytest.raises(ClientError) as err:
            await alice.upload_attachment("bob@riverside", write_file(tmp_path / "big", limit))
        assert err.value.code == "too_large"
        big = a.encrypted_size(limit)
        r = await raw_upload(node.web_url, alice.token or "", "bob@riverside", os.urandom(big))
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert r.json()["error"]["details"]["limit"] == limit
        # No length: refused (the cap is checked before a byte is stored).
        async def chunks():
            yield os.urandom(100)

        async with httpx.AsyncClient(base_url=node.web_url) as http:
            r = await http.post(
                "/api/v1/attachments", params={"conversation": "bob@riverside"}, content=chunks(),
                headers={"authorization": f"Bearer {alice.token}", "content-type": "application/octet-stream"},
            )
        assert r.status_code == 411 and r.json()["error"]["code"] == "length_required"
        cases = [
            ("bob@riverside", os.urandom(10), {}, 400, "bad_request"),  # not the size of any attachment
            ("bob@riverside", os.urandom(100), {"content-type": "text/plain"}, 400, "bad_request"),
            ("nobody@riverside", os.urandom(100), {}, 404, "unknown_user"),
            ("alice@riverside", os.urandom(100), {}, 400, "bad_request"),
            ("not an address", os.urandom(100), {}, 400, "bad_frame"),
        ]
        for peer, body, headers, status, code in cases:
            r = await raw_upload(node.web_url, alice.token or "", peer, body, **headers)
            assert (r.status_code, r.json()["error"]["code"]) == (status, code), (peer, r.text)
        # A body that stops short of its Content-Length (the client went away).
        with trio.fail_after(10):
            stream = await trio.open_tcp_stream("127.0.0.1", node.web_port)
            await stream.send_all(
                f"POST /api/v1/attachments?conversation=bob@riverside HTTP/1.1\r\nHost: x\r\n"
                f"Authorization: Bearer {alice.token}\r\nContent-Type: application/octet-stream\r\n"
                f"Content-Length: 50000\r\n\r\n".encode() + os.urandom(20_000)
            )
            await stream.aclose()
        # Unauthenticated requests get nothing.
        async with httpx.AsyncClient(base_url=node.web_url) as http:
            r = await http.post("/api/v1/attachments", params={"conversation": "bob@riverside"}, content=b"x" * 100,
                                headers={"content-type": "application/octet-stream"})
            assert r.status_code == 401
        await until(lambda: _no_uploads(node), 5, "the cut-short upload to be dropped")
        assert blob_files(node.config.data_dir) == []
        assert await node.attachments.repo.totals() == (0, 0)
        await alice.aclose()


async def _no_uploads(node: Any) -> bool:
    return not any((node.config.data_dir / "blobs" / "tmp").iterdir())


async def test_bad_ids_and_unknown_blobs_in_messages_and_downloads(tmp_path: Path, sqlite_url: str) -> None:
    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice, bob, carol = [await new_user(node.web_url, u) for u in ("alice", "bob", "carol")]
        source = write_file(tmp_path / "doc.pdf", 5000)
        mine = await carol.upload_attachment("alice@riverside", source)  # carol's, for another conversation
        async with alice.connect() as la:
            ours = await alice.upload_attachment("bob@riverside", source)
            for blobs, why in (([mine["blob"]], "someone else's upload"), (["f" * 64], "never uploaded")):
                with pytest.raises(ClientError) as err:
                    await la.send_payload("bob@riverside", {"type": "text", "text": why}, attachments=blobs)
                assert err.value.code == "bad_request" and err.value.details["reason"] == "unknown_attachment", why
            # A malformed id: the frame itself is refused (no message id can be named).
            envelope = await alice.encrypt_payload("bob@riverside", {"type": "text", "text": "x"}, "m-bad-id")
            await la.ws.send_message(json.dumps({"type": "send", "envelope": envelope, "attachments": ["NOT-HEX"]}))
            bad = await next_of(la, ErrorEvent)
            assert bad.code == "bad_frame" and "attachments" in bad.message
            # The refused sends stored nothing: bob's history is empty.
            assert (await bob.history("alice@riverside"))["messages"] == []
            # An upload for the conversation with bob cannot go to carol.
            with pytest.raises(ClientError) as err:
                await la.send_payload("carol@riverside", {"type": "text", "text": "x"}, attachments=[ours["blob"]])
            assert err.value.details["reason"] == "unknown_attachment"
            await la.send_payload("bob@riverside", {"type": "text", "text": "ok"}, attachments=[ours["blob"]])
        async with httpx.AsyncClient(base_url=node.web_url) as http:
            auth = {"authorization": f"Bearer {bob.token}"}
            for path, params, status, code in (
                ("/api/v1/attachments/xyz", {"conversation": "alice@riverside"}, 400, "bad_request"),
                (f"/api/v1/attachments/{'0' * 64}", {"conversation": "alice@riverside"}, 404, "not_found"),
                (f"/api/v1/attachments/{ours['blob']}", {}, 400, "bad_request"),
                (f"/api/v1/attachments/{ours['blob']}", {"conversation": "nobody"}, 400, "bad_frame"),
                (f"/api/v1/attachments/{ours['blob']}", {"conversation": "alice@riverside", "node": "meadow"}, 404, "not_found"),
                (f"/api/v1/attachments/{mine['blob']}", {"conversation": "alice@riverside"}, 404, "not_found"),
            ):
                r = await http.get(path, params=params, headers=auth)
                assert (r.status_code, r.json()["error"]["code"]) == (status, code), (path, params, r.text)
            r = await http.get(f"/api/v1/attachments/{ours['blob']}", params={"conversation": "alice@riverside"}, headers=auth)
            assert r.status_code == 200 and hashlib.sha256(r.content).hexdigest() == ours["blob"]
        for client in (alice, bob, carol):
            await client.aclose()


async def test_orphans_go_after_their_ttl_and_carried_blobs_stay(tmp_path: Path, db_url: str) -> None:
    clock = Clock()
    async with running_node(tmp_path / "n", db_url, clock=clock, attachment_orphan_ttl_s=3600) as node:
        alice = await new_user(node.web_url, "alice")
        await new_user(node.web_url, "bob")
        source = write_file(tmp_path / "f", 3000)
        async with alice.connect() as la:
            sent_id, sent = await la.send_attachment("bob@riverside", source)
            orphan = await alice.upload_attachment("bob@riverside", source)  # never sent
            again = await alice.upload_attachment("bob@riverside", source)  # uploaded, sent after the TTL
        assert len(blob_files(node.config.data_dir)) == 3
        assert await node.attachments.cleanup_once() == 0  # nothing is old yet
        clock.advance(1800)
        # The same bytes uploaded again are stored once, and their deadline starts over.
        stored = next(p for p in blob_files(node.config.data_dir) if p.name == orphan["blob"])
        r = await raw_upload(node.web_url, alice.token or "", "bob@riverside", stored.read_bytes())
        assert r.status_code == 201 and r.json()["blob"] == orphan["blob"]
        assert len(blob_files(node.config.data_dir)) == 3
        clock.advance(1801)
        assert await node.attachments.cleanup_once() == 1
        left = {p.name for p in blob_files(node.config.data_dir)}
        assert left == {sent["blob"], orphan["blob"]}
        clock.advance(1800)
        assert await node.attachments.cleanup_once() == 1
        assert {p.name for p in blob_files(node.config.data_dir)} == {sent["blob"]}
        # The cleaned-up blob can no longer be attached.
        async with alice.connect() as la:
            with pytest.raises(ClientError) as err:
                await la.send_payload("bob@riverside", {"type": "text", "text": "late"}, attachments=[again["blob"]])
            assert err.value.details["reason"] == "unknown_attachment"
        # Dropping the message's references (delete for everyone) deletes the blob.
        seq = (await node.attachments.repo.refs(sent["blob"]))[0]
        assert await node.attachments.forget_message(seq) == [sent["blob"]]
        assert blob_files(node.config.data_dir) == [] and sent_id
        await alice.aclose()


async def test_the_cleanup_task_runs_by_itself(tmp_path: Path, sqlite_url: str) -> None:
    async with running_node(tmp_path / "n", sqlite_url, attachment_orphan_ttl_s=0.3) as node:
        alice = await new_user(node.web_url, "alice")
        await new_user(node.web_url, "bob")
        await alice.upload_attachment("bob@riverside", write_file(tmp_path / "f", 100))
        assert len(blob_files(node.config.data_dir)) == 1
        await until(lambda: _no_blobs(node), 10, "the orphan to be deleted by the node's own task")
        await alice.aclose()


async def _no_blobs(node: Any) -> bool:
    return not blob_files(node.config.data_dir) and node.attachments.deleted == 1


# -- two node processes ----------------------------------------------------------------------


async def test_a_file_crosses_nodes_and_only_the_conversation_may_fetch_it(tmp_path: Path) -> None:
    riverside, address = federating(tmp_path / "riverside", "riverside")
    riverside.start()
    try:
        hilltop, _ = federating(tmp_path / "hilltop", "hilltop", peers=(address,))
        hilltop.start()
        try:
            await _cross_node(tmp_path, riverside.base_url, hilltop.base_url, riverside.data_dir, hilltop.data_dir)
        finally:
            hilltop.stop()
    finally:
        riverside.stop()


async def _cross_node(tmp_path: Path, river_url: str, hill_url: str, river_dir: Path, hill_dir: Path) -> None:
    alice = await new_user(river_url, "alice")
    dave = await new_user(river_url, "dave")
    bob = await new_user(hill_url, "bob")
    carol = await new_user(hill_url, "carol")
    await until(lambda: bob.user_devices("alice@riverside"), 20, "hilltop to reach riverside")
    source = write_file(tmp_path / "clip.mp4", 1_000_000)
    async with alice.connect() as la, bob.connect() as lb:
        mid, payload = await la.send_attachment("bob@hilltop", source, mime="video/mp4")
        got = await next_of(lb, IncomingMessage, id=mid, timeout=20)
        assert got.payload is not None and got.payload["node"] == "riverside"
        # bob fetches through hilltop, which asks riverside for him.
        out = await bob.download_attachment(got.payload, "alice@riverside", tmp_path / "bob.mp4")
        assert out.read_bytes() == source.read_bytes()
        # Only riverside stores it.
        assert [p.name for p in blob_files(river_dir)] == [payload["blob"]] and blob_files(hill_dir) == []
        # A range, relayed.
        async with httpx.AsyncClient(base_url=hill_url) as http:
            r = await http.get(
                f"/api/v1/attachments/{payload['blob']}", params={"conversation": "alice@riverside", "node": "riverside"},
                headers={"authorization": f"Bearer {bob.token}", "range": "bytes=100-"},
            )
            stored = blob_files(river_dir)[0].read_bytes()
            assert r.status_code == 206 and r.content == stored[100:]
        # Not in the conversation: carol on hilltop (naming either side), dave on riverside.
        for client, peer in ((carol, "alice@riverside"), (carol, "bob@hilltop"), (dave, "bob@hilltop"), (dave, "alice@riverside")):
            with pytest.raises(ClientError) as err:
                await client.download_attachment(got.payload, peer, tmp_path / "stolen")
            assert err.value.code == "not_found", (client.address, peer)
        # bob answers with a file of his own: it stays on hilltop, alice fetches it through riverside.
        reply = write_file(tmp_path / "notes.txt", 70_000)
        rid, _ = await lb.send_attachment("alice@riverside", reply, mime="text/plain")
        back = await next_of(la, IncomingMessage, id=rid, timeout=20)
        assert back.payload is not None and back.payload["node"] == "hilltop"
        out = await alice.download_attachment(back.payload, "bob@hilltop", tmp_path / "alice.txt")
        assert out.read_bytes() == reply.read_bytes()
    for client in (alice, bob, carol, dave):
        await client.aclose()


# -- /moot/blobs/1, without sockets --------------------------------------------------------


def test_blob_protocol_frames_and_the_receiver() -> None:
    from federation import blobwire as bw
    from federation.wire import Deframer, Error, ProtocolViolation, encode

    digest = "ab" * 32
    request = bw.GetBlob(digest=digest, user="bob@hilltop", conversation="alice@riverside", offset=4)
    raw = bw.encode_frame(request)
    body = b'{"type":"get_blob","digest":"' + digest.encode() + b'","user":"bob@hilltop","conversation":"alice@riverside","offset":4}'
    assert raw == len(body).to_bytes(4, "big") + body
    deframer = Deframer(bw.MAX_REQUEST)
    assert bw.read_request(deframer, raw[:7]) is None and bw.read_request(deframer, raw[7:]) == request
    with pytest.raises(ProtocolViolation) as err:
        bw.read_request(Deframer(bw.MAX_REQUEST), raw + raw)
    assert err.value.code == "unexpected"
    with pytest.raises(ProtocolViolation):
        bw.read_request(Deframer(bw.MAX_REQUEST), encode(Error(code="x")))

    # The header and the first body bytes in one read, the rest later.
    header = bw.encode_frame(bw.BlobHeader(digest=digest, size=10, offset=4, length=6))
    rx = bw.BlobReceiver(request)
    assert rx.feed(header[:3]) == b"" and rx.header is None
    assert rx.feed(header[3:] + b"abc") == b"abc" and rx.header is not None and not rx.complete
    assert rx.feed(b"def") == b"def" and rx.complete
    rx.finish()
    with pytest.raises(ProtocolViolation):
        rx.feed(b"g")  # more than announced
    # Cut short.
    rx = bw.BlobReceiver(request)
    rx.feed(header + b"ab")
    with pytest.raises(ProtocolViolation):
        rx.finish()
    # A header that answers another question.
    for wrong in (bw.BlobHeader(digest="cd" * 32, size=10, offset=4, length=6), bw.BlobHeader(digest=digest, size=10, offset=0, length=10),
                  bw.BlobHeader(digest=digest, size=10, offset=4, length=5)):
        with pytest.raises(ProtocolViolation):
            bw.BlobReceiver(request).feed(bw.encode_frame(wrong))
    # A refusal.
    rx = bw.BlobReceiver(request)
    rx.feed(encode(Error(code="not_found", message="no")))
    assert rx.refused == bw.Refused("not_found", "no")


def test_the_vector_file_is_what_the_generator_writes() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("gen_attachment_vectors", ROOT / "tools" / "gen_attachment_vectors.py")
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert json.dumps(generator.build(), indent=1) + "\n" == (ROOT / "docs" / "crypto_vectors_attachments_v1.json").read_text()
