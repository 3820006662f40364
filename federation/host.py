"""The node's libp2p host: TCP, Noise and Yamux under the node's own Ed25519 key.

``open_host(signing_key, listen, protocols=...)`` is the only way to get one: it
builds the host, listens, registers the stream handlers, and on exit always closes
the host, because py-libp2p's TCP listeners run as trio *system* tasks that outlive
the nursery that started them (a host that is not closed keeps accepting).

Everything py-libp2p does by default that a node must not do is switched off here,
in one place, so the rest of ``federation/`` never sees libp2p's defaults:

* Security is Noise only. ``new_host`` also offers ``/plaintext/2.0.0`` to whoever
  dials in, and plaintext takes the remote's claimed public key on trust: anyone
  could then speak as any peer id. Muxing is Yamux only.
* One connection per peer (``max_connections_per_peer=1``): with the default of
  three, every dial waits out a 250 ms happy-eyeballs timer.
* No mDNS (it binds every interface; discovery uses zeroconf), no UPnP, no
  bootstrap peers, no observed-address learning (a peer cannot make us advertise
  an address it saw), and no auto-connector: libp2p would otherwise redial every
  peer in its peerstore on its own schedule, behind the back of the per-peer
  outbox that owns reconnection and backoff.
* A dial is tried once. The caller (the outbox) owns retries and backoff; libp2p
  would retry three times and then refuse to dial that peer for 60 s.

Stream handlers receive a ``FederationStream``: a trio-style byte stream
(``receive_some``, ``send_all``, ``send_eof``, ``aclose``) that carries the peer id
Noise authenticated. No framing happens here (``wire.py`` frames).

Importing this module loads libp2p (~52 MB of RSS on top of the node's own
imports, ~0.5 s): only ``federation`` may import it, and the composition root
should import this module inside ``open_node``, as it does ``web.app``.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from functools import partial
from typing import cast

import multiaddr  # type: ignore[import-untyped]
import nacl.signing
import trio
from libp2p import new_host
from libp2p.abc import IHost, INetStream
from libp2p.crypto.ed25519 import Ed25519PrivateKey
from libp2p.crypto.keys import KeyPair
from libp2p.crypto.x25519 import create_new_key_pair as new_x25519_key_pair
from libp2p.custom_types import TProtocol
from libp2p.exceptions import BaseLibp2pError
from libp2p.host.exceptions import StreamFailure
from libp2p.network.config import ConnectionConfig, RetryConfig
from libp2p.network.stream.exceptions import StreamEOF
from libp2p.network.stream.net_stream import NetStream
from libp2p.peer.id import ID
from libp2p.peer.peerinfo import PeerInfo
from libp2p.security.noise.transport import PROTOCOL_ID as NOISE_PROTOCOL_ID
from libp2p.security.noise.transport import Transport as NoiseTransport
from libp2p.stream_muxer.yamux.yamux import PROTOCOL_ID as YAMUX_PROTOCOL_ID
from libp2p.stream_muxer.yamux.yamux import Yamux
from libp2p.transport.tcp.tcp import TCP

from federation.identity import peer_id_of, verify_key_of
from node.logs import get_logger

__all__ = [
    "DialError",
    "FederationHost",
    "FederationStream",
    "HostError",
    "ProtocolNotSupported",
    "StreamBroken",
    "StreamHandler",
    "open_host",
    "peer_id_of",
    "quiet_libp2p_logging",
    "verify_key_of",
]

log = get_logger("moot.federation.host")

# Closing a connection costs py-libp2p ~0.2 s (a fixed 100 ms sleep among it);
# past this bound the rest of the shutdown is left to cancellation.
CLOSE_TIMEOUT_S = 5.0
# How long the peerstore keeps an address given to ``connect``; the outbox passes
# the address again on every reconnect, so it only needs to outlive one dial.
ADDRESS_TTL_S = 600
DEFAULT_RECEIVE_BYTES = 64 * 1024
_DIAL_HOST_PROTOCOLS = ("ip4", "ip6", "dns", "dns4", "dns6")
STREAM_CLOSE_TIMEOUT_S = 1.0


# -- errors: libp2p's exceptions end here ---------------------------------------------


class HostError(Exception):
    """A federation transport failure; the message says which peer and why."""


class DialError(HostError):
    """The peer could not be reached, or it is not who its address said it is."""


class ProtocolNotSupported(HostError):
    """The peer is connected but would not open a stream for the protocol."""


class StreamBroken(HostError, trio.BrokenResourceError):
    """The stream was reset or its connection lost; nothing more can pass on it.

    Also a ``trio.BrokenResourceError``, as trio's stream contract asks, so code
    written against trio streams (and tested over ``trio.testing`` memory streams)
    handles it unchanged.
    """


# -- identity (peer ids are computed in identity.py, without libp2p) -------------------


def _key_pair(signing_key: nacl.signing.SigningKey) -> KeyPair:
    # libp2p's Ed25519 key wraps a PyNaCl SigningKey, so the node key is used as is.
    private = Ed25519PrivateKey(signing_key)
    return KeyPair(private, private.get_public_key())


# -- logging ---------------------------------------------------------------------------

# Loggers that report, at ERROR, what the caller already gets as an exception
# (DialError, ProtocolNotSupported, StreamBroken) or what is routine for a node
# (a peer hanging up mid-identify, a port scanner failing the handshake). At
# ERROR a peer that is down would log a multi-line error on every retry.
_DUPLICATE_LOGGERS = (
    "libp2p.transport",  # "Failed to open TCP stream" for each refused dial
    "libp2p.network.swarm",  # "failed to upgrade security" for each failed handshake
    "libp2p.network.connection",
    "libp2p.network.auto_connector",  # replaced by a no-op; sets its own level to INFO on import
    "libp2p.host.basic_host",  # a multi-line dump when a peer refuses a protocol
    "libp2p.protocol_muxer",
    "libp2p.stream_muxer",  # "Error in handle_incoming: ClosedResourceError" on every close
    "libp2p.identity",
)


# Loggers that warn about what other peers do wrong, which is routine on a DHT open
# to any libp2p implementation (a peer hanging up mid-query, a record our validator
# refuses, a store that failed): they only speak at ERROR.
_ROUTINE_WARNING_LOGGERS = (
    "libp2p.kad_dht",
    "libp2p.records",
)


def quiet_libp2p_logging() -> None:
    """Send libp2p's warnings through the node's handlers and silence its duplicate errors.

    On import libp2p detaches its logger tree (``propagate=False``, no handler),
    so its warnings reached stderr raw through ``logging.lastResort``; reattached,
    they come out in the node's format. The loggers in ``_DUPLICATE_LOGGERS`` only
    speak at CRITICAL, those in ``_ROUTINE_WARNING_LOGGERS`` at ERROR.
    ``LIBP2P_DEBUG`` set in the environment is libp2p's own debugging switch and
    is left alone. Idempotent.
    """
    if os.environ.get("LIBP2P_DEBUG"):
        return
    root = logging.getLogger("libp2p")
    root.propagate = True
    root.setLevel(logging.WARNING)
    for name in _DUPLICATE_LOGGERS:
        logging.getLogger(name).setLevel(logging.CRITICAL)
    for name in _ROUTINE_WARNING_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    # swarm_connection.py logs through the root logger itself; those lines
    # (debug, and warnings about closing already-broken connections) cannot be
    # told apart by logger name.


# -- streams ---------------------------------------------------------------------------


class FederationStream(trio.abc.HalfCloseableStream):
    """One libp2p stream as a trio byte stream, with the authenticated remote peer id.

    ``receive_some`` returns ``b""`` once the peer has closed its side;
    ``send_all`` and ``receive_some`` raise ``StreamBroken`` once the stream is
    reset or the connection is gone. Like trio's streams, one task may send while
    another receives, but two concurrent senders (or receivers) raise
    ``trio.BusyResourceError`` instead of interleaving their bytes.
    """

    def __init__(self, net_stream: INetStream) -> None:
        self._stream = net_stream
        # Noise proved the peer holds the key behind this id (plaintext is refused).
        self.remote_peer_id: str = str(net_stream.muxed_conn.peer_id)
        self.protocol: str = str(net_stream.get_protocol())
        self._closed = False
        self._sending = False
        self._receiving = False

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        """Up to ``max_bytes`` bytes (64 KiB if None), at least one; ``b""`` at EOF."""
        if max_bytes is None:
            max_bytes = DEFAULT_RECEIVE_BYTES
        if max_bytes < 1:
            raise ValueError("max_bytes must be at least 1")
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._receiving:
            raise trio.BusyResourceError("another task is receiving on this stream")
        self._receiving = True
        try:
            data = await self._stream.read(max_bytes)
        except StreamEOF:
            return b""
        except BaseLibp2pError as exc:
            raise StreamBroken(f"stream from {self.remote_peer_id} broken: {_reason(exc)}") from exc
        finally:
            self._receiving = False
        if self._closed:  # closed by another task while this one waited
            raise trio.ClosedResourceError("the stream was closed")
        return data

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        """Send every byte of ``data`` (Yamux splits it into 64 KiB frames and applies flow control).

        Batch frames into one call where possible: each call costs a Noise
        encryption and a socket write, ~0.3 ms of CPU however small.
        """
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._sending:
            raise trio.BusyResourceError("another task is sending on this stream")
        self._sending = True
        try:
            await self._stream.write(bytes(data))
        except BaseLibp2pError as exc:
            raise StreamBroken(f"stream to {self.remote_peer_id} broken: {_reason(exc)}") from exc
        finally:
            self._sending = False

    async def wait_send_all_might_not_block(self) -> None:
        # Yamux offers no readiness signal; send_all itself waits for window credit.
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        await trio.lowlevel.checkpoint()

    async def send_eof(self) -> None:
        """Close the sending side; the peer reads ``b""`` after the bytes already sent."""
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        try:
            # NetStream has close_write; the INetStream interface does not declare it.
            await cast(NetStream, self._stream).close_write()
        except BaseLibp2pError as exc:
            raise StreamBroken(f"stream to {self.remote_peer_id} broken: {_reason(exc)}") from exc

    async def aclose(self) -> None:
        """Close the stream: a FIN if it can be sent promptly, else a reset. Never raises."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        self._closed = True
        with trio.CancelScope(shield=True):
            # The FIN queues behind our unsent bytes: a peer that stopped reading
            # would hold it (and the caller, shielded) for ever.
            with trio.move_on_after(STREAM_CLOSE_TIMEOUT_S) as graceful:
                try:
                    await self._stream.close()
                    return
                except BaseLibp2pError:
                    pass
            if graceful.cancelled_caught:
                log.debug("federation.stream_close_timeout", peer=self.remote_peer_id)
            await self._stream.reset()

    async def reset(self) -> None:
        """Abort the stream: the peer's next read or write fails at once."""
        self._closed = True
        with trio.CancelScope(shield=True):
            await self._stream.reset()


