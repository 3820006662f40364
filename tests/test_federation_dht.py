"""Nodes that find each other through the Kademlia DHT, and names two nodes claim.

Every node runs on loopback with mDNS off and no static peers: the only thing a
node is told is one DHT bootstrap peer.
"""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import nacl.signing
import trio
from click.testing import CliRunner

from cli.client import ClientError, IncomingMessage, MootClient, ReceiptEvent
from cli.main import main
from federation import records
from federation.host import peer_id_of
from federation.mdns import adapter_ips
from federation.service import FederationService
from node.admin import admin_call
from tests.nodes import NodeProcess, federating, new_user, next_of, running_node, until

LOOPBACK = "/ip4/127.0.0.1/tcp/0"


def dht_node(tmp_path: Path, name: str, *bootstrap: str) -> tuple[NodeProcess, str]:
    """A node process joining the DHT through ``bootstrap``; returns it and its address."""
    return federating(tmp_path / name, name, bootstrap=bootstrap)


async def peers_of(node: NodeProcess) -> dict[str, dict[str, Any]]:
    return {p["node"]: p for p in await admin_call(node.data_dir / "admin.sock", "peers.list", None)}


async def test_three_node_processes_find_each_other_only_through_the_dht(tmp_path):
    hub, hub_address = dht_node(tmp_path, "hub")
    riverside, _ = dht_node(tmp_path, "riverside", hub_address)
    hilltop, _ = dht_node(tmp_path, "hilltop", hub_address)
    clients: list[MootClient] = []
    started: list[NodeProcess] = []
    try:
        for node in (hub, riverside, hilltop):
            node.start()
            started.append(node)
        alice = await new_user(riverside.base_url, "alice")
        bob = await new_user(hilltop.base_url, "bob")
        clients += [alice, bob]
        assert await peers_of(riverside) == {}  # riverside knows no one, not even the hub by name
        # riverside looks hilltop up in the DHT (hilltop published its record when it joined)
        [bob_device] = await until(lambda: alice.user_devices("bob@hilltop"), 30, "riverside to find hilltop in the DHT")
        assert bob_device["device"] == bob.device
        found = (await peers_of(riverside))["hilltop"]
        assert found["found_by"] == "dht" and found["conflict"] is None
        async with alice.connect() as la, bob.connect() as lb:
            mid = await la.send_text("bob@hilltop", "found you through the hub")
            got = await next_of(lb, IncomingMessage, id=mid, timeout=30)
            assert got.text == "found you through the hub" and got.sender == "alice@riverside"
            await next_of(la, ReceiptEvent, id=mid, kind="delivered", timeout=30)
            await lb.mark_read("alice@riverside", mid)
            await next_of(la, ReceiptEvent, id=mid, kind="read", timeout=30)
        # hilltop met riverside when it connected to deliver, and the hub stayed a router
        assert (await peers_of(hilltop))["riverside"]["found_by"] == "inbound"
        assert await peers_of(hub) == {}
    finally:
        for client in clients:
            await client.aclose()
        for node in started:
            node.stop()


async def test_an_unknown_name_is_a_clear_error_after_the_dht_is_asked(tmp_path):
    async with running_node(tmp_path / "hub", node_name="hub", federation_listen=LOOPBACK) as hub:
        bootstrap = (hub.federation.host.addrs[0],)
        async with running_node(
            tmp_path / "riverside", node_name="riverside", federation_listen=LOOPBACK, federation_bootstrap=bootstrap
        ) as riverside:
            alice = await new_user(riverside.web_url, "alice")
            with trio.fail_after(10):
                try:
                    await alice.user_devices("carol@meadow")
                    raise AssertionError("meadow does not exist")
                except ClientError as err:
                    assert err.code == "unknown_node" and "meadow" in err.message and "DHT" in err.message
            await alice.aclose()


async def conflict_on(node: Any, name: str) -> str | None:
    record = await node.federation.repo.node(name)
    return record.conflict if record is not None else None


