"""The Python call peer (cli/rtc.py): real aiortc connections on loopback, from trio."""

from __future__ import annotations

import subprocess
import sys
import time

import aioice.ice
import av
import pytest
import trio
from aiortc import RTCPeerConnection
from trio_asyncio import aio_as_trio

from cli.rtc import RtcError, RtcPeer, gather_on, open_loop, open_rtc_peer
from node.turn import turn_credentials
from tests.nodes import REPO
from tests.turnserver import TurnServer

LOOPBACK = ("127.0.0.1",)


def ice_connection(pc: RTCPeerConnection) -> aioice.Connection:
    """The aioice connection under a peer's (bundled) transport: what would be contacted."""
    return pc.sctp.transport.transport.iceGatherer._connection  # type: ignore[no-any-return]


def candidates(sdp: str) -> list[str]:
    return [line for line in sdp.splitlines() if line.startswith("a=candidate:")]


async def connect(offerer: RtcPeer, answerer: RtcPeer, *, timeout: float = 15) -> float:
    """Offer, answer, wait until both are connected; the seconds it took."""
    began = time.perf_counter()
    offer = await offerer.create_offer()
    answer = await answerer.accept_offer(offer)
    await offerer.accept_answer(answer)
    with trio.fail_after(timeout):
        await offerer.wait_connected()
        await answerer.wait_connected()
    return time.perf_counter() - began


async def test_two_peers_connect_on_loopback_with_data_both_ways_and_media_frames() -> None:
    async with open_loop():
        async with open_rtc_peer(host_addresses=LOOPBACK) as caller, open_rtc_peer(host_addresses=LOOPBACK) as callee:
            for peer in (caller, callee):
                peer.add_track("audio")
                peer.add_track("video")
            chat = caller.open_data_channel("chat")
            took = await connect(caller, callee)
            with trio.fail_after(10):
                await chat.wait_open()
                theirs = await callee.next_data_channel()
                assert theirs.label == "chat"
                for n in range(20):
                    chat.send(f"ping {n}")
                    theirs.send(b"pong %d" % n)
                assert [await theirs.receive() for _ in range(20)] == [f"ping {n}" for n in range(20)]
                assert [await chat.receive() for _ in range(20)] == [b"pong %d" % n for n in range(20)]
                # Each side receives the other's audio and video, decoded.
                for peer in (caller, callee):
                    tracks = {t.kind: t for t in [await peer.next_track(), await peer.next_track()]}
                    audio = await peer.next_frame(tracks["audio"])
                    video = await peer.next_frame(tracks["video"])
                    assert isinstance(audio, av.AudioFrame) and audio.sample_rate == 48000
                    assert isinstance(video, av.VideoFrame) and (video.width, video.height) == (640, 480)
            print(f"connected on loopback in {took * 1000:.0f} ms")
        assert caller.connection_state == callee.connection_state == "closed"
        with pytest.raises(RtcError):
            chat.send("after close")


async def test_no_ice_server_unless_given_and_only_the_chosen_host_addresses() -> None:
    async with open_loop():
        async with open_rtc_peer(host_addresses=LOOPBACK) as peer:
            peer.open_data_channel()
            # aiortc gives a connection without iceServers Google's STUN server (checked
            # here without gathering, so nothing is contacted): ours has none.
            default = RTCPeerConnection()
            default.createDataChannel("x")
            assert ice_connection(default).stun_server == ("stun.l.google.com", 19302)
            await aio_as_trio(default.close)()
            assert peer.configuration.iceServers == []
            assert (ice_connection(peer.pc).stun_server, ice_connection(peer.pc).turn_server) == (None, None)
            found = candidates(await peer.create_offer())
            assert found and all(" 127.0.0.1 " in c and c.endswith("typ host") for c in found)


