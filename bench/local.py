"""Local 1:1 messaging throughput and latency on one node (SQLite).

    python bench/local.py [--quick] [--pairs N] [--window W] [--seconds S] [--rate R] [--workers K]

One ``moot run`` process; N pairs of users, each user with one device and one
WebSocket, held by K load-generator processes (trio + trio-websocket). The sender
of a pair sends to its partner; every client acknowledges the stream events it
received as the real client (cli/client.py) does: a WebSocket message holding a
``message`` is acked at once (that ack is what produces the sender's
``delivered`` receipt); one holding only receipts is acked within a second,
coalesced (those acks only move the device's cursor). A message counts when its sender got the
``delivered`` receipt; latency is from the send to that receipt at the sender.

Phases, after a one-second warm-up:

(a) maximum throughput: every sender keeps W messages in flight for S seconds.
    ``delivered_per_s`` = receipts that arrived in the window / S; ``max_p50_ms``
    and ``max_p99_ms`` over the messages sent in the window; ``node_cpu_s`` is the
    node's user+system CPU over the window and ``per_cpu_s`` the messages per node
    CPU-second.
(b) fixed offered load (open loop, default 1,000 msg/s in total, each sender
    paced evenly): ``p50_ms`` / ``p99_ms`` measured from the *scheduled* send time,
    so a stalled client or node shows up as latency (no coordinated omission).

The load generator does not encrypt every message. One real envelope per pair is
made with ``cli.crypto.encrypt_message`` (about 550 bytes, one key entry) and each
message reuses it with a fresh ``id`` substituted. The id is covered by the
envelope signature, so those envelopes would not verify at a recipient; but the
node never verifies signatures or decrypts, and does the same work for them as for
freshly encrypted ones. That keeps the client's crypto out of the measurement: the
node, not the load generator, is measured.

The machine has few cores and the load generators share them with the node;
``client_cpu_s`` shows how much CPU the load generators used in phase (a).
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

from bench._common import (  # noqa: E402
    NodeMonitor,
    NodeProcess,
    Workers,
    emit,
    log,
    next_command,
    percentile,
    register_users,
    rounded,
    run_worker,
    split,
    wall_to_trio,
)

ID_PLACEHOLDER = "MOOTBENCHIDPLACEHOLDER"


# -- the load generator (runs in worker processes) ------------------------------------------


class Pair:
    """A sender and a receiver connection; the sender's bookkeeping for one phase."""

    def __init__(self, cfg: dict[str, Any]) -> None:
        self.cfg = cfg
        self.prefix: str = cfg["prefix"]
        self.head, self.tail = cfg["frame"].split(ID_PLACEHOLDER)
        self.counter = 0
        self.sender: Any = None
        self.receiver: Any = None
        self.reset()

    def reset(self) -> None:
        self.inflight: dict[str, float] = {}  # id -> send time (trio clock) of this phase
        self.latencies: list[float] = []
        self.receipts_in_window = 0
        self.window_start = self.window_end = 0.0
        self.errors = 0
        self.unexpected = 0
        self.slots: Any = None  # trio.Semaphore in window mode
        self.drained: Any = None

    async def send_one(self, t_sched: float) -> None:
        self.counter += 1
        mid = f"{self.prefix}{self.counter}"
        self.inflight[mid] = t_sched
        await self.sender.send_message(self.head + mid + self.tail)

    def on_error(self, mid: str) -> None:
        """A send the node refused: free its slot without counting it."""
        if self.inflight.pop(mid, None) is not None:
            if self.slots is not None:
                self.slots.release()
            if not self.inflight and self.drained is not None:
                self.drained.set()

    def on_receipt(self, mid: str, now: float) -> None:
        t0 = self.inflight.pop(mid, None)
        if t0 is None:
            self.unexpected += 1
            return
        if self.window_start <= now < self.window_end:
            self.receipts_in_window += 1
        if t0 >= self.window_start and t0 < self.window_end:
            self.latencies.append(now - t0)
        if self.slots is not None:
            self.slots.release()
        if not self.inflight and self.drained is not None:
            self.drained.set()


RECEIPT_ACK_DELAY_S = 1.0  # as cli/client.py


