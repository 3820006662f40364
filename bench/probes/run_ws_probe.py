"""Run the WebSocket echo CPU probe over several server stacks; print a table and JSON.

    .venv/bin/python bench/probes/run_ws_probe.py [--rates 1000 2000 3000] [--only starlette,...]

Server pinned to CPU 0, load generator to CPU 1 (2-core machine). Loopback only.
Each server is started by this script and ended by its own PID. Results also go to
bench/probes/ws_probe_results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable

CONFIGS = [
    # (label, server stack, client offers permessage-deflate)
    ("tcp_floor", "tcp_floor", False),
    ("1 hypercorn+starlette", "starlette", False),
    ("1q hypercorn+starlette, recv loop + sender task", "starlette_q", False),
    ("1d hypercorn+starlette, client offers deflate", "starlette", True),
    ("5 hypercorn+starlette, deflate patched out, client offers", "starlette_nodeflate", True),
    ("2 hypercorn+raw ASGI", "asgi", False),
    ("3 trio+websockets sans-IO", "websockets", False),
    ("4 trio-websocket", "triows", False),
    ("3r router: websockets fast path + hypercorn for the rest", "router", False),
]


def run_one(label: str, stack: str, deflate: bool, args: argparse.Namespace) -> dict:
    server = subprocess.Popen(
        [PY, os.path.join(HERE, "ws_echo_server.py"), "--stack", stack, "--cpu", "0", "--max-seconds", "120"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        line = server.stdout.readline()
        if not line.startswith("READY"):
            raise RuntimeError(f"{stack}: server did not start: {line!r} {server.stderr.read()[:2000]}")
        port = int(line.split()[1])
        cmd = [PY, os.path.join(HERE, "ws_load.py"), "--port", str(port), "--server-pid", str(server.pid),
               "--label", label, "--cpu", "1", "--seconds", str(args.seconds), "--warmup", str(args.warmup),
               "--rates", *[str(r) for r in args.rates]]
        if deflate:
            cmd.append("--deflate")
        if args.random_body:
            cmd.append("--random-body")
        load = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if load.returncode != 0:
            raise RuntimeError(f"{stack}: load failed: {load.stderr[-3000:]}")
        result = json.loads(load.stdout.strip().splitlines()[-1])
        result["server_stack"] = stack
        return result
    finally:
        server.terminate()  # only the process we started, by PID
        try:
            server.wait(5)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(5)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--rates", type=float, nargs="+", default=[1000, 2000, 3000])
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--random-body", action="store_true", help="fresh random base64 body per message")
    p.add_argument("--only", default="", help="comma-separated server stacks")
    p.add_argument("--out", default=os.path.join(HERE, "ws_probe_results.json"))
    args = p.parse_args()
    only = set(filter(None, args.only.split(",")))
    results = []
    t0 = time.monotonic()
    for label, stack, deflate in CONFIGS:
        if only and stack not in only:
            continue
        r = run_one(label, stack, deflate, args)
        results.append(r)
        print(f"# {label}: idle {r['idle_server_cpu_pct']}% deflate_negotiated={r['deflate_negotiated']} "
              f"sent={r['sent_total']} recv={r['received_total']}", file=sys.stderr, flush=True)
        for ph in r["phases"]:
            print(f"   R={ph['rate']:>6.0f} echo/s={ph['achieved_rate']:>7.1f} srv={ph['server_cpu_pct']:>5.1f}% "
                  f"{ph['server_us_per_echo']:>6.1f} us/echo (usr {ph['server_user_us_per_echo']}, sys {ph['server_sys_us_per_echo']})  p50={ph['rtt_p50_ms']:.3f}ms p99={ph['rtt_p99_ms']:.3f}ms "
                  f"client={ph['client_cpu_pct']}%", file=sys.stderr, flush=True)
    doc = {"python": sys.version.split()[0], "args": vars(args), "elapsed_s": round(time.monotonic() - t0, 1), "results": results}
    with open(args.out, "w") as f:
        json.dump(doc, f, indent=1)
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
