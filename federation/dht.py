"""The Kademlia DHT on the node's host: this node's record goes in, other nodes' come out.

``serve_dht`` runs py-libp2p's ``KadDHT`` in server mode on the federation host. It
speaks the standard ``/ipfs/kad/1.0.0`` protocol, so any libp2p implementation can
route through a Moot node, find it by peer id, and read the records stored under
``/moot/node/<name>`` (federation/records.py says what they hold and how they are
checked). It

- joins the network through the configured bootstrap peers (none by default: a
  node without any is found only by nodes that bootstrap from it), again whenever
  its routing table runs empty;
- publishes this node's signed record at start and every ``refresh_s``, with a
  sequence number that always grows (the clock in ms, or one more than the last);
- stores and serves other nodes' records, checking each with ``records.open_record``
  and choosing between two with ``records.select``, which prefers the peer id this
  node has pinned to the name (``pinned``); every valid record that passes through
  is shown to ``observed``, which is how a second claim on a pinned name is noticed;
- answers ``lookup(name)``: every valid claim on the name that the closest peers
  hold, asked afresh each time. libp2p's own ``get_value`` returns the local copy
  when there is one, however stale, and only the one value it selects, which would
  hide a conflicting claim.

Only this module and host.py import libp2p's DHT; the rest of the node sees
``NodeDirectory`` and ``records.NodeRecord``.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import msgspec
import nacl.signing
import trio
from libp2p.kad_dht.common import BUCKET_SIZE, PROTOCOL_ID
from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
from libp2p.peer.id import ID
from libp2p.records.validator import Validator
from libp2p.tools.anyio_service import background_trio_service

from federation import records
from federation.host import FederationHost, HostError
from federation.records import NodeRecord, RecordRejected
from federation.session import Backoff
from node.logs import get_logger

__all__ = ["LOOKUP_TIMEOUT_S", "NodeDirectory", "serve_dht"]

log = get_logger("moot.federation.dht")

LOOKUP_TIMEOUT_S = 5.0  # a whole lookup: closest peers, then their records
PEER_TIMEOUT_S = 3.0  # one peer's answer within a lookup
PUBLISH_TIMEOUT_S = 30.0  # one publication, or one round of bootstrap
BOOTSTRAP_RETRY_INITIAL_S = 1.0


class _RecordValidator(Validator):
    """What libp2p's DHT calls on every record under ``/moot/...``, stored or fetched."""

    def __init__(
        self, clock_ms: Callable[[], int], pinned: Callable[[str], str | None], observed: Callable[[NodeRecord], None]
    ) -> None:
        self._clock_ms = clock_ms
        self._pinned = pinned
        self._observed = observed

    def validate(self, key: str, value: bytes) -> None:
        self.open(key, value)

    def open(self, key: str, value: bytes) -> NodeRecord:
        """The record, checked (RecordRejected otherwise), and shown to ``observed``."""
        record = records.open_record(key, value, self._clock_ms())
        self._observed(record)
        return record

    def select(self, key: str, values: list[bytes]) -> int:
        name = records.name_of_key(key)
        return records.select(key, values, self._clock_ms(), pinned=self._pinned(name) if name else None)


