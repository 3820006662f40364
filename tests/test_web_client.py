"""The web client end to end: people in separate Chromium contexts chatting through a
real node process, and a browser chatting with the Python client library."""

from __future__ import annotations

import re
import threading
import time

import pytest
import trio
from click.testing import CliRunner
from playwright.sync_api import expect

from cli.client import IncomingMessage, MootClient
from cli.main import main
from tests.browser import chromium
from tests.nodes import PASSWORD, NodeProcess, federated_pair, free_port, next_of
from tests.webchat import (
    DESKTOP,
    PHONE,
    conversation_item,
    message,
    open_chat,
    open_settings,
    outbox_size,
    person,
    screenshot,
    set_visibility,
    sign_in,
    sign_up,
    start_chat,
    typing_frames_sent,
    wait_connected,
    write,
)


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def test_two_people_chat_with_live_ticks_unread_counts_and_presence(browser, node):
    with person(browser, node.base_url) as alice, person(browser, node.base_url) as bob:
        screenshot(alice, "sign-up")
        sign_up(alice, "alice")
        sign_up(bob, "bob")
        start_chat(alice, "bob@riverside")
        expect(alice.locator("#peer-presence")).to_have_text("online")

        write(alice, "Hello Bob, lunch at noon?")
        mine = message(alice, "Hello Bob, lunch at noon?", mine=True)
        # bob has the list open, not the conversation: delivered, not read, and unread on his side
        expect(mine).to_have_attribute("data-status", "delivered")
        item = conversation_item(bob, "alice@riverside")
        expect(item.locator(".preview-text")).to_have_text("Hello Bob, lunch at noon?")
        expect(item.locator(".unread")).to_have_text("1")
        write(alice, "Or one o'clock")
        expect(item.locator(".unread")).to_have_text("2")
        expect(item.locator(".preview-text")).to_have_text("Or one o'clock")
        screenshot(bob, "conversation-list")

        open_chat(bob, "alice@riverside")
        expect(message(bob, "Hello Bob, lunch at noon?", mine=False)).to_be_visible()
        expect(message(bob, "Or one o'clock", mine=False)).to_be_visible()
        expect(item.locator(".unread")).to_have_count(0)
        expect(mine).to_have_attribute("data-status", "read")
        expect(message(alice, "Or one o'clock", mine=True)).to_have_attribute("data-status", "read")

        write(bob, "Noon works")
        expect(message(alice, "Noon works", mine=False)).to_be_visible()
        expect(message(bob, "Noon works", mine=True)).to_have_attribute("data-status", "read")
        expect(alice.locator("#message-list li.day")).to_have_text(["Today"])
        screenshot(alice, "conversation")

        # both see the same 60-digit safety number
        numbers = []
        for page in (alice, bob):
            page.locator("#safety-button").click()
            digits = page.locator("#safety-digits")
            expect(digits).to_have_attribute("data-number", re.compile(r"^\d{60}$"))
            numbers.append(digits.get_attribute("data-number"))
        screenshot(alice, "safety-number")
        assert numbers[0] == numbers[1]
        alice.locator("#safety-verified").check()
        alice.keyboard.press("Escape")
        expect(alice.locator("#safety-button")).to_have_text("Verified ✓")

        # phone width: one pane at a time, back to the list
        for page in (alice, bob):
            page.set_viewport_size(PHONE)
        expect(alice.locator("#sidebar")).to_be_hidden()
        screenshot(alice, "conversation")
        alice.locator("#back").click()
        expect(alice.locator("#sidebar")).to_be_visible()
        screenshot(alice, "conversation-list")
        bob.keyboard.press("Escape")
        open_chat(alice, "bob@riverside")
        alice.locator("#safety-button").click()
        expect(alice.locator("#safety-digits")).to_have_attribute("data-number", numbers[0])
        screenshot(alice, "safety-number")
        alice.locator("#safety-close").click()
        alice.set_viewport_size(DESKTOP)

        bob.close()  # bob closes the page: alice sees him go
        expect(alice.locator("#peer-presence")).to_have_text(re.compile(r"^last seen "))
    # the sign-up screen at phone width too
    with person(browser, node.base_url, viewport=PHONE) as visitor:
        expect(visitor.locator("#signup-form")).to_be_visible()
        screenshot(visitor, "sign-up")


def test_message_text_is_shown_as_text_and_never_runs(browser, node):
    attack = "<img src=x onerror=alert(1)><script>alert(2)</script>"
    with person(browser, node.base_url) as alice, person(browser, node.base_url) as bob:
        dialogs: list[str] = []
        for page in (alice, bob):
            page.on("dialog", lambda d: (dialogs.append(d.message), d.dismiss()))
        sign_up(alice, "alice")
        sign_up(bob, "bob")
        start_chat(alice, "bob@riverside")
        write(alice, attack)
        expect(conversation_item(bob, "alice@riverside").locator(".preview-text")).to_have_text(attack)
        open_chat(bob, "alice@riverside")
        shown = message(bob, "onerror", mine=False).locator(".text")
        expect(shown).to_have_text(attack)
        for page in (alice, bob):
            assert page.locator("#message-list img, #message-list script, #conversation-list img").count() == 0
        bob.wait_for_timeout(300)
        assert dialogs == []


