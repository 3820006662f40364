"""Call set-up signalling across two nodes: how long from an offer to the answer.

    python bench/calls.py [--quick] [--pairs K] [--calls N]

Two ``moot run`` processes federate over loopback (riverside, and hilltop with
riverside as its static peer), each with its own SQLite database, mDNS off. K
callers on riverside (default 10) each call their partner on hilltop, one call
after the other, N calls in all (default 400; quick 60), all pairs at once. A call:

1. the caller sends ``offer`` (video) with a real end-to-end encrypted envelope of
   a 3 KB SDP as its payload (one per pair, reused: nodes never decrypt it);
2. the callee's client, as soon as the offer arrives, sends ``accept`` with a
   similar envelope (the answer), and the caller's client waits for it;
3. the caller hangs up and waits for its ``call_log`` entry; the callee waits for
   the hangup.

``p50_ms`` / ``p99_ms``: from sending the offer to receiving the accept (one round
trip through both nodes and the federation link, with both nodes' call books);
``ring_p50_ms`` / ``ring_p99_ms``: from the offer to the callee's device getting it.
All times come from this process's monotonic clock. ``cpu_ms_per_call``: both
nodes' CPU (user+system) over the run per call (a call is four signals and two
history entries). Target: p99 under 100 ms.
"""

from __future__ import annotations

import argparse
import json
import secrets
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import NodeMonitor, client_user, emit, free_port, log, percentile, rounded  # noqa: E402
from bench.federation import _system_busy, federating_node, peer_address  # noqa: E402

TARGET_P99_MS = 100.0
SDP = "v=0\r\n" + "a=candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host\r\n" * 50  # ~3 KB


async def run(riverside: Any, hilltop: Any, monitors: list[NodeMonitor], args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from cli.client import CallEvent, CallLogEvent

    callers = [await client_user(riverside.base_url, f"a{i}") for i in range(args.pairs)]
    callees = [await client_user(hilltop.base_url, f"b{i}") for i in range(args.pairs)]
    with trio.fail_after(60):  # riverside meets hilltop, and each side learns the other's keys
        while True:
            try:
                await callers[0].user_devices("b0@hilltop")
                break
            except Exception:
                await trio.sleep(0.2)
    offers = [json.dumps(await c.encrypt_payload(f"b{i}@hilltop", {"type": "offer", "sdp": SDP}, f"bench-offer-{i}", own_devices=False))
              for i, c in enumerate(callers)]
    answers = [json.dumps(await c.encrypt_payload(f"a{i}@riverside", {"type": "answer", "sdp": SDP}, f"bench-answer-{i}", own_devices=False))
               for i, c in enumerate(callees)]
    setup: list[float] = []
    ring: list[float] = []
    per_pair = max(1, args.calls // args.pairs)

    async with AsyncExitStack() as stack:
        a_live = [await stack.enter_async_context(c.connect()) for c in callers]
        b_live = [await stack.enter_async_context(c.connect()) for c in callees]

        async def next_call_event(live: Any, cid: str, kind: str, timeout: float = 30) -> Any:
            with trio.fail_after(timeout):
                while True:
                    event = await live.next_event()
                    if isinstance(event, CallEvent) and event.call_id == cid and event.kind == kind:
                        return event
                    if isinstance(event, CallLogEvent) and event.call_id == cid and kind == "call_log":
                        return event

        async def pair(i: int, count: int, record: bool) -> None:
            caller, callee = a_live[i], b_live[i]
            interval = args.pairs / args.rate
            start = trio.current_time() + i / args.rate  # the pairs spread over one interval
            for k in range(count):
                await trio.sleep_until(start + k * interval)
                cid = secrets.token_urlsafe(16)
                t0 = time.monotonic()
                await caller.call_signal(cid, "offer", f"b{i}@hilltop", media="video", payload=offers[i])
                await next_call_event(callee, cid, "offer")
                t_ring = time.monotonic()
                await callee.call_signal(cid, "accept", f"a{i}@riverside", payload=answers[i])
                await next_call_event(caller, cid, "accept")
                t1 = time.monotonic()
                if record:
                    setup.append(t1 - t0)
                    ring.append(t_ring - t0)
                await caller.call_signal(cid, "hangup", f"b{i}@hilltop")
                await next_call_event(callee, cid, "hangup")
                await next_call_event(caller, cid, "call_log")

        async with trio.open_nursery() as nursery:  # warm-up: one call per pair
            for i in range(args.pairs):
                nursery.start_soon(pair, i, 1, False)
        log(f"warm-up done: {args.pairs} calls")
        cpu0, busy0, t0 = sum(m.cpu_seconds() for m in monitors), _system_busy(), time.monotonic()
        async with trio.open_nursery() as nursery:
            for i in range(args.pairs):
                nursery.start_soon(pair, i, per_pair, True)
        elapsed = time.monotonic() - t0
        node_cpu = sum(m.cpu_seconds() for m in monitors) - cpu0
        busy = _system_busy() - busy0
    for client in callers + callees:
        await client.aclose()
    setup_ms = [x * 1000 for x in setup]
    ring_ms = [x * 1000 for x in ring]
    calls = len(setup)
    return {
        "calls": calls, "pairs": args.pairs, "rate": args.rate, "seconds": rounded(elapsed), "calls_per_s": rounded(calls / elapsed if elapsed else None),
        "p50_ms": rounded(percentile(setup_ms, 50)), "p99_ms": rounded(percentile(setup_ms, 99)),
        "max_ms": rounded(max(setup_ms) if setup_ms else None),
        "ring_p50_ms": rounded(percentile(ring_ms, 50)), "ring_p99_ms": rounded(percentile(ring_ms, 99)),
        "cpu_ms_per_call": rounded(node_cpu * 1000 / calls if calls else None, 3), "node_cpu_s": rounded(node_cpu),
        "other_cpu_s": rounded(busy - node_cpu),  # includes this process (the clients)
        "payload_bytes": len(offers[0]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pairs", type=int, default=10)
    ap.add_argument("--calls", type=int, default=None)
    ap.add_argument("--rate", type=float, default=20.0, help="calls started per second, all pairs together")
    args = ap.parse_args()
    if args.calls is None:
        args.calls = 60 if args.quick else 400
    if args.pairs < 1 or args.calls < args.pairs:
        ap.error("need --pairs >= 1 and --calls >= --pairs")

    import trio

    with tempfile.TemporaryDirectory(prefix="moot-bench-calls-") as tmp:
        root = Path(tmp)
        r_port, h_port = free_port(), free_port()
        riverside = federating_node(root, "riverside", r_port)
        riverside.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        hilltop = federating_node(root, "hilltop", h_port, peers=[peer_address(riverside, r_port)])
        try:
            riverside.start()
            hilltop.start()
            monitors = [NodeMonitor(riverside.pid), NodeMonitor(hilltop.pid)]
            result = trio.run(run, riverside, hilltop, monitors, args)
        finally:
            hilltop.stop()
            riverside.stop()
    p99 = result["p99_ms"]
    met = p99 is not None and p99 < TARGET_P99_MS
    log(f"{result['calls']} calls: set-up p50 {result['p50_ms']} ms, p99 {p99} ms; {result['cpu_ms_per_call']} ms node CPU per call")
    emit("calls-quick" if args.quick else "calls", {
        "bench": "calls", "quick": args.quick, **result, "targets": {f"p99_ms<{TARGET_P99_MS:g}": met}, "met": met,
    })


if __name__ == "__main__":
    main()
