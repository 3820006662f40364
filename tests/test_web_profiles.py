"""Profiles in the web page (Chromium) against two federated node processes: the profile
editor with an avatar preview, names and pictures in the list and the header, the
directory search, looking up ``user@node`` on the other node, and leaving the directory."""

from __future__ import annotations

import re

import pytest
import trio
from playwright.sync_api import expect

from cli.client import MootClient
from tests.browser import chromium
from tests.nodes import PASSWORD, federated_pair
from tests.test_profiles import png
from tests.webchat import conversation_item, open_settings, person, screenshot, sign_up, write


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def with_client(base_url: str, username: str, action, *, register: bool = False):  # type: ignore[no-untyped-def]
    """Run ``action(client)`` as ``username`` through the Python client library."""

    async def run():  # type: ignore[no-untyped-def]
        client = MootClient(base_url)
        try:
            if register:
                await client.register(username, PASSWORD)
            await client.login(username, PASSWORD)
            return await action(client)
        finally:
            await client.aclose()

    return trio.run(run)


def test_profiles_and_the_directory_across_two_nodes_in_the_browser(browser, tmp_path):
    with federated_pair(tmp_path) as (riverside, hilltop):
        with person(browser, riverside.base_url) as alice, person(browser, hilltop.base_url) as bob:
            sign_up(alice, "alice")
            sign_up(bob, "bob")
            # dave, on alice's node, uses the Python client library
            async def dave_profile(c: MootClient) -> None:
                await c.set_profile(display_name="Dave Bowman", status_text="Open the pod bay doors")

            with_client(riverside.base_url, "dave", dave_profile, register=True)

            # alice edits her profile: a wrong file is refused at once, a picture is previewed, then saved
            open_settings(alice)
            expect(alice.locator("#profile-save")).to_be_enabled()
            alice.locator("#profile-avatar-input").set_input_files(
                {"name": "anim.gif", "mimeType": "image/gif", "buffer": b"GIF89a;"})
            expect(alice.locator("#profile-error")).to_have_text("Choose a PNG, JPEG or WebP picture.")
            picture = png(3, 3)
            alice.locator("#profile-avatar-input").set_input_files(
                {"name": "me.png", "mimeType": "image/png", "buffer": picture})
            preview = alice.locator("#profile-avatar-preview")
            expect(preview).to_be_visible()
            expect(preview).to_have_attribute("src", re.compile(r"^blob:"))
            alice.locator("#profile-display-name").fill("Alice Liddell")
            alice.locator("#profile-status").fill("Down the rabbit hole")
            alice.locator("#profile-save").click()
            expect(alice.locator("#profile-note")).to_have_text("Saved.")
            expect(preview).to_have_attribute("src", re.compile(r"^/api/v1/users/alice%40riverside/avatar\?v=[0-9a-f]{64}$"))
            alice.wait_for_function("() => document.getElementById('profile-avatar-preview').naturalWidth === 3")
            screenshot(alice, "profile-editor")
            alice.locator("#settings-close").click()

            async def alice_seen_by_dave(c: MootClient) -> tuple[dict, tuple[str, bytes]]:
                return await c.user_profile("alice@riverside"), await c.user_avatar("alice@riverside")

            seen, avatar = with_client(riverside.base_url, "dave", alice_seen_by_dave)
            assert seen["display_name"] == "Alice Liddell" and seen["status_text"] == "Down the rabbit hole"
            assert avatar == ("image/png", picture)

            # alice finds dave in her node's directory by his display name
            alice.locator("#search").fill("bowman")
            found = alice.locator("#search-results button[data-address='dave@riverside']")
            expect(found.locator(".name")).to_have_text("Dave Bowman")
            expect(found.locator(".status")).to_have_text("Open the pod bay doors")

            # bob, on the other node, looks alice up by address: her name, status and picture come across
            bob.locator("#search").fill("alice@riverside")
            result = bob.locator("#search-results button[data-address='alice@riverside']")
            expect(result.locator(".name")).to_have_text("Alice Liddell")
            expect(result.locator("img.avatar")).to_be_visible()
            result.click()
            expect(bob.locator("#peer-name")).to_have_text("Alice Liddell")
            expect(bob.locator("#peer-address")).to_have_text("alice@riverside")
            expect(bob.locator("#peer-status")).to_have_text("Down the rabbit hole")
            header_picture = bob.locator("#peer-avatar img.avatar")
            expect(header_picture).to_be_visible()
            bob.wait_for_function("() => document.querySelector('#peer-avatar img').naturalWidth === 3")
            write(bob, "Hello Alice")
            item = conversation_item(bob, "alice@riverside")
            expect(item.locator(".name")).to_have_text("Alice Liddell")
            expect(item.locator("img.avatar")).to_be_visible()
            # bob has set nothing: alice sees his user name and an initial
            bob_item = conversation_item(alice, "bob@hilltop")
            expect(bob_item.locator(".name")).to_have_text("bob")
            expect(bob_item.locator("span.avatar")).to_have_text("B")
            screenshot(bob, "profile-in-header")

            # alice leaves the directory: dave's search no longer finds her, her address still works
            open_settings(alice)
            listed = alice.locator("#setting-listed")
            expect(listed).to_be_checked()
            listed.uncheck()
            expect(listed).not_to_be_checked()

            async def dave_searches(c: MootClient) -> tuple[list, dict]:
                return (await c.directory("liddell"))[0], await c.user_profile("alice@riverside")

            found_by_dave, still = with_client(riverside.base_url, "dave", dave_searches)
            assert found_by_dave == [] and still["display_name"] == "Alice Liddell"
            alice.locator("#settings-close").click()
            # and an unknown user on the other node is a clear answer
            bob.locator("#search").fill("nobody@riverside")
            expect(bob.locator("#search-results li.muted")).to_contain_text("no user")
