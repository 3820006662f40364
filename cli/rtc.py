"""The Python call peer: an aiortc RTCPeerConnection driven from trio.

aiortc runs on asyncio; trio-asyncio runs an asyncio loop inside trio, and every
aiortc coroutine is awaited through ``aio_as_trio``. aiortc's events (a data channel
opened by the other side, a message, a remote track, a state change) arrive as
asyncio callbacks, which run in the trio thread inside the trio-asyncio loop: they
feed trio memory channels and events with the ``*_nowait``/``set`` calls.

ICE servers are only the ones given (``RTCConfiguration(iceServers=[])`` otherwise:
left unset, aiortc would add a public STUN server). Candidates are not trickled
outwards: an offer or answer is returned once gathering finished, with every
candidate inside the SDP; candidates the other side trickles (a browser does) go in
through ``add_ice_candidate``.

aioice leaves loopback addresses out of its host candidates, so two peers on one
machine without a LAN address cannot connect. ``host_addresses=("127.0.0.1",)``
makes a peer gather on exactly those addresses (see ``gather_on``).

Import trio-asyncio through this module (``open_loop``): importing it changes how
plain asyncio makes loops, which this module puts right.

Usage::

    async with open_loop():
        async with open_rtc_peer(host_addresses=("127.0.0.1",)) as peer:
            channel = peer.open_data_channel("chat")
            sdp = await peer.create_offer()
            ...
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager
from typing import Any, Literal

import aioice.ice
import trio
import trio_asyncio
from aiortc import (
    RTCBundlePolicy,
    MediaStreamTrack,
    RTCConfiguration,
    RTCDataChannel,
    RTCIceServer,
    RTCIceTransportPolicy,
    RTCPeerConnection,
    RTCSessionDescription,
)
from aiortc.exceptions import InvalidAccessError, InvalidStateError
from aiortc.mediastreams import AudioStreamTrack, MediaStreamError, VideoStreamTrack
from aiortc.sdp import candidate_from_sdp
from trio_asyncio import aio_as_trio

MediaKind = Literal["audio", "video"]
Message = str | bytes



def _keep_asyncio_plain_outside_trio() -> None:
    """Undo what importing trio-asyncio does to plain asyncio in this thread.

    On import, trio-asyncio makes ``asyncio.new_event_loop()`` outside trio return its
    own synchronous loop (for asyncio's test suite); ``asyncio.run`` and Playwright's
    sync API then fail with "You can't nest calls to run_until_complete()". With a
    policy set explicitly it steps aside outside trio and delegates to that policy;
    inside trio, ``open_loop()`` works as before. (It refuses a policy change from
    inside trio, so a lazy import there leaves things as trio-asyncio set them.)
    """
    try:
        trio.lowlevel.current_task()
    except RuntimeError:
        asyncio.set_event_loop_policy(asyncio.DefaultEventLoopPolicy())


_keep_asyncio_plain_outside_trio()
open_loop = trio_asyncio.open_loop
"""``async with open_loop():`` around every use of this module (trio-asyncio's loop)."""

# What aiortc raises for SDP or candidates it cannot take: its parser asserts.
_AIORTC_INPUT_ERRORS = (AssertionError, ValueError, TypeError, IndexError, KeyError, InvalidStateError, InvalidAccessError)

# A peer that stops reading its channel loses the channel, not the process's memory.
MAX_QUEUED_MESSAGES = 10_000


class RtcError(Exception):
    """The call peer failed: bad SDP or candidate, a closed channel, a closed peer."""


# -- host addresses ---------------------------------------------------------------

_original_get_host_addresses = aioice.ice.get_host_addresses
_overrides: list[tuple[object, tuple[str, ...]]] = []


def _overridden_host_addresses(use_ipv4: bool, use_ipv6: bool) -> list[str]:
    addresses = _overrides[-1][1]
    return [a for a in addresses if (":" in a and use_ipv6) or (":" not in a and use_ipv4)]


@contextmanager
def gather_on(addresses: Sequence[str]) -> Iterator[None]:
    """While inside, aioice gathers host candidates on exactly ``addresses``.

    aioice has no parameter for this: it calls the module function
    ``aioice.ice.get_host_addresses`` when a connection gathers, and leaves out
    127.0.0.1. This swaps that function for the duration of the block and puts the
    original back when the last such block exits (blocks may overlap, as two peers in
    one process do; the innermost open one's addresses are used). It affects every
    aioice connection that gathers in the process meanwhile, which is why
    ``RtcPeer`` only opens it around its own gathering (``setLocalDescription``).
    """
    token = object()
    _overrides.append((token, tuple(addresses)))
    aioice.ice.get_host_addresses = _overridden_host_addresses
    try:
        yield
    finally:
        _overrides[:] = [o for o in _overrides if o[0] is not token]
        if not _overrides:
            aioice.ice.get_host_addresses = _original_get_host_addresses


# -- ICE servers ------------------------------------------------------------------


def rtc_configuration(ice_servers: Sequence[Mapping[str, Any]] = (), *, relay_only: bool = False) -> RTCConfiguration:
    """An aiortc configuration with exactly these ICE servers (the shape of
    ``GET /api/v1/ice``'s ``ice_servers``: ``{"urls", "username"?, "credential"?}``);
    ``relay_only``: use TURN relays only, never a direct path."""
    servers = [
        RTCIceServer(urls=list(s["urls"]) if not isinstance(s["urls"], str) else s["urls"],
                     username=s.get("username"), credential=s.get("credential"))
        for s in ice_servers
    ]
    policy = RTCIceTransportPolicy.RELAY if relay_only else RTCIceTransportPolicy.ALL
    # One transport for all media and data, as browsers do by default: one set of candidates.
    return RTCConfiguration(iceServers=servers, iceTransportPolicy=policy, bundlePolicy=RTCBundlePolicy.MAX_BUNDLE)


# -- the data channel ---------------------------------------------------------------


class RtcDataChannel:
    """A data channel: ``send`` now, ``receive`` in order, ``wait_open`` until usable."""

    def __init__(self, channel: RTCDataChannel) -> None:
        self._channel = channel
        self._opened = trio.Event()
        self._closed = trio.Event()
        self._send, self._receive = trio.open_memory_channel[Message](MAX_QUEUED_MESSAGES)
        if channel.readyState == "open":
            self._opened.set()
        channel.on("open", self._opened.set)
        channel.on("close", self._on_close)
        channel.on("message", self._on_message)

    @property
    def label(self) -> str:
        return str(self._channel.label)

    def _on_message(self, message: Message) -> None:
        try:
            self._send.send_nowait(message)
        except trio.WouldBlock:
            self._channel.close()  # a reader that fell this far behind has stopped reading
        except trio.ClosedResourceError:
            pass

    def _on_close(self) -> None:
        self._closed.set()
        self._opened.set()  # nobody waits for an open that will never come
        self._send.close()

    async def wait_open(self) -> None:
        """Return once the channel is open; raises RtcError if it closed instead."""
        await self._opened.wait()
        if self._closed.is_set():
            raise RtcError(f"data channel {self.label!r} closed")

    def send(self, message: Message) -> None:
        """Queue a message (text or bytes); raises RtcError unless the channel is open."""
        if self._channel.readyState != "open":
            raise RtcError(f"data channel {self.label!r} is {self._channel.readyState}")
        self._channel.send(message)

    async def receive(self) -> Message:
        """The next message; raises RtcError once the channel closed and all were read."""
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise RtcError(f"data channel {self.label!r} closed") from None

    def close(self) -> None:
        self._channel.close()


# -- the peer -------------------------------------------------------------------------


class RtcPeer:
    """One side of a call. Build it with ``open_rtc_peer``; every method runs in trio,
    inside an open trio-asyncio loop."""

    def __init__(self, pc: RTCPeerConnection, configuration: RTCConfiguration, host_addresses: Sequence[str] | None) -> None:
        self.pc = pc
        self.configuration = configuration
        self._host_addresses = tuple(host_addresses) if host_addresses is not None else None
        self._state_changed = trio.Event()
        self._channels_in, self._channels_out = trio.open_memory_channel[RtcDataChannel](math.inf)
        self._tracks_in, self._tracks_out = trio.open_memory_channel[MediaStreamTrack](math.inf)
        self._local_tracks: list[MediaStreamTrack] = []
        pc.on("connectionstatechange", self._on_state)
        pc.on("datachannel", lambda channel: self._channels_in.send_nowait(RtcDataChannel(channel)))
        pc.on("track", self._tracks_in.send_nowait)

    # state

    @property
    def connection_state(self) -> str:
        """aiortc's ``connectionState``: new, connecting, connected, failed or closed."""
        return str(self.pc.connectionState)

    def _on_state(self) -> None:
        self._state_changed.set()
        self._state_changed = trio.Event()

    async def wait_connected(self) -> None:
        """Return once ICE and DTLS are up; raises RtcError if the connection fails or closes."""
        while self.connection_state != "connected":
            if self.connection_state in ("failed", "closed"):
                raise RtcError(f"the connection {self.connection_state}")
            await self._state_changed.wait()

    # what is sent

    def open_data_channel(self, label: str = "moot", *, ordered: bool = True) -> RtcDataChannel:
        """A data channel of ours; the offerer opens it before ``create_offer``."""
        return RtcDataChannel(self.pc.createDataChannel(label, ordered=ordered))

    def add_track(self, kind: MediaKind) -> MediaStreamTrack:
        """Send a synthetic track (silence for audio, a plain picture for video).
        Call before ``create_offer`` or ``accept_offer``."""
        track: MediaStreamTrack = AudioStreamTrack() if kind == "audio" else VideoStreamTrack()
        self.pc.addTrack(track)
        self._local_tracks.append(track)
        return track

    # negotiation

    async def _set_local(self, description: RTCSessionDescription) -> str:
        # Gathering happens here; only here do host addresses need to be chosen.
        if self._host_addresses is None:
            await aio_as_trio(self.pc.setLocalDescription)(description)
        else:
            with gather_on(self._host_addresses):
                await aio_as_trio(self.pc.setLocalDescription)(description)
        return str(self.pc.localDescription.sdp)

    async def create_offer(self) -> str:
        """The SDP offer, every local candidate included (gathering is done)."""
        return await self._set_local(await aio_as_trio(self.pc.createOffer)())

    async def accept_offer(self, sdp: str) -> str:
        """Take the other side's offer; return our SDP answer, candidates included."""
        await self._set_remote(sdp, "offer")
        return await self._set_local(await aio_as_trio(self.pc.createAnswer)())

    async def accept_answer(self, sdp: str) -> None:
        """Take the answer to our offer; connecting starts."""
        await self._set_remote(sdp, "answer")

    async def _set_remote(self, sdp: str, kind: str) -> None:
        try:
            await aio_as_trio(self.pc.setRemoteDescription)(RTCSessionDescription(sdp=sdp, type=kind))
        except _AIORTC_INPUT_ERRORS as exc:
            raise RtcError(f"bad SDP {kind}: {type(exc).__name__} {exc}") from exc

    async def add_ice_candidate(self, candidate: str, sdp_mid: str | None = None, sdp_mline_index: int | None = None) -> None:
        """A candidate the other side trickled, as a browser's ``RTCIceCandidate`` gives
        it (``candidate:...``, ``sdpMid``, ``sdpMLineIndex``). An empty one (end of
        candidates) is accepted and ignored."""
        text = candidate.removeprefix("a=").removeprefix("candidate:")
        if not text:
            return
        try:
            parsed = candidate_from_sdp(text)
        except _AIORTC_INPUT_ERRORS as exc:
            raise RtcError(f"bad ICE candidate {candidate!r}: {exc}") from exc
        parsed.sdpMid, parsed.sdpMLineIndex = sdp_mid, sdp_mline_index
        await aio_as_trio(self.pc.addIceCandidate)(parsed)

    # what is received

    async def next_data_channel(self) -> RtcDataChannel:
        """The next data channel the other side opened."""
        return await self._channels_out.receive()

    async def next_track(self) -> MediaStreamTrack:
        """The next remote track (audio or video)."""
        return await self._tracks_out.receive()

    async def next_frame(self, track: MediaStreamTrack) -> Any:
        """The next decoded frame of a remote track (av.AudioFrame or av.VideoFrame)."""
        try:
            return await aio_as_trio(track.recv)()
        except MediaStreamError as exc:
            raise RtcError(f"{track.kind} track ended") from exc

    async def aclose(self) -> None:
        for track in self._local_tracks:
            track.stop()
        await aio_as_trio(self.pc.close)()


@asynccontextmanager
async def open_rtc_peer(
    *,
    ice_servers: Sequence[Mapping[str, Any]] = (),
    host_addresses: Sequence[str] | None = None,
    relay_only: bool = False,
) -> AsyncIterator[RtcPeer]:
    """A peer connection with exactly ``ice_servers`` (none by default), closed on exit.

    ``relay_only``: connect through a TURN server of ``ice_servers`` only.
    ``host_addresses``: gather host candidates on these addresses instead of the
    machine's (``("127.0.0.1",)`` for tests on loopback). Needs an open
    ``open_loop()`` around it; raises RtcError otherwise.
    """
    if trio_asyncio.current_loop.get() is None:
        raise RtcError("open_rtc_peer needs `async with open_loop():` around it")
    configuration = rtc_configuration(ice_servers, relay_only=relay_only)
    peer = RtcPeer(RTCPeerConnection(configuration), configuration, host_addresses)
    try:
        yield peer
    finally:
        with trio.CancelScope(shield=True):
            await peer.aclose()
