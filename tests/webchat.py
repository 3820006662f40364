"""Driving the node's web page the way a person does: forms, buttons, the keyboard.

The selectors here are the page's contract with its tests (web/static/index.html,
web/static/js/ui.js). Every wait is bounded. Screenshots go to
``test-artifacts/screenshots`` (git ignores it) so a person can look at them.
"""

from __future__ import annotations

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


@contextmanager
def person(browser: Browser, base_url: str, *, viewport: dict[str, int] = DESKTOP) -> Iterator[Page]:
    """A browser context of its own (its own cookies and IndexedDB) with one page open on the node."""
    context = browser.new_context(viewport=viewport)
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
