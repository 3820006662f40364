"""Profiles and the user directory over the real HTTP API, on SQLite and PostgreSQL,
through the Python client library; bad input of every kind; the operator's view."""

from __future__ import annotations

import json
import struct
import zlib

import httpx
import pytest
import trio
from click.testing import CliRunner

from cli.client import ClientError, MootClient
from cli.main import main
from node.profiles import MAX_AVATAR_BYTES, sniff_image
from tests.nodes import new_user, running_node


def png(width: int = 2, height: int = 2, pad: int = 0) -> bytes:
    """A real PNG (red pixels), ``pad`` bytes of ancillary chunk making it bigger."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * width for _ in range(height))
    extra = chunk(b"tEXt", b"pad\x00" + b"x" * pad) if pad else b""
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + extra
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32 + b"\xff\xd9"
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 28
GIF = b"GIF89a\x01\x00\x01\x00\x00\x00\x00;"


async def expect_error(code: str, coro) -> ClientError:  # type: ignore[no-untyped-def]
    with pytest.raises(ClientError) as info:
        await coro
    assert info.value.code == code, info.value
    return info.value


def test_images_are_told_apart_by_their_magic_bytes():
    assert sniff_image(png()) == "image/png"
    assert sniff_image(JPEG) == "image/jpeg"
    assert sniff_image(WEBP) == "image/webp"
    assert sniff_image(GIF) is None
    assert sniff_image(b"RIFF\x00\x00\x00\x00WAVE") is None
    assert sniff_image(b"<svg xmlns='http://www.w3.org/2000/svg'/>") is None


async def test_profile_avatar_and_directory_through_the_client_library(tmp_path, db_url):
    async with running_node(tmp_path / "n", db_url) as node:
        alice = await new_user(node.web_url, "alice", device=False)
        bob = await new_user(node.web_url, "bob", device=False)
        await new_user(node.web_url, "carol", device=False)

        fresh = await alice.profile()
        assert fresh == {
            "user": "alice@riverside", "display_name": "", "status_text": "", "avatar": None, "updated_at": None,
            "listed": True,
        }
        mine = await alice.set_profile(display_name="  Alice Liddell ", status_text="Down the rabbit hole ✨")
        assert mine["display_name"] == "Alice Liddell" and mine["status_text"] == "Down the rabbit hole ✨"
        assert mine["updated_at"] is not None
        # only what is named changes
        assert (await alice.set_profile(status_text=""))["display_name"] == "Alice Liddell"

        picture = png(3, 3)
        with_avatar = await alice.set_avatar(picture, "image/png")
        assert with_avatar["avatar"]["type"] == "image/png" and with_avatar["avatar"]["size"] == len(picture)
        # bob sees alice's profile and picture
        seen = await bob.user_profile("alice@riverside")
        assert seen["display_name"] == "Alice Liddell" and seen["avatar"] == with_avatar["avatar"]
        assert "listed" not in seen
        assert await bob.user_avatar("alice@riverside") == ("image/png", picture)
        # a new picture replaces the old one; a JPEG and a WebP are fine too
        for data, kind in ((JPEG, "image/jpeg"), (WEBP, "image/webp")):
            assert (await alice.set_avatar(data, kind))["avatar"]["type"] == kind
            assert await bob.user_avatar("alice@riverside") == (kind, data)
        assert (await alice.delete_avatar())["avatar"] is None
        await expect_error("not_found", bob.user_avatar("alice@riverside"))

        # the directory: substring of the name or the display name, any case
        await bob.set_profile(display_name="Robert the Builder")
        found, following = await alice.directory("BUILD")
        assert [u["user"] for u in found] == ["bob@riverside"] and following is None
        assert found[0]["display_name"] == "Robert the Builder"
        assert [u["user"] for u in (await alice.directory("li"))[0]] == ["alice@riverside"]  # "Liddell"
        assert [u["user"] for u in (await alice.directory("ar"))[0]] == ["carol@riverside"]
        assert (await alice.directory("%"))[0] == [] and (await alice.directory("_"))[0] == []  # no wildcards
        # pages
        first, after = await alice.directory("", limit=2)
        assert [u["user"] for u in first] == ["alice@riverside", "bob@riverside"] and after == "bob"
        rest, end = await alice.directory("", after=after, limit=2)
        assert [u["user"] for u in rest] == ["carol@riverside"] and end is None

        # bob keeps himself out of the directory (and out of the name search); his address still works
        assert (await bob.set_profile(listed=False))["listed"] is False
        assert [u["user"] for u in (await alice.directory(""))[0]] == ["alice@riverside", "carol@riverside"]
        assert "bob@riverside" not in (await alice.request("GET", "/api/v1/users", q="b"))["users"]
        assert (await alice.user_profile("bob@riverside"))["display_name"] == "Robert the Builder"
        await bob.set_profile(listed=True)
        assert "bob@riverside" in [u["user"] for u in (await alice.directory("bob"))[0]]

        # a disabled user is in no directory and has no profile for others
        await node.accounts.set_disabled("carol", True)
        assert (await alice.directory("carol"))[0] == []
        await expect_error("unknown_user", alice.user_profile("carol@riverside"))
        await expect_error("unknown_user", alice.user_profile("nobody@riverside"))
        await expect_error("unknown_user", alice.user_avatar("nobody@riverside"))
        await expect_error("unknown_node", alice.user_profile("bob@nowhere"))  # this node does not federate
        for client in (alice, bob):
            await client.aclose()


async def test_bad_profiles_and_avatars_are_refused(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice = await new_user(node.web_url, "alice", device=False)
        for changes, field in (
            ({"display_name": "x" * 65}, "display_name"),
            ({"status_text": "y" * 141}, "status_text"),
            ({"display_name": "two\nlines"}, "display_name"),
            ({"display_name": "evil\u202eoverride"}, "display_name"),
            ({"display_name": 7}, "display_name"),
            ({"listed": "yes"}, "listed"),
        ):
            err = await expect_error("bad_request", alice.request("PATCH", "/api/v1/me/profile", changes))
            assert err.details.get("field") == field, changes
        # the longest allowed fields are fine (counted in characters, not bytes)
        ok = await alice.set_profile(display_name="é" * 64, status_text="🙂" * 140)
        assert len(ok["display_name"]) == 64 and len(ok["status_text"]) == 140

        err = await expect_error("bad_request", alice.set_avatar(GIF, "image/gif"))  # not an accepted type
        assert err.details["reason"] == "image_type"
        await expect_error("bad_request", alice.set_avatar(GIF, "image/png"))  # says PNG, is not
        await expect_error("bad_request", alice.set_avatar(JPEG, "image/png"))  # says PNG, is JPEG
        await expect_error("bad_request", alice.set_avatar(b"", "image/png"))
        await expect_error("too_large", alice.set_avatar(png(pad=MAX_AVATAR_BYTES), "image/png"))
        # a body that lies about its length, or sends none, is cut off at the cap as it streams
        async def chunks():  # type: ignore[no-untyped-def]
            yield png()
            for _ in range(40):
                yield b"\x00" * 16384

        async with httpx.AsyncClient(base_url=node.web_url) as http:
            response = await http.put(
                "/api/v1/me/avatar", content=chunks(),
                headers={"authorization": f"Bearer {alice.token}", "content-type": "image/png"},
            )
        assert response.status_code == 413 and response.json()["error"]["code"] == "too_large"
        largest = png(pad=MAX_AVATAR_BYTES - len(png(pad=1)) + 1)
        assert len(largest) == MAX_AVATAR_BYTES
        assert (await alice.set_avatar(largest, "image/png"))["avatar"]["size"] == MAX_AVATAR_BYTES

        # nothing of this without a session
        anon = MootClient(node.web_url)
        await expect_error("unauthenticated", anon.profile())
        await expect_error("unauthenticated", anon.user_profile("alice@riverside"))
        await expect_error("unauthenticated", anon.directory("a"))
        await expect_error("unauthenticated", anon.set_avatar(png(), "image/png"))
        # bounded queries
        await expect_error("bad_request", alice.directory("q" * 65))
        await expect_error("bad_request", alice.directory("", limit=51))
        await expect_error("bad_request", alice.request("GET", "/api/v1/directory", limit="many"))
        await expect_error("bad_request", alice.user_profile("not-an-address"))
        await alice.aclose()
        await anon.aclose()


async def test_the_operator_sees_profile_and_storage_used(tmp_path, db_url):
    async with running_node(tmp_path / "n", db_url) as node:
        alice = await new_user(node.web_url, "alice")
        bob = await new_user(node.web_url, "bob")
        await alice.set_profile(display_name="Alice", status_text="here")
        picture = png(4, 4)
        await alice.set_avatar(picture, "image/png")
        async with alice.connect() as live:
            for i in range(3):
                await live.send_text("bob@riverside", f"message {i}")
        async with bob.connect() as live:
            await live.send_text("alice@riverside", "an answer")

        shown = await node.profiles.repo.storage_used((await node.accounts.require_user("alice")).id, "alice@riverside")
        assert shown["messages_sent"] == 3 and shown["messages_received"] == 1
        assert shown["messages_sent_bytes"] > 3 * 100 and shown["messages_received_bytes"] > 100
        assert shown["avatar_bytes"] == len(picture) and shown["profile_bytes"] == len("Alice") + len("here")
        assert shown["total_bytes"] >= shown["messages_sent_bytes"] + shown["messages_received_bytes"] + len(picture)

        def moot(*args: str) -> str:
            return CliRunner().invoke(main, ["--data-dir", str(node.config.data_dir), *args], catch_exceptions=False).output

        data = json.loads(await trio.to_thread.run_sync(moot, "user", "show", "alice", "--json"))
        assert data["display_name"] == "Alice" and data["listed"] is True
        assert data["avatar"] == f"image/png, {len(picture)} bytes"
        assert data["storage"]["avatar_bytes"] == len(picture) and data["storage"]["messages_sent"] == 3
        text = await trio.to_thread.run_sync(moot, "user", "show", "alice")
        assert "display name:" in text and "Alice" in text
        assert "storage used:" in text and "messages sent" in text and f"avatar {len(picture)} B" in text
        for client in (alice, bob):
            await client.aclose()
