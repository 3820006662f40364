"""Debian's Chromium driven by Playwright for Python, kept off the network.

Never `playwright install`: `make test` installs Chromium with apt. Playwright's
sync API runs its own event loop, so tests that use it are plain (sync) tests and
talk to nodes in separate processes (tests.nodes.NodeProcess).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from playwright.sync_api import Browser, sync_playwright

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run", "--disable-default-apps", "--disable-extensions",
]
# For calls: a fake camera and microphone (a test pattern and a beep) granted without
# asking; media may play without a click first; and WebRTC on loopback. Chromium
# leaves 127.0.0.1 out of its ICE candidates unless allowed, and hides host addresses
# behind mDNS ".local" names, which would need a multicast resolver; with raw
# addresses a test can keep every candidate it signals to 127.0.0.1
# (tests/webchat.py LOOPBACK_ONLY_RTC).
CALL_ARGS = [
    "--use-fake-device-for-media-stream", "--use-fake-ui-for-media-stream", "--autoplay-policy=no-user-gesture-required",
    "--allow-loopback-in-peer-connection", "--disable-features=WebRtcHideLocalIpsWithMdns",
]


@contextmanager
def chromium(extra_args: Sequence[str] = ()) -> Iterator[Browser]:
    if not CHROMIUM.exists():
        raise RuntimeError(f"{CHROMIUM} is missing: `make test-deps` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=[*CHROMIUM_ARGS, *extra_args], timeout=30_000)
        try:
            yield browser
        finally:
            browser.close()
