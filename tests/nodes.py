"""Helpers for tests that run real nodes: in-process (trio) or as separate processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import httpx
import trio

from cli.client import ClientError, Event, LiveSession, MootClient
from node.app import Node, clock_ms, open_node
from node.config import NodeConfig, load_config

PASSWORD = "correct horse battery"
REPO = Path(__file__).resolve().parent.parent


def node_config(data_dir: Path, db_url: str = "", **overrides: Any) -> NodeConfig:
    values: dict[str, Any] = {
        "web_port": 0, "node_name": "riverside", "password_hash_cost": "min", "database_url": db_url,
        "log_level": "debug", "federation_listen": "",  # tests that federate pass a loopback address
        "mdns": False,  # tests that discover pass mdns=True and mdns_interfaces=("127.0.0.1",)
    }
    values.update(overrides)
    return load_config(data_dir, overrides=values, environ={})


@asynccontextmanager
async def running_node(
    data_dir: Path, db_url: str = "", *, clock: Callable[[], int] | None = None, **overrides: Any
) -> AsyncIterator[Node]:
    async with open_node(node_config(data_dir, db_url, **overrides), clock=clock or clock_ms) as node:
        yield node


class Clock:
    """The node's clock in milliseconds, real time plus whatever a test skipped ahead."""

    def __init__(self) -> None:
        self.skipped_ms = 0

    def __call__(self) -> int:
        return int(time.time() * 1000) + self.skipped_ms

    def advance(self, seconds: float) -> None:
        self.skipped_ms += int(seconds * 1000)


async def new_user(base_url: str, username: str, *, device: bool = True) -> MootClient:
    """Register, log in and (by default) create a device: a ready-to-chat client."""
    client = MootClient(base_url)
    await client.register(username, PASSWORD)
    await client.login(username, PASSWORD)
    if device:
        await client.create_device(f"{username}-dev")
    return client


async def next_of(live: LiveSession, event_type: type, *, timeout: float = 10, **match: Any) -> Any:
    """The next event of ``event_type`` whose attributes match; others are skipped. Bounded in time."""
    with trio.fail_after(timeout):
        while True:
            event: Event = await live.next_event()
            if isinstance(event, event_type) and all(getattr(event, k) == v for k, v in match.items()):
                return event


# -- nodes as separate processes ----------------------------------------------------


class NodeProcess:
    """``moot run`` in its own process, stopped by PID (only ever the one we started)."""

    def __init__(self, data_dir: Path, port: int, **env: str) -> None:
        self.data_dir = data_dir
        self.port = port
        self.env = {
            **os.environ, "MOOT_PASSWORD_HASH_COST": "min", "MOOT_NODE_NAME": "riverside", "MOOT_FEDERATION_LISTEN": "",
            "MOOT_MDNS": "false", **env,
        }
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = data_dir.parent / f"{data_dir.name}.log"

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 30) -> None:
        self.data_dir.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "--data-dir", str(self.data_dir), "run", "--web-port", str(self.port)],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"node exited with {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.base_url + "/api/v1/info", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError("node did not start in time")

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15) -> int:
        if self.proc and self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
                return -9
        return self.proc.returncode if self.proc else 0


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def federating(path: Path, name: str, *, peers: Any = (), bootstrap: Any = (), **env: str) -> tuple[NodeProcess, str]:
    """A node process federating on a loopback port (mDNS off unless ``env`` says so),
    and the address other nodes dial it at (its key is made now, for the peer id)."""
    from federation.identity import peer_id_of
    from node.app import load_or_create_key

    fed_port = free_port()
    settings = {"MOOT_NODE_NAME": name, "MOOT_FEDERATION_LISTEN": f"/ip4/127.0.0.1/tcp/{fed_port}"}
    if peers:
        settings["MOOT_FEDERATION_PEERS"] = ",".join(peers)
    if bootstrap:
        settings["MOOT_FEDERATION_BOOTSTRAP"] = ",".join(bootstrap)
    node = NodeProcess(path, free_port(), **settings, **env)
    node.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    peer = peer_id_of(load_or_create_key(node.data_dir / "node.key"))
    return node, f"/ip4/127.0.0.1/tcp/{fed_port}/p2p/{peer}"


@contextmanager
def federated_pair(path: Path, **env: str) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    """riverside and hilltop as federating node processes (hilltop has riverside as its
    static peer), both stopped by PID afterwards."""
    riverside, address = federating(path / "riverside", "riverside", **env)
    riverside.start()
    try:
        hilltop, _ = federating(path / "hilltop", "hilltop", peers=(address,), **env)
        hilltop.start()
        try:
            yield riverside, hilltop
        finally:
            hilltop.stop()
    finally:
        riverside.stop()


async def until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    """Poll an async ``check`` until it returns something true (bounded in time); a
    ClientError counts as "not yet"."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = await check()
            if result:
                return result
        except ClientError:
            pass
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await trio.sleep(0.1)
