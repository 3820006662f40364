"""No central presence store: five node processes, one killed with SIGKILL.

Each node has one user, and every user has a conversation with every other, so each
node tells the four others about its user. When one node dies without a word, the
other four mark its user offline within one lease (what that node said lapses), and
keep showing each other online all along.
"""

from __future__ import annotations

import time
from itertools import combinations

import pytest
import trio

from cli.client import IncomingMessage, LiveSession, MootClient, PresenceEvent
from tests.nodes import NodeProcess, federating, new_user, next_of

pytestmark = pytest.mark.slow

HEARTBEAT_S, LEASE_S = 0.5, 3.0
NAMES = [f"n{i}" for i in range(5)]


async def test_five_nodes_keep_presence_among_themselves_when_one_is_killed(tmp_path):
    env = {"MOOT_PRESENCE_HEARTBEAT_S": str(HEARTBEAT_S), "MOOT_PRESENCE_LEASE_S": str(LEASE_S)}
    nodes: list[NodeProcess] = []
    addresses: list[str] = []
    for name in NAMES:  # each node has the earlier ones as static peers
        node, address = federating(tmp_path / name, name, peers=list(addresses), **env)
        nodes.append(node)
        addresses.append(address)
    clients: list[MootClient] = []
    try:
        for node in nodes:
            node.start()
        users = [f"u{i}@{name}" for i, name in enumerate(NAMES)]
        for i, node in enumerate(nodes):
            clients.append(await new_user(node.base_url, f"u{i}"))
        async with _connected(clients) as lives:
            # every pair shares a conversation
            for i, j in combinations(range(5), 2):
                mid = await lives[i].send_text(users[j], f"{users[i]} to {users[j]}")
                await next_of(lives[j], IncomingMessage, id=mid, timeout=30)
            # everyone sees everyone online
            for i in range(5):
                with trio.move_on_after(20):
                    while any(lives[i].presence.get(u, None) is None or lives[i].presence[u].state != "online"
                              for u in users if u != users[i]):
                        await lives[i].next_event()
            states = {users[i]: {u: e.state for u, e in lives[i].presence.items()} for i in range(5)}
            assert all(list(seen.values()).count("online") == 4 for seen in states.values()), states
            flickers: list[PresenceEvent] = []

            # n4 dies without a word
            killed_at = time.time()
            nodes[4].kill()
            t0 = trio.current_time()
            waited = []
            for i in range(4):
                offline = await _offline(lives[i], users[4], flickers, timeout=LEASE_S + 10)
                waited.append(trio.current_time() - t0)
                assert offline.last_seen is not None and killed_at - LEASE_S - 2 <= offline.last_seen / 1000 <= killed_at + 1
            # within one lease of the kill (plus one heartbeat of scheduling slack on a busy machine)
            assert max(waited) <= LEASE_S + HEARTBEAT_S + 1.0, waited
            # the survivors saw no change about each other, before and after the lease ran out
            with trio.move_on_after(LEASE_S + 1):
                while True:
                    for i in range(4):
                        with trio.move_on_after(0.05):
                            event = await lives[i].next_event()
                            if isinstance(event, PresenceEvent):
                                flickers.append(event)
            assert [f for f in flickers if f.user != users[4] and f.state != "online"] == []
            for i in range(4):
                for j in range(4):
                    if i != j:
                        assert lives[i].presence[users[j]].state == "online"
                assert lives[i].presence[users[4]].state == "offline"
    finally:
        for client in clients:
            await client.aclose()
        for node in nodes:
            node.stop()


async def _offline(live: LiveSession, user: str, others: list[PresenceEvent], timeout: float) -> PresenceEvent:
    with trio.fail_after(timeout):
        while True:
            event = await live.next_event()
            if isinstance(event, PresenceEvent):
                if event.user == user and event.state == "offline":
                    return event
                others.append(event)


class _connected:
    """Every client's live session, open at once (the killed node's one breaks)."""

    def __init__(self, clients: list[MootClient]) -> None:
        self.clients = clients

    async def __aenter__(self) -> list[LiveSession]:
        from contextlib import AsyncExitStack

        self.stack = AsyncExitStack()
        await self.stack.__aenter__()
        return [await self.stack.enter_async_context(c.connect()) for c in self.clients]

    async def __aexit__(self, *exc: object) -> None:
        await self.stack.__aexit__(*exc)
