"""Shared pieces of the benchmark scripts: the node process, users, workers, results.

Every benchmark runs one ``moot run`` process on 127.0.0.1 with its data in a
temporary directory, generates load from other processes (trio + trio-websocket
clients), and prints progress to stderr and one JSON object as the last line of
stdout (also saved under ``bench/results/``, which git ignores).

Only processes started here are ever stopped, by their PID.

``MOOT_BENCH_NODE_SRC=/path/to/checkout`` runs the node from another checkout of
the code (the load generators still use this one): a quick way to measure a
change to the node against the same benchmark.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import resource
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).resolve().parent / "results"
PASSWORD = "bench password 1"
NODE_NAME = "bench"
# `python -m cli.main` imports the node from its working directory first.
NODE_SRC = Path(os.environ.get("MOOT_BENCH_NODE_SRC") or REPO).resolve()

if str(REPO) not in sys.path:  # run as `python bench/NAME.py` from anywhere
    sys.path.insert(0, str(REPO))


# -- output --------------------------------------------------------------------------


def log(*parts: Any) -> None:
    """Progress goes to stderr; stdout carries only the final JSON line."""
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def emit(name: str, result: dict[str, Any]) -> None:
    """Print the result as the last line of stdout and keep a copy in bench/results/."""
    if NODE_SRC != REPO:
        result = {**result, "node_src": str(NODE_SRC)}
    line = json.dumps(result, sort_keys=False)
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"{name}-{stamp}.json").write_text(line + "\n")
    print(line, flush=True)


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100) by nearest rank; None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    rank = max(1, math.ceil(p / 100 * len(ordered)))
    return ordered[min(rank, len(ordered)) - 1]


def rounded(value: float | None, digits: int = 2) -> float | None:
    return None if value is None else round(value, digits)


def raise_nofile() -> int:
    """Raise this process's open-file soft limit to its hard limit; returns the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# -- the node process ------------------------------------------------------------------


class NodeProcess:
    """``moot run`` in its own process with its data in ``data_dir``; stopped by PID."""

    def __init__(self, data_dir: Path, **env: str) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {
            **os.environ, "MOOT_PASSWORD_HASH_COST": "min", "MOOT_NODE_NAME": NODE_NAME,
            "MOOT_LOG_LEVEL": "warning", "MOOT_FEDERATION_LISTEN": "", "MOOT_MDNS": "false", **env,
        }
        self.log_path = data_dir.parent / "node.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/api/v1/ws"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def start(self, timeout: float = 30) -> None:
        import httpx

        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "cli.main", "--data-dir", str(self.data_dir), "run",
                 "--web-host", "127.0.0.1", "--web-port", str(self.port)],
                env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=NODE_SRC, preexec_fn=raise_nofile,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if httpx.get(self.base_url + "/api/v1/info", timeout=1).status_code == 200:
                    src = "" if NODE_SRC == REPO else f" (code from {NODE_SRC})"
                    log(f"node pid {self.proc.pid} listening on {self.base_url}{src}")
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError("node did not start in time")

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    def stop(self, timeout: float = 15) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout``; only ever the process we started."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        os.kill(self.proc.pid, signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(self.proc.pid, signal.SIGKILL)
            return self.proc.wait(10)

    def __enter__(self) -> NodeProcess:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class NodeMonitor:
    """Samples the node's RSS every ``interval`` seconds on a thread; reads CPU times.

    ``cpu_seconds()`` is user+system CPU of the node process so far (all its threads,
    including SQLite and the read pool). ``peak_rss`` is the largest sample since the
    last ``reset_peak()``; ``vm_hwm()`` the kernel's high-water mark for the process.
    """

    def __init__(self, pid: int, interval: float = 0.1) -> None:
        import psutil

        self.pid = pid
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            try:
                self.peak_rss = max(self.peak_rss, self.proc.memory_info().rss)
            except psutil.Error:
                return
            self._stop.wait(self.interval)

    def __enter__(self) -> NodeMonitor:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)

    def reset_peak(self) -> None:
        self.peak_rss = self.rss()

    def rss(self) -> int:
        return int(self.proc.memory_info().rss)

    def cpu_seconds(self) -> float:
        t = self.proc.cpu_times()
        return float(t.user + t.system)

    def vm_hwm(self) -> int | None:
        """VmHWM from /proc/PID/status, in bytes."""
        try:
            for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def settled_rss(self, *, window: int = 4, tolerance: float = 0.005, step: float = 0.5, timeout: float = 20) -> int:
        """Sample RSS every ``step`` s until ``window`` samples in a row differ by less than
        ``tolerance`` (relative), or ``timeout`` passes; returns the last sample."""
        samples = [self.rss()]
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            time.sleep(step)
            samples.append(self.rss())
            recent = samples[-window:]
            if len(recent) == window and (max(recent) - min(recent)) <= tolerance * max(recent):
                break
        return samples[-1]


# -- users and devices -------------------------------------------------------------------


@dataclass(frozen=True)
class DeviceLogin:
    """One device of a bench user, with the session token bound to it."""

    username: str
    address: str
    device: str
    token: str
    keys_json: str | None = None  # the device's private keys, when the caller wants them

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


