"""Bad input gets a clear error with a stable code; the connection, other users and stored data carry on."""

from __future__ import annotations

import contextlib
import json

import httpx
import trio
from trio_websocket import ConnectionClosed, open_websocket_url

from cli.client import ClientError, ErrorEvent, IncomingMessage, new_message_id
from node.accounts import token_hash
from tests.nodes import new_user, next_of, running_node


def ws_url(node) -> str:
    return node.web_url.replace("http://", "ws://") + "/api/v1/ws"


async def expect_error(live, code: str, ref: str | None = None) -> ErrorEvent:
    err = await next_of(live, ErrorEvent, code=code)
    if ref is not None:
        assert err.ref == ref
    assert err.message
    return err


async def test_malformed_frames_get_errors_and_the_connection_carries_on(tmp_path, db_url):
    async with running_node(tmp_path / "n", db_url, max_frame_bytes=4096, max_envelope_bytes=2048) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        carol = await new_user(node.web_url, "carol")
        dave = await new_user(node.web_url, "dave")
        async with alice.connect() as la, bob.connect() as lb, carol.connect() as lc, dave.connect() as ld:
            first = await la.send_text("bob@riverside", "before the garbage")
            await next_of(lb, IncomingMessage, id=first)

            await la.ws.send_message("{not json")
            await expect_error(la, "bad_frame")
            await la.ws.send_message(json.dumps({"type": "teleport"}))
            await expect_error(la, "unknown_type")
            await la.ws.send_message(json.dumps({"type": "ack"}))
            await expect_error(la, "missing_field")
            await la.ws.send_message(json.dumps({"type": "ack", "seq": "many"}))
            await expect_error(la, "bad_frame")
            await la.ws.send_message(json.dumps({"type": "send", "envelope": {"v": 1}}))
            await expect_error(la, "missing_field")
            await la.ws.send_message("x" * 5000)  # over max_frame_bytes, under the hard limit
            await expect_error(la, "too_large")
            await la.ws.send_message(json.dumps({"type": "ack", "seq": 10**9}))
            await expect_error(la, "bad_request")

            # An envelope over max_envelope_bytes (but inside the frame limit).
            big = await alice.encrypt_text("bob@riverside", "y" * 1800, new_message_id())
            assert 2048 < len(json.dumps(big)) < 4000
            try:
                await la.send_envelope(big)
            except ClientError as exc:
                assert exc.code == "too_large"
            else:
                raise AssertionError("oversized envelope accepted")

            # Meanwhile other users chat undisturbed.
            other = await lc.send_text("dave@riverside", "we are fine")
            assert (await next_of(ld, IncomingMessage, id=other)).text == "we are fine"

            # And the same connection still works.
            after = await la.send_text("bob@riverside", "after the garbage")
            assert (await next_of(lb, IncomingMessage, id=after)).text == "after the garbage"

        history = await bob.history("alice@riverside")
        assert [m["id"] for m in history["messages"]] == [after, first]
        for c in (alice, bob, carol, dave):
            await c.aclose()


