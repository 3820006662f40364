"""Federation catch-up: how fast a node that was down receives what queued for it meanwhile.

    python bench/catchup.py [--quick] [--messages N] [--pairs K] [--window W] [--runs R]

Two node processes federating over loopback (as in bench/federation.py): riverside,
and hilltop with riverside as its static peer. K users on riverside (default 20)
each write to their partner on hilltop. Each cycle:

1. With hilltop up, every sender's node fetches its partner's device list (so the
   sends below find it cached, as a chat in progress would).
2. hilltop is stopped (SIGTERM, a clean shutdown; it has nothing pending).
3. The K senders send N messages in all (default 10,000; quick: 2,000), N/K each,
   at most W unanswered per sender, and wait until every one is ``sent``: stored on
   riverside with its signed event in the outbox for hilltop. riverside's sender
   fails to reach hilltop and backs off meanwhile. riverside's ``moot peers list``
   must then show N events queued for hilltop.
4. hilltop is started again (same data). Once its web server answers, K recipient
   clients connect, one per user, and read (acknowledging each WebSocket message
   as the real client does) until each has all N/K messages.

``seconds`` runs from the moment hilltop's process is spawned (step 4) until the
last of the N messages has arrived at a recipient's client; a message is pushed to
a client only after hilltop committed it, so by then all N are stored on hilltop
and delivered. The breakdown, all from that same moment (wall clock of this
machine; node log timestamps have millisecond resolution):

- ``node_started_s``: hilltop logged ``node.started`` (storage, federation host
  and web server up);
- ``web_ready_s``: its ``/api/v1/info`` answered (polled every 50 ms);
- ``federation_connected_s``: hilltop logged ``federation.node_found`` for
  riverside: it dialled riverside, both hellos were exchanged and riverside was
  told that hilltop is back (which ends the sender's backoff at once);
- ``first_message_s``: the first message arrived at a client;
- ``outbox_drained_s``: riverside's outbox for hilltop was first seen empty (every
  event acknowledged, i.e. committed on hilltop; polled every 20 ms);
- ``seconds`` as above; ``seconds_from_connected`` = ``seconds`` -
  ``federation_connected_s``.

CPU: ``hilltop_cpu_s`` from its spawn to the last message (``hilltop_cpu_startup_s``
of it until its web server answered), ``riverside_cpu_s`` over the same span,
and ``other_cpu_s`` what the rest of the machine (processes not part of this
benchmark) used meanwhile: wall-clock results are only comparable when it is small.

As in the other benchmarks, one real envelope per pair is reused with a fresh id.
"""

from __future__ import annotations

import argparse
import calendar
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import NodeMonitor, NodeProcess, emit, free_port, log, register_users, rounded  # noqa: E402
from bench.federation import _cpu, _system_busy, federating_node, peer_address, wait_federated  # noqa: E402
from bench.local import ID_PLACEHOLDER, make_frames  # noqa: E402

TIMEOUT_S = 120.0
TARGET_S = 5.0


# -- clients (in this process) ----------------------------------------------------------------


async def fill(ws_url: str, senders: list[dict[str, Any]], per_sender: int, window: int) -> None:
    """Every sender sends ``per_sender`` messages, ``window`` unanswered; returns once all are ``sent``."""
    import trio
    from trio_websocket import open_websocket_url

    from web import frames

    errors: list[str] = []

    async def one(s: dict[str, Any]) -> None:
        head, tail = s["frame"].split(ID_PLACEHOLDER)
        slots = trio.Semaphore(window)
        answered = 0
        done = trio.Event()
        async with open_websocket_url(ws_url, extra_headers=[("authorization", f"Bearer {s['token']}")]) as ws:

            async def reader() -> None:
                nonlocal answered
                while answered < per_sender:
                    for f in frames.decode_server(await ws.get_message()):
                        if isinstance(f, frames.Sent | frames.Error):
                            if isinstance(f, frames.Error):
                                errors.append(f"{f.code}: {f.message}")
                            answered += 1
                            slots.release()
                done.set()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(reader)
                for i in range(per_sender):
                    await slots.acquire()
                    await ws.send_message(f"{head}{s['prefix']}{i}{tail}")
                await done.wait()

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for s in senders:
                nursery.start_soon(one, s)
    if errors:
        raise RuntimeError(f"{len(errors)} sends failed, first: {errors[0]}")


async def receive(ws_url: str, tokens: list[str], per_recipient: int) -> dict[str, Any]:
    """Connect every recipient and read until each has ``per_recipient`` messages (acking as the
    real client does); returns the wall-clock times of the first and the last message."""
    import trio
    from trio_websocket import open_websocket_url

    from web import frames

    first: list[float] = []
    last = 0.0
    ws_messages = 0

    async def one(token: str) -> None:
        nonlocal last, ws_messages
        got = 0
        async with open_websocket_url(
            ws_url, extra_headers=[("authorization", f"Bearer {token}")], max_message_size=64 * 2**20
        ) as ws:
            while got < per_recipient:
                data = await ws.get_message()
                now = time.time()
                ws_messages += 1
                top = 0
                for f in frames.decode_server(data):
                    if isinstance(f, frames.Message):
                        got += 1
                        top = max(top, f.seq)
                        if not first:
                            first.append(now)
                        last = max(last, now)
                if top:
                    await ws.send_message('{"type":"ack","seq":%d}' % top)

    with trio.fail_after(TIMEOUT_S):
        async with trio.open_nursery() as nursery:
            for token in tokens:
                nursery.start_soon(one, token)
    return {"first": first[0], "last": last, "ws_messages": ws_messages}


