"""Profiles across two real nodes (libp2p on loopback): lookups of ``user@node`` on the
other node, avatars, caching, and what a node refuses to answer."""

from __future__ import annotations

import base64

import pytest
import trio

from cli.client import ClientError
from federation import wire
from federation.profiles import ProfileCache
from tests.nodes import new_user
from tests.test_federation import two_nodes
from tests.test_profiles import JPEG, png


async def expect_error(code: str, coro) -> ClientError:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value


def test_the_profile_cache_expires_and_is_bounded_by_cost():
    cache: ProfileCache[str] = ProfileCache(ttl_s=30, max_cost=10)
    cache.put("a", "A", now=100, cost=4)
    assert cache.get("a", now=129.9) == "A"
    assert cache.get("a", now=130) is None and len(cache) == 0
    cache.put("a", "A", now=200, cost=4)
    cache.put("b", "B", now=201, cost=4)
    cache.put("c", "C", now=202, cost=4)  # over 10: the oldest goes
    assert cache.get("a", now=203) is None and cache.get("b", now=203) == "B" and cache.get("c", now=203) == "C"
    cache.put("huge", "H", now=204, cost=11)  # never kept
    assert cache.get("huge", now=204) is None and cache.get("c", now=204) == "C"


async def test_users_look_up_profiles_and_avatars_on_the_other_node(tmp_path):
    async with two_nodes(tmp_path) as (riverside, hilltop):
        alice = await new_user(riverside.web_url, "alice", device=False)
        bob = await new_user(hilltop.web_url, "bob", device=False)
        picture = png(5, 5)
        await bob.set_profile(display_name="Bob on the Hill", status_text="🏔️ out walking")
        await bob.set_avatar(picture, "image/png")

        seen = await alice.user_profile("bob@hilltop")
        assert seen["user"] == "bob@hilltop" and seen["display_name"] == "Bob on the Hill"
        assert seen["status_text"] == "🏔️ out walking" and seen["avatar"]["size"] == len(picture)
        assert await alice.user_avatar("bob@hilltop") == ("image/png", picture)
        # and the other way round, for a user with nothing set
        assert (await bob.user_profile("alice@riverside"))["display_name"] == ""
        await expect_error("not_found", bob.user_avatar("alice@riverside"))

        # answers are kept for a short while: a change shows once the cache entry expires
        await bob.set_profile(display_name="Robert")
        await bob.set_avatar(JPEG, "image/jpeg")
        assert (await alice.user_profile("bob@hilltop"))["display_name"] == "Bob on the Hill"
        riverside.federation.remote_profiles.profiles.drop("bob@hilltop")  # as if 30 s had passed
        fresh = await alice.user_profile("bob@hilltop")
        assert fresh["display_name"] == "Robert" and fresh["avatar"]["type"] == "image/jpeg"
        # the picture is fetched again because its digest changed
        assert await alice.user_avatar("bob@hilltop") == ("image/jpeg", JPEG)

        # unknown users and nodes are clear answers
        await expect_error("unknown_user", alice.user_profile("nobody@hilltop"))
        await expect_error("unknown_user", alice.user_avatar("nobody@hilltop"))
        with trio.fail_after(20):
            await expect_error("unknown_node", alice.user_profile("carol@meadow"))
        # a disabled user's profile is not given out
        await hilltop.accounts.set_disabled("bob", True)
        riverside.federation.remote_profiles.profiles.drop("bob@hilltop")
        await expect_error("unknown_user", alice.user_profile("bob@hilltop"))
        await alice.aclose()
        await bob.aclose()


async def test_a_node_answers_only_for_its_own_users_and_checks_what_it_is_given(tmp_path):
    async with two_nodes(tmp_path) as (riverside, hilltop):
        await new_user(riverside.web_url, "alice", device=False)
        fed = hilltop.federation
        # hilltop asks riverside about a user of a third node, and of hilltop itself
        for user in ("carol@meadow", "bob@hilltop"):
            answer = await fed._ask_node("riverside", wire.GetProfile(user=user))
            assert isinstance(answer, wire.Error) and answer.code == "unknown_node"
        answer = await fed._ask_node("riverside", wire.GetProfile(user="alice@riverside"))
        assert isinstance(answer, wire.Profile) and answer.user == "alice@riverside"

    # What another node sends is checked like an upload: the wrong type, a lie about it
    from federation.profiles import avatar_from_frame
    from node.errors import Unavailable

    def frame(data: bytes, kind: str = "image/png") -> wire.Avatar:
        return wire.Avatar(user="bob@hilltop", content_type=kind, data=base64.urlsafe_b64encode(data).rstrip(b"=").decode())  # type: ignore[arg-type]

    assert avatar_from_frame("bob@hilltop", frame(png())).content_type == "image/png"
    for bad in (frame(b"GIF89a;"), frame(JPEG, "image/png"), frame(b"\x89PNG\r\n\x1a\n", "image/webp")):
        with pytest.raises(Unavailable):
            avatar_from_frame("bob@hilltop", bad)
