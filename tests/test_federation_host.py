"""The node's libp2p host over real sockets on loopback: identity, streams, shutdown, hostile dialers."""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import sys
from pathlib import Path

import nacl.signing
import psutil  # type: ignore[import-untyped]
import pytest
import trio
import trio.testing

from federation.host import (
    DialError,
    FederationStream,
    ProtocolNotSupported,
    StreamBroken,
    open_host,
    peer_id_of,
    verify_key_of,
)
from node.app import load_or_create_key

REPO = Path(__file__).resolve().parent.parent
PROTOCOL = "/moot/federation/1"
LOOPBACK = ["/ip4/127.0.0.1/tcp/0"]
# Every wait in these tests is bounded by this; each step takes milliseconds.
STEP_S = 10


def new_key() -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey.generate()


def port_of(address: str) -> int:
    parts = address.split("/")
    return int(parts[parts.index("tcp") + 1])


def unused_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def assert_refused(port: int) -> None:
    """Nothing accepts on ``port``: the kernel refuses the connection at once."""
    with trio.fail_after(STEP_S), pytest.raises(OSError):
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        await stream.aclose()


async def echo(stream: FederationStream) -> None:
    while data := await stream.receive_some():
        await stream.send_all(data)


# -- identity ----------------------------------------------------------------------------


async def test_peer_id_is_stable_across_restarts_with_the_same_key_file(tmp_path: Path) -> None:
    key_file = tmp_path / "node.key"
    key = load_or_create_key(key_file)
    with trio.fail_after(STEP_S):
        async with open_host(key, LOOPBACK, protocols={}) as host:
            first = host.peer_id
            assert host.addrs and all(addr.endswith(f"/p2p/{first}") for addr in host.addrs)
        reloaded = load_or_create_key(key_file)
        async with open_host(reloaded, LOOPBACK, protocols={}) as host:
            assert host.peer_id == first
    assert first == peer_id_of(key) and first.startswith("12D3KooW")
    assert verify_key_of(first) == bytes(key.verify_key)


def test_peer_id_of_agrees_with_libp2p() -> None:
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.peer.id import ID

    for _ in range(20):
        key = new_key()
        libp2p_id = ID.from_pubkey(Ed25519PrivateKey(key).get_public_key())
        assert peer_id_of(key) == libp2p_id.to_base58()
        extracted = ID.from_base58(peer_id_of(key)).extract_public_key()
        assert extracted is not None and extracted.to_bytes() == bytes(key.verify_key)


def _b58(data: bytes) -> str:
    alphabet = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
    number, out = int.from_bytes(data, "big"), ""
    while number:
        number, digit = divmod(number, 58)
        out = alphabet[digit] + out
    return "1" * (len(data) - len(data.lstrip(b"\0"))) + out


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "not a peer id",
        "12D3KooW0OIl",  # 0, O, I and l are not base58
        peer_id_of(nacl.signing.SigningKey(bytes(32)))[:-1],  # truncated
        _b58(bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20]) + bytes(32) + b"\x01"),  # trailing byte
        _b58(bytes([0x12, 0x20]) + bytes(32)),  # "Qm...": SHA-256 of an RSA key, no key inside
        _b58(bytes([0x00, 0x25, 0x08, 0x02, 0x12, 0x21]) + bytes(33)),  # secp256k1 key
        "1" * 10_000,  # long input is refused before decoding
    ],
)
def test_verify_key_of_rejects_malformed_and_non_ed25519_ids(bad: str) -> None:
    with pytest.raises(ValueError):
        verify_key_of(bad)


def test_verify_key_of_rejects_non_strings() -> None:
    with pytest.raises(ValueError):
        verify_key_of(b"12D3KooW")  # type: ignore[arg-type]


# -- streams -----------------------------------------------------------------------------