StreamHandler = Callable[[FederationStream], Awaitable[None]]


async def _serve_stream(protocol: str, handler: StreamHandler, net_stream: INetStream) -> None:
    """Run one handler on an inbound stream, then release the stream whatever happened.

    libp2p runs handlers inside its connection service, where an escaping
    exception would take the whole host down with it. A stream that breaks
    (the peer vanished, the host is closing) is routine. Anything else that
    escapes is a bug on our side: logged with its traceback, and the stream reset.
    """
    stream = FederationStream(net_stream)
    try:
        await handler(stream)
    except StreamBroken as exc:
        log.debug("federation.stream_broken", protocol=protocol, peer=stream.remote_peer_id, reason=str(exc))
    except Exception:
        log.exception("federation.handler_failed", protocol=protocol, peer=stream.remote_peer_id)
        await stream.reset()
    finally:
        await stream.aclose()


# -- the host --------------------------------------------------------------------------


class FederationHost:
    """A running host, yielded by ``open_host``: who we are, where we listen, dialling."""

    def __init__(self, host: IHost) -> None:
        self._host = host
        self.peer_id: str = str(host.get_id())

    @property
    def libp2p(self) -> IHost:
        """The libp2p host itself, for the modules of ``federation`` that run a libp2p
        service on it (``dht.py``). Its types never leave ``federation``."""
        return self._host

    @property
    def addrs(self) -> list[str]:
        """Full multiaddrs that reach this host, each ending in ``/p2p/<peer id>``."""
        return [str(addr) for addr in self._host.get_addrs()]

    def is_connected(self, peer_id: str) -> bool:
        """Whether a connection to ``peer_id`` is open (either side may have dialled)."""
        return bool(self._host.get_network().get_connections(_peer(peer_id)))

    async def connect(self, address: str) -> str:
        """Connect to the node at ``address`` (which must end in ``/p2p/<peer id>``).

        Returns the peer id, which Noise has then proved. Reuses a live connection
        to that peer. Dials only ``address``, once: addresses the peerstore held
        for that peer before are forgotten, and a failed earlier dial does not
        block this one. Raises ValueError for a malformed address and DialError
        when the peer cannot be reached or holds a different key.
        """
        addr, peer = _parse_peer_address(address)
        if peer.to_base58() == self.peer_id:
            raise ValueError(f"{address} is this node's own address")
        network = self._host.get_network()
        if not network.get_connections(peer):
            peerstore = self._host.get_peerstore()
            peerstore.clear_addrs(peer)
            network.unblock_peer(peer)  # type: ignore[attr-defined]  # Swarm, not in INetworkService
            try:
                await self._host.connect(PeerInfo(peer, [addr]))
            except (BaseLibp2pError, OSError) as exc:
                raise DialError(f"cannot connect to {address}: {_reason(exc)}") from exc
        peerstore = self._host.get_peerstore()
        peerstore.add_addrs(peer, [addr], ADDRESS_TTL_S)
        return peer.to_base58()

    async def open_stream(self, peer_id: str, protocol: str) -> FederationStream:
        """Open a stream to ``peer_id`` for ``protocol`` on the connection to it.

        Without a live connection, libp2p dials the address last given to
        ``connect`` for that peer. Raises DialError when the peer cannot be
        reached, ProtocolNotSupported when it is connected but does not agree to
        the protocol (it refused, or did not answer within 10 s), and HostError
        for anything else.
        """
        peer = _peer(peer_id)
        network = self._host.get_network()
        network.unblock_peer(peer)  # type: ignore[attr-defined]  # Swarm, not in INetworkService
        try:
            net_stream = await self._host.new_stream(peer, [TProtocol(protocol)])
        except BaseLibp2pError as exc:
            if not network.get_connections(peer):
                raise DialError(f"cannot reach {peer_id} to open {protocol}: {_reason(exc)}") from exc
            if isinstance(exc, StreamFailure):  # multistream-select did not agree
                raise ProtocolNotSupported(f"{peer_id} did not agree to {protocol}: {_reason(exc)}") from exc
            raise HostError(f"cannot open {protocol} to {peer_id}: {_reason(exc)}") from exc
        return FederationStream(net_stream)

    async def disconnect(self, peer_id: str) -> None:
        """Close the connection to ``peer_id`` (its streams break); no-op if none."""
        await self._host.disconnect(_peer(peer_id))


