"""Backlog delivery: how fast an offline device catches up when it connects.

    python bench/backlog.py [--quick] [--messages N] [--window W]

One node, two users with one device each. The recipient's device is offline.
The sender sends N messages (10,000; quick: 2,000) with W sends in flight and
waits until every one is ``sent`` (durably stored), then disconnects. Then the
recipient connects: ``seconds`` runs from the start of the WebSocket handshake
until all N ``message`` frames have arrived, the client acknowledging as it goes
(one ``ack`` of the highest seq per WebSocket message, as the real client does).

As in bench/local.py, one real envelope (``cli.crypto.encrypt_message``) is reused
with a fresh ``id`` per message: the node neither verifies nor decrypts, so its
work is the same, and the client's crypto stays out of the measurement. The
client runs in this process, separate from the node's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import NodeMonitor, NodeProcess, emit, log, register_users  # noqa: E402

ID_PLACEHOLDER = "MOOTBENCHIDPLACEHOLDER"
TIMEOUT_S = 120.0


def send_frame_template(sender: Any, recipient: Any) -> tuple[str, str]:
    """The text of a ``send`` frame around a real envelope, split at its id."""
    from cli import crypto

    keys = crypto.DeviceKeys.from_json(sender.keys_json)
    rkeys = crypto.DeviceKeys.from_json(recipient.keys_json)
    to = crypto.RecipientDevice.from_bundle(recipient.address, recipient.device, rkeys.public_bundle())
    payload = {"type": "text", "text": "see you at 6, ok?", "ts": int(time.time() * 1000)}
    env = crypto.encrypt_message(keys, sender.address, sender.device, recipient.address, ID_PLACEHOLDER, payload, [to])
    head, tail = ('{"type":"send","envelope":' + json.dumps(env, separators=(",", ":")) + "}").split(ID_PLACEHOLDER)
    return head, tail


async def send_all(ws_url: str, token: str, head: str, tail: str, n: int, window: int) -> float:
    """Send ``n`` messages, at most ``window`` unanswered; returns seconds until all are ``sent``."""
    import trio
    from trio_websocket import open_websocket_url

    from web import frames

    slots = trio.Semaphore(window)
    stored = 0
    errors: list[str] = []
    all_sent = trio.Event()
    async with open_websocket_url(ws_url, extra_headers=[("authorization", f"Bearer {token}")]) as ws:

        async def reader() -> None:
            nonlocal stored
            while True:
                for f in frames.decode_server(await ws.get_message()):
                    if isinstance(f, frames.Sent):
                        stored += 1
                        slots.release()
                    elif isinstance(f, frames.Error):
                        errors.append(f"{f.code}: {f.message}")
                        slots.release()
                if stored + len(errors) >= n:
                    all_sent.set()
                    return

        t0 = time.monotonic()
        with trio.fail_after(TIMEOUT_S):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                for i in range(n):
                    await slots.acquire()
                    await ws.send_message(f"{head}b{i}{tail}")
                await all_sent.wait()
        elapsed = time.monotonic() - t0
    if errors:
        raise RuntimeError(f"{len(errors)} sends failed, first: {errors[0]}")
    return elapsed


async def receive_backlog(ws_url: str, token: str, n: int, ack: bool = True) -> dict[str, Any]:
    """Connect and read until ``n`` messages arrived, acking per WebSocket message (if ``ack``)."""
    import trio
    from trio_websocket import open_websocket_url

    from web import frames

    got = 0
    ws_messages = 0
    first_at = None
    t0 = time.monotonic()
    with trio.fail_after(TIMEOUT_S):
        async with open_websocket_url(
            ws_url, extra_headers=[("authorization", f"Bearer {token}")], max_message_size=64 * 2**20
        ) as ws:
            connected = time.monotonic() - t0
            while got < n:
                data = await ws.get_message()
                ws_messages += 1
                top = 0
                for f in frames.decode_server(data):
                    if isinstance(f, frames.Message):
                        got += 1
                        top = max(top, f.seq)
                        if first_at is None:
                            first_at = time.monotonic() - t0
                if top and ack:
                    await ws.send_message('{"type":"ack","seq":%d}' % top)
            elapsed = time.monotonic() - t0
    return {"seconds": elapsed, "connect_s": connected, "first_message_s": first_at, "ws_messages": ws_messages}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 messages (under 30 s)")
    ap.add_argument("--messages", type=int)
    ap.add_argument("--window", type=int, default=128, help="sends in flight while filling the backlog")
    ap.add_argument("--no-ack", action="store_true", help="diagnostic: do not acknowledge (no receipts are written)")
    args = ap.parse_args()
    n = args.messages or (2000 if args.quick else 10_000)

    import trio

    with tempfile.TemporaryDirectory(prefix="moot-bench-backlog-") as tmp:
        node = NodeProcess(Path(tmp) / "data")
        with node, NodeMonitor(node.pid) as monitor:
            (sender,), (recipient,) = trio.run(lambda: register_users(node.base_url, ["sender", "recipient"], keep_keys=True))
            head, tail = send_frame_template(sender, recipient)
            log(f"sending {n} messages to the offline recipient")
            fill_s = trio.run(send_all, node.ws_url, sender.token, head, tail, n, args.window)
            log(f"  all {n} sent (stored) in {fill_s:.2f} s ({n / fill_s:.0f}/s)")
            cpu0 = monitor.cpu_seconds()
            monitor.reset_peak()
            r = trio.run(receive_backlog, node.ws_url, recipient.token, n, not args.no_ack)
            cpu = monitor.cpu_seconds() - cpu0
            log(f"  backlog of {n} received in {r['seconds']:.2f} s over {r['ws_messages']} WebSocket messages "
                f"(first after {r['first_message_s']:.3f} s); node cpu {cpu:.2f} s")
            peak = monitor.peak_rss

    result = {
        "bench": "backlog",
        "quick": args.quick,
        "messages": n,
        "seconds": round(r["seconds"], 3),
        "msgs_per_s": round(n / r["seconds"], 1),
        "first_message_s": round(r["first_message_s"], 3),
        "ws_messages": r["ws_messages"],
        "node_cpu_s": round(cpu, 2),
        "peak_rss_mb": round(peak / 2**20, 1),
        "fill_seconds": round(fill_s, 2),
        "fill_sent_per_s": round(n / fill_s, 1),
        "acked": not args.no_ack,
        "targets": {"seconds<2": r["seconds"] < 2},
    }
    emit("backlog-quick" if args.quick else "backlog", result)


if __name__ == "__main__":
    main()