# -- watching riverside's outbox -----------------------------------------------------------------


def outbox_depth(node: NodeProcess, peer: str) -> int | None:
    import trio

    from node.admin import admin_call

    for record in trio.run(admin_call, node.data_dir / "admin.sock", "peers.list"):
        if record["node"] == peer:
            return int(record["outbox"])
    return None


class DrainWatcher:
    """Polls riverside's outbox depth for hilltop on a thread; notes when it first is 0."""

    def __init__(self, node: NodeProcess, peer: str, interval: float = 0.02) -> None:
        self.node, self.peer, self.interval = node, peer, interval
        self.drained_at: float | None = None
        self.first_progress_at: float | None = None
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="outbox-watcher", daemon=True)

    def _run(self) -> None:
        start = None
        deadline = time.monotonic() + TIMEOUT_S
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                depth = outbox_depth(self.node, self.peer)
            except Exception as exc:  # the node answers again on the next poll, or the bench fails
                self.error = f"{type(exc).__name__}: {exc}"
                depth = None
            now = time.time()
            if depth is not None:
                if start is None:
                    start = depth
                if self.first_progress_at is None and depth < start:
                    self.first_progress_at = now
                if depth == 0:
                    self.drained_at = now
                    return
            self._stop.wait(self.interval)

    def __enter__(self) -> DrainWatcher:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def log_time(log_path: Path, event: str, after: float, **fields: str) -> float | None:
    """Wall-clock time of the first JSON log line of ``event`` (with ``fields``) at or after ``after``."""
    try:
        lines = log_path.read_text(errors="replace").splitlines()
    except OSError:
        return None
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if rec.get("event") != event or any(rec.get(k) != v for k, v in fields.items()):
            continue
        stamp = rec["ts"]  # 2026-11-23T14:43:30.123Z
        t = calendar.timegm(time.strptime(stamp[:19], "%Y-%m-%dT%H:%M:%S")) + int(stamp[20:23]) / 1000
        if t >= after - 0.001:
            return t
    return None


# -- the parent ----------------------------------------------------------------------------------


