"""ICE servers for clients, and TURN credentials that a real coturn accepts."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from aioice import stun, turn
from trio_asyncio import aio_as_trio

from cli.rtc import open_loop
from node.config import ConfigError, load_config
from node.turn import IceServer, ice_servers_for, turn_credentials
from tests.nodes import Clock, new_user, running_node
from tests.turnserver import TurnServer

SECRET = "a shared secret only the node and coturn know"


def test_credentials_match_a_vector_computed_by_openssl() -> None:
    # echo -n "1795454370:alice@riverside" | openssl dgst -sha1 -hmac s3cret -binary | base64
    assert turn_credentials("s3cret", "alice@riverside", 1795450770.9, 3600) == (
        "1795454370:alice@riverside", "64ctuqfV9ne1G8IqXjInJrGU/Pk=",
    )
    with pytest.raises(ValueError):
        turn_credentials("s3cret", "odd:user", 0, 60)


def test_ice_servers_split_stun_from_turn_and_only_turn_gets_credentials() -> None:
    urls = ("stun:192.0.2.1:3478", "turn:192.0.2.1:3478?transport=udp", "turns:192.0.2.1:5349")
    stun_only, with_turn = ice_servers_for("bob@hill", urls=urls, secret=SECRET, ttl_s=600, now=1000)
    assert stun_only == IceServer(("stun:192.0.2.1:3478",))
    assert with_turn.urls == urls[1:] and with_turn.username == "1600:bob@hill"
    assert with_turn.as_json() == {"urls": list(urls[1:]), "username": "1600:bob@hill", "credential": with_turn.credential}
    assert ice_servers_for("bob@hill", urls=(), secret=SECRET, ttl_s=600, now=1000) == []


def test_no_ice_server_unless_configured_and_turn_needs_the_secret(tmp_path) -> None:
    assert load_config(tmp_path, environ={}).ice_servers == ()  # never a public STUN server by default
    config = load_config(tmp_path, environ={
        "MOOT_ICE_SERVERS": "stun:192.0.2.1:3478,turn:192.0.2.1:3478", "MOOT_TURN_SECRET": "x", "MOOT_TURN_TTL_S": "600",
    })
    assert (config.ice_servers, config.turn_secret, config.turn_ttl_s) == (("stun:192.0.2.1:3478", "turn:192.0.2.1:3478"), "x", 600)
    with pytest.raises(ConfigError, match="turn_secret"):
        load_config(tmp_path, environ={"MOOT_ICE_SERVERS": "turn:192.0.2.1:3478"})
    with pytest.raises(ConfigError, match="ice_servers"):
        load_config(tmp_path, environ={"MOOT_ICE_SERVERS": "http://192.0.2.1"})
    with pytest.raises(ConfigError, match="turn_ttl_s"):
        load_config(tmp_path, environ={"MOOT_TURN_TTL_S": "5"})


async def test_the_ice_endpoint_needs_a_session_and_gives_nothing_by_default(tmp_path, sqlite_url) -> None:
    async with running_node(tmp_path / "n", sqlite_url) as node:
        async with httpx.AsyncClient(base_url=node.web_url) as http:
            refused = await http.get("/api/v1/ice")
            assert refused.status_code == 401 and refused.json()["error"]["code"] == "unauthenticated"
        alice = await new_user(node.web_url, "alice", device=False)
        assert await alice.ice_servers() == []
        await alice.aclose()


class _Quiet(asyncio.DatagramProtocol):
    pass


async def _allocate(port: int, username: str, password: str) -> tuple[str, int]:
    """A TURN Allocate over UDP with these credentials; the relayed address. asyncio."""
    transport, _ = await turn.create_turn_endpoint(_Quiet, ("127.0.0.1", port), username, password, lifetime=60)
    try:
        return tuple(transport.get_extra_info("sockname"))  # type: ignore[return-value]
    finally:
        transport.close()


async def _refused(port: int, username: str, password: str) -> int:
    """The STUN error code coturn answers an Allocate with (the test fails if it succeeds)."""
    try:
        relayed = await aio_as_trio(_allocate)(port, username, password)
    except stun.TransactionFailed as exc:
        return int(exc.response.attributes["ERROR-CODE"][0])
    raise AssertionError(f"coturn allocated {relayed} for {username!r}")


async def test_coturn_accepts_the_nodes_credentials_and_refuses_wrong_or_expired_ones(tmp_path, sqlite_url) -> None:
    clock = Clock()
    with TurnServer.start(SECRET) as coturn:
        urls = (f"stun:127.0.0.1:{coturn.port}", f"turn:127.0.0.1:{coturn.port}?transport=udp")
        async with running_node(tmp_path / "n", sqlite_url, clock=clock, ice_servers=urls, turn_secret=SECRET, turn_ttl_s=600) as node:
            alice = await new_user(node.web_url, "alice", device=False)
            answer = await alice.request("GET", "/api/v1/ice")
            assert answer["ttl_s"] == 600
            stun_entry, turn_entry = answer["ice_servers"]
            assert stun_entry == {"urls": [urls[0]]}
            assert turn_entry["urls"] == [urls[1]]
            expiry, user = turn_entry["username"].split(":")
            assert user == "alice@riverside" and abs(int(expiry) - (time.time() + 600)) < 30
            # Credentials issued with the node's clock two TTLs behind are already expired.
            clock.advance(-1200)
            (_, stale) = await alice.ice_servers()
            assert int(stale["username"].split(":")[0]) < time.time()
            await alice.aclose()
            http = httpx.AsyncClient(base_url=node.web_url)
            no_store = await http.get("/api/v1/ice", headers={"authorization": f"Bearer {alice.token}"})
            assert no_store.headers["cache-control"] == "no-store"
            await http.aclose()

        async with open_loop():
            host, relay_port = await aio_as_trio(_allocate)(coturn.port, turn_entry["username"], turn_entry["credential"])
            assert host == "127.0.0.1" and relay_port != coturn.port
            assert await _refused(coturn.port, turn_entry["username"], "not-the-credential") == 401
            assert await _refused(coturn.port, stale["username"], stale["credential"]) == 401
            # The HMAC binds the user: another name with alice's credential is refused.
            assert await _refused(coturn.port, f"{expiry}:mallory@riverside", turn_entry["credential"]) == 401
            other = turn_credentials("another secret", "alice@riverside", time.time(), 600)
            assert await _refused(coturn.port, *other) == 401
