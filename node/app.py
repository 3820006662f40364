"""The composition root: ``open_node(config)`` builds every subsystem and owns its tasks.

Nothing else constructs services. Shutdown order matters for durability: stop
accepting connections, close live sockets, then drain the writer (so everything
acknowledged is committed) and close the database.
"""

from __future__ import annotations

import gc
import os
import re
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import nacl.signing
import trio

from node.accounts import AccountService
from node.admin import serve_admin
from node.attachments import AttachmentService, BlobStore
from node.config import NodeConfig, write_sample_config
from node.devices import DeviceService
from node.hub import Hub
from node.logs import configure_logging, get_logger
from node.messaging import MessagingService
from node.presence import PresenceService
from node.profiles import ProfileService
from node.signalling import CallService
from storage import Database, open_database
from storage.repos import AccountRepo, DeviceRepo, MessageRepo, ProfileRepo
from storage.repos.attachments import AttachmentRepo

log = get_logger("moot.node")
VERSION = "0.1.0"


def clock_ms() -> int:
    return int(time.time() * 1000)


# -- the data directory and the node key ---------------------------------------------


def default_node_name() -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:63]
    return name or "moot"


def load_or_create_key(path: os.PathLike[str] | str) -> nacl.signing.SigningKey:
    """The node's Ed25519 key (also its libp2p identity), created 0600 if missing."""
    try:
        with open(path, "rb") as fh:
            seed = fh.read()
    except FileNotFoundError:
        seed = nacl.signing.SigningKey.generate().encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(seed)
            fh.flush()
            os.fsync(fh.fileno())
    if len(seed) != 32:
        raise ValueError(f"{path}: not a 32-byte Ed25519 seed")
    return nacl.signing.SigningKey(seed)


def init_data_dir(config: NodeConfig) -> tuple[str, bool]:
    """Create the data directory (0700), node key (0600) and commented config if missing.

    Returns the node name and whether anything was created.
    """
    created = False
    if not config.data_dir.exists():
        config.data_dir.mkdir(parents=True, mode=0o700)
        created = True
    if not config.key_file.exists():
        load_or_create_key(config.key_file)
        created = True
    name = config.node_name or default_node_name()
    if not config.config_file.exists():
        write_sample_config(config.config_file, name)
        created = True
    return name, created


# -- the node ------------------------------------------------------------------------


@dataclass
class Node:
    """Every subsystem of a running node, built once by ``open_node``."""

    config: NodeConfig
    name: str
    key: nacl.signing.SigningKey
    db: Database
    hub: Hub
    account_repo: AccountRepo
    device_repo: DeviceRepo
    message_repo: MessageRepo
    accounts: AccountService
    devices: DeviceService
    messaging: MessagingService
    presence: PresenceService
    calls: CallService
    profiles: ProfileService
    federation: Any = None  # federation.service.FederationService when federating
    attachments: AttachmentService | None = None
    web_port: int = 0
    started_at: float = field(default_factory=time.time)
    version: str = VERSION
    clock: Callable[[], int] = clock_ms  # the services' now, in ms since the epoch

    @property
    def web_url(self) -> str:
        return self.config.public_url or f"http://{self.config.web_host}:{self.web_port}"

    def status(self) -> dict[str, Any]:
        return {
            "node": self.name, "version": self.version, "web_url": self.web_url,
            "uptime_s": round(time.time() - self.started_at, 1), "database": self.db.dialect,
            "connections": self.hub.connection_count, "online_users": self.hub.online_users,
            "writer": {"batches": self.db.writer.batches, "writes": self.db.writer.writes},
            "registration": self.config.registration, "pid": os.getpid(),
            **self._federation_status(),
        }

    def _federation_status(self) -> dict[str, Any]:
        """How other nodes reach this one (what an operator gives them for federation_peers
        or federation_bootstrap), and how many DHT peers it knows."""
        host = getattr(self.federation, "host", None)
        if host is None:
            return {"federation": "off" if self.federation is None else "starting"}
        dht = getattr(self.federation, "dht", None)
        return {"peer_id": host.peer_id, "federation_addrs": host.addrs, "dht_peers": dht.peers if dht else 0}