def _peer(peer_id: str) -> ID:
    """libp2p's ID for a peer id string; ValueError unless it is an Ed25519 peer id."""
    verify_key_of(peer_id)
    return ID.from_base58(peer_id)


def _reason(exc: BaseException) -> str:
    """The messages down a libp2p exception's cause chain: the outermost alone says little."""
    reasons: list[str] = []
    seen: BaseException | None = exc
    while seen is not None and len(reasons) < 4:
        reasons.append(str(seen) or type(seen).__name__)
        seen = seen.__cause__
    return ": ".join(reasons)


def _parse_peer_address(address: str) -> tuple[multiaddr.Multiaddr, ID]:
    """Split ``/ip4/<ip>/tcp/<port>/p2p/<id>`` (or ip6, dns, dns4, dns6) into address and peer id."""
    try:
        full = multiaddr.Multiaddr(address)
        names = [proto.name for proto in full.protocols()]
        peer_id = str(full.value_for_protocol("p2p")) if names[-1:] == ["p2p"] else ""
    except Exception as exc:  # multiaddr raises several unrelated types
        raise ValueError(f"not a multiaddr: {address!r}") from exc
    if len(names) != 3 or names[0] not in _DIAL_HOST_PROTOCOLS or names[1:] != ["tcp", "p2p"]:
        raise ValueError(f"peer address must be /ip4|ip6|dns|dns4|dns6/<host>/tcp/<port>/p2p/<peer id>, not {address!r}")
    verify_key_of(peer_id)
    return full.decapsulate(multiaddr.Multiaddr(f"/p2p/{peer_id}")), ID.from_base58(peer_id)