async def test_lies_unknown_users_and_reused_ids(tmp_path, db_url):
    async with running_node(tmp_path / "n", db_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        mallory = await new_user(node.web_url, "mallory")
        async with alice.connect() as la, bob.connect() as lb, mallory.connect() as lm:
            # mallory claims to be alice
            forged = await mallory.encrypt_text("bob@riverside", "I am alice", new_message_id())
            forged["sender"] = "alice@riverside"
            try:
                await lm.send_envelope(forged)
                raise AssertionError("forged sender accepted")
            except ClientError as exc:
                assert exc.code == "sender_mismatch"

            for peer, code in (("nobody@riverside", "unknown_user"), ("bob@elsewhere", "unknown_node")):
                try:
                    await la.send_text(peer, "hello?")
                    raise AssertionError(f"message to {peer} accepted")
                except ClientError as exc:
                    assert exc.code == code

            # a reused id with the same content is acknowledged again; different content is refused
            envelope = await alice.encrypt_text("bob@riverside", "original", new_message_id())
            first = await la.send_envelope(envelope)
            again = await la.send_envelope(envelope)
            assert not first.duplicate and again.duplicate
            altered = await alice.encrypt_text("bob@riverside", "altered", envelope["id"])
            try:
                await la.send_envelope(altered)
                raise AssertionError("reused id with different content accepted")
            except ClientError as exc:
                assert exc.code == "id_conflict"

            # keys for the wrong set of devices: the client is told to refetch
            stale = await alice.encrypt_text("bob@riverside", "stale", new_message_id())
            stale["keys"] = stale["keys"] + [{"to": "bob@riverside", "device": "ghost", "spk": 1, "wrapped": "AA"}]
            try:
                await la.send_envelope(stale)
                raise AssertionError("envelope for unknown device accepted")
            except ClientError as exc:
                assert exc.code == "bad_request" and exc.details["reason"] == "devices_changed"
                assert exc.details["extra"] == ["bob@riverside/ghost"]

            got = await next_of(lb, IncomingMessage, id=envelope["id"])
            assert got.text == "original"
            with trio.move_on_after(0.3):
                while True:
                    event = await lb.next_event()
                    assert not isinstance(event, IncomingMessage) or event.id != envelope["id"], "delivered twice"
        history = await bob.history("alice@riverside")
        assert [m["id"] for m in history["messages"]] == [envelope["id"]]
        for c in (alice, bob, mallory):
            await c.aclose()


async def test_websocket_authentication(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice = await new_user(node.web_url, "alice")
        nodevice = await new_user(node.web_url, "nodevice", device=False)
        cases = [
            ([], "unauthenticated"),
            ([("authorization", "Bearer not-a-token")], "unauthenticated"),
            ([("authorization", f"Bearer {nodevice.token}")], "no_device"),
        ]
        # an expired session
        user = await node.account_repo.get_user("alice")
        await node.account_repo.create_session(token_hash("expired-token"), user.id, None, 1_000, 1_000)
        cases.append(([("authorization", "Bearer expired-token")], "token_expired"))
        for headers, code in cases:
            async with open_websocket_url(ws_url(node), extra_headers=headers) as ws:
                frame = json.loads(await ws.get_message())
                assert frame["type"] == "error" and frame["code"] == code
                try:
                    with trio.fail_after(5):
                        await ws.get_message()
                    raise AssertionError("connection left open")
                except ConnectionClosed as exc:
                    assert exc.reason.code in (4401, 4403)
        # a frame past the hard limit closes the socket with 1009, and nothing else breaks
        async with alice.connect() as la:
            try:
                # The node may close as soon as it reads the frame's length, mid-send.
                await la.ws.send_message("z" * (node.config.max_frame_bytes * 4 + 10))
            except ConnectionClosed as exc:
                assert exc.reason.code == 1009
            with trio.fail_after(5):  # the event stream ends when the connection does
                with contextlib.suppress(trio.EndOfChannel):
                    while True:
                        await la.next_event()
            assert "1009" in la.closed_reason or "MESSAGE_TOO_BIG" in la.closed_reason
        async with alice.connect() as la:
            assert la.ready is not None
        await alice.aclose()
        await nodevice.aclose()


async def test_http_errors(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url, max_frame_bytes=2048) as node:
        async with httpx.AsyncClient(base_url=node.web_url) as http:
            r = await http.post("/api/v1/register", content=b"{nope", headers={"content-type": "application/json"})
            assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
            r = await http.post("/api/v1/register", data={"username": "x", "password": "y"})
            assert r.status_code == 400  # form posts are refused: JSON only (CSRF barrier)
            r = await http.post("/api/v1/register", json={"username": "Bad Name!", "password": "password1"})
            assert r.json()["error"]["code"] == "bad_request"
            r = await http.post("/api/v1/register", json={"username": "ok", "password": "short"})
            assert r.json()["error"]["code"] == "bad_request"
            r = await http.post("/api/v1/register", json={"username": "ok", "password": "p" * 3000})
            assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
            r = await http.get("/api/v1/conversations")
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
            r = await http.get("/api/v1/nothing-here")
            assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
            r = await http.get("/")
            assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
