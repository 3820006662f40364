"""Presence across nodes: how fast a change reaches watchers on the other nodes, and its CPU cost.

    python bench/presence.py [--quick] [--nodes N] [--seconds S] [--rate R]

N node processes (default 10; quick 4, a smoke run) federate over loopback, each with its own SQLite
database, mDNS off: node ``n<i>`` has the nodes before it as static peers. Each
node has a *subject* user ``s`` and a *watcher* user ``w``. Every subject writes
one message to the watcher of every other node, so each subject is watched by
N - 1 users, one on each other node, and each watcher watches N - 1 subjects on
N - 1 nodes. All 2N users hold one WebSocket each, from this process.

After everyone sees every subject online (and a quiet window that measures the
idle cost: heartbeats), subjects change presence for S seconds (default 20; quick
6), R changes per second in all (default 10), round-robin, each change flipping
that subject between ``away`` and ``online`` (the client's ``presence`` frame).
A change counts for a watcher when the watcher's WebSocket delivers that subject
in that state; its latency runs from the moment the subject's frame was sent. All
clocks are this process's monotonic clock.

Results: ``p50_ms`` / ``p99_ms`` / ``max_ms`` over every (change, watcher);
``missed``: deliveries that never came (within 5 s after the window);
``cpu_ms_per_change``: the node processes' CPU (user+system, all N) during the
window, minus what they use idle (heartbeats, measured just before), per change;
``cpu_ms_per_change_raw`` without that subtraction; ``idle_cpu_ms_per_s`` of all
nodes. ``other_cpu_s``: CPU used meanwhile by processes not part of the benchmark.
Target: p99 under 500 ms.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import NodeMonitor, client_user, NodeProcess, emit, log, percentile, rounded  # noqa: E402
from bench.federation import _system_busy, federating_node, peer_address  # noqa: E402
from node.nursery import first_error  # noqa: E402

TARGET_P99_MS = 500.0


def distinct_free_ports(count: int) -> list[int]:
    """``count`` ports free now and all different (each socket stays bound until all are picked)."""
    import socket

    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def start_all(nodes: list[NodeProcess]) -> None:
    """Start every node at once (each start waits for its web server), bounded by their own timeouts."""
    errors: list[BaseException] = []

    def start(node: NodeProcess) -> None:
        try:
            node.start(timeout=180)
        except BaseException as exc:  # noqa: BLE001 (re-raised below)
            errors.append(exc)

    threads = [threading.Thread(target=start, args=(n,)) for n in nodes]
    for t in threads:
        t.start()
    for t in threads:
        t.join(200)
    if errors:
        raise errors[0]


async def run(nodes: list[NodeProcess], monitors: list[NodeMonitor], args: argparse.Namespace) -> dict[str, Any]:
    import trio

    from cli.client import IncomingMessage, PresenceEvent

    n = len(nodes)
    names = [f"n{i}" for i in range(n)]

    from node.admin import admin_call

    # every node has met every other (static peers, and those that dialled it)
    with trio.move_on_after(120):
        while True:
            missing = {}
            for i, node in enumerate(nodes):
                known = {p["node"] for p in await admin_call(node.data_dir / "admin.sock", "peers.list", None) if p["peer_id"]}
                if lacking := set(names) - known - {names[i]}:
                    missing[names[i]] = sorted(lacking)
            if not missing:
                break
            await trio.sleep(0.5)
    if missing:
        raise RuntimeError(f"nodes did not meet: {missing}")
    subjects = [await client_user(node.base_url, "s") for node in nodes]
    watchers = [await client_user(node.base_url, "w") for node in nodes]
    async with AsyncExitStack() as stack:
        s_live = [await stack.enter_async_context(c.connect()) for c in subjects]
        w_live = [await stack.enter_async_context(c.connect()) for c in watchers]
        t0 = time.monotonic()
        sent = [0] * n
        with trio.fail_after(180):
            async with trio.open_nursery() as nursery:
                for i in range(n):
                    async def introduce(i: int = i) -> None:
                        for j in range(n):
                            if j != i:
                                await s_live[i].send_text(f"w@{names[j]}", f"hello from {names[i]}")
                                sent[i] += 1
                    nursery.start_soon(introduce)
            got = [0] * n
            try:
                for j in range(n):
                    while got[j] < n - 1:
                        if isinstance(await w_live[j].next_event(), IncomingMessage):
                            got[j] += 1
            except trio.Cancelled:
                log(f"messages each subject sent: {sent}; each watcher got (of {n - 1}): {got}")
                with trio.CancelScope(shield=True):
                    for i, node in enumerate(nodes):
                        peers = await admin_call(node.data_dir / "admin.sock", "peers.list", None)
                        stuck = {p["node"]: (p["outbox"], p["connected"], p["failures"], p["last_error"]) for p in peers if p["outbox"]}
                        convs = await watchers[i].conversations()
                        log(f"  {names[i]} outboxes: {stuck}; w's conversations: {len(convs)}, "
                            f"live seq {w_live[i]._last_seq}, ready cursor {w_live[i].ready.cursor if w_live[i].ready else None}")
                raise
        log(f"{n * (n - 1)} conversations across {n} nodes in {time.monotonic() - t0:.1f} s")
        subject_addrs = [f"s@{name}" for name in names]
        with trio.fail_after(60):
            for j in range(n):
                while any(
                    (p := w_live[j].presence.get(s)) is None or p.state != "online"
                    for s in subject_addrs if s != f"s@{names[j]}"
                ):
                    await w_live[j].next_event()
        log("every watcher sees every other node's subject online")

        idle_s = 3.0 if args.quick else 5.0
        cpu0 = sum(m.cpu_seconds() for m in monitors)
        await trio.sleep(idle_s)
        idle_cpu_per_s = (sum(m.cpu_seconds() for m in monitors) - cpu0) / idle_s

        # subject i's k-th change: (state, sent at); watchers record each change once
        changes: list[list[tuple[str, float]]] = [[] for _ in range(n)]
        state = ["online"] * n
        latencies: list[float] = []
        recorded: set[tuple[int, int, int]] = set()  # (watcher, subject, change index)
        expected = 0

        async def watch(j: int) -> None:
            while True:
                event = await w_live[j].next_event()
                if not isinstance(event, PresenceEvent):
                    continue
                now = time.monotonic()
                i = subject_addrs.index(event.user) if event.user in subject_addrs else -1
                if i < 0 or not changes[i]:
                    continue
                k = len(changes[i]) - 1
                sent_state, sent_at = changes[i][k]
                if event.state == sent_state and (j, i, k) not in recorded:
                    recorded.add((j, i, k))
                    latencies.append(now - sent_at)

        busy0, cpu0 = _system_busy(), sum(m.cpu_seconds() for m in monitors)
        total = int(args.seconds * args.rate)
        async with trio.open_nursery() as nursery:
            for j in range(n):
                nursery.start_soon(watch, j)
            start = trio.current_time()
            for k in range(total):
                await trio.sleep_until(start + k / args.rate)
                i = k % n
                state[i] = "away" if state[i] == "online" else "online"
                changes[i].append((state[i], time.monotonic()))
                await s_live[i].set_presence(state[i])
                expected += n - 1
            window_cpu = sum(m.cpu_seconds() for m in monitors) - cpu0
            window_s = trio.current_time() - start
            busy = _system_busy() - busy0
            with trio.move_on_after(5):
                while len(recorded) < expected:
                    await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
    for client in subjects + watchers:
        await client.aclose()

    lat_ms = [x * 1000 for x in latencies]
    client_cpu = 0.0
    try:
        import psutil

        t = psutil.Process().cpu_times()
        client_cpu = t.user + t.system
    except Exception:
        pass
    net = max(0.0, window_cpu - idle_cpu_per_s * window_s)
    return {
        "changes": total, "deliveries": len(latencies), "missed": expected - len(recorded),
        "p50_ms": rounded(percentile(lat_ms, 50)), "p99_ms": rounded(percentile(lat_ms, 99)),
        "max_ms": rounded(max(lat_ms) if lat_ms else None),
        "cpu_ms_per_change": rounded(net * 1000 / total if total else None, 3),
        "cpu_ms_per_change_raw": rounded(window_cpu * 1000 / total if total else None, 3),
        "idle_cpu_ms_per_s": rounded(idle_cpu_per_s * 1000, 1),
        "node_cpu_s": rounded(window_cpu), "window_s": rounded(window_s),
        "other_cpu_s": rounded(busy - window_cpu - 0.0),  # includes this process (the clients)
        "client_process_cpu_s_total": rounded(client_cpu),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--nodes", type=int, default=None, help="node processes (default 10; quick 4)")
    ap.add_argument("--seconds", type=float, default=None)
    ap.add_argument("--rate", type=float, default=10.0, help="presence changes per second, all subjects together")
    ap.add_argument("--heartbeat", type=float, default=10.0, help="presence_heartbeat_s of every node")
    ap.add_argument("--lease", type=float, default=30.0, help="presence_lease_s of every node")
    ap.add_argument("--node-log-level", default="warning", help="the nodes' log_level (their logs go to DIR/n<i>/node.log)")
    ap.add_argument("--keep", metavar="DIR", help="put the nodes' data and logs in DIR (kept) instead of a temporary directory")
    args = ap.parse_args()
    if args.seconds is None:
        args.seconds = 6.0 if args.quick else 20.0
    if args.nodes is None:
        args.nodes = 4 if args.quick else 10
    if args.nodes < 2:
        ap.error("--nodes must be at least 2")

    import trio

    env = {"MOOT_PRESENCE_HEARTBEAT_S": str(args.heartbeat), "MOOT_PRESENCE_LEASE_S": str(args.lease),
           "MOOT_LOG_LEVEL": args.node_log_level}
    with tempfile.TemporaryDirectory(prefix="moot-bench-presence-") as tmp:
        root = Path(args.keep) if args.keep else Path(tmp)
        nodes: list[NodeProcess] = []
        addresses: list[str] = []
        ports = distinct_free_ports(2 * args.nodes)
        for i in range(args.nodes):
            port = ports[2 * i]
            node = federating_node(root, f"n{i}", port, peers=list(addresses), **env)
            node.port = ports[2 * i + 1]
            node.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            addresses.append(peer_address(node, port))
            nodes.append(node)
        try:
            t0 = time.monotonic()
            start_all(nodes)
            log(f"{len(nodes)} nodes up in {time.monotonic() - t0:.1f} s")
            monitors = [NodeMonitor(node.pid) for node in nodes]
            try:
                result = trio.run(run, nodes, monitors, args)
            except BaseExceptionGroup as group:
                raise first_error(group) from None  # (each open session nests a group)
        finally:
            for node in nodes:
                node.stop()
    p99 = result["p99_ms"]
    met = p99 is not None and p99 < TARGET_P99_MS and result["missed"] == 0
    log(f"p50 {result['p50_ms']} ms, p99 {p99} ms, {result['cpu_ms_per_change']} ms CPU per change, missed {result['missed']}")
    emit("presence-quick" if args.quick else "presence", {
        "bench": "presence", "quick": args.quick, "nodes": args.nodes, "rate": args.rate, "seconds": args.seconds,
        **result, "targets": {f"p99_ms<{TARGET_P99_MS:g}": met}, "met": met,
    })


if __name__ == "__main__":
    main()