def _parse_listen_address(address: str) -> tuple[multiaddr.Multiaddr, str, int]:
    """A TCP listen multiaddr (``/ip4/<ip>/tcp/<port>`` or ``/ip6/...``) and its host and port."""
    try:
        addr = multiaddr.Multiaddr(address)
        names = [proto.name for proto in addr.protocols()]
    except Exception as exc:
        raise ValueError(f"not a multiaddr: {address!r}") from exc
    if names not in (["ip4", "tcp"], ["ip6", "tcp"]):
        raise ValueError(f"listen address must be /ip4/<ip>/tcp/<port> or /ip6/<ip>/tcp/<port>, not {address!r}")
    host = str(addr.value_for_protocol(names[0]))
    port = int(str(addr.value_for_protocol("tcp")))
    return addr, host, port


def _check_port_free(host: str, port: int) -> None:
    """Raise OSError(EADDRINUSE) if something already listens on ``host:port``.

    libp2p binds its listeners with SO_REUSEPORT, so listening on a port another
    process already holds "works": the kernel then splits incoming connections
    between the two. A probe bound without SO_REUSEPORT fails in that case.
    """
    if port == 0:
        return
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no conflict
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"cannot listen on {host} port {port}: {exc.strerror}") from None


def _build_host(signing_key: nacl.signing.SigningKey) -> IHost:
    key_pair = _key_pair(signing_key)
    host = new_host(
        key_pair=key_pair,
        sec_opt={NOISE_PROTOCOL_ID: NoiseTransport(key_pair, noise_privkey=new_x25519_key_pair().private_key)},
        muxer_opt={TProtocol(YAMUX_PROTOCOL_ID): Yamux},
        transports=[TCP()],
        connection_config=ConnectionConfig(max_connections_per_peer=1),
        enable_mDNS=False,
        enable_upnp=False,
        bootstrap=None,
        disable_identify_address_discovery=True,
    )
    swarm = host.get_network()
    # Public attributes of the Swarm, not part of new_host's parameters.
    swarm.retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]
    swarm.auto_connector.maybe_connect = _no_auto_connect  # type: ignore[attr-defined]
    return host


