"""Calls from the web page, end to end: real node processes (two federated ones where
it matters), real headless Chromium with a fake camera and microphone, and a Python
peer answering with aiortc.

ICE stays on this machine: no STUN or TURN server (the nodes list none, so
``/api/v1/ice`` is empty), Chromium allowed to gather 127.0.0.1 with raw addresses
(tests.browser.CALL_ARGS), and every candidate on another address kept out of the
signalling at both ends (tests.webchat.LOOPBACK_ONLY_RTC; the Python peer gathers on
127.0.0.1 only). Each call test checks that only 127.0.0.1 candidates were signalled
and that the selected candidate pair joins addresses of this machine (Chromium may
use its socket on another local address towards the peer's 127.0.0.1), and that
media arrives: inbound RTP bytes and decoded frames growing in getStats, a playing
remote <video> with a picture.

The Python peer runs in its own process (tests/call_peer.py): Playwright's sync API
and trio-asyncio's loop do not share one.
"""

from __future__ import annotations

import json
import queue
import secrets
import re
import socket
import subprocess
import sys
import threading
import time
from typing import Any

import pytest
import trio
from playwright.sync_api import Page, expect

from cli.client import MootClient
from tests.browser import CALL_ARGS, chromium
from tests.nodes import PASSWORD, REPO, NodeProcess, federated_pair, free_port
from tests.test_web_client import CONTRAST_JS
from tests.webchat import (
    call_entry,
    call_screen,
    message,
    open_chat,
    person,
    rtc_report,
    screenshot,
    sign_in,
    sign_up,
    start_chat,
    write,
)

CALL_WAIT_MS = 30_000  # connecting on a loaded machine: generous
MEDIA_WAIT_S = 30


@pytest.fixture(scope="module")
def browser():
    with chromium(CALL_ARGS) as b:
        yield b


def wait_for_media(page: Page, kinds: tuple[str, ...]) -> dict[str, Any]:
    """Poll getStats until the page's (one) connection is connected on 127.0.0.1 and
    each media kind has arrived and keeps arriving; the last report. Bounded in time."""
    deadline = time.monotonic() + MEDIA_WAIT_S
    first: dict[str, Any] | None = None
    report: dict[str, Any] = {}
    while time.monotonic() < deadline:
        report = rtc_report(page)
        peers = report["peers"]
        live = [p for p in peers if p["state"] == "connected"]
        if live and all(live[-1]["inbound"].get(k, {}).get("bytes", 0) > 0 for k in kinds):
            if first is None:
                first = live[-1]
            elif all(live[-1]["inbound"][k]["bytes"] > first["inbound"][k]["bytes"] for k in kinds) and (
                "video" not in kinds or live[-1]["inbound"]["video"]["frames"] > first["inbound"]["video"]["frames"]
            ):
                return report
        page.wait_for_timeout(300)
    raise AssertionError(f"media did not flow: {report}")