async def test_a_name_two_nodes_claim_stays_with_the_node_seen_first(tmp_path):
    async with running_node(tmp_path / "hub", node_name="hub", federation_listen=LOOPBACK) as hub:
        joining = {"federation_listen": LOOPBACK, "federation_bootstrap": (hub.federation.host.addrs[0],)}
        async with running_node(tmp_path / "riverside", node_name="riverside", **joining) as riverside, trio.open_nursery() as nursery:
            stop_first, first_stopped = trio.Event(), trio.Event()

            async def run_first(task_status: trio.TaskStatus[Any]) -> None:
                async with running_node(tmp_path / "twin-1", node_name="twin", **joining) as node:
                    task_status.started(node)
                    await stop_first.wait()
                first_stopped.set()

            first = await nursery.start(run_first)
            alice = await new_user(riverside.web_url, "alice")
            bob = await new_user(first.web_url, "bob")
            [device] = await until(lambda: alice.user_devices("bob@twin"), 15, "riverside to find twin in the DHT")
            assert device["device"] == bob.device
            pinned = first.federation.host.peer_id
            assert (await riverside.federation.repo.node("twin")).peer_id == pinned

            # a second node takes the same name and publishes a newer record for it
            async with running_node(tmp_path / "twin-2", node_name="twin", **joining) as second:
                impostor = await new_user(second.web_url, "bob")
                impostor_peer = second.federation.host.peer_id
                conflict = await until(lambda: conflict_on(riverside, "twin"), 15, "riverside to notice the second claim")
                assert impostor_peer in conflict
                claims = await riverside.federation.dht.lookup("twin")
                assert impostor_peer in {c.peer_id for c in claims}  # the network holds both claims...
                assert await riverside.federation.find_in_dht("twin")  # ...and resolution keeps to the first
                [device] = await alice.user_devices("bob@twin")
                assert device["device"] == bob.device != impostor.device

                # the first node goes away: the second's record is still refused
                stop_first.set()
                with trio.fail_after(15):
                    await first_stopped.wait()
                await riverside.federation.find_in_dht("twin")
                known = await riverside.federation.repo.node("twin")
                assert known.peer_id == pinned and not any(impostor_peer in addr for addr in known.addrs)
                # (what twin's bob had is all riverside can say now; the impostor's bob is never asked)
                [device] = await alice.user_devices("bob@twin")
                assert device["device"] == bob.device
                assert await second.federation.repo.node("riverside") is None  # nothing ever went to the impostor

                # the operator sees it...
                [listed] = [p for p in await admin_call(riverside.config.admin_socket, "peers.list", None) if p["node"] == "twin"]
                assert listed["peer_id"] == pinned and impostor_peer in listed["conflict"] and "peers pin" in listed["conflict"]
                result = await trio.to_thread.run_sync(
                    lambda: CliRunner().invoke(main, ["--data-dir", str(riverside.config.data_dir), "peers", "list"])
                )
                assert result.exit_code == 0 and "twin" in result.stdout and impostor_peer in result.stderr
                # ...and reaches the other claimant by its peer id, giving it the name
                address = second.federation.host.addrs[0]
                assert address.endswith(f"/p2p/{impostor_peer}")
                result = await trio.to_thread.run_sync(
                    lambda: CliRunner().invoke(main, ["--data-dir", str(riverside.config.data_dir), "peers", "pin", address])
                )
                assert result.exit_code == 0, result.output
                assert f"twin is now {impostor_peer} (was {pinned})" in result.stdout
                [device] = await alice.user_devices("bob@twin")
                assert device["device"] == impostor.device
                known = await riverside.federation.repo.node("twin")
                assert known.peer_id == impostor_peer and pinned in known.conflict
                async with alice.connect() as la, impostor.connect() as li:
                    mid = await la.send_text("bob@twin", "the operator chose you")
                    assert (await next_of(li, IncomingMessage, id=mid, timeout=20)).text == "the operator chose you"
                    await next_of(la, ReceiptEvent, id=mid, kind="delivered", timeout=20)

            for client in (alice, bob, impostor):
                await client.aclose()


