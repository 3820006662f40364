"""Federation: this node's libp2p host, one sender per remote node, and the receiving end.

``FederationService`` implements ``node.remote.Remote`` for the domain logic and
owns every federation task (started by the composition root with ``serve``):

- **senders**: one task per remote node with events in its outbox. It dials the
  node, opens one long-lived ``/moot/federation/1`` stream, and sends the outbox
  in oid order in batches, at most ``WINDOW`` events unacknowledged; each ``ack``
  is recorded and the acknowledged rows are deleted. When anything fails it waits
  (exponential backoff with jitter, capped) and starts again from what the node
  acknowledged. ``wake(node)`` (new events; the node was seen again) cuts the wait
  short.
- **receiving**: each inbound stream runs an ``InboundSession``. Every event of a
  batch is verified against the key of the authenticated peer (events.py), checked
  and stored by the messaging service; the ``ack`` goes out only after the batch is
  committed. Rejected events get a ``reject``; a peer whose events keep being
  rejected, or who breaks the protocol, is disconnected.
- **device keys and profiles**: ``/moot/keys/1`` answers one ``get_devices``,
  ``get_profile`` or ``get_avatar`` per stream, about this node's own users; remote
  answers are cached for a short while (profiles in federation/profiles.py).
- **the DHT** (dht.py): this node's signed record is published; a name no one has
  introduced yet is looked up when a client writes to it (``require_node``), and a
  node that no longer answers at any known address is looked up again. A name is
  pinned to the first peer id met with it; other claims are recorded as conflicts.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from functools import partial
from typing import TYPE_CHECKING, Any, Literal

import msgspec
import nacl.signing
import outcome
import trio

from federation import records, wire
from federation.events import DevicesEvent, EventRejected, EventSigner, MessageEvent, ReceiptEvent, node_of, verify_event
from federation.host import FederationHost, FederationStream, HostError, open_host, verify_key_of
from federation.blobs import BlobLinks
from federation.blobwire import PROTOCOL_ID as BLOBS_PROTOCOL_ID
from federation.live import LiveLinks
from federation.profiles import RemoteProfiles, avatar_frame, profile_frame
from federation.session import (
    Acked,
    Backoff,
    BatchReceived,
    InboundSession,
    LiveInbound,
    Misbehaviour,
    OutboundSession,
    PeerClosing,
    PeerReady,
    Rejected,
)
from federation.wire import ProtocolViolation
from node.config import NodeConfig
from node.devices import public_view
from node.errors import BadRequest, MootError, NotFound, Unavailable, UnknownNode, UnknownUser
from node.logs import get_logger
from node.nursery import first_error
from storage.repos.federation import FederationRepo, NodeRecord, enqueue
from storage.writer import GroupCommitWriter

if TYPE_CHECKING:
    from federation.announcement import Announcement
    from federation.dht import NodeDirectory
    from federation.mdns import MdnsDiscovery
    from node.devices import DeviceService
    from node.messaging import MessagingService
    from node.profiles import ProfileService
    from storage.repos import Avatar

log = get_logger("moot.federation")

WINDOW = 2000  # events sent and not yet acknowledged
BATCH = 500  # events per batch frame
RECEIVE_BYTES = 256 * 1024
DEVICES_TTL_S = 30.0
# A cached device list in use is fetched again in the background once this old, so
# a sender never waits for the fetch while it is fresh (and a hundred lists fetched
# together do not all expire, and stall their senders, together). Late, as each
# fetch costs a new stream to the other node; early enough for a fetch to finish.
DEVICES_REFRESH_S = DEVICES_TTL_S - 5.0
KEYS_TIMEOUT_S = 10.0
HELLO_TIMEOUT_S = 10.0
OPEN_TIMEOUT_S = 3.0  # opening a stream on a live connection takes milliseconds
PING_INTERVAL_S = 20.0
USABLE_TTL_S = 2.0  # how long require_node trusts that a node it looked up is usable
MDNS_ATTEMPTS = 4  # dials of a node found by mDNS, with backoff, before waiting for its next announcement
MDNS_DIAL_TIMEOUT_S = 15.0


@dataclass
class _Peer:
    """The sender's state for one remote node."""

    name: str
    wake: trio.Event = field(default_factory=trio.Event)  # new events in the outbox
    seen: trio.Event = field(default_factory=trio.Event)  # the node showed up: retry at once
    failures: int = 0
    retry_at: float | None = None
    connected: bool = False
    last_error: str | None = None