def test_messages_written_offline_wait_in_the_outbox_and_arrive_once(browser, node):
    with person(browser, node.base_url) as alice, person(browser, node.base_url) as bob:
        sign_up(alice, "alice")
        sign_up(bob, "bob")
        start_chat(alice, "bob@riverside")
        write(alice, "before")
        expect(message(alice, "before", mine=True)).to_have_attribute("data-status", "delivered")

        # the connection drops: what alice writes waits, marked pending, and the page says so
        alice.context.set_offline(True)
        expect(alice.locator("#conn-status")).to_have_attribute("data-state", "offline")
        expect(alice.locator("#conn-status")).to_contain_text("Offline")
        for text in ("offline 1", "offline 2"):
            write(alice, text)
            expect(message(alice, text, mine=True)).to_have_attribute("data-status", "pending")
        assert outbox_size(alice, "alice@riverside") == 2
        alice.context.set_offline(False)
        wait_connected(alice)
        for text in ("offline 1", "offline 2"):
            expect(message(alice, text, mine=True)).to_have_attribute("data-status", "delivered")
        assert outbox_size(alice, "alice@riverside") == 0

        # offline again, and this time the page is closed before the network returns:
        # the outbox is in IndexedDB, so the next page sends it
        alice.context.set_offline(True)
        expect(alice.locator("#conn-status")).to_have_attribute("data-state", "offline")
        write(alice, "offline 3")
        expect(message(alice, "offline 3", mine=True)).to_have_attribute("data-status", "pending")
        context = alice.context
        alice.close()
        context.set_offline(False)
        again = context.new_page()
        again.goto(node.base_url + "/")
        wait_connected(again)
        open_chat(again, "bob@riverside")
        expect(message(again, "offline 3", mine=True)).to_have_attribute("data-status", "delivered")
        assert outbox_size(again, "alice@riverside") == 0

        open_chat(bob, "alice@riverside")
        for text in ("before", "offline 1", "offline 2", "offline 3"):
            expect(message(bob, text, mine=False)).to_have_count(1)
        expect(bob.locator("#message-list li.message")).to_have_count(4)

    ids = _history_ids(node, "bob", "alice@riverside")
    assert len(ids) == 4 and len(set(ids)) == 4  # each stored once


def _history_ids(node: NodeProcess, username: str, peer: str) -> list[str]:
    async def main() -> list[str]:
        client = MootClient(node.base_url)
        await client.login(username, PASSWORD)
        try:
            return [m["id"] for m in (await client.history(peer))["messages"]]
        finally:
            await client.aclose()

    return trio.run(main)


def _devices(page) -> list[str]:
    return page.evaluate("async () => (await (await fetch('/api/v1/devices')).json()).devices.map(d => d.device)")


def test_reload_and_signing_in_again_keep_the_device_and_the_history(browser, node):
    with person(browser, node.base_url) as alice, person(browser, node.base_url) as bob:
        sign_up(alice, "alice")
        sign_up(bob, "bob")
        start_chat(alice, "bob@riverside")
        write(alice, "remember me")
        open_chat(bob, "alice@riverside")
        write(bob, "I will")
        expect(message(alice, "I will", mine=False)).to_be_visible()
        [device] = _devices(alice)
        keys_exportable = alice.evaluate(
            """() => new Promise((resolve) => {
                const open = indexedDB.open('moot:alice@riverside');
                open.onsuccess = () => {
                    const get = open.result.transaction('meta').objectStore('meta').get('device');
                    get.onsuccess = () => {
                        const k = get.result.keys;
                        resolve([k.identity, k.dh.privateKey, ...k.signedPrekeys.values().map(p => p.privateKey)]
                            .map(key => key.extractable));
                    };
                };
            })"""
        )
        assert keys_exportable and not any(keys_exportable)  # private keys cannot leave the browser

        alice.reload()
        wait_connected(alice)
        assert _devices(alice) == [device]
        open_chat(alice, "bob@riverside")
        expect(message(alice, "remember me", mine=True)).to_have_attribute("data-status", "read")
        expect(message(alice, "I will", mine=False)).to_be_visible()

        alice.locator("#signout").click()
        expect(alice.locator("#signin-form")).to_be_visible()
        assert alice.evaluate("async () => (await fetch('/api/v1/me')).status") == 401
        sign_in(alice, "alice")
        assert _devices(alice) == [device]
        open_chat(alice, "bob@riverside")
        expect(message(alice, "remember me", mine=True)).to_be_visible()
        write(alice, "still me")
        expect(message(bob, "still me", mine=False)).to_be_visible()