async def _no_auto_connect() -> None:
    """Replaces libp2p's auto-connector: the per-peer outbox decides when to dial."""


@asynccontextmanager
async def open_host(
    signing_key: nacl.signing.SigningKey,
    listen: Sequence[str],
    *,
    protocols: Mapping[str, StreamHandler],
) -> AsyncIterator[FederationHost]:
    """Run a libp2p host under ``signing_key``, listening on ``listen``, until the block exits.

    ``listen`` holds TCP multiaddrs (``/ip4/127.0.0.1/tcp/0`` picks a free port);
    ``protocols`` maps protocol ids to handlers, which run once per inbound stream
    and whose stream is closed when they return. Yields once every address is
    listening. Raises ValueError for a listen address that is not TCP and OSError
    when one cannot be bound (including a port another process listens on).

    On exit (normal, exception or cancellation) the host is closed: connections,
    then listeners, so the ports refuse connections afterwards.
    """
    parsed = [_parse_listen_address(address) for address in listen]
    if not parsed:
        raise ValueError("open_host needs at least one listen address")
    for _, host_ip, port in parsed:
        _check_port_free(host_ip, port)
    quiet_libp2p_logging()
    host = _build_host(signing_key)
    for protocol, handler in protocols.items():
        host.set_stream_handler(TProtocol(protocol), partial(_serve_stream, protocol, handler))
    only_error: BaseException | None = None
    try:
        async with host.run(listen_addrs=[]):
            try:
                network = host.get_network()
                for addr, _, _ in parsed:
                    # Swarm.listen reports failure as False, with the reason only in a debug log.
                    if not await network.listen(addr):
                        raise OSError(errno.EADDRNOTAVAIL, f"cannot listen on {addr}")
                federation_host = FederationHost(host)
                log.info("federation.listening", peer=federation_host.peer_id, addrs=" ".join(federation_host.addrs))
                yield federation_host
            finally:
                with trio.CancelScope(shield=True):
                    await _close_host(host)
    except BaseExceptionGroup as group:
        # libp2p's two nurseries wrap whatever the block raised; the caller should
        # see its own exception (or a lone Cancelled), not a group two levels deep.
        only_error = _only_exception(group)
        if only_error is None:
            raise
    if only_error is not None:
        raise only_error  # outside the except clause, so it is not chained to the group


async def _close_host(host: IHost) -> None:
    """Stop accepting, close every connection, then close the host; bounded in time.

    Must run inside ``host.run()``: leaving run() does not stop the TCP listener
    (a trio system task), only close() does. libp2p's close() takes ~0.2 s per
    connection, one after another (30 peers: 6 s), and closes the listeners only
    after them; so listeners go first here, then the connections all at once.
    """
    swarm = host.get_network()
    with trio.move_on_after(CLOSE_TIMEOUT_S) as bounded:
        for listener in list(swarm.listeners.values()):
            await listener.close()
        async with trio.open_nursery() as nursery:
            for peer in list(swarm.connections):
                nursery.start_soon(swarm.close_peer, peer)
        await host.close()
    if bounded.cancelled_caught:
        log.warning("federation.close_timeout", seconds=CLOSE_TIMEOUT_S)


def _only_exception(group: BaseExceptionGroup[BaseException]) -> BaseException | None:
    """The single exception inside nested groups, or None if there are several."""
    leaves: list[BaseException] = []
    pending: list[BaseException] = [group]
    while pending and len(leaves) < 2:
        exc = pending.pop()
        if isinstance(exc, BaseExceptionGroup):
            pending.extend(exc.exceptions)
        else:
            leaves.append(exc)
    return leaves[0] if len(leaves) == 1 and not pending else None