async def register_users(
    base_url: str,
    usernames: Sequence[str],
    *,
    devices_per_user: int = 1,
    concurrency: int = 32,
    keep_keys: bool = False,
    timeout: float = 600,
) -> list[list[DeviceLogin]]:
    """Register users, and for each one ``devices_per_user`` devices, each with its own session.

    A device is bound to the session that created it, so every device costs one
    login and one key-bundle upload. Requests run ``concurrency`` at a time over
    pooled HTTP connections (closed on return). Returns the devices of each user,
    in order. Raises on any HTTP error; bounded by ``timeout`` seconds overall.
    """
    import httpx
    import trio

    from cli import crypto

    results: list[list[DeviceLogin]] = [[] for _ in usernames]
    limiter = trio.CapacityLimiter(concurrency)
    done = 0
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)

    async with httpx.AsyncClient(base_url=base_url, timeout=60, limits=limits) as http:

        async def call(method: str, path: str, body: Any, token: str | None = None) -> Any:
            headers = {"authorization": f"Bearer {token}"} if token else {}
            async with limiter:
                response = await http.request(method, path, json=body, headers=headers)
            if response.status_code >= 400:
                raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
            return response.json()

        async def one_device(i: int, username: str) -> None:
            nonlocal done
            login = await call("POST", "/api/v1/login", {"username": username, "password": PASSWORD})
            keys = crypto.DeviceKeys.generate(0)
            created = await call("POST", "/api/v1/devices", {"name": "bench", **keys.public_bundle()}, login["token"])
            results[i].append(DeviceLogin(
                username, login["user"], created["device"], login["token"], keys.to_json() if keep_keys else None,
            ))
            done += 1
            if done % 1000 == 0:
                log(f"  {done} devices registered")

        async def one_user(i: int, username: str) -> None:
            await call("POST", "/api/v1/register", {"username": username, "password": PASSWORD})
            # Devices of one user one after the other: the node caps devices per user.
            for _ in range(devices_per_user):
                await one_device(i, username)

        with trio.fail_after(timeout):
            async with trio.open_nursery() as nursery:
                # At most `concurrency` users in progress keeps the task count bounded.
                users = trio.CapacityLimiter(concurrency)

                async def guarded(i: int, username: str) -> None:
                    async with users:
                        await one_user(i, username)

                for i, username in enumerate(usernames):
                    nursery.start_soon(guarded, i, username)
    return results


async def client_user(base_url: str, username: str) -> Any:
    """A registered, logged-in ``cli.client.MootClient`` with a device: for benchmarks
    that need real end-to-end clients (a handful of them)."""
    from cli.client import MootClient

    client = MootClient(base_url)
    await client.register(username, PASSWORD)
    await client.login(username, PASSWORD)
    await client.create_device("bench")
    return client


# -- worker processes ----------------------------------------------------------------------


class Workers:
    """Load-generating processes (``spawn``), each running ``target(index, config, inbox, outbox)``.

    The parent talks to each worker through two queues: ``send(i, msg)`` / ``broadcast``
    to it, ``receive(i)`` from it. Workers are joined on exit and terminated (by
    their own PID) if they do not finish in time.
    """

    def __init__(self, target: Callable[..., None], configs: Sequence[dict[str, Any]]) -> None:
        ctx = multiprocessing.get_context("spawn")
        self.inboxes = [ctx.Queue() for _ in configs]
        self.outboxes = [ctx.Queue() for _ in configs]
        self.procs = [
            ctx.Process(target=target, args=(i, cfg, self.inboxes[i], self.outboxes[i]), name=f"bench-worker-{i}")
            for i, cfg in enumerate(configs)
        ]

    def __enter__(self) -> Workers:
        for p in self.procs:
            p.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for box in self.inboxes:
            box.put({"cmd": "exit"})
        deadline = time.monotonic() + 15
        for p in self.procs:
            p.join(max(0.1, deadline - time.monotonic()))
            if p.is_alive():
                p.terminate()
                p.join(5)

    def broadcast(self, msg: dict[str, Any]) -> None:
        for box in self.inboxes:
            box.put(msg)

    def receive(self, i: int, timeout: float) -> dict[str, Any]:
        """The next message of worker ``i``; raises if it died or said nothing in time."""
        import queue

        deadline = time.monotonic() + timeout
        while True:
            try:
                msg: dict[str, Any] = self.outboxes[i].get(timeout=0.5)
            except queue.Empty:
                if not self.procs[i].is_alive():
                    raise RuntimeError(f"worker {i} died (exit code {self.procs[i].exitcode})") from None
                if time.monotonic() > deadline:
                    raise TimeoutError(f"worker {i} said nothing in {timeout} s") from None
                continue
            if msg.get("error"):
                raise RuntimeError(f"worker {i}: {msg['error']}")
            return msg

    def receive_all(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        return [self.receive(i, max(0.1, deadline - time.monotonic())) for i in range(len(self.procs))]


def split(items: Sequence[Any], parts: int) -> list[list[Any]]:
    """``items`` in ``parts`` contiguous chunks of nearly equal size."""
    parts = max(1, min(parts, len(items)))
    size, extra = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + size + (1 if i < extra else 0)
        out.append(list(items[start:end]))
        start = end
    return out


def run_worker(main: Callable[..., Any], index: int, config: dict[str, Any], inbox: Any, outbox: Any) -> None:
    """Entry helper for a worker: raise the fd limit, run ``main`` under trio, report errors."""
    import traceback

    import trio

    raise_nofile()
    try:
        trio.run(main, index, config, inbox, outbox)
    except BaseException as exc:  # report, then let the process end
        outbox.put({"error": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-3000:]}"})


async def next_command(inbox: Any, timeout: float = 600) -> dict[str, Any]:
    """The parent's next message, awaited from trio without blocking the event loop."""
    import queue

    import trio

    with trio.fail_after(timeout):
        while True:
            try:
                return await trio.to_thread.run_sync(lambda: inbox.get(timeout=0.5))  # type: ignore[no-any-return]
            except queue.Empty:
                continue


def wall_to_trio(wall: float) -> float:
    """Convert an absolute ``time.time()`` instant into this process's trio clock."""
    import trio

    return trio.current_time() + (wall - time.time())