def test_browser_and_python_client_chat_both_ways(browser, node):
    async def python_user() -> None:
        carol = MootClient(node.base_url)
        await carol.register("carol", PASSWORD)
        await carol.login("carol", PASSWORD)
        await carol.create_device("carol-laptop")
        carol.save(node.data_dir.parent / "carol.json")
        await carol.aclose()

    trio.run(python_user)
    with person(browser, node.base_url) as alice:
        sign_up(alice, "alice")
        start_chat(alice, "carol@riverside")
        write(alice, "Hi Carol, from a browser ✓ ünïcödé 🙂")

        async def carol_replies() -> str:
            carol = MootClient.load(node.data_dir.parent / "carol.json")
            try:
                async with carol.connect() as live:
                    got = await next_of(live, IncomingMessage, sender="alice@riverside")
                    await live.send_text("alice@riverside", f"Carol got: {got.text}")
                    await live.flush()
                    return str(got.text)
            finally:
                await carol.aclose()

        assert trio.run(carol_replies) == "Hi Carol, from a browser ✓ ünïcödé 🙂"
        expect(message(alice, "Carol got: Hi Carol, from a browser ✓ ünïcödé 🙂", mine=False)).to_be_visible()
        expect(message(alice, "Hi Carol", mine=True)).to_have_attribute("data-status", "delivered")

        async def carol_safety_number() -> str:
            carol = MootClient.load(node.data_dir.parent / "carol.json")
            try:
                return await carol.safety_number("alice@riverside")
            finally:
                await carol.aclose()

        alice.locator("#safety-button").click()
        digits = alice.locator("#safety-digits")
        expect(digits).to_have_attribute("data-number", re.compile(r"^\d{60}$"))
        assert digits.get_attribute("data-number") == trio.run(carol_safety_number)


def test_a_new_device_of_a_contact_is_announced_and_gets_the_next_message(browser, node):
    with person(browser, node.base_url) as alice, person(browser, node.base_url) as bob:
        sign_up(alice, "alice")
        sign_up(bob, "bob")
        start_chat(alice, "bob@riverside")
        write(alice, "first")
        expect(conversation_item(bob, "alice@riverside")).to_be_visible()
        alice.locator("#safety-button").click()
        alice.locator("#safety-verified").check()
        alice.locator("#safety-close").click()

        async def bob_adds_a_device() -> None:
            bob2 = MootClient(node.base_url)
            await bob2.login("bob", PASSWORD)
            await bob2.create_device("bob-tablet")
            bob2.save(node.data_dir.parent / "bob2.json")
            await bob2.aclose()

        trio.run(bob_adds_a_device)
        # alice's page learns it when the node refuses her next message for missing the
        # new device. She verified bob, so the message waits until she has looked.
        write(alice, "second")
        warning = alice.locator("#key-warning")
        expect(warning).to_be_visible()
        expect(warning).to_contain_text("bob's safety number changed: a device was added (bob-tablet)")
        second = message(alice, "second", mine=True)
        expect(second).to_have_attribute("data-status", "pending")
        expect(second.locator(".held-note")).to_be_visible()
        expect(alice.locator("#send")).to_be_disabled()
        expect(conversation_item(alice, "bob@riverside").locator(".key-flag")).to_be_visible()
        alice.locator("#key-warning button.review").click()
        expect(alice.locator("#safety-change")).to_contain_text("a device was added")
        expect(alice.locator("#safety-digits")).to_have_attribute("data-number", re.compile(r"^\d{60}$"))
        alice.locator("#safety-close").click()
        expect(warning).to_be_hidden()
        expect(alice.locator("#send")).to_be_enabled()
        expect(alice.locator("#safety-button")).to_have_text("Safety number")  # no longer verified
        expect(second).to_have_attribute("data-status", "delivered")
        expect(second.locator(".held-note")).to_have_count(0)

        async def bob2_reads() -> list[str]:
            bob2 = MootClient.load(node.data_dir.parent / "bob2.json")
            try:
                async with bob2.connect() as live:
                    got = await next_of(live, IncomingMessage, sender="alice@riverside")
                    return [str(got.text)]
            finally:
                await bob2.aclose()

        assert trio.run(bob2_reads) == ["second"]


def test_sign_up_with_an_invite_code(browser, tmp_path):
    proc = NodeProcess(tmp_path / "node", free_port(), MOOT_REGISTRATION="invite")
    proc.start()
    try:
        created = CliRunner().invoke(main, ["--data-dir", str(proc.data_dir), "invite", "create"], catch_exceptions=False)
        assert created.exit_code == 0
        code = created.stdout.strip()
        with person(browser, proc.base_url) as page:
            expect(page.locator("#invite-field")).to_be_visible()
            form = page.locator("#signup-form")
            form.locator("input[name=username]").fill("dora")
            form.locator("input[name=password]").fill(PASSWORD)
            form.locator("input[name=invite]").fill("not-a-code")
            form.locator("button[type=submit]").click()
            expect(form.locator(".form-error")).to_contain_text("invite")
            sign_up(page, "dora", invite=code)
            expect(page.locator("#me")).to_have_text("dora@riverside")
    finally:
        proc.stop()