async def test_echo_between_two_hosts_with_authenticated_peer_ids() -> None:
    seen_by_b: list[tuple[str, str]] = []

    async def recording_echo(stream: FederationStream) -> None:
        seen_by_b.append((stream.remote_peer_id, stream.protocol))
        await echo(stream)

    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={}) as a, open_host(
            new_key(), LOOPBACK, protocols={PROTOCOL: recording_echo}
        ) as b:
            assert await a.connect(b.addrs[0]) == b.peer_id
            assert a.is_connected(b.peer_id)
            # Connecting again reuses the connection.
            assert await a.connect(b.addrs[0]) == b.peer_id
            stream = await a.open_stream(b.peer_id, PROTOCOL)
            assert stream.remote_peer_id == b.peer_id
            await stream.send_all(b"hello, ")
            await stream.send_all(bytearray(b"riverside"))
            await stream.send_eof()  # the handler's loop ends, it returns, B closes its side
            received = b""
            while chunk := await stream.receive_some():
                received += chunk
            assert received == b"hello, riverside"
            await stream.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await stream.send_all(b"late")
    assert seen_by_b == [(a.peer_id, PROTOCOL)]


async def test_ten_thousand_frames_batched_a_hundred_per_write_arrive_in_order() -> None:
    frame = struct.Struct(">I12s")  # fixed-size frames: the test needs no length prefix
    count, per_write = 10_000, 100
    done: trio.MemorySendChannel[bytes]
    done, received = trio.open_memory_channel[bytes](1)

    async def collect(stream: FederationStream) -> None:
        chunks = []
        while chunk := await stream.receive_some():
            chunks.append(chunk)
        await done.send(b"".join(chunks))

    with trio.fail_after(STEP_S * 3):
        async with open_host(new_key(), LOOPBACK, protocols={}) as a, open_host(
            new_key(), LOOPBACK, protocols={PROTOCOL: collect}
        ) as b:
            await a.connect(b.addrs[0])
            stream = await a.open_stream(b.peer_id, PROTOCOL)
            for start in range(0, count, per_write):
                await stream.send_all(b"".join(frame.pack(i, b"message %04d" % (i % 10_000)) for i in range(start, start + per_write)))
            await stream.send_eof()
            data = await received.receive()
            await stream.aclose()
    assert len(data) == count * frame.size
    frames = [frame.unpack_from(data, offset) for offset in range(0, len(data), frame.size)]
    assert frames == [(i, b"message %04d" % i) for i in range(count)]


async def test_unknown_protocol_is_refused_and_the_connection_stays_usable() -> None:
    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={}) as a, open_host(
            new_key(), LOOPBACK, protocols={PROTOCOL: echo}
        ) as b:
            await a.connect(b.addrs[0])
            with pytest.raises(ProtocolNotSupported):
                await a.open_stream(b.peer_id, "/moot/unknown/1")
            stream = await a.open_stream(b.peer_id, PROTOCOL)
            await stream.send_all(b"still here")
            assert await stream.receive_some() == b"still here"
            await stream.aclose()


async def test_a_failing_handler_resets_its_stream_and_the_host_keeps_serving(caplog: pytest.LogCaptureFixture) -> None:
    # Unwrapped, an exception from a libp2p stream handler cancels the whole host.
    async def buggy(stream: FederationStream) -> None:
        if await stream.receive_some() == b"crash":
            raise RuntimeError("bug in a handler")
        await echo(stream)

    with trio.fail_after(STEP_S), caplog.at_level(logging.ERROR, logger="moot.federation.host"):
        async with open_host(new_key(), LOOPBACK, protocols={}) as a, open_host(
            new_key(), LOOPBACK, protocols={PROTOCOL: buggy}
        ) as b:
            await a.connect(b.addrs[0])
            doomed = await a.open_stream(b.peer_id, PROTOCOL)
            await doomed.send_all(b"crash")
            try:
                assert await doomed.receive_some() == b""
            except StreamBroken:
                pass  # a reset may surface as either, depending on timing
            await doomed.aclose()
            healthy = await a.open_stream(b.peer_id, PROTOCOL)
            await healthy.send_all(b"fine")
            await healthy.send_all(b"again")
            received = b""
            while len(received) < len(b"again"):
                received += await healthy.receive_some()
            assert received == b"again"
            await healthy.aclose()
    assert any(r.getMessage() == "federation.handler_failed" for r in caplog.records)


