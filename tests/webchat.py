"""Driving the node's web page the way a person does: forms, buttons, the keyboard.

The selectors here are the page's contract with its tests (web/static/index.html,
web/static/js/ui.js). Every wait is bounded. Screenshots go to
``test-artifacts/screenshots`` (git ignores it) so a person can look at them.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from playwright.sync_api import Browser, Page, expect

from tests.nodes import PASSWORD, REPO

SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WAIT_MS = 15_000

# Chromium under Playwright keeps every page visible: a page brought to the front
# over it, or its window minimised through CDP (Browser.setWindowBounds), leaves it
# "visible" with no visibilitychange (Playwright issue #2286). So the test takes over
# document.visibilityState before the page's scripts run, and switches it the way the
# browser would: change the state, then fire visibilitychange on the document.
VISIBILITY_SWITCH = """
(() => {
    let state = 'visible';
    Object.defineProperty(document, 'visibilityState', {configurable: true, get: () => state});
    Object.defineProperty(document, 'hidden', {configurable: true, get: () => state !== 'visible'});
    Object.defineProperty(window, '__testSetVisibility', {value: (next) => {
        state = next;
        document.dispatchEvent(new Event('visibilitychange'));
    }});
})();
"""


# Calls in tests stay on this machine, with 127.0.0.1 as the only address either
# side is told about. Chromium (with tests.browser.CALL_ARGS) gathers host
# candidates on every interface, loopback included, and no flag or policy limits it
# to one interface. This stands in for the page's RTCPeerConnection before its
# scripts run and keeps every candidate on another address out of the signalling at
# both ends: not signalled (icecandidate events), not taken (addIceCandidate,
# candidate lines of a remote SDP). What it cannot stop: Chromium still pairs its
# sockets on the machine's other addresses (here 192.0.2.2) with the other side's
# 127.0.0.1 candidate, and may select such a pair. Packets between two addresses of
# one host go through the kernel's loopback device, never a network; the tests check
# that every address in a selected pair belongs to this machine
# (tests/test_web_calls.py assert_stays_on_this_host). It also lists the
# connections the page made (window.__rtc.peers) for getStats, and what it dropped.
LOOPBACK_ONLY_RTC = """
(() => {
    const Native = window.RTCPeerConnection;
    if (!Native) return;
    const onLoopback = (line) => String(line || '').replace(/^a=/, '').split(' ')[4] === '127.0.0.1';
    const rtc = {peers: [], dropped: [], signalled: []};
    Object.defineProperty(window, '__rtc', {value: rtc});
    class LoopbackOnly extends Native {
        constructor(config) {
            super(config);
            rtc.peers.push(this);
        }
        addEventListener(type, listener, options) {
            if (type !== 'icecandidate') return super.addEventListener(type, listener, options);
            return super.addEventListener(type, (e) => {
                if (e.candidate && e.candidate.candidate) {
                    if (!onLoopback(e.candidate.candidate)) { rtc.dropped.push(e.candidate.candidate); return; }
                    rtc.signalled.push(e.candidate.candidate);
                }
                listener.call(this, e);
            }, options);
        }
        addIceCandidate(candidate, ...rest) {
            if (candidate && candidate.candidate && !onLoopback(candidate.candidate)) {
                rtc.dropped.push(candidate.candidate);
                return Promise.resolve();
            }
            return super.addIceCandidate(candidate, ...rest);
        }
        setRemoteDescription(description, ...rest) {
            if (description && description.sdp) {
                const sdp = description.sdp.split('\\r\\n').filter((l) => !l.startsWith('a=candidate:') || onLoopback(l)).join('\\r\\n');
                description = {type: description.type, sdp};
            }
            return super.setRemoteDescription(description, ...rest);
        }
    }
    window.RTCPeerConnection = LoopbackOnly;
})();
"""

# What each of the page's peer connections says about itself: its state, the
# addresses of the selected candidate pair, and what has arrived per media kind.
RTC_REPORT_JS = """
async () => {
    const out = [];
    for (const pc of window.__rtc.peers) {
        const byId = new Map();
        (await pc.getStats()).forEach((r) => byId.set(r.id, r));
        const all = [...byId.values()];
        const transport = all.find((r) => r.type === 'transport' && r.selectedCandidatePairId);
        const pair = transport ? byId.get(transport.selectedCandidatePairId) : null;
        const inbound = {};
        for (const r of all.filter((r) => r.type === 'inbound-rtp')) {
            inbound[r.kind] = {bytes: r.bytesReceived || 0, frames: r.framesDecoded || 0, width: r.frameWidth || 0};
        }
        out.push({
            state: pc.connectionState,
            local: pair ? byId.get(pair.localCandidateId).address : null,
            remote: pair ? byId.get(pair.remoteCandidateId).address : null,
            inbound,
        });
    }
    return {peers: out, dropped: window.__rtc.dropped.length, signalled: window.__rtc.signalled};
}
"""


@contextmanager
def person(
    browser: Browser, base_url: str, *, viewport: dict[str, int] = DESKTOP, hideable: bool = False, calls: bool = False
) -> Iterator[Page]:
    """A browser context of its own (its own cookies and IndexedDB) with one page open on the node.
    A ``hideable`` page can be hidden and shown again with ``set_visibility``; with
    ``calls``, its WebRTC stays on 127.0.0.1 (LOOPBACK_ONLY_RTC)."""
    context = browser.new_context(viewport=viewport)
    if hideable:
        context.add_init_script(VISIBILITY_SWITCH)
    if calls:
        context.add_init_script(LOOPBACK_ONLY_RTC)
    try:
        page = context.new_page()
        page.set_default_timeout(WAIT_MS)
        errors: list[str] = []
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.goto(base_url + "/")
        yield page
        assert not errors, f"uncaught errors in the page: {errors}"
    finally:
        context.close()


def sign_up(page: Page, username: str, *, password: str = PASSWORD, invite: str | None = None) -> None:
    form = page.locator("#signup-form")
    form.locator("input[name=username]").fill(username)
    form.locator("input[name=password]").fill(password)
    if invite is not None:
        form.locator("input[name=invite]").fill(invite)
    form.locator("button[type=submit]").click()
    wait_connected(page)


def sign_in(page: Page, username: str, *, password: str = PASSWORD) -> None:
    form = page.locator("#signin-form")
    form.locator("input[name=username]").fill(username)
    form.locator("input[name=password]").fill(password)
    form.locator("button[type=submit]").click()
    wait_connected(page)


def wait_connected(page: Page) -> None:
    expect(page.locator("#main")).to_be_visible()
    expect(page.locator("#conn-status")).to_have_attribute("data-state", "online")
    expect(page.locator("#conn-status")).to_have_text("Connected")


def start_chat(page: Page, peer: str) -> None:
    """Find ``peer`` with the search box and open the conversation."""
    page.locator("#search").fill(peer.split("@")[0])
    page.locator(f"#search-results button[data-address='{peer}']").click()
    expect(page.locator("#peer-name")).to_have_text(peer)


def open_chat(page: Page, peer: str) -> None:
    page.locator(f"#conversation-list button[data-peer='{peer}']").click()
    expect(page.locator("#peer-name")).to_have_text(peer)


def write(page: Page, text: str) -> None:
    """Type a message and press Enter."""
    page.locator("#compose").fill(text)
    page.locator("#compose").press("Enter")


def message(page: Page, text: str, *, mine: bool | None = None) -> Any:
    side = "" if mine is None else ("[data-mine='1']" if mine else "[data-mine='0']")
    return page.locator(f"#message-list li.message{side}", has_text=text)


def conversation_item(page: Page, peer: str) -> Any:
    return page.locator(f"#conversation-list li[data-peer='{peer}']")


def set_visibility(page: Page, state: str) -> None:
    """Hide the page ("hidden": the person switched tabs) or show it again ("visible")."""
    page.evaluate("state => window.__testSetVisibility(state)", state)
    assert page.evaluate("() => document.visibilityState") == state


def typing_frames_sent(page: Page) -> list[dict[str, Any]]:
    """A list that fills with the ``typing`` frames the page sends on its WebSockets
    from now on (call it before the page connects)."""
    sent: list[dict[str, Any]] = []

    def on_frame(payload: str | bytes) -> None:
        parsed = json.loads(payload)
        for frame in parsed if isinstance(parsed, list) else [parsed]:
            if frame.get("type") == "typing":
                sent.append(frame)

    page.on("websocket", lambda ws: ws.on("framesent", on_frame))
    return sent


def open_settings(page: Page) -> None:
    page.locator("#settings-button").click()
    expect(page.locator("#settings-dialog")).to_be_visible()
    expect(page.locator("#setting-show-presence")).to_be_enabled()  # the settings have loaded


def screenshot(page: Page, name: str) -> Path:
    """Save the current screen as ``<name>-<width>.png``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    width = page.viewport_size["width"] if page.viewport_size else 0
    path = SCREENSHOTS / f"{name}-{width}.png"
    page.screenshot(path=str(path))
    return path


def outbox_size(page: Page, address: str) -> int:
    """How many messages wait in the page's IndexedDB outbox."""
    return int(page.evaluate(
        """(name) => new Promise((resolve, reject) => {
            const open = indexedDB.open(name);
            open.onerror = () => reject(open.error);
            open.onsuccess = () => {
                const db = open.result;
                const count = db.transaction('outbox').objectStore('outbox').count();
                count.onsuccess = () => { db.close(); resolve(count.result); };
                count.onerror = () => reject(count.error);
            };
        })""",
        f"moot:{address}",
    ))


def rtc_report(page: Page) -> dict[str, Any]:
    return page.evaluate(RTC_REPORT_JS)  # type: ignore[no-any-return]


def call_screen(page: Page) -> Any:
    return page.locator("#call-dialog")


def call_entry(page: Page, text: str) -> Any:
    """A call-history entry in the open conversation."""
    return page.locator("#message-list li.call-entry", has_text=text)