def test_history_loads_from_the_node_as_the_reader_scrolls_up(browser, node):
    count = 120
    with person(browser, node.base_url) as alice:
        sign_up(alice, "alice")

        async def bob_writes() -> None:
            bob = MootClient(node.base_url)
            await bob.register("bob", PASSWORD)
            await bob.login("bob", PASSWORD)
            await bob.create_device("bob-laptop")
            try:
                async with bob.connect() as live:
                    for i in range(count):
                        await live.send_text("alice@riverside", f"message {i:03}")
                    await live.flush()
            finally:
                await bob.aclose()

        trio.run(bob_writes)
        item = conversation_item(alice, "bob@riverside")
        expect(item.locator(".preview-text")).to_have_text(f"message {count - 1:03}")
        expect(item.locator(".unread")).to_have_text(str(count))
        # forget what this browser stored, so that every message comes from the node's history
        alice.evaluate(
            """() => new Promise((resolve, reject) => {
                const open = indexedDB.open('moot:alice@riverside');
                open.onsuccess = () => {
                    const tx = open.result.transaction(['messages', 'conversations'], 'readwrite');
                    tx.objectStore('messages').clear();
                    tx.objectStore('conversations').clear();
                    tx.oncomplete = () => { open.result.close(); resolve(); };
                    tx.onerror = () => reject(tx.error);
                };
            })"""
        )
        alice.reload()
        wait_connected(alice)
        expect(item.locator(".preview-text")).to_have_text(f"message {count - 1:03}")
        open_chat(alice, "bob@riverside")
        shown = alice.locator("#message-list li.message")
        expect(shown).to_have_count(50)  # one page: the newest
        expect(shown.last).to_contain_text(f"message {count - 1:03}")
        for _ in range(10):
            if shown.count() == count:
                break
            alice.locator("#messages").evaluate("box => { box.scrollTop = 0; box.dispatchEvent(new Event('scroll')); }")
            alice.wait_for_function(
                "n => document.querySelectorAll('#message-list li.message').length > n || "
                "document.getElementById('history-state').textContent.includes('start')",
                arg=shown.count(),
            )
        expect(shown).to_have_count(count)
        expect(alice.locator("#history-state")).to_have_text("This is the start of the conversation.")
        texts = shown.locator(".text").all_inner_texts()
        assert texts == [f"message {i:03}" for i in range(count)]


def test_page_helpers_label_days_and_describe_key_changes(browser, node):
    with person(browser, node.base_url) as page:
        result = page.evaluate(
            """async () => {
                const ui = await import('/js/ui.js');
                const chat = await import('/js/chat.js');
                const now = new Date(2026, 10, 23, 12, 0).getTime();
                const dev = (device, identity_key, name) => ({device, identity_key, name});
                return {
                    today: ui.dayLabel(new Date(2026, 10, 23, 0, 5).getTime(), now),
                    yesterday: ui.dayLabel(new Date(2026, 10, 22, 23, 59).getTime(), now),
                    older: ui.dayLabel(new Date(2026, 10, 20, 9, 0).getTime(), now),
                    ago: [ui.ago(now - 5000, now), ui.ago(now - 5 * 60000, now), ui.ago(now - 3 * 3600000, now)],
                    same: chat.deviceChange({devices: [dev('a', 'K1', 'phone')]}, {devices: [dev('a', 'K1', 'phone')]}),
                    change: chat.deviceChange(
                        {devices: [dev('a', 'K1', 'phone'), dev('b', 'K2', 'laptop')]},
                        {devices: [dev('a', 'K9', 'phone'), dev('c', 'K3', 'tablet')]}),
                };
            }"""
        )
    assert result["today"] == "Today" and result["yesterday"] == "Yesterday"
    assert "20" in result["older"] and "2026" in result["older"]
    assert result["ago"] == ["just now", "5 min ago", "3 h ago"]
    assert result["same"] is None
    assert result["change"] == {"added": ["tablet"], "removed": ["laptop"], "rekeyed": ["phone"]}


CONTRAST_JS = """
() => {
    const rgb = (s) => s.match(/[\\d.]+/g).map(Number);
    const lum = ([r, g, b]) => {
        const f = (c) => { c /= 255; return c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4; };
        return 0.2126 * f(r) + 0.7152 * f(g) + 0.0722 * f(b);
    };
    const background = (el) => {
        for (; el; el = el.parentElement) {
            const c = rgb(getComputedStyle(el).backgroundColor);
            if (c.length < 4 || c[3] > 0) return c.slice(0, 3);
        }
        return [255, 255, 255];
    };
    const out = [];
    const selectors = ['body', '.muted', '.preview-text', '.summary .name', '.message .text', '.message .meta',
        '.ticks', '.ticks.read', '.unread', 'button', '#conn-status', '.day span', '#peer-presence',
        '#compose', '.warning', '.warning button', 'label', '#peer-typing', '.preview.typing', 'dialog .note'];
    for (const sel of selectors) {
        for (const el of document.querySelectorAll(sel)) {
            if (!el.getClientRects().length) continue;
            const fg = rgb(getComputedStyle(el).color).slice(0, 3);
            const [a, b] = [lum(fg), lum(background(el))].sort((x, y) => y - x);
            out.push({sel, ratio: (a + 0.05) / (b + 0.05), text: el.textContent.slice(0, 30)});
        }
    }
    return out;
}
"""