def is_this_hosts_address(address: str) -> bool:
    """Whether ``address`` belongs to this machine: only then can a socket be bound to it."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in address else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((address, 0))
        return True
    except OSError:
        return False


def assert_stays_on_this_host(report: dict[str, Any]) -> None:
    """The page signalled only 127.0.0.1 candidates, and its selected candidate pair
    joins two addresses of this machine (Chromium may send from its socket on another
    local address to the peer's 127.0.0.1: see tests/webchat.py LOOPBACK_ONLY_RTC).
    A peer-reflexive remote address may be hidden (""); the other side's report has it
    as its local address."""
    connected = [p for p in report["peers"] if p["state"] == "connected"]
    assert connected, report
    for peer in connected:
        assert peer["local"] and is_this_hosts_address(peer["local"]), report
        assert peer["remote"] == "" or is_this_hosts_address(peer["remote"]), report
    assert report["signalled"], "no candidate was signalled"
    assert all(c.split()[4] == "127.0.0.1" for c in report["signalled"]), report["signalled"]


def remote_video_plays(page: Page) -> None:
    """The remote <video> shows a picture and its time moves on."""
    video = page.locator("#remote-video")
    expect(video).to_be_visible()
    first = page.wait_for_function(
        "() => { const v = document.getElementById('remote-video'); return v.videoWidth > 0 && v.currentTime > 0 && v.currentTime; }",
        timeout=CALL_WAIT_MS,
    ).json_value()
    page.wait_for_function(
        "(t) => document.getElementById('remote-video').currentTime > t + 0.3", arg=first, timeout=CALL_WAIT_MS,
    )
    size = page.evaluate("() => { const v = document.getElementById('remote-video'); return [v.videoWidth, v.videoHeight]; }")
    assert size[0] > 0 and size[1] > 0


def local_track_enabled(page: Page, kind: str) -> bool:
    return bool(page.evaluate(
        "(kind) => window.__rtc.peers.at(-1).getSenders().filter((s) => s.track && s.track.kind === kind)"
        ".every((s) => s.track.enabled)", kind,
    ))


def expect_state(page: Page, state: str, *, timeout: int = CALL_WAIT_MS) -> None:
    expect(call_screen(page)).to_have_attribute("data-state", state, timeout=timeout)


def test_two_browsers_on_two_federated_nodes_make_a_video_call(browser, tmp_path):
    with federated_pair(tmp_path) as (riverside, hilltop):
        with (
            person(browser, riverside.base_url, calls=True) as alice,
            person(browser, hilltop.base_url, calls=True) as bob,
        ):
            sign_up(alice, "alice")
            sign_up(bob, "bob")
            alice.locator("#search").fill("bob@hilltop")
            alice.locator("#search-results button[data-address='bob@hilltop']").click()
            write(alice, "Call you now")
            expect(message(alice, "Call you now", mine=True)).to_have_attribute("data-status", "delivered")

            alice.locator("#video-call-button").click()
            screen = call_screen(alice)
            expect(screen).to_be_visible()
            expect(alice.locator("#call-status")).to_have_text(re.compile("Calling…|Ringing…"))
            expect(alice.locator("#call-hangup")).to_have_text("Cancel")

            # bob's page rings, with the keyboard on Accept
            expect_state(bob, "incoming")
            expect(bob.locator("#call-status")).to_have_text("Incoming video call")
            expect(bob.locator("#call-peer")).to_have_text("alice@riverside")
            expect(bob.locator("#call-accept")).to_be_focused()
            expect(alice.locator("#call-status")).to_have_text("Ringing…")
            screenshot(bob, "call-incoming")
            bob.keyboard.press("Enter")

            for page in (alice, bob):
                expect_state(page, "active")
                expect(page.locator("#call-status")).to_have_text("Connected")
                expect(page.locator("#call-hangup")).to_have_text("Hang up")
            for page in (alice, bob):
                report = wait_for_media(page, ("audio", "video"))
                assert_stays_on_this_host(report)
                remote_video_plays(page)
                expect(page.locator("#local-video")).to_be_visible()
                expect(page.locator("#call-duration")).to_have_text(re.compile(r"^\d+:\d\d$"))
            screenshot(alice, "call-active")

            # mute and camera off act on what is sent
            assert local_track_enabled(alice, "audio") and local_track_enabled(alice, "video")
            alice.locator("#call-mute").click()
            expect(alice.locator("#call-mute")).to_have_attribute("aria-pressed", "true")
            assert not local_track_enabled(alice, "audio")
            alice.locator("#call-camera").click()
            expect(alice.locator("#call-camera")).to_have_attribute("aria-pressed", "true")
            expect(alice.locator("#local-video")).to_be_hidden()
            assert not local_track_enabled(alice, "video")
            alice.locator("#call-mute").click()
            assert local_track_enabled(alice, "audio")

            alice.wait_for_timeout(1200)  # a call that lasted a second or more
            bob.locator("#call-hangup").click()
            expect(bob.locator("#call-status")).to_have_text("Call ended")
            expect(alice.locator("#call-status")).to_have_text("Call ended")
            for page in (alice, bob):
                expect(page.locator("#call-close")).to_be_focused()
                page.locator("#call-close").click()
                expect(call_screen(page)).to_be_hidden()
                assert all(p["state"] == "closed" for p in rtc_report(page)["peers"])

            # the history, in both conversations, and still there after a reload
            outgoing = call_entry(alice, "Outgoing video call")
            expect(outgoing).to_have_text(re.compile(r"Outgoing video call, 0:0[1-9]"))
            open_chat(bob, "alice@riverside")
            expect(call_entry(bob, "Incoming video call")).to_have_text(re.compile(r"Incoming video call, 0:0[1-9]"))
            expect(bob.locator("#conversation-list li[data-peer='alice@riverside'] .preview-text")).to_have_text(
                re.compile(r"Incoming video call, "))
            alice.reload()
            expect(alice.locator("#conn-status")).to_have_text("Connected")
            open_chat(alice, "bob@hilltop")
            expect(call_entry(alice, "Outgoing video call")).to_have_count(1)
            expect(message(alice, "Call you now", mine=True)).to_be_visible()


class CallPeerProcess:
    """tests/call_peer.py in its own process; its JSON lines, read with a deadline."""

    def __init__(self, state: str, *args: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "tests.call_peer", state, *args], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))

    def next(self, event: str, timeout: float = 60) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                got = self.lines.get(timeout=left)
            except queue.Empty:
                break
            if got["event"] == "error":
                raise AssertionError(f"the Python peer failed: {got['error']}")
            if got["event"] == event:
                return got
        stderr = self.proc.stderr.read() if self.proc.poll() is not None and self.proc.stderr else ""
        raise AssertionError(f"the Python peer said no {event!r} in {timeout} s {stderr[-2000:]}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def test_a_browser_calls_a_python_client_on_another_node_and_media_flows_both_ways(browser, tmp_path):
    with federated_pair(tmp_path) as (riverside, hilltop):
        state = tmp_path / "carol.json"

        async def python_user() -> None:
            carol = MootClient(hilltop.base_url)
            await carol.register("carol", PASSWORD)
            await carol.login("carol", PASSWORD)
            await carol.create_device("carol-laptop")
            carol.save(state)
            await carol.aclose()

        trio.run(python_user)
        carol = CallPeerProcess(str(state), "--hang-up-after", "3")
        try:
            carol.next("ready")
            with person(browser, riverside.base_url, calls=True) as alice:
                sign_up(alice, "alice")
                alice.locator("#search").fill("carol@hilltop")
                alice.locator("#search-results button[data-address='carol@hilltop']").click()
                alice.locator("#video-call-button").click()
                offer = carol.next("offer")
                assert offer == {"event": "offer", "sender": "alice@riverside", "media": "video"}
                expect_state(alice, "active")
                carol.next("connected")
                # carol decoded alice's camera (the fake device's picture) ...
                frame = carol.next("frame")
                assert frame["kind"] in ("audio", "video")
                frames = [frame, carol.next("frame")]
                video = next(f for f in frames if f["kind"] == "video")
                assert video["width"] > 0 and video["height"] > 0
                # ... and alice receives carol's audio and video (aiortc's 640x480 picture)
                report = wait_for_media(alice, ("audio", "video"))
                assert_stays_on_this_host(report)
                remote_video_plays(alice)
                assert alice.evaluate("() => document.getElementById('remote-video').videoWidth") == 640
                # carol hangs up after a few seconds of media
                carol.next("hangup")
                expect(alice.locator("#call-status")).to_have_text("Call ended")
                log = carol.next("call_log")
                assert log == {"event": "call_log", "reason": "completed", "direction": "incoming", "media": "video",
                               "answered": True}
                expect(call_entry(alice, "Outgoing video call")).to_have_text(re.compile(r"Outgoing video call, \d:\d\d"))
        finally:
            carol.stop()


def test_a_declined_call_and_a_busy_callee_are_shown_clearly(browser, node):
    with (
        person(browser, node.base_url, calls=True) as alice,
        person(browser, node.base_url, calls=True) as bob,
        person(browser, node.base_url, calls=True) as carol,
    ):
        for page, name in ((bob, "bob"), (carol, "carol"), (alice, "alice")):
            sign_up(page, name)
        start_chat(alice, "bob@riverside")
        start_chat(carol, "bob@riverside")

        # bob declines
        alice.locator("#audio-call-button").click()
        expect_state(bob, "incoming")
        expect(bob.locator("#call-status")).to_have_text("Incoming audio call")
        expect(bob.locator("#call-camera")).to_be_hidden()
        bob.locator("#call-decline").click()
        expect(bob.locator("#call-status")).to_have_text("Call declined")
        expect(alice.locator("#call-status")).to_have_text("bob declined the call")
        expect_state(alice, "ended")
        expect(call_screen(alice)).to_have_attribute("data-reason", "rejected")
        for page in (alice, bob):
            page.locator("#call-close").click()
        expect(call_entry(alice, "Outgoing audio call, declined")).to_be_visible()
        open_chat(bob, "alice@riverside")
        expect(call_entry(bob, "Declined audio call")).to_be_visible()

        # bob takes alice's next call; carol calls him meanwhile and hears he is busy
        alice.locator("#audio-call-button").click()
        expect_state(bob, "incoming")
        bob.locator("#call-accept").click()
        for page in (alice, bob):
            expect_state(page, "active")
        assert_stays_on_this_host(wait_for_media(bob, ("audio",)))
        expect(alice.locator("#call-camera")).to_be_hidden()
        expect(alice.locator("#audio-call-button")).to_be_disabled()
        carol.locator("#audio-call-button").click()
        expect(carol.locator("#call-status")).to_have_text("Busy: bob is in another call")
        expect(call_screen(carol)).to_have_attribute("data-reason", "busy")
        expect_state(bob, "active")  # bob's call goes on, and his page never rang
        expect(bob.locator("#call-peer")).to_have_text("alice@riverside")
        # the call screen reads well too
        for page in (alice, carol):
            ratios = page.evaluate(CONTRAST_JS.replace("'dialog .note'", "'dialog .note', '#call-status', '#call-peer', '.call-duration'"))
            poor = [r for r in ratios if r["ratio"] < 4.5]
            assert not poor, poor
        screenshot(carol, "call-busy")
        carol.locator("#call-close").click()
        expect(call_entry(carol, "Outgoing audio call, busy")).to_be_visible()
        alice.locator("#call-hangup").click()
        expect(bob.locator("#call-status")).to_have_text("Call ended")
        expect(alice.locator("#audio-call-button")).to_be_enabled(timeout=10_000)  # the ended screen closes by itself


def test_an_unanswered_call_is_missed_on_both_sides(browser, tmp_path):
    node = NodeProcess(tmp_path / "node", free_port(), MOOT_CALL_RING_TIMEOUT_S="3")
    node.start()
    try:
        with person(browser, node.base_url, calls=True) as alice, person(browser, node.base_url, calls=True) as bob:
            sign_up(bob, "bob")
            sign_up(alice, "alice")
            start_chat(alice, "bob@riverside")
            alice.locator("#video-call-button").click()
            expect_state(bob, "incoming")
            expect(bob.locator("#call-status")).to_have_text("Incoming video call")
            # nobody answers: the node's ring timeout ends it for both
            expect(alice.locator("#call-status")).to_have_text("No answer", timeout=20_000)
            expect(bob.locator("#call-status")).to_have_text("Missed call", timeout=20_000)
            expect(call_screen(bob)).to_have_attribute("data-reason", "missed")
            expect(bob.locator("#call-accept")).to_be_hidden()
            bob.keyboard.press("Escape")  # an ended call's screen closes with Escape
            expect(call_screen(bob)).to_be_hidden()
            open_chat(bob, "alice@riverside")
            expect(call_entry(bob, "Missed video call")).to_have_attribute("data-reason", "missed")
            expect(bob.locator("#conversation-list li[data-peer='alice@riverside'] .preview-text")).to_have_text("Missed video call")
            alice.locator("#call-close").click()
            expect(call_entry(alice, "Outgoing video call, no answer")).to_be_visible()

            # a call the caller cancels while it rings is a missed call too
            alice.locator("#audio-call-button").click()
            expect_state(bob, "incoming")
            expect(bob.locator("#call-accept")).to_be_focused()
            alice.locator("#call-hangup").click()  # "Cancel"
            expect(alice.locator("#call-status")).to_have_text("Call cancelled")
            expect(bob.locator("#call-status")).to_have_text("Missed call")
            expect(call_entry(alice, "Cancelled audio call")).to_be_visible()
            expect(call_entry(bob, "Missed audio call")).to_be_visible()
    finally:
        node.stop()


def test_all_my_devices_ring_and_the_one_that_answers_takes_the_call(browser, node):
    with (
        person(browser, node.base_url, calls=True) as alice,
        person(browser, node.base_url, calls=True) as bob_laptop,
        person(browser, node.base_url, calls=True) as bob_phone,
    ):
        sign_up(bob_laptop, "bob")
        sign_in(bob_phone, "bob")
        sign_up(alice, "alice")
        start_chat(alice, "bob@riverside")
        alice.locator("#video-call-button").click()
        for page in (bob_laptop, bob_phone):
            expect_state(page, "incoming")
            expect(page.locator("#call-accept")).to_be_focused()
        bob_phone.locator("#call-accept").click()
        expect(bob_laptop.locator("#call-status")).to_have_text("Answered on another device")
        expect(call_screen(bob_laptop)).to_have_attribute("data-reason", "answered_elsewhere")
        for page in (alice, bob_phone):
            expect_state(page, "active")
        for page in (alice, bob_phone):
            assert_stays_on_this_host(wait_for_media(page, ("audio", "video")))
        assert rtc_report(bob_laptop)["peers"] == []  # it never made a connection
        expect_state(bob_phone, "active")
        alice.locator("#call-hangup").click()
        expect(bob_phone.locator("#call-status")).to_have_text("Call ended")
        # each of bob's devices has the call in its history
        for page in (bob_laptop, bob_phone):
            page.locator("#call-close").click() if page.locator("#call-close").is_visible() else None
            open_chat(page, "alice@riverside")
            expect(call_entry(page, "Incoming video call")).to_be_visible()


def test_an_offer_sealed_for_another_call_or_as_another_signal_never_rings(browser, node):
    """The page opens a call payload only if it was made for this call and this kind of
    signal: what a node replays from one call into another, or passes off as another
    signal, does not ring. A genuine offer from the same Python client does."""
    with person(browser, node.base_url, calls=True) as bob:
        warnings: list[str] = []
        bob.on("console", lambda m: warnings.append(m.text) if "could not be verified" in m.text else None)
        sign_up(bob, "bob")

        async def carol_calls() -> str:
            carol = MootClient(node.base_url)
            await carol.register("carol", PASSWORD)
            await carol.login("carol", PASSWORD)
            await carol.create_device("carol-laptop")
            try:
                async with carol.connect() as live:
                    async def offer(call_id: str, sealed_for: str, kind: str) -> None:
                        body = {"type": "call", "call_id": sealed_for, "kind": kind, "sdp": "v=0"}
                        payload = await carol.encrypt_payload("bob@riverside", body, f"{sealed_for}-1", own_devices=False)
                        await live.call_signal(call_id, "offer", "bob@riverside", media="audio", payload=json.dumps(payload))

                    moved, mislabelled, genuine = (secrets.token_urlsafe(16) for _ in range(3))
                    await offer(moved, secrets.token_urlsafe(16), "offer")  # sealed for another call
                    await live.call_signal(moved, "hangup", "bob@riverside")
                    await offer(mislabelled, mislabelled, "answer")  # an answer passed off as an offer
                    await live.call_signal(mislabelled, "hangup", "bob@riverside")
                    await offer(genuine, genuine, "offer")
                    await live.flush()
                    return genuine
            finally:
                await carol.aclose()

        genuine = trio.run(carol_calls)
        # Signals are handled in order: once the genuine call rings, the two before were refused.
        expect(call_screen(bob)).to_have_attribute("data-call-id", genuine)
        assert len(warnings) == 2, warnings
        # carol's connection closed without a hangup: her node ends the call after its grace
        expect(bob.locator("#call-status")).to_have_text(re.compile("Incoming audio call|Missed call"))
