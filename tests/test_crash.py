"""SIGKILL the node while clients send: nothing acknowledged is lost, nothing is delivered twice."""

from __future__ import annotations

from collections import Counter
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed

from cli.client import ClientError, IncomingMessage, MootClient, new_message_id
from tests.nodes import NodeProcess, free_port, new_user, next_of

SENDERS = ("alice", "carol", "dave")
PER_SENDER = 120
IN_FLIGHT = 4  # concurrent sends per sender
KILL_AFTER = 150


async def test_sigkill_while_sending_loses_no_acknowledged_message(tmp_path):
    port = free_port()
    node = NodeProcess(tmp_path / "node", port)
    node.start()
    clients: list[MootClient] = []
    try:
        bob = await new_user(node.base_url, "bob")
        senders = {name: await new_user(node.base_url, name) for name in SENDERS}
        clients += [bob, *senders.values()]
        acked: dict[str, str] = {}  # message id -> sender, for every `sent` received
        unanswered: dict[str, tuple[str, dict[str, Any]]] = {}  # id -> (sender, envelope)
        enough = trio.Event()

        # Encrypted up front, so the senders keep several messages in flight each.
        prepared: dict[str, list[tuple[str, dict[str, Any]]]] = {}
        for name, client in senders.items():
            prepared[name] = []
            for i in range(PER_SENDER):
                mid = new_message_id()
                prepared[name].append((mid, await client.encrypt_text("bob@riverside", f"{name} {i}", mid)))

        async def send_until_the_node_dies(name: str, client: MootClient) -> None:
            queue = iter(prepared[name])

            async def pipeline(live: Any) -> None:
                for mid, envelope in queue:
                    unanswered[mid] = (name, envelope)
                    await live.send_envelope(envelope)
                    del unanswered[mid]
                    acked[mid] = name
                    if len(acked) >= KILL_AFTER:
                        enough.set()

            try:
                async with client.connect() as live, trio.open_nursery() as pipelines:
                    for _ in range(IN_FLIGHT):
                        pipelines.start_soon(pipeline, live)
            except* (ClientError, ConnectionClosed, httpx.HTTPError, trio.BrokenResourceError, OSError):
                pass  # the node is gone

        with trio.fail_after(60):
            async with trio.open_nursery() as nursery:
                for name, client in senders.items():
                    nursery.start_soon(send_until_the_node_dies, name, client)
                await enough.wait()
                node.kill()  # SIGKILL: no shutdown, no flush
        assert len(acked) >= KILL_AFTER
        before_restart = dict(acked)

        node = NodeProcess(tmp_path / "node", port)
        node.start()

        # Senders resend what was never answered, with the same id and the same bytes:
        # stored once whether or not it had reached the disk before the kill.
        for name, client in senders.items():
            async with client.connect() as live:
                for mid, (owner, envelope) in list(unanswered.items()):
                    if owner == name:
                        await live.send_envelope(envelope)
                        acked[mid] = name
        assert len(acked) >= len(before_restart)

        # bob was offline throughout: his backlog holds every acknowledged message once.
        received: list[IncomingMessage] = []
        async with bob.connect() as lb:
            while len(received) < len(acked):
                received.append(await next_of(lb, IncomingMessage, timeout=20))
            with trio.move_on_after(1):
                extra = await next_of(lb, IncomingMessage, timeout=5)
                raise AssertionError(f"message delivered again: {extra.id}")
        counts = Counter(m.id for m in received)
        assert set(counts) == set(acked)
        assert max(counts.values()) == 1
        assert all(m.error is None and m.text is not None for m in received)
        # And the history has each of them once.
        for name in SENDERS:
            ids: list[str] = []
            before = None
            for _ in range(100):
                page = await bob.history(f"{name}@riverside", before=before, limit=200)
                ids += [m["id"] for m in page["messages"]]
                before = page["before"]
                if before is None or not page["messages"]:
                    break
            mine = {mid for mid, owner in acked.items() if owner == name}
            assert sorted(ids) == sorted(mine)
        assert node.stop() == 0
    finally:
        node.kill()
        for client in clients:
            await client.aclose()