async def test_closing_a_host_breaks_the_streams_of_its_peers() -> None:
    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={}) as a:
            async with open_host(new_key(), LOOPBACK, protocols={PROTOCOL: echo}) as b:
                await a.connect(b.addrs[0])
                stream = await a.open_stream(b.peer_id, PROTOCOL)
                await stream.send_all(b"ping")
                assert await stream.receive_some() == b"ping"
            try:
                assert await stream.receive_some() == b""
            except StreamBroken:
                pass
            await stream.aclose()


# -- shutdown: the listening port is released whatever ends the block -------------------------


async def test_the_port_refuses_connections_after_the_block_exits() -> None:
    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={PROTOCOL: echo}) as host:
            port = port_of(host.addrs[0])
            stream = await trio.open_tcp_stream("127.0.0.1", port)  # accepting while open
            await stream.aclose()
    await assert_refused(port)


async def test_the_port_is_released_when_the_body_raises() -> None:
    class Boom(Exception):
        pass

    port = 0
    with trio.fail_after(STEP_S), pytest.raises(Boom):
        async with open_host(new_key(), LOOPBACK, protocols={}) as host:
            port = port_of(host.addrs[0])
            raise Boom
    await assert_refused(port)


async def test_the_port_is_released_when_the_body_is_cancelled() -> None:
    port = 0
    with trio.fail_after(STEP_S), trio.CancelScope() as scope:
        async with open_host(new_key(), LOOPBACK, protocols={}) as host:
            port = port_of(host.addrs[0])
            scope.cancel()
            await trio.sleep_forever()
    assert scope.cancelled_caught
    await assert_refused(port)


async def test_a_port_in_use_is_an_error_not_a_shared_listener() -> None:
    # libp2p binds with SO_REUSEPORT: without the check the second host would
    # silently receive half of the first one's connections.
    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={}) as first:
            with pytest.raises(OSError):
                async with open_host(new_key(), [f"/ip4/127.0.0.1/tcp/{port_of(first.addrs[0])}"], protocols={}):
                    pass


async def test_a_fixed_port_can_be_reused_right_after_a_restart() -> None:
    port = unused_port()
    key = new_key()
    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={}) as a:
            async with open_host(key, [f"/ip4/127.0.0.1/tcp/{port}"], protocols={PROTOCOL: echo}) as b:
                await a.connect(b.addrs[0])
                stream = await a.open_stream(b.peer_id, PROTOCOL)
                await stream.send_all(b"traffic")
                assert await stream.receive_some() == b"traffic"
            # B closed first, so its side of that connection sits in TIME_WAIT on
            # the port: no conflict for a node restarting on its configured port.
            async with open_host(key, [f"/ip4/127.0.0.1/tcp/{port}"], protocols={}) as again:
                assert port_of(again.addrs[0]) == port


# -- dialling ------------------------------------------------------------------------------


async def test_a_refused_dial_fails_at_once_and_does_not_block_the_next_one() -> None:
    # py-libp2p by default retries a refused dial three times (~0.7 s), then refuses
    # to dial that peer for 60 s: a node that comes back would stay unreachable.
    key_b, port = new_key(), unused_port()
    address = f"/ip4/127.0.0.1/tcp/{port}/p2p/{peer_id_of(key_b)}"
    async with open_host(new_key(), LOOPBACK, protocols={}) as a:
        with trio.fail_after(0.5), pytest.raises(DialError):
            await a.connect(address)
        async with open_host(key_b, [f"/ip4/127.0.0.1/tcp/{port}"], protocols={}) as b:
            with trio.fail_after(STEP_S):
                assert await a.connect(address) == b.peer_id


async def test_an_address_whose_node_holds_another_key_is_refused() -> None:
    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={}) as a, open_host(new_key(), LOOPBACK, protocols={}) as b:
            impostor = b.addrs[0].rsplit("/p2p/", 1)[0] + f"/p2p/{peer_id_of(new_key())}"
            with pytest.raises(DialError):
                await a.connect(impostor)
            assert not a.is_connected(b.peer_id)


