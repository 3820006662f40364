"""Accounts over the real HTTP API: registration modes, login limits, sessions, disabling."""

from __future__ import annotations

import httpx
import pytest
import trio
from trio_websocket import ConnectionClosed

from cli.client import ClientError, IncomingMessage, MootClient
from node.errors import UsernameTaken
from tests.nodes import PASSWORD, Clock, new_user, next_of, running_node


async def expect_error(code: str, coro) -> ClientError:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value


async def test_invite_only_registration(tmp_path, sqlite_url):
    clock = Clock()
    async with running_node(tmp_path / "n", sqlite_url, clock=clock, registration="invite") as node:
        client = MootClient(node.web_url)
        await expect_error("bad_invite", client.register("alice", PASSWORD))
        await expect_error("bad_invite", client.register("alice", PASSWORD, invite="not-a-code"))
        _, code = await node.accounts.create_invite(max_uses=2)
        assert await client.register("alice", PASSWORD, invite=code) == "alice@riverside"
        assert await client.register("bob", PASSWORD, invite=code) == "bob@riverside"
        await expect_error("bad_invite", client.register("carol", PASSWORD, invite=code))  # used up
        revoked_id, revoked = await node.accounts.create_invite()
        await node.accounts.revoke_invite(revoked_id)
        await expect_error("bad_invite", client.register("carol", PASSWORD, invite=revoked))
        _, expired = await node.accounts.create_invite(ttl_s=1)
        clock.advance(1.1)
        await expect_error("bad_invite", client.register("carol", PASSWORD, invite=expired))
        # The people invited can log in; the refused ones do not exist.
        await client.login("bob", PASSWORD)
        await expect_error("bad_credentials", MootClient(node.web_url).login("carol", PASSWORD))
        await client.aclose()


async def test_closed_registration_and_operator_accounts(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url, registration="closed") as node:
        client = MootClient(node.web_url)
        await expect_error("registration_closed", client.register("alice", PASSWORD))
        await node.accounts.register("alice", PASSWORD, by_operator=True)
        await client.login("alice", PASSWORD)
        info = (await client.http.get("/api/v1/info")).json()
        assert info["registration"] == "closed"
        await client.aclose()


async def test_registration_rules(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        client = MootClient(node.web_url)
        await client.register("alice", PASSWORD)
        await expect_error("username_taken", client.register("alice", PASSWORD))
        await expect_error("bad_request", client.register("Alice", PASSWORD))
        await expect_error("bad_request", client.register("a" * 33, PASSWORD))
        await expect_error("bad_request", client.register("bob", "short"))
        await client.aclose()


async def test_failed_logins_are_rate_limited_with_retry_after(tmp_path, sqlite_url):
    async with running_node(
        tmp_path / "n", sqlite_url, login_failures_allowed=3, login_failure_window_s=60
    ) as node:
        await new_user(node.web_url, "alice", device=False)
        async with httpx.AsyncClient(base_url=node.web_url) as http:
            for _ in range(3):
                r = await http.post("/api/v1/login", json={"username": "alice", "password": "wrong password"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "bad_credentials"
            r = await http.post("/api/v1/login", json={"username": "alice", "password": "wrong password"})
            assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
            assert 1 <= int(r.headers["retry-after"]) <= 60
            # Even the right password waits: the limit is checked before the password.
            r = await http.post("/api/v1/login", json={"username": "alice", "password": PASSWORD})
            assert r.status_code == 429
        # Another user is not affected.
        await new_user(node.web_url, "bob", device=False)


async def test_logout_revokes_the_token_and_closes_its_websocket(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice = await new_user(node.web_url, "alice")
        token = alice.token
        async with alice.connect() as live:
            async with httpx.AsyncClient(base_url=node.web_url) as http:
                r = await http.post("/api/v1/logout", json={}, headers={"authorization": f"Bearer {token}"})
                assert r.status_code == 200
                r = await http.get("/api/v1/me", headers={"authorization": f"Bearer {token}"})
                assert r.status_code == 401 and r.json()["error"]["code"] == "unauthenticated"
            with trio.fail_after(5):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await live.ws.get_message()
            assert closed.value.reason.code == 4401
        await alice.aclose()


async def test_expired_sessions_are_refused(tmp_path, sqlite_url):
    clock = Clock()
    async with running_node(tmp_path / "n", sqlite_url, clock=clock, session_ttl_s=1) as node:
        alice = await new_user(node.web_url, "alice", device=False)
        await alice.request("GET", "/api/v1/me")
        clock.advance(1.2)
        await expect_error("token_expired", alice.request("GET", "/api/v1/me"))
        await alice.aclose()


async def test_a_disabled_user_is_cut_off_and_cannot_be_messaged(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        async with alice.connect() as la:
            async with bob.connect() as lb:
                first = await la.send_text("bob@riverside", "hello")
                await next_of(lb, IncomingMessage, id=first)
                await node.accounts.set_disabled("bob", True)
                with trio.fail_after(5):
                    with pytest.raises(ConnectionClosed) as closed:
                        while True:
                            await lb.ws.get_message()
                assert closed.value.reason.code == 4401
            # bob's sessions are gone, he cannot log in, and nobody can write to him.
            await expect_error("unauthenticated", bob.request("GET", "/api/v1/me"))
            await expect_error("account_disabled", MootClient(node.web_url).login("bob", PASSWORD))
            envelope = {
                "v": 1, "id": "to-disabled", "sender": "alice@riverside", "sender_device": alice.device,
                "conversation": "bob@riverside", "keys": [{"to": "bob@riverside", "device": bob.device}],
            }
            await expect_error("unknown_user", la.send_envelope(envelope))
            # Enabled again: he logs in and the conversation carries on.
            await node.accounts.set_disabled("bob", False)
            await bob.login("bob", PASSWORD)
            second = await la.send_text("bob@riverside", "welcome back")
        async with bob.connect() as lb:
            assert (await next_of(lb, IncomingMessage, id=second)).text == "welcome back"
        await alice.aclose()
        await bob.aclose()


async def test_a_deleted_users_name_is_never_given_out_again(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        async with alice.connect() as la, bob.connect() as lb:
            mid = await la.send_text("bob@riverside", "for bob only")
            await next_of(lb, IncomingMessage, id=mid)
        await node.accounts.delete_user("bob")
        await expect_error("unauthenticated", bob.request("GET", "/api/v1/me"))
        # Whoever comes next cannot become bob@riverside and inherit his conversations.
        await expect_error("username_taken", MootClient(node.web_url).register("bob", PASSWORD))
        with pytest.raises(UsernameTaken):
            await node.accounts.register("bob", PASSWORD, by_operator=True)
        await alice.aclose()
        await bob.aclose()