def test_keyboard_only_use_and_readable_contrast(browser, node):
    with person(browser, node.base_url) as alice, person(browser, node.base_url) as bob:
        sign_up(bob, "bob")
        # alice does everything with the keyboard: sign up, find bob, write, read the safety number
        alice.locator("#signin-form input[name=username]").focus()
        for _ in range(3):  # from the sign-in user name past its password and button to the sign-up form
            alice.keyboard.press("Tab")
        alice.keyboard.type("alice")
        alice.keyboard.press("Tab")
        alice.keyboard.type(PASSWORD)
        alice.keyboard.press("Enter")
        wait_connected(alice)
        alice.locator("#search").focus()
        alice.keyboard.type("bo")
        result = alice.locator("#search-results button[data-address='bob@riverside']")
        expect(result).to_be_visible()
        alice.keyboard.press("Tab")
        expect(result).to_be_focused()
        alice.keyboard.press("Enter")
        expect(alice.locator("#compose")).to_be_focused()
        alice.keyboard.type("typed, not clicked")
        alice.keyboard.press("Shift+Enter")
        alice.keyboard.type("second line")
        alice.keyboard.press("Enter")
        sent = message(alice, "typed, not clicked", mine=True)
        expect(sent.locator(".text")).to_have_text("typed, not clicked\nsecond line")
        expect(alice.locator("#compose")).to_have_value("")
        alice.locator("#safety-button").focus()
        alice.keyboard.press("Enter")
        expect(alice.locator("#safety-dialog")).to_be_visible()
        alice.keyboard.press("Escape")
        expect(alice.locator("#safety-dialog")).to_be_hidden()
        open_chat(bob, "alice@riverside")
        write(bob, "got it")
        expect(message(alice, "got it", mine=False)).to_be_visible()

        for page in (alice, bob):
            ratios = page.evaluate(CONTRAST_JS)
            assert len(ratios) > 15
            poor = [r for r in ratios if r["ratio"] < 4.5]
            assert not poor, poor


def test_the_page_says_when_the_node_is_gone_and_reconnects_with_backoff(browser, node):
    async def bob_exists() -> None:
        bob = MootClient(node.base_url)
        await bob.register("bob", PASSWORD)
        await bob.login("bob", PASSWORD)
        await bob.create_device("bob-laptop")
        await bob.aclose()

    trio.run(bob_exists)
    with person(browser, node.base_url) as alice:
        sign_up(alice, "alice")
        start_chat(alice, "bob@riverside")
        node.stop()
        status = alice.locator("#conn-status")
        expect(status).to_have_attribute("data-state", "waiting")
        expect(status).to_contain_text(re.compile(r"Connection lost\. Reconnecting in \d+ s"))
        write(alice, "written while the node was down")
        expect(message(alice, "written while", mine=True)).to_have_attribute("data-status", "pending")
        # the delay grows while the node stays away (attempt n waits 0.5 * 2^(n-1) s, half of it jittered)
        delays = []
        first = int(status.get_attribute("data-attempt"))
        for attempt in range(first, first + 4):
            # at least attempt n, waiting (a busy machine may draw two attempts in one frame)
            alice.wait_for_function(
                "n => { const el = document.getElementById('conn-status');"
                " return Number(el.dataset.attempt) >= n && el.dataset.state === 'waiting' && /in \\d+ s/.test(el.textContent); }",
                arg=attempt, timeout=35_000,  # delays double up to 30 s: a late start waits longer
            )
            delays.append(int(re.search(r"in (\d+) s", status.inner_text()).group(1)))
        assert delays[-1] >= 2 and delays[-1] >= delays[0], delays
        node.start()
        expect(status).to_have_attribute("data-state", "waiting")
        status.locator("button", has_text="Retry now").click()
        wait_connected(alice)
        expect(message(alice, "written while", mine=True)).to_have_attribute("data-status", "sent")


def test_after_its_device_is_removed_the_browser_signs_in_with_a_new_one(browser, node):
    with person(browser, node.base_url) as alice:
        sign_up(alice, "alice")
        [old] = _devices(alice)
        status = alice.evaluate(f"async () => (await fetch('/api/v1/devices/{old}', {{method: 'DELETE'}})).status")
        assert status == 200
        # the node closed the page's connection (4401): the page asks to sign in again
        expect(alice.locator("#signin-form")).to_be_visible()
        sign_in(alice, "alice")
        [new] = _devices(alice)
        assert new != old
        expect(alice.locator("#own-warning")).to_be_hidden()  # the page made it: no alarm


def test_a_new_device_on_my_own_account_unverifies_my_contacts(browser, node):
    with person(browser, node.base_url) as alice, person(browser, node.base_url) as bob:
        sign_up(alice, "alice")
        sign_up(bob, "bob")
        start_chat(alice, "bob@riverside")
        write(alice, "hello")
        alice.locator("#safety-button").click()
        expect(alice.locator("#safety-digits")).to_have_attribute("data-number", re.compile(r"^\d{60}$"))
        alice.locator("#safety-verified").check()
        alice.locator("#safety-close").click()
        expect(alice.locator("#safety-button")).to_have_text("Verified ✓")

        async def someone_adds_a_device_to_alice() -> None:
            intruder = MootClient(node.base_url)
            await intruder.login("alice", PASSWORD)
            await intruder.create_device("not-alice")
            await intruder.aclose()

        trio.run(someone_adds_a_device_to_alice)
        write(alice, "are you there?")  # refused for missing the new device: the page looks again
        expect(alice.locator("#own-warning")).to_contain_text("added not-alice")
        expect(alice.locator("#key-warning")).to_contain_text("Your own devices changed")
        held = message(alice, "are you there?", mine=True)
        expect(held.locator(".held-note")).to_be_visible()
        expect(alice.locator("#safety-button")).to_have_text("Safety number")