async def read_loop(ws: Any, pair: Any, is_sender: bool, on_message: Any = None) -> None:
    """Read node messages and track receipts; ack as the real client does.

    A WebSocket message holding a ``message`` frame is acked at once (the sender's
    ``delivered`` waits for that ack); one holding only receipts is acked within
    a second, coalesced, like cli/client.py. ``pair`` has ``on_receipt``,
    ``on_error`` and ``errors``; ``on_message(now)`` (optional) sees each arrival.
    """
    import trio
    from trio_websocket import ConnectionClosed

    from web import frames

    top = acked = 0
    lazy = trio.Event()

    async def lazy_acker() -> None:
        nonlocal acked, lazy
        while True:
            await lazy.wait()
            await trio.sleep(RECEIPT_ACK_DELAY_S)
            lazy = trio.Event()
            if top > acked:
                acked = top
                await ws.send_message('{"type":"ack","seq":%d}' % acked)

    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lazy_acker)
            while True:
                data = await ws.get_message()
                now = trio.current_time()
                got_message = False
                for frame in frames.decode_server(data):
                    if isinstance(frame, frames.Message):
                        top = max(top, frame.seq)
                        got_message = True
                        if on_message is not None:
                            on_message(now)
                    elif isinstance(frame, frames.Receipt):
                        top = max(top, frame.seq)
                        if is_sender and frame.kind == "delivered":
                            pair.on_receipt(frame.id, now)
                    elif isinstance(frame, frames.Error):
                        pair.errors += 1
                        if pair.errors <= 3:
                            print(f"node error: {frame.code} {frame.message}", file=sys.stderr, flush=True)
                        if frame.ref:
                            pair.on_error(frame.ref)
                if top > acked:
                    if got_message:
                        acked = top
                        await ws.send_message('{"type":"ack","seq":%d}' % acked)
                    else:
                        lazy.set()
    except ConnectionClosed:
        pass


async def wait_ready(ws: Any) -> None:
    from web import frames

    first = frames.decode_server(await ws.get_message())
    if not any(isinstance(f, frames.Ready) for f in first):
        raise RuntimeError(f"expected ready, got {first!r}")


async def hold_pair(url: str, p: Pair, stop: Any, *, task_status: Any) -> None:
    """Open both WebSockets, report started once both are ready, read until ``stop``."""
    import trio
    from trio_websocket import open_websocket_url

    def opener(token: str) -> Any:
        return open_websocket_url(url, extra_headers=[("authorization", f"Bearer {token}")], max_message_size=16 * 2**20)

    async with opener(p.cfg["sender_token"]) as p.sender, opener(p.cfg["receiver_token"]) as p.receiver:
        await wait_ready(p.sender)
        await wait_ready(p.receiver)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_loop, p.sender, p, True)
            nursery.start_soon(read_loop, p.receiver, p, False)
            task_status.started()
            await stop.wait()
            nursery.cancel_scope.cancel()


async def _run_phase(pairs: list[Pair], cmd: dict[str, Any]) -> dict[str, Any]:
    import trio

    start = wall_to_trio(cmd["start_at"])
    end = start + cmd["seconds"]
    for p in pairs:
        p.reset()
        p.window_start, p.window_end = start, end
    sent = 0

    async def windowed(p: Pair) -> None:
        nonlocal sent
        p.slots = trio.Semaphore(cmd["window"])
        await trio.sleep_until(start)
        while trio.current_time() < end:
            with trio.move_on_at(end):
                await p.slots.acquire()
            if trio.current_time() >= end:
                break
            await p.send_one(trio.current_time())
            sent += 1

    async def paced(p: Pair, offset: float) -> None:
        nonlocal sent
        interval = 1.0 / cmd["rate_per_sender"]
        k = 0
        while True:
            t = start + offset + k * interval
            if t >= end:
                break
            await trio.sleep_until(t)
            await p.send_one(t)  # latency counts from the scheduled time
            sent += 1
            k += 1

    async with trio.open_nursery() as nursery:
        for i, p in enumerate(pairs):
            if cmd["mode"] == "window":
                nursery.start_soon(windowed, p)
            else:
                phase = (cmd["worker_index"] + i * cmd["workers"]) / (len(pairs) * cmd["workers"])
                nursery.start_soon(paced, p, phase / cmd["rate_per_sender"])
    # Drain: wait (bounded) for the receipts of everything still in flight.
    with trio.move_on_at(end + cmd["drain"]):
        for p in pairs:
            if p.inflight:
                p.drained = trio.Event()
                await p.drained.wait()
    lost = sum(len(p.inflight) for p in pairs)
    return {
        "sent": sent,
        "receipts_in_window": sum(p.receipts_in_window for p in pairs),
        "latencies": [x for p in pairs for x in p.latencies],
        "lost": lost,
        "errors": sum(p.errors for p in pairs),
        "unexpected": sum(p.unexpected for p in pairs),
    }


