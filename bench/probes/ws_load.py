"""Probe load generator: N WebSocket connections, open-loop paced echo load.

Hand-rolled minimal WS client on trio (cheapest possible client): frames are masked with
the all-zero key (valid per RFC 6455, and no XOR work), responses parsed by hand. The
payload carries the send time, so each echo gives a round-trip latency.

For each rate R (messages/s over all connections, round-robin): warm up, then measure
for --seconds: server process CPU (utime+stime from /proc/<pid>/stat), echoes received,
p50/p99 RTT. Prints one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import sys
import time
import zlib

import trio

TICK = os.sysconf("SC_CLK_TCK")


def proc_cpu_split(pid: int) -> tuple[float, float]:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def proc_cpu(pid: int) -> float:
    return sum(proc_cpu_split(pid))


def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


def make_payload(cid: int, size: int) -> bytes:
    # '{"t":<19 digits>,...}' so t sits at [5:24]
    head = '{"t":%019d,"c":%03d,"type":"send","to":"bob@example.org","id":"' % (0, cid)
    body = head + "m" * 20 + '","body":"'
    tail = '"}'
    pad = size - len(body) - len(tail)
    return (body + "x" * max(pad, 0) + tail).encode()


def frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        head = bytes([0x81, 0x80 | n])
    elif n < 65536:
        head = bytes([0x81, 0x80 | 126]) + n.to_bytes(2, "big")
    else:
        head = bytes([0x81, 0x80 | 127]) + n.to_bytes(8, "big")
    return head + b"\x00\x00\x00\x00" + payload


class Conn:
    def __init__(self, cid: int, stream: trio.SocketStream, leftover: bytes, inflate: bool, template: bytes):
        self.cid = cid
        self.stream = stream
        self.buf = bytearray(leftover)
        self.inflater = zlib.decompressobj(-15) if inflate else None
        self.template = template


class Stats:
    def __init__(self) -> None:
        self.recording = False
        self.received = 0
        self.received_total = 0
        self.lat_ns: list[int] = []


async def connect(cid: int, port: int, deflate: bool, size: int) -> Conn:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    key = base64.b64encode(os.urandom(16)).decode()
    ext = "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n" if deflate else ""
    req = (
        f"GET /api/v1/ws HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
        f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
    )
    await stream.send_all(req.encode())
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = await stream.receive_some(65536)
        if not chunk:
            raise RuntimeError("closed during handshake")
        buf += chunk
    head, _, rest = buf.partition(b"\r\n\r\n")
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        raise RuntimeError(f"handshake refused: {head[:200]!r}")
    negotiated = b"permessage-deflate" in head.lower()
    return Conn(cid, stream, rest, negotiated, make_payload(cid, size))


async def reader(conn: Conn, stats: Stats) -> None:
    buf = conn.buf
    stream = conn.stream
    inflater = conn.inflater
    while True:
        data = await stream.receive_some(65536)
        if not data:
            return
        buf += data
        pos = 0
        end = len(buf)
        now = None
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            n = b1 & 0x7F
            hl = 2
            if n == 126:
                if end - pos < 4:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 4], "big")
                hl = 4
            elif n == 127:
                if end - pos < 10:
                    break
                n = int.from_bytes(buf[pos + 2:pos + 10], "big")
                hl = 10
            if b1 & 0x80:
                hl += 4  # zero mask key (tcp_floor echoes our own frames)
            if end - pos < hl + n:
                break
            payload = bytes(buf[pos + hl:pos + hl + n])
            pos += hl + n
            if b0 & 0x40 and inflater is not None:
                payload = inflater.decompress(payload + b"\x00\x00\xff\xff")
            if b0 & 0x0F == 1:
                if now is None:
                    now = time.perf_counter_ns()
                stats.received_total += 1
                if stats.recording:
                    stats.received += 1
                    stats.lat_ns.append(now - int(payload[5:24]))
            elif b0 & 0x0F == 8:
                return
        if pos:
            del buf[:pos]


async def pace(conns: list[Conn], rate: float, seconds: float, counter: list[int], random_body: bool = False) -> None:
    """Open loop: message i is due at t0 + i/rate, to conns[i % N]; late ones go out at once.

    random_body: the "body" field becomes fresh random base64 each message (like ciphertext),
    so permessage-deflate cannot just reference the previous message.
    """
    n = len(conns)
    tpl0 = conns[0].template
    cut = tpl0.index(b'"body":"') + len(b'"body":"')
    body_raw = (len(tpl0) - cut - 2) * 3 // 4
    t0 = trio.current_time()
    total = int(rate * seconds)
    i = 0
    while i < total:
        now = trio.current_time()
        due = min(total, int((now - t0) * rate) + 1)
        while i < due:
            conn = conns[(counter[0]) % n]
            counter[0] += 1
            tpl = conn.template
            if random_body:
                body = base64.b64encode(os.urandom(body_raw))
                payload = b'{"t":%019d' % time.perf_counter_ns() + tpl[24:cut] + body + b'"}'
            else:
                payload = b'{"t":%019d' % time.perf_counter_ns() + tpl[24:]
            await conn.stream.send_all(frame(payload))
            i += 1
        await trio.sleep_until(t0 + i / rate)


def pct(sorted_vals: list[int], q: float) -> float:
    if not sorted_vals:
        return float("nan")
    k = min(len(sorted_vals) - 1, int(q * len(sorted_vals)))
    return sorted_vals[k] / 1e6


async def main(args: argparse.Namespace) -> None:
    budget = (args.warmup + args.seconds) * len(args.rates) + args.idle_seconds + 60
    with trio.fail_after(budget):  # bounded run
        await run(args)


async def run(args: argparse.Namespace) -> None:
    stats = Stats()
    conns: list[Conn] = []
    out: dict = {"stack": args.label, "connections": args.connections, "payload_bytes": args.size,
                 "deflate_offered": args.deflate, "random_body": args.random_body, "phases": []}
    async with trio.open_nursery() as nursery:
        for start in range(0, args.connections, 20):
            batch: list[Conn | None] = [None] * min(20, args.connections - start)

            async def one(k: int, cid: int) -> None:
                batch[k] = await connect(cid, args.port, args.deflate, args.size)

            async with trio.open_nursery() as cn:
                for k in range(len(batch)):
                    cn.start_soon(one, k, start + k)
            conns.extend(batch)  # type: ignore[arg-type]
        out["deflate_negotiated"] = sum(c.inflater is not None for c in conns)
        for c in conns:
            nursery.start_soon(reader, c, stats)

        # idle baseline
        await trio.sleep(0.5)
        c0 = proc_cpu(args.server_pid)
        await trio.sleep(args.idle_seconds)
        out["idle_server_cpu_pct"] = round(100 * (proc_cpu(args.server_pid) - c0) / args.idle_seconds, 2)

        counter = [0]
        for rate in args.rates:
            phase = {"rate": rate}
            # warm-up at this rate, then measure
            await pace(conns, rate, args.warmup, counter, args.random_body)
            stats.recording = True
            stats.received = 0
            stats.lat_ns = []
            sent_before = counter[0]
            (u0, k0), m0, w0 = proc_cpu_split(args.server_pid), self_cpu(), time.perf_counter()
            await pace(conns, rate, args.seconds, counter, args.random_body)
            (u1, k1), m1, w1 = proc_cpu_split(args.server_pid), self_cpu(), time.perf_counter()
            s0, s1 = u0 + k0, u1 + k1
            stats.recording = False
            wall = w1 - w0
            sent = counter[0] - sent_before
            recv = stats.received
            lat = sorted(stats.lat_ns)
            phase.update({
                "wall_s": round(wall, 3),
                "sent": sent,
                "echoes": recv,
                "achieved_rate": round(recv / wall, 1),
                "server_cpu_s": round(s1 - s0, 3),
                "server_cpu_pct": round(100 * (s1 - s0) / wall, 1),
                "server_us_per_echo": round(1e6 * (s1 - s0) / max(recv, 1), 1),
                "server_user_us_per_echo": round(1e6 * (u1 - u0) / max(recv, 1), 1),
                "server_sys_us_per_echo": round(1e6 * (k1 - k0) / max(recv, 1), 1),
                "client_cpu_pct": round(100 * (m1 - m0) / wall, 1),
                "rtt_p50_ms": round(pct(lat, 0.50), 3),
                "rtt_p99_ms": round(pct(lat, 0.99), 3),
                "rtt_max_ms": round(pct(lat, 1.0), 3),
            })
            out["phases"].append(phase)
            print(json.dumps(phase), file=sys.stderr, flush=True)
        # drain
        await trio.sleep(0.5)
        out["sent_total"] = counter[0]
        out["received_total"] = stats.received_total
        nursery.cancel_scope.cancel()
    for c in conns:
        with trio.move_on_after(1):
            await c.stream.aclose()
    print(json.dumps(out), flush=True)


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--server-pid", type=int, required=True)
    p.add_argument("--label", default="?")
    p.add_argument("--connections", type=int, default=200)
    p.add_argument("--size", type=int, default=600)
    p.add_argument("--rates", type=float, nargs="+", default=[1000, 2000, 3000])
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--idle-seconds", type=float, default=2.0)
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate like browsers do")
    p.add_argument("--random-body", action="store_true", help="fresh random base64 body per message")
    p.add_argument("--cpu", type=int, default=None)
    a = p.parse_args()
    if a.cpu is not None:
        os.sched_setaffinity(0, {a.cpu})
    trio.run(main, a)