async def test_a_plain_libp2p_kademlia_peer_routes_to_moot_nodes_and_reads_their_records(tmp_path):
    # libp2p's defaults and its stock KadDHT, in client mode, with no Moot code at all
    from libp2p import new_host
    from libp2p.kad_dht.kad_dht import DHTMode, KadDHT
    from libp2p.peer.id import ID
    from libp2p.peer.peerinfo import info_from_p2p_addr
    from libp2p.tools.anyio_service import background_trio_service
    from multiaddr import Multiaddr

    async with running_node(tmp_path / "hub", node_name="hub", federation_listen=LOOPBACK) as hub:
        joining = {"federation_listen": LOOPBACK, "federation_bootstrap": (hub.federation.host.addrs[0],)}
        async with running_node(tmp_path / "riverside", node_name="riverside", **joining) as riverside:
            with trio.fail_after(15):  # published again once its web server listened
                while hub.federation.dht.peers == 0 or not getattr(riverside.federation.dht.published, "web", ""):
                    await trio.sleep(0.05)
            riverside_peer, riverside_addrs = riverside.federation.host.peer_id, riverside.federation.host.addrs
            riverside_web = riverside.web_url
            outsider = new_host()
            async with outsider.run([Multiaddr("/ip4/127.0.0.1/tcp/0")]):
                try:
                    dht = KadDHT(outsider, DHTMode.CLIENT)
                    async with background_trio_service(dht):
                        with trio.fail_after(15):
                            entry = info_from_p2p_addr(Multiaddr(hub.federation.host.addrs[0]))
                            await outsider.connect(entry)
                            assert await dht.add_peer(entry.peer_id)
                            value = await dht.get_value("/moot/node/riverside")  # stored at the hub
                            found = await dht.find_peer(ID.from_base58(riverside_peer))
                finally:
                    await outsider.close()
    assert value is not None
    record = records.open_record("/moot/node/riverside", value, int(time.time() * 1000))
    assert record.peer_id == riverside_peer and record.addrs == riverside_addrs and record.web == riverside_web
    assert found is not None and [str(a) for a in found.addrs] == riverside_addrs


def test_a_node_on_every_interface_publishes_the_addresses_others_can_dial():
    peer = peer_id_of(nacl.signing.SigningKey(bytes(32)))
    listening = SimpleNamespace(peer_id=peer, addrs=[f"/ip4/0.0.0.0/tcp/8471/p2p/{peer}"])
    published = FederationService._published_addrs(listening)  # type: ignore[arg-type]
    ips = [ip for ip in adapter_ips() if ":" not in ip]
    assert published and len(published) <= records.MAX_ADDRS
    assert all(a.startswith("/ip4/") and a.endswith(f"/tcp/8471/p2p/{peer}") and "/0.0.0.0/" not in a for a in published)
    if any(not ip.startswith("127.") for ip in ips):  # loopback would send other nodes to themselves
        assert not any(a.startswith("/ip4/127.") for a in published)
    on_loopback = SimpleNamespace(peer_id=peer, addrs=[f"/ip4/127.0.0.1/tcp/8471/p2p/{peer}"])
    assert FederationService._published_addrs(on_loopback) == on_loopback.addrs  # type: ignore[arg-type]


async def test_a_node_back_under_a_new_address_is_found_through_its_republished_record(tmp_path):
    """riverside waits out a long backoff for hilltop; hilltop returns on another port
    and republishes its record: that alone wakes riverside's sender."""
    async with running_node(
        tmp_path / "riverside", node_name="riverside", federation_listen=LOOPBACK,
        federation_backoff_initial_s=120.0, federation_backoff_max_s=300.0,
    ) as riverside:
        joining = {"federation_listen": LOOPBACK, "federation_bootstrap": (riverside.federation.host.addrs[0],)}
        alice = await new_user(riverside.web_url, "alice")
        async with running_node(tmp_path / "hilltop", node_name="hilltop", **joining) as hilltop:
            bob = await new_user(hilltop.web_url, "bob")
            bob.save(tmp_path / "bob.json")
            await bob.aclose()
            old_addrs = hilltop.federation.host.addrs
            await until(lambda: alice.user_devices("bob@hilltop"), 20, "riverside to find hilltop in the DHT")
        # hilltop is gone: a message for bob waits, and the sender backs off for a minute or more
        async with alice.connect() as la:
            mid = await la.send_text("bob@hilltop", "are you back?")
            # (the first attempt takes a few seconds: libp2p still holds the dead
            # connection until opening a stream on it times out)
            with trio.fail_after(20):
                while riverside.federation.status("hilltop")["retry_in_s"] is None:
                    await trio.sleep(0.02)
            assert riverside.federation.status("hilltop")["retry_in_s"] > 30
        async with running_node(tmp_path / "hilltop", node_name="hilltop", **joining) as hilltop:
            assert hilltop.federation.host.addrs != old_addrs  # a new port
            bob = MootClient.load(tmp_path / "bob.json")
            bob.base_url = hilltop.web_url  # the same device, on the restarted node
            async with bob.connect() as lb:
                got = await next_of(lb, IncomingMessage, id=mid, timeout=20)  # well before the backoff ends
                assert got.text == "are you back?"
            await bob.aclose()
        await alice.aclose()
