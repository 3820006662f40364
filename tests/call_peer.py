"""A Python user of Moot who answers one call with aiortc (cli/rtc.py), run as a process
of its own by tests/test_web_calls.py: Playwright's sync API and trio-asyncio's loop
then never share a process. It prints one JSON line per step (``ready``, ``offer``,
``connected``, ``frame``, ``hangup``, ``call_log``; ``error`` if something failed) and
hangs up after ``--hang-up-after`` seconds of media unless the browser hangs up first.

    python -m tests.call_peer STATE_FILE [--hang-up-after SECONDS]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

import trio

from cli.client import CallEvent, CallLogEvent, LiveSession, MootClient
from cli.rtc import RtcPeer, open_loop, open_rtc_peer
from tests.nodes import next_of

LOOPBACK = ("127.0.0.1",)


def say(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def on_loopback(candidate: str) -> bool:
    fields = candidate.removeprefix("a=").split()
    return len(fields) > 4 and fields[4] == "127.0.0.1"


async def sealed(client: MootClient, peer: str, call_id: str, n: int, body: dict[str, Any]) -> str:
    return json.dumps(await client.encrypt_payload(peer, body, f"{call_id}-{n}", own_devices=False))


async def take_signals(client: MootClient, live: LiveSession, peer: RtcPeer, call_id: str, hung_up: trio.Event) -> None:
    """The browser's trickled candidates go into the connection (loopback ones only),
    until it hangs up."""
    while True:
        event = await live.next_event()
        if not isinstance(event, CallEvent) or event.call_id != call_id:
            continue
        if event.kind == "candidate":
            body = await client.open_call_payload(event)
            assert body["type"] == "call" and body["call_id"] == call_id and body["kind"] == "candidate"
            candidate = body["candidate"]
            if on_loopback(candidate["candidate"]):
                await peer.add_ice_candidate(candidate["candidate"], candidate.get("sdpMid"), candidate.get("sdpMLineIndex"))
        elif event.kind == "hangup":
            say("hangup", by="browser", reason=event.reason)
            hung_up.set()
            return


async def answer_one_call(state: Path, hang_up_after: float) -> None:
    client = MootClient.load(state)
    try:
        async with client.connect() as live:
            say("ready")
            offer = await next_of(live, CallEvent, kind="offer", timeout=120)
            body = await client.open_call_payload(offer)  # verified: signed by the calling device
            assert body["type"] == "call" and body["call_id"] == offer.call_id and body["kind"] == "offer"
            say("offer", sender=offer.sender, media=offer.media)
            await live.call_signal(offer.call_id, "ringing", offer.sender)
            hung_up = trio.Event()
            async with open_loop(), open_rtc_peer(host_addresses=LOOPBACK) as peer:
                peer.add_track("audio")
                peer.add_track("video")
                answer = await peer.accept_offer(body["sdp"])
                reply = {"type": "call", "call_id": offer.call_id, "kind": "answer", "sdp": answer}
                await live.call_signal(offer.call_id, "accept", offer.sender, payload=await sealed(client, offer.sender, offer.call_id, 1, reply))
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(take_signals, client, live, peer, offer.call_id, hung_up)
                    with trio.fail_after(60):
                        await peer.wait_connected()
                    say("connected")
                    with trio.fail_after(60):
                        tracks = [await peer.next_track() for _ in range(2 if offer.media == "video" else 1)]
                        for track in tracks:
                            frames = [await peer.next_frame(track) for _ in range(3)]
                            last = frames[-1]
                            say("frame", kind=track.kind, count=len(frames),
                                width=getattr(last, "width", None), height=getattr(last, "height", None))
                    with trio.move_on_after(hang_up_after):
                        await hung_up.wait()
                    if not hung_up.is_set():
                        await live.call_signal(offer.call_id, "hangup", offer.sender)
                        say("hangup", by="python")
                    nursery.cancel_scope.cancel()
            entry = await next_of(live, CallLogEvent, call_id=offer.call_id, timeout=30)
            say("call_log", reason=entry.reason, direction=entry.direction, media=entry.media,
                answered=entry.answered_at is not None)
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("state", type=Path)
    parser.add_argument("--hang-up-after", type=float, default=math.inf)
    args = parser.parse_args()
    try:
        trio.run(answer_one_call, args.state, args.hang_up_after)
    except BaseException as exc:  # the test reads why from the last line
        say("error", error=f"{type(exc).__name__}: {exc}")
        sys.exit(1)


if __name__ == "__main__":
    main()