@asynccontextmanager
async def open_node(config: NodeConfig, *, clock: Callable[[], int] = clock_ms) -> AsyncIterator[Node]:
    """Start a node: storage, services, admin socket and web server. Yields once serving.

    ``clock`` (milliseconds since the epoch) is the services' notion of now; tests
    pass one they can move forward instead of sleeping.

    On exit, connections are closed and the writer drained before the database closes.
    """
    name, _ = init_data_dir(config)
    name = config.node_name or name
    key = load_or_create_key(config.key_file)
    async with open_database(config.db_url, max_batch=config.writer_max_batch, read_threads=config.read_threads) as db:
        hub = Hub()
        account_repo, device_repo, message_repo = AccountRepo(db), DeviceRepo(db), MessageRepo(db, name)
        accounts = AccountService(account_repo, config, name, clock_ms=clock)
        accounts.on_sessions_revoked = lambda user_id, session_id: hub.close_sessions(user_id, session_id, "session revoked")
        devices = DeviceService(device_repo, account_repo, config, name, clock_ms=clock)
        accounts.on_user_changed = devices.forget_user
        federation = None
        if config.federation_listen:
            # Imported here: libp2p costs ~58 MB and half a second, only for nodes that federate.
            from federation.service import FederationService
            from storage.repos.federation import FederationRepo

            federation = FederationService(config, name, key, FederationRepo(db), db.writer, devices, clock_ms=clock)
        messaging = MessagingService(
            message_repo, devices, device_repo, account_repo, hub, db.writer, config, name, clock_ms=clock,
            remote=federation,
        )
        if federation is not None:
            federation.messaging = messaging
        presence = PresenceService(
            hub, account_repo, message_repo, name, config, clock_ms=clock, live=federation.live if federation else None,
        )
        if federation is not None:
            federation.live.handler = presence
        messaging.on_conversation = presence.introduce
        calls = CallService(
            hub, devices, message_repo, db.writer, name, config, clock_ms=clock, remote=messaging.remote,
            live=federation.live if federation else None,
        )
        if federation is not None:
            federation.live.signals = calls
        profiles = ProfileService(ProfileRepo(db), name, messaging.remote, clock_ms=clock)
        if federation is not None:
            federation.profiles = profiles
        attachments = AttachmentService(
            AttachmentRepo(db), BlobStore(config.data_dir / "blobs"), messaging, db.writer, config, name, clock_ms=clock,
            remote=federation.blobs if federation else None,
        )
        messaging.attachments = attachments
        if federation is not None:
            federation.blobs.attachments = attachments
        node = Node(
            config, name, key, db, hub, account_repo, device_repo, message_repo, accounts, devices, messaging, presence,
            calls, profiles, federation, attachments, clock=clock,
        )

        from web.app import create_app
        from web.server import serve_web
        from web.ws import serve_websocket

        shutdown = trio.Event()
        async with trio.open_nursery() as services:
            await services.start(presence.serve)
            await services.start(calls.serve)
            await services.start(attachments.serve)
            if federation is not None:
                await services.start(federation.serve)
            await services.start(serve_admin, config.admin_socket, node)
            async with trio.open_nursery() as web:
                node.web_port = await web.start(
                    lambda task_status: serve_web(
                        create_app(node), partial(serve_websocket, node=node), config.web_host, config.web_port,
                        shutdown=shutdown, task_status=task_status,
                    )
                )
                if federation is not None:
                    federation.announce_web_url(node.web_url)  # mDNS started before the port was known
                log.info("node.started", node=name, web_url=node.web_url, database=db.dialect)
                try:
                    yield node
                finally:
                    log.info("node.stopping", node=name)
                    for conn in list(hub.all()):
                        conn.close(1001, "node shutting down")
                    # The web server stops accepting and gives open requests a grace period.
                    shutdown.set()
            services.cancel_scope.cancel()
        # Leaving open_database drains the writer: everything queued is committed.
    log.info("node.stopped", node=name)


# -- running until a signal -------------------------------------------------------------


async def _run(config: NodeConfig) -> None:
    async with open_node(config) as node:
        # Everything built so far (modules, libp2p, SQLAlchemy's compiled statements)
        # lives as long as the process: out of the collector's sight, a full
        # collection no longer walks it again and again (see run_node).
        gc.collect()
        gc.freeze()
        print(f"Moot node {node.name!r} is running at {node.web_url}", flush=True)
        print(f"  data: {config.data_dir}  database: {node.db.dialect}  (Ctrl+C to stop)", flush=True)
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async for signum in signals:
                log.info("node.signal", signal=signal.Signals(signum).name)
                break


GC_THRESHOLD = (50_000, 20, 10)  # the collector's (gen0, gen1, gen2) thresholds in a node process


def run_node(config: NodeConfig) -> int:
    """Run a node until SIGINT or SIGTERM; returns the process exit code."""
    configure_logging(config.log_format, config.log_level)
    # Every message allocates many short-lived objects: with the default thresholds
    # (700, 10, 10) the collector ran ~50 times a second under load, and its full
    # collections walked every long-lived object again (~5% of a node's CPU in
    # bench/federation.py; ~0.3% with these thresholds and the freeze in _run).
    gc.set_threshold(*GC_THRESHOLD)
    try:
        trio.run(_run, config)
    except OSError as exc:
        print(f"moot: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0
