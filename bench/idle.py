"""Memory per idle WebSocket session on one node.

    python bench/idle.py [--quick] [--sessions N] [--devices-per-user D] [--per-worker K]

Registers ceil(N / D) users with D devices each (default 16, the node's limit);
every device has its own session token. RSS of the node is measured once the
registrations are done and memory has settled, then N authenticated WebSockets
are opened from several load-generator processes (about K sockets each) and held
idle; once every one of them has received ``ready`` and the node's RSS has
settled again, it is measured a second time. ``kib_per_session`` is the
difference divided by N. The node's own count of live connections (``moot
status``) is checked against N.

RSS settles when four samples taken 0.5 s apart lie within 0.5 % of each other
(waiting at most 30 s).
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import (  # noqa: E402
    REPO,
    NodeMonitor,
    NodeProcess,
    Workers,
    emit,
    log,
    next_command,
    register_users,
    run_worker,
    split,
)

CONNECT_CONCURRENCY = 16  # handshakes in progress per worker


# -- the load generator (runs in worker processes) ------------------------------------------


async def hold_session(url: str, token: str, stop: Any, *, task_status: Any) -> None:
    """Open one WebSocket, report started once ``ready`` arrived, stay idle until ``stop``."""
    from trio_websocket import open_websocket_url

    from web import frames

    async with open_websocket_url(url, extra_headers=[("authorization", f"Bearer {token}")]) as ws:
        got = frames.decode_server(await ws.get_message())
        if not any(isinstance(f, frames.Ready) for f in got):
            raise RuntimeError(f"expected ready, got {got!r}")
        task_status.started()
        await stop.wait()


async def worker_main(index: int, cfg: dict[str, Any], inbox: Any, outbox: Any) -> None:
    import trio

    stop = trio.Event()
    tokens: list[str] = cfg["tokens"]
    opened = 0
    async with trio.open_nursery() as nursery:

        async def opener(mine: list[str]) -> None:
            nonlocal opened
            for token in mine:
                await nursery.start(hold_session, cfg["ws_url"], token, stop)
                opened += 1

        t0 = time.monotonic()
        with trio.fail_after(cfg["timeout"]):
            async with trio.open_nursery() as opening:
                for chunk in split(tokens, CONNECT_CONCURRENCY):
                    opening.start_soon(opener, chunk)
        outbox.put({"opened": opened, "seconds": time.monotonic() - t0})
        while (await next_command(inbox, timeout=3600))["cmd"] != "exit":
            pass
        stop.set()
        # Sockets close gracefully in parallel; bounded.
        nursery.cancel_scope.deadline = trio.current_time() + 20


def worker(index: int, cfg: dict[str, Any], inbox: Any, outbox: Any) -> None:
    run_worker(worker_main, index, cfg, inbox, outbox)


# -- the parent -----------------------------------------------------------------------------


def node_connections(data_dir: Path) -> int | None:
    """Live connections as the node counts them (``moot status --json`` over the admin socket)."""
    out = subprocess.run(
        [sys.executable, "-m", "cli.main", "--data-dir", str(data_dir), "status", "--json"],
        capture_output=True, text=True, cwd=REPO, timeout=30,
    )
    try:
        return int(json.loads(out.stdout)["connections"])
    except (ValueError, KeyError, TypeError):
        log(f"moot status failed: {out.stderr.strip()[:300]}")
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="1,000 sessions (under 30 s)")
    ap.add_argument("--sessions", type=int)
    ap.add_argument("--devices-per-user", type=int, default=16)
    ap.add_argument("--per-worker", type=int, default=2500, help="sockets per load-generator process")
    args = ap.parse_args()
    n = args.sessions or (1000 if args.quick else 10_000)
    per_user = max(1, min(args.devices_per_user, 16))
    n_users = math.ceil(n / per_user)

    import trio

    with tempfile.TemporaryDirectory(prefix="moot-bench-idle-") as tmp:
        data_dir = Path(tmp) / "data"
        node = NodeProcess(data_dir)
        with node, NodeMonitor(node.pid) as monitor:
            t0 = time.monotonic()
            users = trio.run(lambda: register_users(
                node.base_url, [f"idle{i:05d}" for i in range(n_users)], devices_per_user=per_user,
            ))
            tokens = [d.token for devs in users for d in devs][:n]
            reg_s = time.monotonic() - t0
            log(f"registered {n_users} users with {len(tokens)} devices in {reg_s:.1f} s")
            rss_before = monitor.settled_rss(timeout=30)
            log(f"node RSS before: {rss_before / 2**20:.1f} MiB")

            n_workers = max(1, math.ceil(n / args.per_worker))
            configs = [{"ws_url": node.ws_url, "tokens": chunk, "timeout": 300} for chunk in split(tokens, n_workers)]
            t1 = time.monotonic()
            with Workers(worker, configs) as workers:
                parts = workers.receive_all(330)
                open_s = time.monotonic() - t1
                opened = sum(p["opened"] for p in parts)
                log(f"{opened} sessions ready in {open_s:.1f} s ({n_workers} processes)")
                rss_after = monitor.settled_rss(timeout=30)
                live = node_connections(data_dir)
                log(f"node RSS after: {rss_after / 2**20:.1f} MiB; node counts {live} live connections")
                hwm = monitor.vm_hwm()
            if live is not None and live != opened:
                log(f"WARNING: the node counts {live} connections, expected {opened}")

    kib = (rss_after - rss_before) / opened / 1024 if opened else None
    result = {
        "bench": "idle",
        "quick": args.quick,
        "sessions": opened,
        "kib_per_session": round(kib, 2) if kib is not None else None,
        "rss_before_mb": round(rss_before / 2**20, 1),
        "rss_after_mb": round(rss_after / 2**20, 1),
        "vm_hwm_mb": round(hwm / 2**20, 1) if hwm else None,
        "node_connections": live,
        "users": n_users,
        "devices_per_user": per_user,
        "register_seconds": round(reg_s, 1),
        "open_seconds": round(open_s, 1),
        "sessions_per_s": round(opened / open_s, 1) if open_s > 0 else None,
        "client_processes": n_workers,
        "targets": {"sessions>=10000_under_40kib": opened >= 10_000 and kib is not None and kib < 40},
    }
    emit("idle-quick" if args.quick else "idle", result)


if __name__ == "__main__":
    main()
