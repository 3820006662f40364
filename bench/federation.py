"""Federation throughput and latency: two node processes federating over loopback.

    python bench/federation.py [--quick] [--pairs N] [--reverse F] [--window W] [--seconds S]
                               [--rate R] [--workers K] [--runs N]

Two ``moot run`` processes on 127.0.0.1, each with its own SQLite database:
riverside and hilltop, federating over libp2p on loopback (hilltop has riverside
as its static peer). N pairs of users (default 100), one device and one WebSocket
each, held by K load-generator processes: in most pairs ``a<i>@riverside`` sends to
``b<i>@hilltop``; in a fraction F of them (default 0.2) ``b<i>@hilltop`` sends to
``a<i>@riverside``, so both nodes send and receive events. Every message crosses
the federation link, and so does its ``delivered`` receipt, the other way: the
recipient's client acknowledges the message at once (as cli/client.py does), its
node queues a signed receipt event for the sender's node, which records it and
pushes ``delivered`` to the sender. A message counts when its sender got that
receipt; receipts that only move a cursor are acknowledged within a second,
coalesced, like the real client.

Phases, after a two-second warm-up (which also makes each sender's node fetch the
recipient's device list from the other node once), repeated ``--runs`` times on
the same two nodes (results are medians over runs; per-run values are listed):

(a) maximum throughput: every sender keeps W messages in flight for S seconds.
    ``delivered_per_s`` = ``delivered`` receipts that reached senders in the
    window / S; ``received_per_s`` = messages that reached recipients' clients in
    the window / S. ``cpu_s`` is each node process's user+system CPU over the
    window (all threads), ``peak_rss_mb`` each node's largest RSS sample.
(b) fixed offered load (open loop, default 500 msg/s in total, senders paced
    evenly): ``p50_ms`` / ``p99_ms`` from each message's *scheduled* send time to
    its sender seeing ``delivered`` (no coordinated omission).

As in bench/local.py, one real envelope per pair is made with
``cli.crypto.encrypt_message`` (to the recipient's real device keys) and reused
with a fresh ``id``: nodes never decrypt or check the client's signature, so they
do the same work, and the client's crypto stays out of the measurement. Node
signatures on federation events are real: each event is signed by its origin
node and verified by the other.

Everything (two nodes, load generators) shares the machine's cores;
``client_cpu_s`` shows what the load generators used in phase (a), and
``other_cpu_s`` what the rest of the machine (processes not part of this
benchmark) used meanwhile: results are only comparable when it is small.
``commits`` are each node's group commits (and the writes in them) in phase (a),
from ``moot status``. ``--node-env NAME=VALUE`` passes extra settings to both
nodes; ``MOOT_BENCH_NODE_SRC`` runs the nodes from another checkout (_common.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    NodeMonitor,
    NodeProcess,
    Workers,
    emit,
    free_port,
    log,
    next_command,
    percentile,
    register_users,
    rounded,
    run_worker,
    split,
)
from bench.local import Pair, _run_phase, make_frames, read_loop, wait_ready  # noqa: E402

TARGET_PER_S = 2000
TARGET_P99_MS = 150
TARGET_OFFERED = 500


# -- the two nodes (also used by bench/catchup.py) ---------------------------------------------


def federating_node(root: Path, name: str, fed_port: int, peers: Sequence[str] = (), **env: str) -> NodeProcess:
    """A node named ``name`` with its data (and node.log) under ``root/name``, federating on loopback."""
    (root / name).mkdir(parents=True, exist_ok=True)
    # mDNS off: the two nodes meet through the static peer only.
    fed = {"MOOT_NODE_NAME": name, "MOOT_FEDERATION_LISTEN": f"/ip4/127.0.0.1/tcp/{fed_port}", "MOOT_MDNS": "false"}
    if peers:
        fed["MOOT_FEDERATION_PEERS"] = ",".join(peers)
    return NodeProcess(root / name / "data", **{**fed, **env})


def peer_address(node: NodeProcess, fed_port: int) -> str:
    """The multiaddr of a started node, ending in /p2p/<its peer id> (from its key file)."""
    from federation.host import peer_id_of
    from node.app import load_or_create_key

    return f"/ip4/127.0.0.1/tcp/{fed_port}/p2p/{peer_id_of(load_or_create_key(node.data_dir / 'node.key'))}"


def wait_federated(node: NodeProcess, token: str, remote_address: str, timeout: float = 30) -> float:
    """Poll (bounded) until ``node`` can list the devices of ``remote_address`` on the other node;
    returns the seconds waited."""
    import httpx

    t0 = time.monotonic()
    last = ""
    while time.monotonic() - t0 < timeout:
        try:
            r = httpx.get(f"{node.base_url}/api/v1/users/{remote_address}/devices",
                          headers={"authorization": f"Bearer {token}"}, timeout=5)
            if r.status_code == 200:
                return time.monotonic() - t0
            last = f"{r.status_code} {r.text[:200]}"
        except httpx.HTTPError as exc:
            last = str(exc)
        time.sleep(0.1)
    raise RuntimeError(f"{node.base_url} did not reach {remote_address} in {timeout} s: {last}")


# -- the load generator (runs in worker processes) ------------------------------------------


class FedPair(Pair):
    """bench/local.py's Pair, plus what the recipient's client saw."""

    def reset(self) -> None:
        super().reset()
        self.received = 0
        self.received_in_window = 0

    def on_message(self, now: float) -> None:
        self.received += 1
        if self.window_start <= now < self.window_end:
            self.received_in_window += 1


async def hold_pair(p: FedPair, stop: Any, *, task_status: Any) -> None:
    """Open the sender's and the recipient's WebSockets (on different nodes), read until ``stop``."""
    import trio
    from trio_websocket import open_websocket_url

    def opener(url: str, token: str) -> Any:
        return open_websocket_url(url, extra_headers=[("authorization", f"Bearer {token}")], max_message_size=16 * 2**20)

    cfg = p.cfg
    async with opener(cfg["sender_url"], cfg["sender_token"]) as p.sender, \
            opener(cfg["receiver_url"], cfg["receiver_token"]) as p.receiver:
        await wait_ready(p.sender)
        await wait_ready(p.receiver)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_loop, p.sender, p, True)
            nursery.start_soon(read_loop, p.receiver, p, False, p.on_message)
            task_status.started()
            await stop.wait()
            nursery.cancel_scope.cancel()


async def worker_main(index: int, cfg: dict[str, Any], inbox: Any, outbox: Any) -> None:
    import trio

    pairs = [FedPair(c) for c in cfg["pairs"]]
    stop = trio.Event()
    async with trio.open_nursery() as nursery:

        async def starter(mine: list[FedPair]) -> None:
            for p in mine:
                await nursery.start(hold_pair, p, stop)

        with trio.fail_after(60):
            async with trio.open_nursery() as starting:
                for chunk in split(pairs, 8):
                    starting.start_soon(starter, chunk)
        outbox.put({"connected": len(pairs) * 2})
        while True:
            cmd = await next_command(inbox)
            if cmd["cmd"] == "exit":
                break
            result = await _run_phase(pairs, {**cmd, "worker_index": index})  # type: ignore[arg-type]
            result["received_in_window"] = sum(p.received_in_window for p in pairs)
            result["received"] = sum(p.received for p in pairs)
            outbox.put(result)
        stop.set()
        nursery.cancel_scope.deadline = trio.current_time() + 5


def worker(index: int, cfg: dict[str, Any], inbox: Any, outbox: Any) -> None:
    run_worker(worker_main, index, cfg, inbox, outbox)


# -- the parent -----------------------------------------------------------------------------


def _cpu(proc: Any) -> float:
    try:
        t = proc.cpu_times()
        return float(t.user + t.system)
    except Exception:
        return 0.0


def _system_busy() -> float:
    """CPU seconds the whole machine spent busy so far (all processes, all cores)."""
    import psutil

    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


def writer_stats(node: NodeProcess) -> dict[str, int]:
    """The node's group-commit counters (``moot status`` over the admin socket)."""
    import trio

    from node.admin import admin_call

    status = trio.run(admin_call, node.data_dir / "admin.sock", "status")
    return {"batches": int(status["writer"]["batches"]), "writes": int(status["writer"]["writes"])}