async def worker_main(index: int, cfg: dict[str, Any], inbox: Any, outbox: Any) -> None:
    import trio

    pairs = [Pair(c) for c in cfg["pairs"]]
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def starter(mine: list[Pair]) -> None:
            for p in mine:
                await nursery.start(hold_pair, cfg["ws_url"], p, stop)

        with trio.fail_after(60):
            async with trio.open_nursery() as starting:
                for chunk in split(pairs, 8):
                    starting.start_soon(starter, chunk)
        outbox.put({"connected": len(pairs) * 2})
        while True:
            cmd = await next_command(inbox)
            if cmd["cmd"] == "exit":
                break
            result = await _run_phase(pairs, {**cmd, "worker_index": index})
            outbox.put(result)
        stop.set()
        # Each pair closes its sockets gracefully; bounded.
        nursery.cancel_scope.deadline = trio.current_time() + 5


def worker(index: int, cfg: dict[str, Any], inbox: Any, outbox: Any) -> None:
    run_worker(worker_main, index, cfg, inbox, outbox)


# -- the parent -----------------------------------------------------------------------------


def make_frames(pairs: list[tuple[Any, Any]]) -> tuple[list[str], int]:
    """One send frame per pair around a real encrypted envelope, with an id placeholder."""
    from cli import crypto

    out = []
    size = 0
    for s, r in pairs:
        sender_keys = crypto.DeviceKeys.from_json(s.keys_json)
        recipient_keys = crypto.DeviceKeys.from_json(r.keys_json)
        recipient = crypto.RecipientDevice.from_bundle(r.address, r.device, recipient_keys.public_bundle())
        payload = {"type": "text", "text": "see you at 6, ok?", "ts": int(time.time() * 1000)}
        env = crypto.encrypt_message(sender_keys, s.address, s.device, r.address, ID_PLACEHOLDER, payload, [recipient])
        text = json.dumps(env, separators=(",", ":"))
        assert text.count(ID_PLACEHOLDER) == 1
        size = len(text) - len(ID_PLACEHOLDER) + 12
        out.append('{"type":"send","envelope":' + text + "}")
    return out, size


def measure_phase(workers: Workers, monitor: NodeMonitor, worker_procs: list[Any], cmd: dict[str, Any]) -> dict[str, Any]:
    """Run one phase in every worker; measure node CPU and RSS over its window."""
    start_at = time.time() + 0.5
    workers.broadcast({**cmd, "cmd": "phase", "start_at": start_at})
    time.sleep(max(0.0, start_at - time.time()))
    cpu0 = monitor.cpu_seconds()
    wcpu0 = sum(_cpu(p) for p in worker_procs)
    monitor.reset_peak()
    time.sleep(cmd["seconds"])
    cpu1 = monitor.cpu_seconds()
    wcpu1 = sum(_cpu(p) for p in worker_procs)
    peak = monitor.peak_rss
    parts = workers.receive_all(cmd["seconds"] + cmd["drain"] + 30)
    lat = [x * 1000 for part in parts for x in part["latencies"]]
    out = {
        "sent": sum(p["sent"] for p in parts),
        "receipts_in_window": sum(p["receipts_in_window"] for p in parts),
        "lost": sum(p["lost"] for p in parts),
        "errors": sum(p["errors"] for p in parts),
        "unexpected": sum(p["unexpected"] for p in parts),
        "p50_ms": percentile(lat, 50),
        "p99_ms": percentile(lat, 99),
        "max_ms": max(lat) if lat else None,
        "samples": len(lat),
        "node_cpu_s": cpu1 - cpu0,
        "client_cpu_s": wcpu1 - wcpu0,
        "peak_rss": peak,
    }
    out["per_s"] = out["receipts_in_window"] / cmd["seconds"]
    log(
        f"  {cmd['mode']}: sent {out['sent']}, delivered {out['per_s']:.0f}/s, p50 {out['p50_ms'] or 0:.1f} ms, "
        f"p99 {out['p99_ms'] or 0:.1f} ms, node cpu {out['node_cpu_s']:.2f} s, clients cpu {out['client_cpu_s']:.2f} s, "
        f"lost {out['lost']}, errors {out['errors']}"
    )
    return out