def test_unread_counts_after_a_reload_match_the_node(browser, node):
    with person(browser, node.base_url) as alice:
        sign_up(alice, "alice")

        saved = node.data_dir.parent / "bob.json"

        async def bob_writes(n: int, first: bool) -> None:
            if first:
                bob = MootClient(node.base_url)
                await bob.register("bob", PASSWORD)
                await bob.login("bob", PASSWORD)
                await bob.create_device("bob-laptop")
                bob.save(saved)
            else:
                bob = MootClient.load(saved)
            try:
                async with bob.connect() as live:
                    for i in range(n):
                        await live.send_text("alice@riverside", f"note {i}")
                    await live.flush()
            finally:
                await bob.aclose()

        trio.run(bob_writes, 2, True)
        item = conversation_item(alice, "bob@riverside")
        expect(item.locator(".unread")).to_have_text("2")
        context = alice.context
        alice.close()
        trio.run(bob_writes, 5, False)  # while alice's page is closed
        again = context.new_page()
        again.goto(node.base_url + "/")
        wait_connected(again)
        item = conversation_item(again, "bob@riverside")
        expect(item.locator(".preview-text")).to_have_text("note 4")
        expect(item.locator(".unread")).to_have_text("7")
        again.wait_for_timeout(1000)  # the backlog and the node's count have both arrived by now
        expect(item.locator(".unread")).to_have_text("7")
        [conv] = again.evaluate("async () => (await (await fetch('/api/v1/conversations')).json()).conversations")
        assert conv["unread"] == 7


def test_people_on_two_federated_nodes_chat_see_presence_and_typing_from_their_browsers(browser, tmp_path):
    with federated_pair(tmp_path) as (riverside, hilltop):
        with (
            person(browser, riverside.base_url, hideable=True) as alice,
            person(browser, hilltop.base_url, hideable=True) as bob,
        ):
            sign_up(alice, "alice")
            sign_up(bob, "bob")
            alice.locator("#search").fill("bob@hilltop")
            alice.locator("#search-results button[data-address='bob@hilltop']").click()
            write(alice, "Hello from the river")
            item = conversation_item(bob, "alice@riverside")
            expect(item.locator(".preview-text")).to_have_text("Hello from the river")
            mine = message(alice, "Hello from the river", mine=True)
            expect(mine).to_have_attribute("data-status", "delivered")
            open_chat(bob, "alice@riverside")
            expect(mine).to_have_attribute("data-status", "read")
            write(bob, "Hello from the hill")
            expect(message(alice, "Hello from the hill", mine=False)).to_be_visible()

            # presence and typing cross the nodes too, both ways
            for (watcher, watched, address) in ((alice, bob, "bob@hilltop"), (bob, alice, "alice@riverside")):
                presence = watcher.locator("#peer-presence")
                dot = conversation_item(watcher, address).locator(".presence-dot")
                expect(presence).to_have_text("online")
                set_visibility(watched, "hidden")
                expect(presence).to_have_text("away")
                expect(dot).to_have_attribute("data-state", "away")
                set_visibility(watched, "visible")
                expect(presence).to_have_text("online")
                expect(dot).to_have_attribute("data-state", "online")

                name = address.split("@")[0]
                watched.locator("#compose").press_sequentially("On my way", delay=40)
                expect(watcher.locator("#peer-typing")).to_have_text(f"{name} is typing…")
                expect(conversation_item(watcher, address).locator(".typing")).to_have_text(f"{name} is typing…")
                watched.locator("#compose").fill("")
                expect(watcher.locator("#peer-typing")).to_have_text("", timeout=3000)
                expect(conversation_item(watcher, address).locator(".typing")).to_have_count(0, timeout=3000)
            # an address on a node nobody knows is a clear answer, not a hang
            alice.locator("#search").fill("carol@meadow")
            expect(alice.locator("#search-results li.muted")).to_contain_text("unknown node")