class FederationService:
    def __init__(
        self,
        config: NodeConfig,
        name: str,
        key: nacl.signing.SigningKey,
        repo: FederationRepo,
        writer: GroupCommitWriter,
        devices: DeviceService,
        *,
        clock_ms: Callable[[], int],
    ) -> None:
        self.config = config
        self.name = name
        self.key = key
        self.repo = repo
        self.writer = writer
        self.devices = devices
        self.messaging: MessagingService | None = None  # set by the composition root
        self.profiles: ProfileService | None = None  # set by the composition root: answers about our users
        self.remote_profiles = RemoteProfiles(self._ask_node, trio.current_time)
        self.signer = EventSigner(name, key)
        self.backoff = Backoff(initial_s=config.federation_backoff_initial_s, max_s=config.federation_backoff_max_s)
        self._clock_ms = clock_ms
        self._peers: dict[str, _Peer] = {}
        self._devices_cache: dict[str, tuple[float, list[dict[str, Any]]]] = {}
        self._devices_refreshing: set[str] = set()  # addresses fetched in the background now
        self._devices_dropped = 0  # counts cache entries dropped by devices events
        self._usable: dict[str, float] = {}  # node -> when require_node last found it usable
        self._checking: dict[str, trio.Event] = {}  # nodes require_node is looking up now
        # Peers cut off for misbehaving: peer id -> (offences, refused until).
        self._penalties: dict[str, tuple[int, float]] = {}
        self._nursery: trio.Nursery | None = None
        self.host: FederationHost | None = None
        self.dht: NodeDirectory | None = None
        # Name -> the peer id pinned to it (the DHT's select prefers that peer's records).
        self._pins: dict[str, str] = {}
        self._lookups: dict[str, trio.Event] = {}  # names being looked up in the DHT now
        self._claims_noted: set[tuple[str, str]] = set()  # conflicting (name, peer id) already recorded
        self._reviving: set[str] = set()  # names whose republished record is being applied
        self.live = LiveLinks(self)  # presence and typing (federation/live.py); its handler is set by the composition root
        self.blobs = BlobLinks(self)  # attachments (federation/blobs.py); its service is set by the composition root

    # -- the Remote port (node/remote.py) -------------------------------------------------

    def permitted(self, node: str) -> bool:
        """The configured allow and deny lists (operators block single nodes in the database)."""
        allow, deny = self.config.federation_allow, self.config.federation_deny
        return node not in deny and (not allow or node in allow)

    async def require_node(self, node: str) -> None:
        """Return once ``node`` is known by its peer id, looking it up in the DHT if need be.

        Raises UnknownNode when it is not allowed, blocked, or found nowhere (static
        peers and mDNS find nodes ahead of time; the DHT is asked here, bounded).
        """
        if not self.permitted(node):
            raise UnknownNode(f"node {node!r} is not allowed by this node's configuration")
        # Asked for every message to another node: a node found usable is not looked up
        # again for a moment (blocking it forgets this at once).
        checked = self._usable.get(node)
        if checked is not None and trio.current_time() - checked < USABLE_TTL_S:
            return
        checking = self._checking.get(node)
        if checking is not None:
            # Messages keep coming while one of them looks the node up (a database
            # read, behind a busy writer perhaps): they wait for its answer instead
            # of each reading the same row. If it failed, each finds out for itself.
            await checking.wait()
            checked = self._usable.get(node)
            if checked is not None and trio.current_time() - checked < USABLE_TTL_S:
                return
        done = self._checking[node] = trio.Event()
        try:
            record = await self.repo.node(node)
            if record is not None and record.blocked:
                raise UnknownNode(f"node {node!r} is blocked by this node's operator")
            if (record is None or record.peer_id is None) and await self.find_in_dht(node):
                record = await self.repo.node(node)
            if record is None or record.peer_id is None:
                raise UnknownNode(f"unknown node {node!r}: not a known peer, and neither mDNS nor the DHT found it")
            self._usable[node] = trio.current_time()
        finally:
            if self._checking.get(node) is done:
                del self._checking[node]
            done.set()

    async def devices_of(self, address: str, *, fresh: bool = False) -> list[dict[str, Any]]:
        node = node_of(address)
        if node is None:
            raise UnknownUser(f"not an address: {address!r}")
        cached = self._devices_cache.get(address)
        if cached is not None and not fresh and (age := trio.current_time() - cached[0]) < DEVICES_TTL_S:
            if age >= DEVICES_REFRESH_S and address not in self._devices_refreshing and self._nursery is not None:
                self._devices_refreshing.add(address)
                self._nursery.start_soon(self._refresh_devices, node, address)
            return cached[1]
        await self.require_node(node)
        peer = self._peers.get(node)
        if cached is not None and peer is not None and peer.retry_at is not None:
            # Its node is known to be away (the sender is backing off): asking again
            # would cost a dial timeout per message on a real network.
            return cached[1]
        record = await self.repo.node(node)
        assert record is not None and record.peer_id is not None
        try:
            devices = await self._fetch_devices(record, address)
        except Unavailable:
            if cached is None:
                raise
            # The node is away: what it said last is the best there is (a device
            # added there meanwhile misses these messages, as with any stale list).
            log.info("federation.devices_stale", user=address, age_s=round(trio.current_time() - cached[0], 1))
            return cached[1]
        self._devices_cache[address] = (trio.current_time(), devices)
        return devices

    async def _refresh_devices(self, node: str, address: str) -> None:
        """Fetch ``address``'s devices ahead of their cache entry's expiry (see DEVICES_REFRESH_S).

        Failures are left to the next ``devices_of`` after expiry, which fetches and
        reports them itself. An answer that may predate a ``devices`` event received
        meanwhile is not kept.
        """
        dropped = self._devices_dropped
        try:
            peer = self._peers.get(node)
            record = await self.repo.node(node)
            if record is None or record.peer_id is None or (peer is not None and peer.retry_at is not None):
                return
            devices = await self._fetch_devices(record, address)
        except Exception as exc:
            if not isinstance(exc, (*_EXPECTED, MootError)):
                log.exception("federation.devices_refresh_failed", user=address)
            else:
                log.info("federation.devices_refresh_failed", user=address, error=str(exc))
            return
        finally:
            self._devices_refreshing.discard(address)
        if dropped == self._devices_dropped:
            self._devices_cache[address] = (trio.current_time(), devices)

    async def profile_of(self, address: str) -> dict[str, Any]:
        node = node_of(address)
        if node is None:
            raise UnknownUser(f"not an address: {address!r}")
        await self.require_node(node)
        return await self.remote_profiles.profile_of(address, node)

    async def avatar_of(self, address: str) -> Avatar:
        node = node_of(address)
        if node is None:
            raise UnknownUser(f"not an address: {address!r}")
        await self.require_node(node)
        return await self.remote_profiles.avatar_of(address, node)

    def sign_message(self, *, sender: str, sender_device: str, to: str, message_id: str, envelope: bytes, now: int) -> tuple[bytes, str]:
        return self.signer.message(sender=sender, sender_device=sender_device, to=to, message_id=message_id, envelope=envelope, now=now)

    def sign_receipt(self, *, kind: Literal["delivered", "read"], by: str, to: str, message_id: str, now: int) -> tuple[bytes, str]:
        return self.signer.receipt(kind=kind, by=by, to=to, message_id=message_id, now=now)

    def wake(self, node: str) -> None:
        self._peer(node).wake.set()

    async def devices_changed(self, address: str) -> None:
        """Queue a signed ``devices`` event for every node whose users talk to ``address``,
        so they drop their cached copy of its device list."""
        try:
            nodes = await self.repo.nodes_talking_to(address)
            if not nodes:
                return
            now = self._clock_ms()
            raw, sig = self.signer.devices(user=address, now=now)

            def op(conn: Any) -> None:
                for node in nodes:
                    enqueue(conn, node, raw, sig, now)

            await self.writer.write(op)
        except MootError as exc:
            # The device change itself is done; the other nodes' caches expire anyway.
            log.warning("federation.devices_event_failed", user=address, error=exc.code)
            return
        for node in nodes:
            self.wake(node)

    def seen(self, node: str) -> None:
        """``node`` connected to us or was found again: a sender waiting out a backoff goes now."""
        peer = self._peer(node)
        peer.wake.set()
        peer.seen.set()
        self.live.seen(node)

    def _peer(self, node: str) -> _Peer:
        peer = self._peers.get(node)
        if peer is None:
            peer = self._peers[node] = _Peer(node)
            if self._nursery is not None:
                self._nursery.start_soon(self._sender, peer)
        return peer

    # -- running ------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[FederationHost] = trio.TASK_STATUS_IGNORED) -> None:
        """Run the host and every federation task until cancelled."""
        protocols = {
            wire.PROTOCOL_ID: self._inbound, wire.KEYS_PROTOCOL_ID: self._keys, wire.LIVE_PROTOCOL_ID: self.live.inbound,
            BLOBS_PROTOCOL_ID: self.blobs.inbound,
        }
        async with open_host(self.key, [self.config.federation_listen], protocols=protocols) as host:
            self.host = host
            try:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    await nursery.start(self.live.serve)
                    for peer in list(self._peers.values()):  # woken before the host was up
                        nursery.start_soon(self._sender, peer)
                    for record in await self.repo.nodes():
                        if record.outbox_depth > 0:
                            self.wake(record.name)
                    for address in self.config.federation_peers:
                        nursery.start_soon(self._dial_static, address)
                    self.dht = await nursery.start(self._serve_dht, host)  # see "the DHT" below
                    if self.config.mdns:  # discovery on the local network: see _serve_mdns
                        await nursery.start(self._serve_mdns, host)
                    task_status.started(host)
                    await trio.sleep_forever()  # the senders come and go; the host stays
            finally:
                self._nursery = None
                self.host = None
                self.dht = None

    async def _dial_static(self, address: str) -> None:
        """Connect to a configured peer and learn its name (from its hello) until it answers."""
        failures = 0
        while True:
            try:
                await self.introduce(address, found_by="static")
                return
            except (HostError, ProtocolViolation, trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
                failures += 1
                delay = self.backoff.delay(failures, random.random())
                log.info("federation.static_peer_unreachable", address=address, error=str(exc), retry_s=round(delay, 1))
                await trio.sleep(delay)

    async def introduce(self, address: str, *, found_by: str) -> str:
        """Dial ``address``, exchange hellos, and remember the node; returns its name."""
        peer_id, name = await self._ask_name(address)
        if not await self._pin(name, peer_id, [address], found_by):
            raise ProtocolViolation("wrong_node", f"{address} claims {name!r}, which another peer holds")
        log.info("federation.node_found", node=name, peer=peer_id, found_by=found_by)
        self.seen(name)
        return name

    async def _ask_name(self, address: str) -> tuple[str, str]:
        """Dial ``address`` and exchange hellos: (its peer id, the name it claims)."""
        assert self.host is not None
        peer_id = await self.host.connect(address)
        stream = await self.host.open_stream(peer_id, wire.PROTOCOL_ID)
        try:
            session = OutboundSession(self.name)
            await stream.send_all(session.start())
            ready = await self._read_hello(stream, session)
        finally:
            await stream.aclose()
        if not self.permitted(ready.node):
            raise ProtocolViolation("forbidden", f"{ready.node!r} is not allowed by this node's configuration")
        return peer_id, ready.node

    async def _read_hello(self, stream: FederationStream, session: OutboundSession | InboundSession) -> PeerReady:
        with trio.fail_after(HELLO_TIMEOUT_S):
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    raise trio.BrokenResourceError("the peer closed the stream before its hello")
                for event in session.receive_data(data):
                    if isinstance(event, PeerReady):
                        return event
                    if isinstance(event, PeerClosing):
                        raise ProtocolViolation(event.code, f"the peer refused: {event.message}")

    # -- the DHT (federation/dht.py) ---------------------------------------------------

    async def _pin(self, name: str, peer_id: str, addrs: list[str], found_by: str, *, replace: bool = False) -> bool:
        """Remember that ``peer_id`` is node ``name`` (at ``addrs``). False when the name
        is pinned to another peer id (the conflict is recorded for the operator)."""
        op = self.repo.seen_op(name, peer_id, addrs, found_by, self._clock_ms(), replace=replace)
        if await self.writer.write(op) is None:
            return False
        self._pins[name] = peer_id
        return True

    async def _serve_dht(self, host: FederationHost, *, task_status: trio.TaskStatus[NodeDirectory] = trio.TASK_STATUS_IGNORED) -> None:
        from federation.dht import serve_dht

        # Updated in place: a static peer may have been pinned while the query ran.
        self._pins.update({r.name: r.peer_id for r in await self.repo.nodes() if r.peer_id is not None})
        self._pins[self.name] = host.peer_id  # our own records beat anyone else's claim on our name
        await serve_dht(
            host, name=self.name, key=self.key, addrs=lambda: self._published_addrs(host), web_url=self._published_web_url,
            clock_ms=self._clock_ms, bootstrap=self.config.federation_bootstrap,
            refresh_s=self.config.federation_dht_refresh_s, pinned=self._pins.get, observed=self._claim_seen,
            task_status=task_status,
        )

    @staticmethod
    def _published_addrs(host: FederationHost) -> list[str]:
        """Where other nodes can dial this one: on 0.0.0.0 (or ::), every interface's
        address, except loopback when there is another (it would send others to themselves)."""
        from federation.announcement import announced_addrs
        from federation.mdns import adapter_ips

        addrs = list(announced_addrs(host.addrs, adapter_ips()))
        reachable = [a for a in addrs if not ipaddress.ip_address(a.split("/")[2]).is_loopback]
        return [f"{addr}/p2p/{host.peer_id}" for addr in reachable or addrs]

    def _published_web_url(self) -> str:
        from federation.announcement import announced_web_url
        from federation.mdns import adapter_ips

        return announced_web_url(self._web_url, adapter_ips()) if self._web_url else ""

    async def find_in_dht(self, name: str) -> bool:
        """Look ``name`` up in the DHT (bounded in time) and pin the node found.

        For a name already pinned, only that peer's record counts (its addresses are
        merged into what is known); any other peer's claim is recorded as a conflict
        and never used. A name not pinned yet goes to the newest claim. Returns
        whether a usable record was found. Lookups of one name share one query.
        """
        if self.dht is None or name == self.name or not wire.NODE_NAME_RE.match(name):
            return False
        pending = self._lookups.get(name)
        if pending is not None:
            await pending.wait()
            known = await self.repo.node(name)
            return known is not None and known.peer_id is not None
        done = self._lookups[name] = trio.Event()
        try:
            claims = await self.dht.lookup(name)
            known = await self.repo.node(name)
            chosen, conflicts = records.choose(claims, known.peer_id if known is not None else None)
            found = chosen is not None and await self._pin(name, chosen.peer_id, list(chosen.addrs), "dht")
            for claim in conflicts:
                await self._note_conflict(claim)  # only once the name is pinned: see there
            if found:
                log.info("federation.node_found", node=name, peer=chosen.peer_id if chosen else None, found_by="dht")
                self.seen(name)
            else:
                log.info("federation.dht_not_found", node=name, claims=len(claims))
            return found
        finally:
            del self._lookups[name]
            done.set()

    def _claim_seen(self, record: records.NodeRecord) -> None:
        """Every valid record the DHT handles: a claim on a pinned name by another peer
        is recorded as a conflict (in the background, once per name and peer)."""
        pinned = self._pins.get(record.name)
        if pinned is not None and pinned == record.peer_id:
            # The node we know, republishing (it came back, perhaps elsewhere): a sender
            # waiting out a backoff for it learns the addresses and goes now.
            peer = self._peers.get(record.name)
            if peer is not None and peer.retry_at is not None and self._nursery is not None and record.name not in self._reviving:
                self._reviving.add(record.name)
                self._nursery.start_soon(self._revive, record)
            return
        if pinned is None or (record.name, record.peer_id) in self._claims_noted:
            return
        if len(self._claims_noted) >= 1000:  # bounded: a flood of claims is noted again later
            self._claims_noted.clear()
        self._claims_noted.add((record.name, record.peer_id))
        if self._nursery is not None:
            self._nursery.start_soon(self._note_conflict, record)

    async def _revive(self, record: records.NodeRecord) -> None:
        try:
            if await self._pin(record.name, record.peer_id, list(record.addrs), "dht"):
                log.info("federation.node_republished", node=record.name, peer=record.peer_id)
                self.seen(record.name)
        except MootError as exc:
            log.warning("federation.revive_failed", node=record.name, error=exc.code)
        finally:
            self._reviving.discard(record.name)

    async def _note_conflict(self, claim: records.NodeRecord) -> None:
        if claim.name == self.name:
            log.warning("federation.own_name_claimed", node=claim.name, peer=claim.peer_id)
            return
        if self._pins.get(claim.name) in (None, claim.peer_id):
            return  # recording it would pin the name to this claim instead
        try:
            await self._pin(claim.name, claim.peer_id, list(claim.addrs), "dht")  # refused: records the conflict
        except MootError as exc:
            log.warning("federation.conflict_not_recorded", node=claim.name, peer=claim.peer_id, error=exc.code)
            return
        log.warning("federation.name_conflict", node=claim.name, peer=claim.peer_id, pinned=self._pins.get(claim.name))

    # -- sending ---------------------------------------------------------------------

    async def _sender(self, peer: _Peer) -> None:
        """Deliver ``peer``'s outbox for as long as the node runs."""
        while True:
            peer.wake = trio.Event()
            record = await self.repo.node(peer.name)
            if record is None or record.peer_id is None or record.blocked or record.outbox_depth == 0:
                await peer.wake.wait()
                continue
            try:
                try:
                    await self._deliver(peer, record)
                except BaseExceptionGroup as group:
                    raise first_error(group) from None
                peer.failures = 0
            except Exception as exc:
                if not isinstance(exc, _EXPECTED):
                    # A bug must not take the node down: log it and retry later like any failure.
                    log.exception("federation.sender_failed", node=peer.name)
                peer.connected = False
                peer.failures += 1
                peer.last_error = str(exc)
                delay = self.backoff.delay(peer.failures, random.random())
                peer.retry_at = trio.current_time() + delay
                log.info("federation.send_failed", node=peer.name, error=str(exc), failures=peer.failures, retry_s=round(delay, 1))
                # New events do not cut this short (they would hammer a dead node); the
                # node itself showing up again does.
                peer.seen = trio.Event()
                with trio.move_on_after(delay):
                    await peer.seen.wait()
                peer.retry_at = None

    async def _dial(self, record: NodeRecord) -> None:
        """Connect to ``record``'s node by its addresses, newest first; HostError if none answers."""
        assert self.host is not None
        last: Exception | None = None
        for address in reversed(record.addrs):
            try:
                await self.host.connect(address)
                return
            except (HostError, ValueError) as exc:
                last = exc
        raise HostError(f"no address of {record.name} answers: {last}")

    async def _open(self, record: NodeRecord, protocol: str) -> FederationStream:
        """A stream to ``record``'s node, dialling first if need be.

        libp2p may still hold a connection whose other end is gone (it notices only
        when a stream negotiation times out, after 10 s): when opening takes too long,
        that connection is dropped and the node dialled afresh, once.
        """
        assert self.host is not None and record.peer_id is not None
        if not self.host.is_connected(record.peer_id):
            await self._dial(record)
        with trio.move_on_after(OPEN_TIMEOUT_S):
            return await self.host.open_stream(record.peer_id, protocol)
        log.info("federation.stale_connection", node=record.name, peer=record.peer_id)
        await self.host.disconnect(record.peer_id)
        await self._dial(record)
        with trio.move_on_after(OPEN_TIMEOUT_S):
            return await self.host.open_stream(record.peer_id, protocol)
        raise HostError(f"{record.name} did not open a {protocol} stream within {OPEN_TIMEOUT_S:g} s")

    async def _deliver(self, peer: _Peer, record: NodeRecord) -> None:
        """One stream's life: send the outbox from ``acked + 1``, keep it open while idle."""
        try:
            stream = await self._open(record, wire.PROTOCOL_ID)
        except HostError:
            await self.find_in_dht(peer.name)  # it may have moved: the next try dials what it publishes now
            raise
        session = OutboundSession(self.name, acked=record.acked_oid, window=WINDOW, expected_peer=peer.name)
        try:
            await stream.send_all(session.start())
            await self._read_hello(stream, session)
            peer.connected = True
            async with trio.open_nursery() as nursery:

                async def read_acks() -> None:
                    while True:
                        data = await stream.receive_some(RECEIVE_BYTES)
                        if not data:
                            raise trio.BrokenResourceError(f"{peer.name} closed the stream")
                        acked = None
                        for event in session.receive_data(data):
                            if isinstance(event, Acked):
                                acked = event.upto
                            elif isinstance(event, Rejected):
                                log.warning("federation.event_rejected", node=peer.name, oid=event.oid, code=event.code, reason=event.message)
                            elif isinstance(event, PeerClosing):
                                raise ProtocolViolation(event.code, f"{peer.name} closed the stream: {event.message}")
                        if acked is not None:
                            # The window is open again as soon as the ack is read; recording
                            # it (one write for all the acks read at once) only forgets rows.
                            peer.wake.set()
                            await self.writer.write(self.repo.acked_op(peer.name, acked))
                        pong = session.data_to_send()
                        if pong:
                            await stream.send_all(pong)

                nursery.start_soon(read_acks)
                partial_in_flight = False
                ping_at = trio.current_time() + PING_INTERVAL_S
                while True:
                    room = session.room
                    if session.sent == session.acked:
                        partial_in_flight = False
                    # A batch smaller than BATCH goes out only when nothing else is in
                    # flight (as Nagle's algorithm): events that arrive meanwhile wait for
                    # its ack and then go together. Without this, a steady trickle costs
                    # one batch, one commit and one ack per event at both ends.
                    if room and not partial_in_flight:
                        limit = min(room, BATCH)
                        items = await self.repo.pending(peer.name, session.sent, limit)
                        if items:
                            batch = [wire.SignedEvent(oid=i.oid, event=msgspec.Raw(i.event), sig=i.sig) for i in items]
                            await stream.send_all(session.send_batch(batch))
                            partial_in_flight = len(items) < limit
                            continue
                    # Idle, a partial batch in flight, or the window is full: wait for an
                    # ack or new events (both set peer.wake; new events alone change
                    # nothing while a partial batch is in flight: the loop waits again),
                    # or the ping time (which only acks, or new events heeded, put off).
                    wake, acked = peer.wake, session.acked
                    with trio.move_on_at(ping_at):
                        await wake.wait()
                    if wake.is_set():
                        peer.wake = trio.Event()
                        if session.acked != acked or not partial_in_flight:
                            ping_at = trio.current_time() + PING_INTERVAL_S
                    else:
                        await stream.send_all(session.ping())
                        ping_at = trio.current_time() + PING_INTERVAL_S
        finally:
            peer.connected = False
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.aclose()

    # -- receiving -------------------------------------------------------------------

    def check_not_refused(self, peer_id: str, known: NodeRecord | None) -> None:
        """Raise Refused when ``peer_id`` is blocked or cut off for misbehaving."""
        if known is not None and known.blocked:
            raise PeerRefused("forbidden", f"{known.name!r} is blocked by this node's operator")
        _, until = self._penalties.get(peer_id, (0, 0.0))
        if trio.current_time() < until:
            raise PeerRefused("backoff", f"misbehaved: wait {until - trio.current_time():.0f} s")

    async def admit(self, origin: str, peer_id: str) -> None:
        """The peer said hello as ``origin``: pin the name to it, unless it is not
        allowed, blocked, or another peer holds that name (ProtocolViolation)."""
        if not self.permitted(origin):
            raise ProtocolViolation("forbidden", f"{origin!r} is not allowed to federate with this node")
        if not await self._pin(origin, peer_id, [], "inbound"):
            raise ProtocolViolation("wrong_node", f"the name {origin!r} belongs to another peer")
        record = await self.repo.node(origin)
        if record is not None and record.blocked:
            raise PeerRefused("forbidden", f"{origin!r} is blocked by this node's operator")
        self.seen(origin)  # whatever waits for it goes now

    def punish(self, peer_id: str, origin: str | None, exc: ProtocolViolation) -> None:
        """Refuse a peer that broke the protocol for a while, longer each time (the
        same backoff as for sending)."""
        if isinstance(exc, PeerRefused):
            log.info("federation.peer_refused", peer=peer_id, node=origin, code=exc.code)
            return
        log.warning("federation.protocol_violation", peer=peer_id, node=origin, code=exc.code, reason=exc.message)
        offences = self._penalties.pop(peer_id, (0, 0.0))[0] + 1
        self._penalties[peer_id] = (offences, trio.current_time() + self.backoff.delay(offences, random.random()))
        if len(self._penalties) > 10_000:  # bounded: forget the oldest
            self._penalties.pop(next(iter(self._penalties)))

    async def serve_inbound(
        self, stream: FederationStream, known: NodeRecord | None, session: InboundSession | LiveInbound,
        handle: Callable[[str, Any], Awaitable[None]], *, events: Callable[[list[Any]], list[Any]] = lambda e: e,
    ) -> None:
        """Run a stream another node opened (``known``: what we know of its peer id):
        admit its hello, hand every later event to ``handle(origin, event)``, answer
        pings. A peer that breaks the protocol is cut off and refused for a while."""
        peer_id = stream.remote_peer_id
        origin: str | None = None
        try:
            self.check_not_refused(peer_id, known)
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return
                for event in events(session.receive_data(data)):
                    if isinstance(event, PeerReady):
                        await self.admit(event.node, peer_id)
                        origin = event.node
                        # Our hello says "accepted": the opener sends nothing else before it.
                        await stream.send_all(session.start())
                    elif isinstance(event, PeerClosing):
                        return
                    elif origin is not None:
                        await handle(origin, event)
                pong = session.data_to_send()
                if pong:
                    await stream.send_all(pong)
        except ProtocolViolation as exc:
            self.punish(peer_id, origin, exc)
            with trio.move_on_after(2):
                await stream.send_all(session.violation_frame(exc))
        except (trio.BrokenResourceError, trio.ClosedResourceError, HostError):
            return

    async def _inbound(self, stream: FederationStream) -> None:
        """A ``/moot/federation/1`` stream: batches of signed events in, acks out."""
        peer_id = stream.remote_peer_id
        known = await self.repo.node_by_peer(peer_id)
        session = InboundSession(self.name, expected_peer=known.name if known else None)
        origin_key = verify_key_of(peer_id)
        judge = Misbehaviour()

        async def handle(origin: str, event: Any) -> None:
            if isinstance(event, BatchReceived):
                rejected = await self._apply(origin, origin_key, event.events)
                out = b"".join(session.reject(oid, code, message) for oid, code, message in rejected)
                await stream.send_all(out + session.ack(event.upto))
                if any(judge.record(trio.current_time()) for _ in rejected):
                    raise ProtocolViolation("misbehaving", "too many rejected events")

        await self.serve_inbound(stream, known, session, handle, events=_merge_batches)

    async def _apply(self, origin: str, origin_key: bytes, items: list[wire.SignedEvent]) -> list[tuple[int, str, str]]:
        """Verify, check and store a batch; returns the rejected (oid, code, message).

        Returns only once everything accepted is committed; raises Unavailable (and
        so acknowledges nothing) if storage fails.
        """
        assert self.messaging is not None
        messaging = self.messaging
        rejected: list[tuple[int, str, str]] = []
        ops: list[tuple[int, Any, Callable[[Any], None]]] = []
        for item in items:
            try:
                event = verify_event(item, origin, origin_key)
                if isinstance(event, MessageEvent):
                    op, after = await messaging.remote_message(
                        sender=event.sender, sender_device=event.sender_device, to=event.to,
                        message_id=event.message_id, envelope=bytes(event.envelope),
                    )
                    ops.append((item.oid, op, after))
                elif isinstance(event, DevicesEvent):
                    self._devices_cache.pop(event.user, None)
                    self._devices_dropped += 1
                elif isinstance(event, ReceiptEvent):
                    op, after = await messaging.remote_receipt(kind=event.kind, by=event.by, to=event.to, message_id=event.message_id)
                    ops.append((item.oid, op, after))
            except EventRejected as exc:
                rejected.append((item.oid, exc.code, exc.message))
            except MootError as exc:
                rejected.append((item.oid, exc.code, exc.message))
        failed: list[BaseException] = []

        def committed(oid: int, after: Callable[[Any], None], result: outcome.Outcome[Any]) -> None:
            # Runs in the writer's completion callback, in commit order: the stream events
            # ``after`` pushes reach each connection in seq order (see Connection.push_event).
            if isinstance(result, outcome.Error):
                exc = result.error
                if isinstance(exc, MootError) and not isinstance(exc, Unavailable):
                    rejected.append((oid, exc.code, exc.message))
                else:
                    failed.append(exc)
                return
            try:
                after(result.value)
            except MootError as exc:
                rejected.append((oid, exc.code, exc.message))

        await self._commit([(op, partial(committed, oid, after)) for oid, op, after in ops])
        if failed:
            raise Unavailable("could not store events from another node") from failed[0]
        rejected.sort()
        return rejected

    async def _commit(self, ops: list[tuple[Any, Callable[[outcome.Outcome[Any]], None]]]) -> None:
        """Submit every (op, on_done) to the group-commit writer at once; wait for them all."""
        remaining = len(ops)
        done = trio.Event()
        if not ops:
            return

        def finished(on_done: Callable[[outcome.Outcome[Any]], None], result: outcome.Outcome[Any]) -> None:
            nonlocal remaining
            try:
                on_done(result)
            finally:
                remaining -= 1
                if remaining == 0:
                    done.set()

        for op, on_done in ops:
            self.writer.submit_nowait(op, partial(finished, on_done))
        await done.wait()

    # -- device keys ------------------------------------------------------------------

    async def _keys(self, stream: FederationStream) -> None:
        """Answer one ``get_devices``, ``get_profile`` or ``get_avatar`` about a local user."""
        deframer = wire.Deframer(64 * 1024)
        with trio.move_on_after(KEYS_TIMEOUT_S):
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    return
                try:
                    bodies = deframer.feed(data)
                    if not bodies:
                        continue
                    request = wire.decode(bodies[0])
                    if not isinstance(request, (wire.GetDevices, wire.GetProfile, wire.GetAvatar)):
                        raise ProtocolViolation("unexpected", "expected get_devices, get_profile or get_avatar")
                except ProtocolViolation as exc:
                    await stream.send_all(wire.encode(wire.Error(code=exc.code, message=exc.message)))
                    return
                try:
                    answer = await self._answer(request)
                except MootError as exc:
                    answer = wire.Error(code=exc.code, message=exc.message)
                await stream.send_all(wire.encode(answer))
                return

    async def _answer(self, request: wire.GetDevices | wire.GetProfile | wire.GetAvatar) -> Any:
        """The answer to a question about one of this node's users (raises MootError:
        ``unknown_user``, ``unknown_node`` for anyone else's, ``not_found``)."""
        if isinstance(request, wire.GetDevices):
            records = await self.devices.devices_of(request.user)
            return wire.Devices(user=request.user, devices=[msgspec.convert(public_view(d), wire.DeviceView) for d in records])
        if self.profiles is None:
            raise NotFound("this node keeps no profiles")
        if isinstance(request, wire.GetProfile):
            return profile_frame(await self.profiles.local_profile(request.user))
        return avatar_frame(request.user, await self.profiles.local_avatar(request.user))

    async def _ask_node(self, node: str, question: Any) -> Any:
        record = await self.repo.node(node)
        if record is None or record.peer_id is None:
            raise UnknownNode(f"unknown node {node!r}")
        return await self._ask(record, question)

    async def _ask(self, record: NodeRecord, question: Any) -> Any:
        """Send one question on a new ``/moot/keys/1`` stream; its one answer (any frame).

        Raises Unavailable when the node cannot be reached, does not answer in time or
        breaks the protocol.
        """
        try:
            stream = await self._open(record, wire.KEYS_PROTOCOL_ID)
        except HostError as exc:
            raise Unavailable(f"node {record.name!r} cannot be reached: {exc}") from exc
        try:
            await stream.send_all(wire.encode(question))
            deframer = wire.Deframer(wire.DEFAULT_MAX_FRAME)
            with trio.fail_after(KEYS_TIMEOUT_S):
                while True:
                    data = await stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        raise Unavailable(f"node {record.name!r} closed the keys stream")
                    bodies = deframer.feed(data)
                    if bodies:
                        return wire.decode(bodies[0])
        except (trio.TooSlowError, trio.BrokenResourceError, ProtocolViolation, HostError) as exc:
            raise Unavailable(f"node {record.name!r} did not answer: {exc}") from exc
        finally:
            await stream.aclose()

    async def _fetch_devices(self, record: NodeRecord, address: str) -> list[dict[str, Any]]:
        answer = await self._ask(record, wire.GetDevices(user=address))
        if isinstance(answer, wire.Error):
            if answer.code == "unknown_user":
                raise UnknownUser(f"no user {address}", address=address)
            raise Unavailable(f"node {record.name!r} answered {answer.code}: {answer.message}")
        if not isinstance(answer, wire.Devices) or answer.user != address:
            raise Unavailable(f"node {record.name!r} answered something else")
        return [msgspec.to_builtins(d) for d in answer.devices]

    # -- for operators (moot peers ...) ---------------------------------------------------

    def status(self, name: str) -> dict[str, Any]:
        """The sender's live state for a node: connected, failures, backoff."""
        peer = self._peers.get(name)
        if peer is None:
            return {"connected": False, "failures": 0, "retry_in_s": None, "last_error": None}
        retry = None if peer.retry_at is None else round(max(0.0, peer.retry_at - trio.current_time()), 1)
        return {"connected": peer.connected, "failures": peer.failures, "retry_in_s": retry, "last_error": peer.last_error}

    async def peers(self) -> list[dict[str, Any]]:
        """Every node this one knows, with how it was found and the state of its outbox."""
        out = []
        for record in await self.repo.nodes():
            out.append({
                "node": record.name, "peer_id": record.peer_id, "addrs": record.addrs, "found_by": record.found_by,
                "first_seen": record.first_seen, "last_seen": record.last_seen, "blocked": record.blocked,
                "outbox": record.outbox_depth, "conflict": record.conflict, **self.status(record.name),
            })
        return out

    async def add_peer(self, address: str) -> str:
        """Dial a node by multiaddr now (``moot peers add``); returns its name."""
        if self.host is None:
            raise Unavailable("federation is not running")
        try:
            return await self.introduce(address, found_by="operator")
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        except (HostError, ProtocolViolation, trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            raise Unavailable(f"cannot reach {address}: {exc}") from None

    async def pin_peer(self, address: str) -> dict[str, Any]:
        """Give the name the node at ``address`` claims to it (``moot peers pin``): the
        operator settles a conflict. What is queued for that name goes to it now."""
        if self.host is None:
            raise Unavailable("federation is not running")
        try:
            peer_id, name = await self._ask_name(address)
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        except (HostError, ProtocolViolation, trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
            raise Unavailable(f"cannot reach {address}: {exc}") from None
        before = await self.repo.node(name)
        if not await self._pin(name, peer_id, [address], "operator", replace=True):
            raise BadRequest(f"{peer_id} is already known as another node")
        previous = before.peer_id if before is not None and before.peer_id not in (None, peer_id) else None
        if previous is not None:
            await self.host.disconnect(previous)
        self._usable.pop(name, None)
        self._devices_cache = {a: v for a, v in self._devices_cache.items() if node_of(a) != name}
        log.warning("federation.name_pinned", node=name, peer=peer_id, previous=previous)
        self.seen(name)
        return {"node": name, "peer_id": peer_id, "previous": previous}

    async def set_blocked(self, node: str, blocked: bool) -> None:
        """Refuse (or accept again) a node's connections and events."""
        if not wire.NODE_NAME_RE.match(node):
            raise BadRequest(f"not a node name: {node!r}")
        await self.writer.write(self.repo.blocked_op(node, blocked, self._clock_ms()))
        self._usable.pop(node, None)
        record = await self.repo.node(node)
        if blocked and record is not None and record.peer_id is not None and self.host is not None:
            await self.host.disconnect(record.peer_id)
        log.info("federation.blocked" if blocked else "federation.unblocked", node=node)
        if not blocked:
            self.seen(node)

    async def retry(self, node: str) -> None:
        """Cut a node's backoff short (``moot peers retry``)."""
        if await self.repo.node(node) is None:
            raise NotFound(f"no node {node!r} is known")
        self.seen(node)

    # -- discovery on the local network (mDNS, federation/mdns.py) ------------------------

    _mdns: MdnsDiscovery | None = None  # while it runs
    _web_url: str = ""  # set by the composition root once the web server listens

    async def _serve_mdns(self, host: FederationHost, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Announce this node and introduce ourselves to every node found, until cancelled.

        Ready once zeroconf listens. mDNS is a convenience, not a duty: when it cannot
        start (no such interface, no multicast) or fails later, the error is logged
        and federation goes on without it.
        """
        from federation.announcement import Announcement, BadAnnouncement, announced_addrs, announced_web_url
        from federation.mdns import MdnsDiscovery, adapter_ips, choose_interfaces

        started = False
        try:
            interfaces = choose_interfaces(self.config.mdns_interfaces, self.config.federation_listen, adapter_ips())
            addrs = announced_addrs(host.addrs, interfaces)
            try:
                # The web server starts after us: until it says where (announce_web_url),
                # the configured port is the best guess, and right unless it is 0.
                web_url = self._web_url or (self.config.web_url if self.config.web_port else "")
                announcement = Announcement(host.peer_id, self.name, addrs, announced_web_url(web_url, interfaces))
            except BadAnnouncement:  # the web URL is too long to announce: leave it out
                announcement = Announcement(host.peer_id, self.name, addrs)
            self._mdns = MdnsDiscovery(announcement, interfaces, self._mdns_found)
            async with trio.open_nursery() as nursery:
                await nursery.start(self._mdns.serve)
                started = True
                task_status.started()
        except Exception:
            log.exception("federation.mdns_failed", interfaces=" ".join(self.config.mdns_interfaces) or "(federation_listen)")
        finally:
            self._mdns = None
        if not started:
            task_status.started()

    async def _mdns_found(self, found: Announcement) -> None:
        """A node announced itself: dial its addresses until one answers, or, when we
        already know it there, tell its sender that it is back (``seen``).

        Retries with backoff a few times (two nodes that find each other at once may
        both fail to dial); then its next announcement tries again. Errors are logged.
        """
        if not self.permitted(found.node):
            log.debug("federation.mdns_not_permitted", node=found.node, peer=found.peer_id)
            return
        for attempt in range(1, MDNS_ATTEMPTS + 1):
            record = await self.repo.node_by_peer(found.peer_id)
            if record is not None and record.blocked:
                return
            if record is not None and set(found.dial_addrs) & set(record.addrs):
                self.seen(record.name)
                return
            errors = []
            for address in found.dial_addrs:
                try:
                    with trio.fail_after(MDNS_DIAL_TIMEOUT_S):
                        await self.introduce(address, found_by="mdns")
                    return
                except (HostError, ProtocolViolation, trio.BrokenResourceError, trio.TooSlowError, OSError, ValueError) as exc:
                    errors.append(f"{address}: {exc}")
            delay = self.backoff.delay(attempt, random.random())
            last = attempt == MDNS_ATTEMPTS
            log.info(
                "federation.mdns_node_unreachable", node=found.node, peer=found.peer_id, errors="; ".join(errors)[:1000],
                retry_s=None if last else round(delay, 1),
            )
            if not last:
                await trio.sleep(delay)

    def announce_web_url(self, url: str) -> None:
        """The web server listens at ``url``: announce it by mDNS from now on.

        The composition root starts the web server after federation, so the first
        announcement may go out without it; this re-announces.
        """
        from federation.announcement import BadAnnouncement, announced_web_url

        self._web_url = url
        if self.dht is not None:
            self.dht.refresh_soon()  # the record published at start had no web URL
        if self._mdns is not None:
            current = self._mdns.announcement
            try:
                self._mdns.update(replace(current, web_url=announced_web_url(url, self._mdns.interfaces)))
            except BadAnnouncement:
                log.warning("federation.mdns_web_url_too_long", url=url[:300])


class PeerRefused(ProtocolViolation):
    """This peer may not talk to us now (blocked, or serving a penalty): not an offence."""


_EXPECTED = (HostError, ProtocolViolation, trio.BrokenResourceError, trio.ClosedResourceError, trio.TooSlowError, Unavailable, OSError)


def _merge_batches(events: list[Any]) -> list[Any]:
    """Batches that arrived together become one: stored in one commit, acknowledged
    once. A receiver that falls behind so takes bigger bites instead of paying a
    commit and an ack for each of the sender's (possibly tiny) batches."""
    out: list[Any] = []
    for event in events:
        if isinstance(event, BatchReceived) and out and isinstance(out[-1], BatchReceived):
            out[-1] = BatchReceived(events=out[-1].events + event.events)
        else:
            out.append(event)
    return out
