"""Nodes that find each other by mDNS alone: three node processes, zeroconf bound to
loopback, no static peers; their users then chat across all three with receipts.
A node that comes back elsewhere is found again. And the options, and which
interfaces mDNS runs on.

Node names get a random suffix: another test run on this machine announces on the
same loopback interface, and its nodes must not be mistaken for ours.
"""

from __future__ import annotations

import json
import secrets
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from itertools import permutations
from pathlib import Path
from typing import Any

import pytest
import trio

from cli.client import IncomingMessage, MootClient, ReceiptEvent
from federation.mdns import choose_interfaces
from node.config import ConfigError, load_config
from tests.nodes import REPO, NodeProcess, federating, free_port, new_user, next_of, until

DISCOVERY_TIMEOUT_S = 30


# -- where mDNS runs, and its options ----------------------------------------------------


def test_mdns_runs_on_the_configured_interfaces_or_where_federation_listens():
    adapters = ["127.0.0.1", "192.0.2.2", "fd00::2", "fe80::fc:ff:fe00:1%eth0", "::1", "169.254.1.1"]
    assert choose_interfaces(["127.0.0.1"], "/ip4/0.0.0.0/tcp/1", adapters) == ["127.0.0.1"]
    assert choose_interfaces([], "/ip4/127.0.0.1/tcp/1", adapters) == ["127.0.0.1"]
    assert choose_interfaces([], "/ip4/0.0.0.0/tcp/1", adapters) == ["192.0.2.2"]
    assert choose_interfaces([], "/ip6/::/tcp/1", adapters) == ["fd00::2"]
    assert choose_interfaces([], "/ip4/0.0.0.0/tcp/1", ["127.0.0.1"]) == ["127.0.0.1"]
    with pytest.raises(ValueError):
        choose_interfaces(["eth0"], "/ip4/0.0.0.0/tcp/1", adapters)


def test_mdns_options_from_the_environment_and_the_file(tmp_path):
    assert load_config(tmp_path, environ={}).mdns is True
    for text, value in (("false", False), ("0", False), ("No", False), ("off", False), ("true", True), ("1", True), ("yes", True)):
        assert load_config(tmp_path, environ={"MOOT_MDNS": text}).mdns is value
    config = load_config(tmp_path, environ={"MOOT_MDNS_INTERFACES": "127.0.0.1, ::1"})
    assert config.mdns_interfaces == ("127.0.0.1", "::1")
    with pytest.raises(ConfigError, match="mdns"):
        load_config(tmp_path, environ={"MOOT_MDNS": "maybe"})
    with pytest.raises(ConfigError, match="mdns_interfaces"):
        load_config(tmp_path, environ={"MOOT_MDNS_INTERFACES": "eth0"})
    # Not checked when not used.
    assert load_config(tmp_path, environ={"MOOT_MDNS": "off", "MOOT_MDNS_INTERFACES": "off"}).mdns is False
    (tmp_path / "moot.toml").write_text('mdns = false\nmdns_interfaces = ["127.0.0.1"]\n')
    config = load_config(tmp_path, environ={})
    assert config.mdns is False and config.mdns_interfaces == ("127.0.0.1",)


# -- real node processes --------------------------------------------------------------


def discovering(root: Path, name: str) -> NodeProcess:
    """A node federating on loopback with mDNS on, on loopback only, and no static peers."""
    return federating(root / name, name, MOOT_MDNS="true", MOOT_MDNS_INTERFACES="127.0.0.1")[0]


def stop_all(nodes: Sequence[NodeProcess]) -> None:
    """Stop our node processes, all at once (each by its own PID)."""
    with ThreadPoolExecutor(len(nodes)) as pool:
        list(pool.map(NodeProcess.stop, nodes))