def test_a_hidden_page_is_away_and_typing_shows_in_the_header_and_the_list(browser, node):
    with person(browser, node.base_url) as alice, person(browser, node.base_url, hideable=True) as bob:
        typed = typing_frames_sent(alice)
        sign_up(alice, "alice")
        sign_up(bob, "bob")
        start_chat(alice, "bob@riverside")
        write(alice, "hi")
        row = conversation_item(bob, "alice@riverside")
        expect(row.locator(".preview-text")).to_have_text("hi")
        presence = alice.locator("#peer-presence")
        bob_row = conversation_item(alice, "bob@riverside")
        expect(presence).to_have_text("online")

        # bob switches to another tab: alice sees him away, in the header and the list
        set_visibility(bob, "hidden")
        expect(presence).to_have_text("away")
        expect(presence).to_have_attribute("data-state", "away")
        expect(bob_row.locator(".presence-dot")).to_have_attribute("data-state", "away")
        expect(bob_row.locator("button")).to_have_attribute("aria-label", re.compile(r"^bob@riverside, away$"))
        screenshot(alice, "away")
        # bob's connection drops while the tab is hidden: the new connection starts out
        # online on the node, and the page says "away" again once it is ready
        bob.context.set_offline(True)
        expect(presence).to_have_text(re.compile(r"^last seen "))
        bob.context.set_offline(False)
        wait_connected(bob)
        expect(presence).to_have_text("away")
        set_visibility(bob, "visible")
        expect(presence).to_have_text("online")
        expect(bob_row.locator(".presence-dot")).to_have_attribute("data-state", "online")

        # alice types; bob has the list open: the row says so, then the header once he opens it
        compose = alice.locator("#compose")
        compose.press_sequentially("Are you", delay=40)
        expect(row.locator(".typing")).to_have_text("alice is typing…")
        expect(row.locator(".preview-text")).to_have_count(0)
        expect(row.locator("button")).to_have_attribute("aria-label", re.compile(r", typing$"))
        open_chat(bob, "alice@riverside")
        header = bob.locator("#peer-typing")
        expect(header).to_have_text("alice is typing…")
        expect(header).to_have_attribute("aria-live", "polite")
        screenshot(bob, "typing")
        for page in (alice, bob):
            poor = [r for r in page.evaluate(CONTRAST_JS) if r["ratio"] < 4.5]
            assert not poor, poor
        # she empties the composer: gone on both at once (active: false), not 6 s later
        compose.fill("")
        expect(header).to_have_text("", timeout=3000)
        expect(row.locator(".typing")).to_have_count(0, timeout=3000)
        expect(row.locator(".preview-text")).to_have_text("hi")
        assert typed[-1] == {"type": "typing", "conversation": "bob@riverside", "active": False}

        # typing for several seconds sends "active: true" about every 3 s, not per key
        typed.clear()
        started = time.monotonic()
        compose.press_sequentially("Sorry, I was away from my desk for a while", delay=100)
        took = time.monotonic() - started
        actives = [f for f in typed if f["active"]]
        assert took >= 3.2 and 2 <= len(actives) <= took // 3 + 1, (took, typed)
        assert all(not f["active"] for f in typed[len(actives):]), typed
        expect(header).to_have_text("alice is typing…")
        # she sends it: the indicator goes, the message comes
        compose.press("Enter")
        expect(message(bob, "Sorry, I was away", mine=False)).to_be_visible()
        expect(header).to_have_text("")
        assert typed[-1]["active"] is False

        # she types and stops without sending: the indicator lapses by itself after ~6 s
        typed.clear()
        compose.press_sequentially("hm", delay=40)
        expect(header).to_have_text("alice is typing…")
        shown = time.monotonic()
        expect(header).to_have_text("", timeout=12_000)
        lapsed = time.monotonic() - shown
        assert 3.5 <= lapsed <= 9, lapsed
        assert [f["active"] for f in typed] == [True]  # nothing said it stopped: it lapsed

        # leaving the conversation stops it too
        compose.press_sequentially("!", delay=40)
        expect(header).to_have_text("alice is typing…")
        alice.set_viewport_size(PHONE)
        alice.locator("#back").click()
        expect(header).to_have_text("", timeout=3000)
        assert typed[-1] == {"type": "typing", "conversation": "bob@riverside", "active": False}


def test_hiding_my_online_status_shows_me_offline_while_connected(browser, node):
    with person(browser, node.base_url) as alice, person(browser, node.base_url) as bob:
        sign_up(alice, "alice")
        sign_up(bob, "bob")
        start_chat(alice, "bob@riverside")
        write(alice, "hi")
        expect(conversation_item(bob, "alice@riverside")).to_be_visible()
        presence = alice.locator("#peer-presence")
        expect(presence).to_have_text("online")

        open_settings(bob)
        show = bob.locator("#setting-show-presence")
        receipts = bob.locator("#setting-read-receipts")
        expect(show).to_be_checked()
        expect(receipts).to_be_checked()
        screenshot(bob, "settings")
        show.uncheck()
        # bob is still connected, and alice sees him offline, with no last-seen time
        expect(presence).to_have_text("offline")
        expect(conversation_item(alice, "bob@riverside").locator(".presence-dot")).to_have_attribute("data-state", "offline")
        expect(bob.locator("#conn-status")).to_have_text("Connected")
        receipts.uncheck()
        expect(bob.locator("#settings-error")).to_have_text("")
        bob.locator("#settings-close").click()
        me = bob.evaluate("async () => (await (await fetch('/api/v1/me')).json()).settings")
        assert me == {"read_receipts": False, "show_presence": False}

        # the page loads them from the node: after a reload the boxes say the same
        bob.reload()
        wait_connected(bob)
        open_settings(bob)
        expect(show).not_to_be_checked()
        expect(receipts).not_to_be_checked()
        expect(presence).to_have_text("offline")  # reconnecting did not show him
        show.check()
        expect(presence).to_have_text("online")
        expect(show).to_be_checked()
        bob.keyboard.press("Escape")
        expect(bob.locator("#settings-dialog")).to_be_hidden()