def test_gather_on_is_scoped_and_overlapping_blocks_unwind() -> None:
    original = aioice.ice.get_host_addresses
    first, second = gather_on(["127.0.0.1"]), gather_on(["127.0.0.2", "::1"])
    first.__enter__()
    second.__enter__()
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.2"]
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=True) == ["127.0.0.2", "::1"]
    first.__exit__(None, None, None)  # not the innermost: the other block's addresses stay
    assert aioice.ice.get_host_addresses(use_ipv4=True, use_ipv6=False) == ["127.0.0.2"]
    second.__exit__(None, None, None)
    assert aioice.ice.get_host_addresses is original
    with pytest.raises(KeyError), gather_on(["127.0.0.1"]):
        raise KeyError
    assert aioice.ice.get_host_addresses is original


async def test_trickled_browser_style_candidates_connect() -> None:
    """The answerer gets an offer without candidates, then each as a browser sends it."""
    async with open_loop():
        async with open_rtc_peer(host_addresses=LOOPBACK) as caller, open_rtc_peer(host_addresses=LOOPBACK) as callee:
            chat = caller.open_data_channel("chat")
            offer = await caller.create_offer()
            trickled = candidates(offer)
            bare = "\r\n".join(l for l in offer.splitlines() if not l.startswith(("a=candidate:", "a=end-of-candidates"))) + "\r\n"
            await caller.accept_answer(await callee.accept_offer(bare))
            with pytest.raises(RtcError):
                await callee.add_ice_candidate("candidate:not a candidate", "0", 0)
            for line in trickled:
                await callee.add_ice_candidate(line.removeprefix("a="), "0", 0)
            await callee.add_ice_candidate("", "0", 0)  # a browser's end of candidates
            with trio.fail_after(15):
                await caller.wait_connected()
                await chat.wait_open()
                theirs = await callee.next_data_channel()
                chat.send("over trickled candidates")
                assert await theirs.receive() == "over trickled candidates"


async def test_bad_sdp_and_a_missing_loop_are_errors() -> None:
    with pytest.raises(RtcError, match="open_loop"):
        async with open_rtc_peer():
            pass
    async with open_loop():
        async with open_rtc_peer(host_addresses=LOOPBACK) as peer:
            with pytest.raises(RtcError, match="bad SDP offer"):
                await peer.accept_offer("v=0\r\nm=audio x y z\r\n")
            with pytest.raises(RtcError, match="bad SDP answer"):
                await peer.accept_answer("v=0\r\n")  # no offer was made


async def test_peers_connect_through_coturn_alone_with_the_nodes_credentials() -> None:
    secret = "relay secret"
    with TurnServer.start(secret) as coturn:
        def servers(user: str) -> list[dict[str, object]]:
            username, credential = turn_credentials(secret, user, time.time(), 600)
            return [{"urls": [f"turn:127.0.0.1:{coturn.port}?transport=udp"], "username": username, "credential": credential}]

        async with open_loop():
            async with (
                open_rtc_peer(ice_servers=servers("alice@riverside"), host_addresses=LOOPBACK, relay_only=True) as caller,
                open_rtc_peer(ice_servers=servers("bob@hill"), host_addresses=LOOPBACK, relay_only=True) as callee,
            ):
                chat = caller.open_data_channel("relayed")
                offer = await caller.create_offer()
                assert candidates(offer) and all(" typ relay" in c for c in candidates(offer))
                answer = await callee.accept_offer(offer)
                assert all(" typ relay" in c for c in candidates(answer))
                await caller.accept_answer(answer)
                with trio.fail_after(20):
                    await caller.wait_connected()
                    await chat.wait_open()
                    theirs = await callee.next_data_channel()
                    chat.send(b"through the relay")
                    assert await theirs.receive() == b"through the relay"


def test_importing_the_peer_leaves_plain_asyncio_working() -> None:
    """trio-asyncio's import makes asyncio.run (and Playwright's sync API, used by the
    browser tests in this same process) fail; importing it through cli.rtc must not."""
    code = (
        "import asyncio, cli.rtc\n"
        "async def one(): await asyncio.sleep(0); return 1\n"
        "assert asyncio.run(one()) == 1\n"
        "print(type(asyncio.new_event_loop()).__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert not out.stdout.startswith("trio_asyncio")