def _cpu(proc: Any) -> float:
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except Exception:
        return 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small and short (under 30 s)")
    ap.add_argument("--pairs", type=int)
    ap.add_argument("--window", type=int, default=32, help="messages in flight per sender in phase (a)")
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--rate", type=float, default=1000.0, help="total offered msg/s in phase (b)")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args()
    pairs_n = args.pairs or (20 if args.quick else 100)
    seconds = args.seconds or (5.0 if args.quick else 20.0)
    n_workers = max(1, min(args.workers, pairs_n))

    import psutil
    import trio

    with tempfile.TemporaryDirectory(prefix="moot-bench-local-") as tmp:
        node = NodeProcess(Path(tmp) / "data")
        with node, NodeMonitor(node.pid) as monitor:
            t0 = time.monotonic()
            names = [f"p{i:05d}{side}" for i in range(pairs_n) for side in "sr"]
            users = trio.run(lambda: register_users(node.base_url, names, keep_keys=True))
            devs = [u[0] for u in users]
            pairs = [(devs[2 * i], devs[2 * i + 1]) for i in range(pairs_n)]
            frames_, env_size = make_frames(pairs)
            log(f"registered {len(names)} users in {time.monotonic() - t0:.1f} s; envelope {env_size} bytes")
            configs = [
                {"ws_url": node.ws_url, "pairs": [
                    {"prefix": f"w{w}p{i}m", "frame": frames_[i], "sender_token": pairs[i][0].token,
                     "receiver_token": pairs[i][1].token}
                    for i in chunk
                ]}
                for w, chunk in enumerate(split(range(pairs_n), n_workers))
            ]
            with Workers(worker, configs) as workers:
                workers.receive_all(90)
                worker_procs = [psutil.Process(p.pid) for p in workers.procs]
                log(f"{pairs_n * 2} WebSockets open in {n_workers} workers")
                # After each phase, receipts still missing after `drain` seconds count as lost.
                base = {"workers": n_workers, "rate_per_sender": args.rate / pairs_n, "drain": 3.0 if args.quick else 10.0}
                log("warm-up")
                measure_phase(workers, monitor, worker_procs, {**base, "mode": "window", "window": 4, "seconds": 1.0})
                log(f"phase (a): window {args.window} per sender for {seconds:.0f} s")
                a = measure_phase(workers, monitor, worker_procs, {**base, "mode": "window", "window": args.window, "seconds": seconds})
                log(f"phase (b): {args.rate:.0f} msg/s offered for {seconds:.0f} s")
                b = measure_phase(workers, monitor, worker_procs, {**base, "mode": "rate", "seconds": seconds})
            hwm = monitor.vm_hwm()
            peak = max(a["peak_rss"], b["peak_rss"], monitor.peak_rss)

    result = {
        "bench": "local",
        "quick": args.quick,
        "delivered_per_s": round(a["per_s"], 1),
        "p50_ms": rounded(b["p50_ms"]),
        "p99_ms": rounded(b["p99_ms"]),
        "max_p50_ms": rounded(a["p50_ms"]),
        "max_p99_ms": rounded(a["p99_ms"]),
        "node_cpu_s": round(a["node_cpu_s"], 2),
        "per_cpu_s": round(a["receipts_in_window"] / a["node_cpu_s"], 1) if a["node_cpu_s"] > 0 else None,
        "peak_rss_mb": round(peak / 2**20, 1),
        "vm_hwm_mb": round(hwm / 2**20, 1) if hwm else None,
        "offered_per_s": args.rate,
        "achieved_offered_per_s": round(b["sent"] / seconds, 1),
        "delivered_per_s_at_offered": round(b["per_s"], 1),
        "pairs": pairs_n,
        "window": args.window,
        "seconds": seconds,
        "envelope_bytes": env_size,
        "node_cpu_s_offered": round(b["node_cpu_s"], 2),
        "client_cpu_s": round(a["client_cpu_s"], 2),
        "client_processes": n_workers,
        "lost": a["lost"] + b["lost"],
        "errors": a["errors"] + b["errors"],
        "targets": {
            "delivered_per_s>=2500": a["per_s"] >= 2500,
            "p99_ms<100_at_1000": b["p99_ms"] is not None and b["p99_ms"] < 100 and b["lost"] == 0,
        },
    }
    emit("local-quick" if args.quick else "local", result)


if __name__ == "__main__":
    main()