def test_typing_from_a_python_client_goes_when_its_message_arrives(browser, node):
    saved = node.data_dir.parent / "carol.json"

    async def carol_exists() -> None:
        carol = MootClient(node.base_url)
        await carol.register("carol", PASSWORD)
        await carol.login("carol", PASSWORD)
        await carol.create_device("carol-laptop")
        carol.save(saved)
        await carol.aclose()

    seen = threading.Event()
    failures: list[BaseException] = []

    async def carol_types_then_writes() -> None:
        carol = MootClient.load(saved)
        try:
            async with carol.connect() as live:
                await next_of(live, IncomingMessage, timeout=30, sender="alice@riverside")
                await live.typing("alice@riverside", True)
                await trio.to_thread.run_sync(seen.wait, 20)
                await live.typing("alice@riverside", True)  # shown 6 s from now, unless the message ends it
                await live.send_text("alice@riverside", "typed it")
                await live.flush()
        finally:
            await carol.aclose()

    def carol_thread() -> None:
        try:
            trio.run(carol_types_then_writes)
        except BaseException as exc:  # reported by the test below
            failures.append(exc)

    trio.run(carol_exists)
    thread = threading.Thread(target=carol_thread)
    with person(browser, node.base_url) as alice:
        sign_up(alice, "alice")
        thread.start()
        try:
            start_chat(alice, "carol@riverside")
            write(alice, "Carol?")
            header = alice.locator("#peer-typing")
            expect(header).to_have_text("carol is typing…")
            expect(conversation_item(alice, "carol@riverside").locator(".typing")).to_have_text("carol is typing…")
        finally:
            seen.set()
        expect(message(alice, "typed it", mine=False)).to_be_visible()
        # carol never said she stopped: only her message can end it this soon
        expect(header).to_have_text("", timeout=2000)
        expect(conversation_item(alice, "carol@riverside").locator(".typing")).to_have_count(0, timeout=2000)
    thread.join(30)
    assert not thread.is_alive() and not failures, failures


def test_page_helpers_for_presence_typing_and_idleness(browser, node):
    with person(browser, node.base_url) as page:
        result = page.evaluate(
            """async () => {
                const chat = await import('/js/chat.js');
                const ui = await import('/js/ui.js');
                const { AwayWatcher } = await import('/js/activity.js');
                const out = {};
                const a = new chat.TypingAnnouncer(3000);
                out.announced = [a.typed('bob@n', 0), a.typed('bob@n', 1000), a.typed('bob@n', 3000),
                    a.typed('carol@n', 3500), a.stopped(), a.stopped()];
                const t = new chat.TypingIndicators(6000);
                out.shown = [t.note('bob@n', 'bob@n', true, 0), t.note('bob@n', 'bob@n', true, 3000),
                    t.typist('bob@n', 8000), t.expire(8999), t.nextExpiry(), t.typist('bob@n', 9000),
                    t.expire(9000), t.nextExpiry(), t.note('bob@n', 'bob@n', true, 10000),
                    t.note('bob@n', 'bob@n', false, 10001), t.typist('bob@n', 10002)];
                out.presence = [ui.presenceText({state: 'away'}), ui.presenceText({state: 'online'}),
                    ui.presenceText({state: 'offline', last_seen: null}),
                    ui.presenceText({state: 'offline', last_seen: 1000}, 1000 + 5 * 60000)];
                // idle for 150 ms means away; input means back; a hidden document is away
                const doc = new EventTarget();
                doc.visibilityState = 'visible';
                const win = new EventTarget();
                const seen = [];
                const watcher = new AwayWatcher((away) => seen.push(away), {doc, win, idleMs: 150});
                watcher.start();
                const until = (n) => new Promise((resolve) => {
                    const started = Date.now();
                    const look = () => (seen.length >= n || Date.now() - started > 3000 ? resolve() : setTimeout(look, 10));
                    look();
                });
                await until(2);
                win.dispatchEvent(new Event('keydown'));
                doc.visibilityState = 'hidden';
                doc.dispatchEvent(new Event('visibilitychange'));
                doc.visibilityState = 'visible';
                doc.dispatchEvent(new Event('visibilitychange'));
                win.dispatchEvent(new Event('pointermove'));
                watcher.stop();
                out.idle = seen;
                return out;
            }"""
        )
    typing = lambda active, to="bob@n": {"type": "typing", "conversation": to, "active": active}  # noqa: E731
    assert result["announced"] == [
        [typing(True)], [], [typing(True)], [typing(False), typing(True, "carol@n")], [typing(False, "carol@n")], [],
    ]
    assert result["shown"] == [True, False, "bob@n", False, 9000, None, True, None, True, True, None]
    assert result["presence"] == ["away", "online", "offline", "last seen 5 min ago"]
    assert result["idle"] == [False, True, False, True, False]