async def test_three_node_processes_find_each_other_by_mdns_and_chat_with_receipts(tmp_path):
    suffix = secrets.token_hex(3)
    names = [f"{base}-{suffix}" for base in ("riverside", "hilltop", "meadow")]
    nodes = [discovering(tmp_path, name) for name in names]
    clients: dict[str, MootClient] = {}
    try:
        async with trio.open_nursery() as starting:  # each start waits for its node's web port
            for node in nodes:
                starting.start_soon(trio.to_thread.run_sync, node.start)
        for user, name, node in zip(("alice", "bob", "carol"), names, nodes, strict=True):
            clients[name] = await new_user(node.base_url, user)
        address = {name: f"{user}@{name}" for user, name in zip(("alice", "bob", "carol"), names, strict=True)}

        # A node answers for another node's user only once it knows that node.
        started = time.monotonic()
        async with trio.open_nursery() as polling:
            for here, there in permutations(names, 2):
                polling.start_soon(
                    until, lambda here=here, there=there: clients[here].user_devices(address[there]),
                    DISCOVERY_TIMEOUT_S, f"{here} to know {there}",
                )
        print(f"all six pairs know each other after {time.monotonic() - started:.2f} s")

        for sender, recipient in ((0, 1), (1, 2), (2, 0)):
            a, b = clients[names[sender]], clients[names[recipient]]
            async with a.connect() as la, b.connect() as lb:
                text = f"hello {address[names[recipient]]}, found by mDNS"
                mid = await la.send_text(address[names[recipient]], text)
                got = await next_of(lb, IncomingMessage, id=mid)
                assert got.text == text and got.sender == address[names[sender]]
                delivered = await next_of(la, ReceiptEvent, id=mid, kind="delivered")
                assert delivered.by == address[names[recipient]]
                await lb.mark_read(address[names[sender]], mid)
                read = await next_of(la, ReceiptEvent, id=mid, kind="read")
                assert read.by == address[names[recipient]]
    finally:
        for client in clients.values():
            await client.aclose()
        stop_all(nodes)


async def peers_of(node: NodeProcess) -> dict[str, Any]:
    """``moot peers list --json`` on ``node``: what it knows of each other node, by name."""
    done = await trio.run_process(
        [sys.executable, "-m", "cli.main", "--data-dir", str(node.data_dir), "peers", "list", "--json"],
        capture_stdout=True, cwd=REPO,
    )
    return {peer["node"]: peer for peer in json.loads(done.stdout)}


async def test_a_node_back_on_another_port_is_found_again_and_gets_what_waited_for_it(tmp_path):
    suffix = secrets.token_hex(3)
    riverside, meadow = discovering(tmp_path, f"riverside-{suffix}"), discovering(tmp_path, f"meadow-{suffix}")
    carol_address = f"carol@{meadow.data_dir.name}"
    clients: list[MootClient] = []
    try:
        async with trio.open_nursery() as starting:
            for node in (riverside, meadow):
                starting.start_soon(trio.to_thread.run_sync, node.start)
        alice, carol = await new_user(riverside.base_url, "alice"), await new_user(meadow.base_url, "carol")
        clients += [alice, carol]
        await until(lambda: alice.user_devices(carol_address), DISCOVERY_TIMEOUT_S, "riverside to know meadow")

        await trio.to_thread.run_sync(meadow.stop)  # its goodbye tells riverside it is gone
        async with alice.connect() as la:
            mid = await la.send_text(carol_address, "waiting for you")  # queued on riverside
            new_address = f"/ip4/127.0.0.1/tcp/{free_port()}"
            meadow.env["MOOT_FEDERATION_LISTEN"] = new_address
            await trio.to_thread.run_sync(meadow.start)
            async with carol.connect() as lc:
                got = await next_of(lc, IncomingMessage, id=mid, timeout=DISCOVERY_TIMEOUT_S)
                assert got.text == "waiting for you"
            await next_of(la, ReceiptEvent, id=mid, kind="delivered", timeout=DISCOVERY_TIMEOUT_S)

        async def knows_new_address() -> bool:
            # Only a dial records an address (a node that dials us is not asked where
            # it listens): riverside dialled the address meadow announced.
            record = (await peers_of(riverside))[meadow.data_dir.name]
            return any(a.startswith(new_address + "/p2p/") for a in record["addrs"])

        await until(knows_new_address, DISCOVERY_TIMEOUT_S, "riverside to learn meadow's new address by mDNS")
    finally:
        for client in clients:
            await client.aclose()
        stop_all([riverside, meadow])