def measure_phase(
    workers: Workers, nodes: dict[str, NodeProcess], monitors: dict[str, NodeMonitor], worker_procs: list[Any],
    cmd: dict[str, Any],
) -> dict[str, Any]:
    """Run one phase in every worker; measure each node's CPU, RSS and commits over its window."""
    start_at = time.time() + 0.5
    workers.broadcast({**cmd, "cmd": "phase", "start_at": start_at})
    time.sleep(max(0.0, start_at - time.time()))
    w0 = {n: writer_stats(node) for n, node in nodes.items()}
    sys0 = _system_busy()
    cpu0 = {n: m.cpu_seconds() for n, m in monitors.items()}
    wcpu0 = sum(_cpu(p) for p in worker_procs)
    for m in monitors.values():
        m.reset_peak()
    time.sleep(cmd["seconds"])
    cpu = {n: m.cpu_seconds() - cpu0[n] for n, m in monitors.items()}
    wcpu = sum(_cpu(p) for p in worker_procs) - wcpu0
    other = _system_busy() - sys0 - sum(cpu.values()) - wcpu
    peaks = {n: m.peak_rss for n, m in monitors.items()}
    w1 = {n: writer_stats(node) for n, node in nodes.items()}
    commits = {n: {k: w1[n][k] - w0[n][k] for k in ("batches", "writes")} for n in nodes}
    parts = workers.receive_all(cmd["seconds"] + cmd["drain"] + 30)
    lat = [x * 1000 for part in parts for x in part["latencies"]]
    out = {key: sum(p[key] for p in parts) for key in ("sent", "receipts_in_window", "received_in_window", "received", "lost", "errors", "unexpected")}
    out.update({
        "p50_ms": percentile(lat, 50), "p99_ms": percentile(lat, 99), "max_ms": max(lat) if lat else None,
        "samples": len(lat), "cpu_s": cpu, "client_cpu_s": wcpu, "peak_rss": peaks, "commits": commits,
        "other_cpu_s": other,
    })
    out["per_s"] = out["receipts_in_window"] / cmd["seconds"]
    out["received_per_s"] = out["received_in_window"] / cmd["seconds"]
    log(
        f"  {cmd['mode']}: sent {out['sent']}, delivered {out['per_s']:.0f}/s (received {out['received_per_s']:.0f}/s), "
        f"p50 {out['p50_ms'] or 0:.1f} ms, p99 {out['p99_ms'] or 0:.1f} ms, max {out['max_ms'] or 0:.0f} ms, "
        f"cpu " + ", ".join(f"{n} {c:.2f} s" for n, c in cpu.items()) + f", clients {wcpu:.2f} s, others {other:.2f} s, "
        f"lost {out['lost']}, errors {out['errors']}, received {out['received']}; commits "
        + ", ".join(f"{n} {c['batches']} ({c['writes']} writes)" for n, c in commits.items())
    )
    return out