def cycle(riverside: NodeProcess, hilltop: NodeProcess, senders: list[Any], recipients: list[Any], frames_: list[str],
          per_pair: int, window: int, run: int) -> dict[str, Any]:
    import httpx
    import psutil
    import trio

    n = per_pair * len(senders)
    # 1. Fresh device lists on riverside (the node caches them for 30 s).
    for s, r in zip(senders, recipients, strict=True):
        resp = httpx.get(f"{riverside.base_url}/api/v1/users/{r.address}/devices",
                         headers={"authorization": f"Bearer {s.token}"}, timeout=10)
        resp.raise_for_status()
    # 2. hilltop goes down.
    code = hilltop.stop()
    log(f"hilltop stopped (exit code {code})")
    # 3. The backlog queues on riverside.
    t0 = time.monotonic()
    cfg = [{"token": s.token, "frame": frames_[i], "prefix": f"r{run}s{i}m"} for i, s in enumerate(senders)]
    trio.run(fill, riverside.ws_url, cfg, per_pair, window)
    fill_s = time.monotonic() - t0
    depth = outbox_depth(riverside, "hilltop")
    log(f"  {n} messages sent (stored on riverside) in {fill_s:.2f} s ({n / fill_s:.0f}/s); outbox for hilltop: {depth}")
    if depth != n:
        raise RuntimeError(f"expected {n} events queued for hilltop, riverside shows {depth}")
    # 4. hilltop comes back.
    me = psutil.Process()
    with DrainWatcher(riverside, "hilltop") as watcher, NodeMonitor(riverside.pid) as r_mon:
        sys0, r_cpu0, me0 = _system_busy(), r_mon.cpu_seconds(), _cpu(me)
        t_start = time.time()
        hilltop.start()
        t_web = time.time()
        with NodeMonitor(hilltop.pid) as h_mon:
            h_cpu_start = h_mon.cpu_seconds()
            got = trio.run(receive, hilltop.ws_url, [r.token for r in recipients], per_pair)
            h_cpu, r_cpu = h_mon.cpu_seconds(), r_mon.cpu_seconds() - r_cpu0
        other = _system_busy() - sys0 - h_cpu - r_cpu - (_cpu(me) - me0)
        # Bounded: the outbox drains before (or just after) the last message arrives.
        deadline = time.monotonic() + 30
        while watcher.drained_at is None and time.monotonic() < deadline and watcher._thread.is_alive():
            time.sleep(0.02)
    if watcher.drained_at is None:
        raise RuntimeError(f"riverside's outbox for hilltop did not drain ({watcher.error})")
    connected = log_time(hilltop.log_path, "federation.node_found", t_start, node="riverside")
    started = log_time(hilltop.log_path, "node.started", t_start)

    def since(t: float | None) -> float | None:
        return None if t is None else round(t - t_start, 3)

    out = {
        "seconds": since(got["last"]),
        "node_started_s": since(started),
        "web_ready_s": since(t_web),
        "federation_connected_s": since(connected),
        "first_message_s": since(got["first"]),
        "first_ack_s": since(watcher.first_progress_at),
        "outbox_drained_s": since(watcher.drained_at),
        "seconds_from_connected": None if connected is None else round(got["last"] - connected, 3),
        "fill_s": round(fill_s, 2),
        "ws_messages": got["ws_messages"],
        "hilltop_cpu_s": round(h_cpu, 2),  # since its process started, imports included
        "hilltop_cpu_startup_s": round(h_cpu_start, 2),  # of which until its web server answered
        "riverside_cpu_s": round(r_cpu, 2),
        "other_cpu_s": round(other, 2),  # other processes on the machine meanwhile (not this benchmark's)
    }
    log("  hilltop back: " + ", ".join(f"{k} {v}" for k, v in out.items()))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="2,000 messages, one cycle")
    ap.add_argument("--messages", type=int, help="messages queued per cycle (default 10,000; quick: 2,000)")
    ap.add_argument("--pairs", type=int, default=20, help="senders on riverside, each with a partner on hilltop")
    ap.add_argument("--window", type=int, default=64, help="sends in flight per sender while filling")
    ap.add_argument("--runs", type=int, help="down/fill/up cycles on the same two nodes (default 3; quick: 1)")
    ap.add_argument("--node-env", action="append", default=[], metavar="NAME=VALUE", help="extra environment for both nodes")
    args = ap.parse_args()
    n = args.messages or (2000 if args.quick else 10_000)
    pairs_n = args.pairs
    per_pair = -(-n // pairs_n)
    n = per_pair * pairs_n
    runs = args.runs or (1 if args.quick else 3)
    node_env = dict(item.split("=", 1) for item in args.node_env)
    logs = {"MOOT_LOG_LEVEL": "info", "MOOT_LOG_FORMAT": "json"}

    import trio

    results = []
    with tempfile.TemporaryDirectory(prefix="moot-bench-catchup-") as tmp:
        root = Path(tmp)
        r_fed, h_fed = free_port(), free_port()
        riverside = federating_node(root, "riverside", r_fed, **node_env)
        with riverside:
            hilltop = federating_node(root, "hilltop", h_fed, [peer_address(riverside, r_fed)], **{**logs, **node_env})
            try:
                hilltop.start()
                senders = [u[0] for u in trio.run(lambda: register_users(riverside.base_url, [f"a{i:04d}" for i in range(pairs_n)], keep_keys=True))]
                recipients = [u[0] for u in trio.run(lambda: register_users(hilltop.base_url, [f"b{i:04d}" for i in range(pairs_n)], keep_keys=True))]
                wait_federated(riverside, senders[0].token, recipients[0].address)
                frames_, _ = make_frames(list(zip(senders, recipients, strict=True)))
                for run in range(runs):
                    log(f"cycle {run + 1}/{runs}: {n} messages from {pairs_n} users of riverside to {pairs_n} of hilltop")
                    results.append(cycle(riverside, hilltop, senders, recipients, frames_, per_pair, args.window, run))
            finally:
                hilltop.stop()

    def med(key: str) -> float | None:
        values = [r[key] for r in results if r[key] is not None]
        return rounded(statistics.median(values), 3) if values else None

    seconds = med("seconds")
    targets = {f"seconds<{TARGET_S:g}": seconds is not None and seconds < TARGET_S}
    result = {
        "bench": "catchup",
        "quick": args.quick,
        "messages": n,
        "seconds": seconds,
        "seconds_from_connected": med("seconds_from_connected"),
        "msgs_per_s_from_connected": round(n / med("seconds_from_connected"), 1) if med("seconds_from_connected") else None,
        "breakdown": {k: med(k) for k in ("node_started_s", "web_ready_s", "federation_connected_s", "first_message_s",
                                          "first_ack_s", "outbox_drained_s")},
        "hilltop_cpu_s": med("hilltop_cpu_s"),
        "hilltop_cpu_startup_s": med("hilltop_cpu_startup_s"),
        "riverside_cpu_s": med("riverside_cpu_s"),
        "other_cpu_s": med("other_cpu_s"),
        "cores": os.cpu_count(),
        "runs": runs,
        "seconds_runs": [r["seconds"] for r in results],
        "cycles": results,
        "pairs": pairs_n,
        "targets": targets,
        "met": all(targets.values()),
    }
    emit("catchup-quick" if args.quick else "catchup", result)


if __name__ == "__main__":
    main()