class NodeDirectory:
    """A running DHT, as the federation service uses it: publish, look up."""

    def __init__(
        self,
        dht: KadDHT,
        validator: _RecordValidator,
        host: FederationHost,
        *,
        name: str,
        key: nacl.signing.SigningKey,
        addrs: Callable[[], Sequence[str]],
        web_url: Callable[[], str],
        clock_ms: Callable[[], int],
    ) -> None:
        self._dht = dht
        self._validator = validator
        self._host = host
        self._name = name
        self._key = key
        self._addrs = addrs
        self._web_url = web_url
        self._clock_ms = clock_ms
        self._seq = 0
        self._changed = trio.Event()
        self.published: NodeRecord | None = None  # the last record put in the DHT

    @property
    def peers(self) -> int:
        """How many peers are in the routing table."""
        return int(self._dht.get_routing_table_size())

    async def lookup(self, name: str, *, timeout: float = LOOKUP_TIMEOUT_S) -> list[NodeRecord]:
        """Every valid record for ``name`` held here or by the peers closest to its key.

        Asks the network every time (a copy held here may be stale). Bounded by
        ``timeout`` seconds: returns what it found by then. Records that fail the
        checks are left out. Never raises for what other peers do or fail to do.
        """
        key = records.dht_key(name)
        key_bytes = key.encode()
        found: list[NodeRecord] = []

        def keep(value: bytes, source: str) -> None:
            try:
                found.append(self._validator.open(key, value))
            except RecordRejected as exc:
                log.debug("federation.dht_record_rejected", node=name, source=source, code=exc.code, reason=exc.message)

        local = self._dht.value_store.get(key_bytes)
        if local is not None:
            keep(local.value, "local")
        with trio.move_on_after(timeout):
            closest = await self._dht.peer_routing.find_closest_peers_network(key_bytes)
            me = self._dht.local_peer_id
            async with trio.open_nursery() as nursery:
                for peer in [p for p in closest if p != me][:BUCKET_SIZE]:
                    nursery.start_soon(self._ask, peer, key_bytes, keep)
        return found

    async def _ask(self, peer: ID, key: bytes, keep: Callable[[bytes, str], None]) -> None:
        with trio.move_on_after(PEER_TIMEOUT_S):
            # ValueStore has no public way to ask one peer for its record; this is the
            # call its own get_value makes. It logs and returns None on every failure.
            got = await self._dht.value_store._get_from_peer(peer, key, return_record=True)
            value = getattr(got, "value", None)
            if isinstance(value, bytes) and value:
                keep(value, str(peer))

    async def publish(self) -> NodeRecord | None:
        """Sign a new record of this node and put it in the DHT (bounded in time).

        Returns the record, or None when there is no address to publish (or the
        DHT here holds a better record of ours, which only a clock gone backwards
        makes): nothing is published then.
        """
        addrs = list(self._addrs())[: records.MAX_ADDRS]
        if not addrs:
            log.warning("federation.dht_no_address", addrs=" ".join(self._host.addrs))
            return None
        now = self._clock_ms()
        self._seq = max(self._seq + 1, now)
        record = NodeRecord(
            v=records.VERSION, name=self._name, peer_id=self._host.peer_id, addrs=addrs, web=self._web_url(),
            seq=self._seq, expires=now + records.LIFETIME_MS,
        )
        value = records.sign_record(record, self._key)
        try:
            records.open_record(records.dht_key(self._name), value, now)
        except RecordRejected as exc:  # a web URL the format does not allow, say: leave it out
            log.warning("federation.dht_record_web_url_dropped", url=record.web[:200], reason=exc.message)
            record = msgspec.structs.replace(record, web="")
            value = records.sign_record(record, self._key)
            try:
                records.open_record(records.dht_key(self._name), value, now)
            except RecordRejected as again:  # an address the format does not allow
                log.error("federation.dht_record_invalid", addrs=" ".join(addrs), reason=again.message)
                return None
        with trio.move_on_after(PUBLISH_TIMEOUT_S) as bounded:
            try:
                await self._dht.put_value(records.dht_key(self._name), value)
            except ValueError as exc:  # our copy here beats the new one: only with a clock gone backwards
                log.warning("federation.dht_publish_refused", seq=record.seq, reason=str(exc))
                return None
        self.published = record
        log.info("federation.dht_published", seq=record.seq, peers=self.peers, timed_out=bounded.cancelled_caught)
        return record

    async def join(self, bootstrap: Sequence[str]) -> int:
        """Connect to the bootstrap peers and fill the routing table from them.

        Returns how many of them answered. Bounded in time.
        """
        joined = 0
        with trio.move_on_after(PUBLISH_TIMEOUT_S):
            for address in bootstrap:
                try:
                    peer_id = await self._host.connect(address)
                except (HostError, ValueError) as exc:
                    log.info("federation.dht_bootstrap_unreachable", address=address, error=str(exc))
                    continue
                # Identify has told us by now whether it speaks Kademlia; if not, it is not added.
                if await self._dht.add_peer(ID.from_base58(peer_id)):
                    joined += 1
            if joined:
                await self._dht.refresh_routing_table()
        log.info("federation.dht_joined" if joined else "federation.dht_not_joined", bootstrap=len(bootstrap), peers=self.peers)
        return joined

    def refresh_soon(self) -> None:
        """What this node would publish has changed (its web URL is known now): publish again."""
        self._changed.set()

    async def keep_published(self, bootstrap: Sequence[str], refresh_s: float) -> None:
        """Join through ``bootstrap``, publish, and do both again as needed, until cancelled.

        Publishes every ``refresh_s`` seconds, and at once after ``refresh_soon``.
        While no bootstrap peer answers (and the routing table is empty) it tries
        again sooner, backing off from 1 s up to ``refresh_s``.
        """
        backoff = Backoff(initial_s=min(BOOTSTRAP_RETRY_INITIAL_S, refresh_s), max_s=refresh_s)
        failures = 0
        while True:
            if bootstrap and self.peers == 0:
                failures = 0 if await self.join(bootstrap) else failures + 1
            self._changed = trio.Event()
            await self.publish()
            with trio.move_on_after(backoff.delay(failures, random.random()) if failures else refresh_s):
                await self._changed.wait()


async def serve_dht(
    host: FederationHost,
    *,
    name: str,
    key: nacl.signing.SigningKey,
    addrs: Callable[[], Sequence[str]],
    web_url: Callable[[], str],
    clock_ms: Callable[[], int],
    bootstrap: Sequence[str],
    refresh_s: float,
    pinned: Callable[[str], str | None],
    observed: Callable[[NodeRecord], None],
    task_status: trio.TaskStatus[NodeDirectory] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Run the DHT on ``host`` until cancelled; ``task_status.started`` gets the directory.

    Ready as soon as the DHT answers other peers (before joining or publishing,
    which ``keep_published`` does in the background). The published record holds
    ``addrs()`` (full multiaddrs, ``/p2p/<peer id>`` included) and ``web_url()``,
    read at each publication. ``pinned(name)`` is the peer
    id this node has pinned to a name, if any; ``observed`` is called (synchronously,
    inside libp2p's handlers: it must not block) with every valid record that passes
    through. On exit the DHT service is stopped and the host stops answering
    ``/ipfs/kad/1.0.0``.
    """
    dht = KadDHT(host.libp2p, DHTMode.SERVER)
    validator = _RecordValidator(clock_ms, pinned, observed)
    dht.register_validator(records.NAMESPACE, validator)
    try:
        async with background_trio_service(dht):
            directory = NodeDirectory(
                dht, validator, host, name=name, key=key, addrs=addrs, web_url=web_url, clock_ms=clock_ms
            )
            async with trio.open_nursery() as nursery:
                nursery.start_soon(directory.keep_published, tuple(bootstrap), refresh_s)
                task_status.started(directory)
    finally:
        host.libp2p.remove_stream_handler(PROTOCOL_ID)