def median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return float(statistics.median(present)) if present else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small and short (about 30 s)")
    ap.add_argument("--pairs", type=int, help="user pairs (default 100; quick: 20)")
    ap.add_argument("--reverse", type=float, default=0.2, help="fraction of pairs sending hilltop -> riverside")
    ap.add_argument("--window", type=int, default=32, help="messages in flight per sender in phase (a)")
    ap.add_argument("--seconds", type=float, help="length of each phase (default 10; quick: 4)")
    ap.add_argument("--rate", type=float, default=float(TARGET_OFFERED), help="total offered msg/s in phase (b)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--runs", type=int, help="repetitions of (a) and (b) (default 3; quick: 1)")
    ap.add_argument("--node-env", action="append", default=[], metavar="NAME=VALUE",
                    help="extra environment for both nodes (experiments, e.g. MOOT_WRITER_MAX_BATCH=500)")
    args = ap.parse_args()
    pairs_n = args.pairs or (20 if args.quick else 100)
    seconds = args.seconds or (4.0 if args.quick else 10.0)
    runs = args.runs or (1 if args.quick else 3)
    n_workers = max(1, min(args.workers, pairs_n))
    # Spread the reverse pairs evenly: pair i is reverse when floor((i+1)F) > floor(iF).
    reverse = {i for i in range(pairs_n) if int((i + 1) * args.reverse) > int(i * args.reverse)}

    node_env = dict(item.split("=", 1) for item in args.node_env)

    import psutil
    import trio

    with tempfile.TemporaryDirectory(prefix="moot-bench-federation-") as tmp:
        root = Path(tmp)
        r_fed, h_fed = free_port(), free_port()
        riverside = federating_node(root, "riverside", r_fed, **node_env)
        with riverside:
            hilltop = federating_node(root, "hilltop", h_fed, [peer_address(riverside, r_fed)], **node_env)
            with hilltop, NodeMonitor(riverside.pid) as r_mon, NodeMonitor(hilltop.pid) as h_mon:
                monitors = {"riverside": r_mon, "hilltop": h_mon}
                nodes = {"riverside": riverside, "hilltop": hilltop}
                t0 = time.monotonic()
                a_users = trio.run(lambda: register_users(riverside.base_url, [f"a{i:04d}" for i in range(pairs_n)], keep_keys=True))
                b_users = trio.run(lambda: register_users(hilltop.base_url, [f"b{i:04d}" for i in range(pairs_n)], keep_keys=True))
                a_devs, b_devs = [u[0] for u in a_users], [u[0] for u in b_users]
                waited = wait_federated(riverside, a_devs[0].token, b_devs[0].address)
                wait_federated(hilltop, b_devs[0].token, a_devs[0].address)
                log(f"registered {2 * pairs_n} users in {time.monotonic() - t0:.1f} s; federated after {waited:.1f} s more")
                pairs = [(b_devs[i], a_devs[i]) if i in reverse else (a_devs[i], b_devs[i]) for i in range(pairs_n)]
                frames_, env_size = make_frames(pairs)
                url = {"riverside": riverside.ws_url, "hilltop": hilltop.ws_url}

                def node_url(dev: Any) -> str:
                    return url[dev.address.rpartition("@")[2]]

                configs = [
                    {"pairs": [
                        {"prefix": f"w{w}p{i}m", "frame": frames_[i],
                         "sender_url": node_url(pairs[i][0]), "sender_token": pairs[i][0].token,
                         "receiver_url": node_url(pairs[i][1]), "receiver_token": pairs[i][1].token}
                        for i in chunk
                    ]}
                    for w, chunk in enumerate(split(range(pairs_n), n_workers))
                ]
                with Workers(worker, configs) as workers:
                    workers.receive_all(90)
                    worker_procs = [psutil.Process(p.pid) for p in workers.procs]
                    log(f"{pairs_n * 2} WebSockets open in {n_workers} workers; {len(reverse)} of {pairs_n} pairs hilltop -> riverside")
                    base = {"workers": n_workers, "rate_per_sender": args.rate / pairs_n, "drain": 5.0 if args.quick else 10.0}
                    log("warm-up")
                    measure_phase(workers, nodes, monitors, worker_procs, {**base, "mode": "window", "window": 4, "seconds": 2.0})
                    results = []
                    for run in range(runs):
                        log(f"run {run + 1}/{runs}, phase (a): window {args.window} per sender for {seconds:.0f} s")
                        a = measure_phase(workers, nodes, monitors, worker_procs, {**base, "mode": "window", "window": args.window, "seconds": seconds})
                        log(f"run {run + 1}/{runs}, phase (b): {args.rate:.0f} msg/s offered for {seconds:.0f} s")
                        b = measure_phase(workers, nodes, monitors, worker_procs, {**base, "mode": "rate", "seconds": seconds})
                        results.append((a, b))
                hwm = {n: m.vm_hwm() for n, m in monitors.items()}
                peak = {n: max([m.peak_rss] + [ph["peak_rss"][n] for ab in results for ph in ab]) for n, m in monitors.items()}

    a_runs = [a for a, _ in results]
    b_runs = [b for _, b in results]
    per_s = median([a["per_s"] for a in a_runs]) or 0.0
    p50 = median([b["p50_ms"] for b in b_runs])
    p99 = median([b["p99_ms"] for b in b_runs])
    lost = sum(a["lost"] + b["lost"] for a, b in results)
    targets = {
        f"delivered_per_s>={TARGET_PER_S}": per_s >= TARGET_PER_S,
        f"p99_ms<{TARGET_P99_MS}_at_{TARGET_OFFERED}": p99 is not None and p99 < TARGET_P99_MS and args.rate >= TARGET_OFFERED
        and all(b["lost"] == 0 for b in b_runs),
    }
    cpu = {n: round(median([a["cpu_s"][n] for a in a_runs]) or 0.0, 2) for n in monitors}
    result = {
        "bench": "federation",
        "quick": args.quick,
        "delivered_per_s": round(per_s, 1),
        "received_per_s": round(median([a["received_per_s"] for a in a_runs]) or 0.0, 1),
        "p50_ms": rounded(p50),
        "p99_ms": rounded(p99),
        "max_ms": rounded(median([b["max_ms"] for b in b_runs])),
        "cpu_s": cpu,
        "msgs_per_cpu_s": round(per_s * seconds / sum(cpu.values()), 1) if sum(cpu.values()) else None,
        "cpu_s_offered": {n: round(median([b["cpu_s"][n] for b in b_runs]) or 0.0, 2) for n in monitors},
        "peak_rss_mb": {n: round(v / 2**20, 1) for n, v in peak.items()},
        "vm_hwm_mb": {n: round(v / 2**20, 1) if v else None for n, v in hwm.items()},
        "max_p50_ms": rounded(median([a["p50_ms"] for a in a_runs])),
        "max_p99_ms": rounded(median([a["p99_ms"] for a in a_runs])),
        "offered_per_s": args.rate,
        "achieved_offered_per_s": round(median([b["sent"] / seconds for b in b_runs]) or 0.0, 1),
        "runs": runs,
        "delivered_per_s_runs": [round(a["per_s"], 1) for a in a_runs],
        "p99_ms_runs": [rounded(b["p99_ms"]) for b in b_runs],
        "p50_ms_runs": [rounded(b["p50_ms"]) for b in b_runs],
        "cpu_s_runs": [{n: round(c, 2) for n, c in a["cpu_s"].items()} for a in a_runs],
        "pairs": pairs_n,
        "reverse_pairs": len(reverse),
        "window": args.window,
        "seconds": seconds,
        "envelope_bytes": env_size,
        "client_cpu_s": round(median([a["client_cpu_s"] for a in a_runs]) or 0.0, 2),
        "client_processes": n_workers,
        "other_cpu_s": round(median([a["other_cpu_s"] for a in a_runs]) or 0.0, 2),
        "cores": psutil.cpu_count(),
        "commits": [{n: c for n, c in a["commits"].items()} for a in a_runs],
        "lost": lost,
        "errors": sum(a["errors"] + b["errors"] for a, b in results),
        "targets": targets,
        "met": all(targets.values()),
    }
    emit("federation-quick" if args.quick else "federation", result)


if __name__ == "__main__":
    main()