async def test_malformed_addresses_are_value_errors() -> None:
    with pytest.raises(ValueError):
        async with open_host(new_key(), ["/ip4/127.0.0.1/udp/0/quic-v1"], protocols={}):
            pass
    with pytest.raises(ValueError):
        async with open_host(new_key(), [], protocols={}):
            pass
    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={}) as a:
            for bad in (
                "nonsense",
                "/ip4/127.0.0.1/tcp/1",  # no peer id: nothing for Noise to check
                f"/ip4/127.0.0.1/tcp/1/p2p/{peer_id_of(new_key())}/tcp/2",
                "/ip4/127.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",  # not Ed25519
                a.addrs[0],  # ourselves
            ):
                with pytest.raises(ValueError):
                    await a.connect(bad)
            with pytest.raises(ValueError):
                await a.open_stream("not a peer id", PROTOCOL)


async def test_a_plaintext_dialer_claiming_another_nodes_key_is_refused() -> None:
    # py-libp2p's new_host accepts /plaintext/2.0.0, where a dialer only *claims* a
    # public key: knowing Alice's public key is enough to be "Alice" to its handlers.
    from libp2p import new_host
    from libp2p.crypto.ed25519 import Ed25519PrivateKey
    from libp2p.crypto.keys import KeyPair, PublicKey
    from libp2p.custom_types import TProtocol
    from libp2p.network.config import ConnectionConfig, RetryConfig
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.security.insecure.transport import PLAINTEXT_PROTOCOL_ID, InsecureTransport
    from multiaddr import Multiaddr  # type: ignore[import-untyped]

    class ClaimedKey(Ed25519PrivateKey):
        """Holds only somebody else's public key."""

        def __init__(self, public: PublicKey) -> None:
            self._public = public

        def get_public_key(self) -> PublicKey:
            return self._public

        def sign(self, data: bytes) -> bytes:
            return bytes(64)

    alice = new_key()
    alice_public = Ed25519PrivateKey(alice).get_public_key()
    claimed = KeyPair(ClaimedKey(alice_public), alice_public)
    mallory = new_host(
        key_pair=claimed,
        sec_opt={TProtocol(PLAINTEXT_PROTOCOL_ID): InsecureTransport(claimed)},
        connection_config=ConnectionConfig(max_connections_per_peer=1),
    )
    mallory.get_network().retry_config = RetryConfig(max_retries=0)  # type: ignore[attr-defined]
    seen: list[str] = []

    async def record(stream: FederationStream) -> None:
        seen.append(stream.remote_peer_id)

    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={PROTOCOL: record}) as victim:
            async with mallory.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                try:
                    with pytest.raises(Exception):
                        await mallory.connect(info_from_p2p_addr(Multiaddr(victim.addrs[0])))
                finally:
                    await mallory.close()
            assert not victim.is_connected(peer_id_of(alice))
    assert seen == []


# -- what a host does not do ---------------------------------------------------------------


async def test_a_host_opens_only_its_loopback_listener() -> None:
    # No mDNS, UPnP or bootstrap: no UDP socket and nothing bound beyond loopback.
    process = psutil.Process()
    before = {c.laddr for c in process.net_connections(kind="inet")}
    with trio.fail_after(STEP_S):
        async with open_host(new_key(), LOOPBACK, protocols={}) as host:
            await trio.testing.wait_all_tasks_blocked()
            opened = [c for c in process.net_connections(kind="inet") if c.laddr not in before]
            assert [(c.type, c.status, c.laddr.ip, c.laddr.port) for c in opened] == [
                (socket.SOCK_STREAM, psutil.CONN_LISTEN, "127.0.0.1", port_of(host.addrs[0]))
            ]


def test_the_node_package_does_not_load_libp2p() -> None:
    # libp2p costs ~58 MB of RSS; only federation/ may import it.
    code = "import sys, json; import node.app, node.config; print(json.dumps('libp2p' in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert json.loads(out) is False
