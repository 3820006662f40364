"""Two node processes federating over loopback; the receiving node is killed with
SIGKILL while messages for it pile up, then restarted: every message arrives once,
in order, and every delivered receipt gets back to the sender."""

from __future__ import annotations

import trio

from cli import crypto
from cli.client import ClientError, IncomingMessage, MootClient, new_message_id
from tests.nodes import federating, new_user, next_of, until

MESSAGES = 1000
KILL_AFTER = 300


async def test_sigkill_of_the_receiving_node_loses_and_duplicates_nothing(tmp_path):
    riverside, riverside_address = federating(tmp_path / "riverside", "riverside")
    riverside.start()
    hilltop, _ = federating(tmp_path / "hilltop", "hilltop", peers=(riverside_address,))
    hilltop.start()
    clients: list[MootClient] = []
    try:
        alice = await new_user(riverside.base_url, "alice")
        bob = await new_user(hilltop.base_url, "bob")
        clients += [alice, bob]
        devices = await until(lambda: alice.user_devices("bob@hilltop"), 30, "riverside to reach hilltop")
        assert alice.keys is not None and alice.device is not None
        recipients = [crypto.RecipientDevice.from_bundle("bob@hilltop", d["device"], d) for d in devices]
        prepared = []
        for i in range(MESSAGES):
            mid = new_message_id()
            payload = {"type": "text", "text": f"message {i}", "ts": 0}
            prepared.append((mid, crypto.encrypt_message(alice.keys, "alice@riverside", alice.device, "bob@hilltop", mid, payload, recipients)))

        async with alice.connect() as la:
            for i, (_mid, envelope) in enumerate(prepared):
                if i == KILL_AFTER:
                    hilltop.kill()  # mid-stream: some events in flight, some acknowledged
                try:
                    sent = await la.send_envelope(envelope)  # stored on riverside: acknowledged
                except ClientError as exc:
                    raise AssertionError(f"send {i} failed: {exc}") from exc
                assert not sent.duplicate

        hilltop.start()  # same data, same address; it dials riverside, which resumes sending
        ids = [mid for mid, _ in prepared]
        got: list[str] = []
        async with bob.connect() as lb:
            with trio.fail_after(60):
                while len(got) < MESSAGES:
                    message = await next_of(lb, IncomingMessage, timeout=60)
                    assert message.text == f"message {ids.index(message.id)}"
                    got.append(message.id)
            with trio.move_on_after(1):  # and nothing more
                extra = await lb.next_event()
                assert not isinstance(extra, IncomingMessage), extra
        assert got == ids  # each once, in the order sent

        async def all_delivered() -> bool:
            statuses: dict[str, str] = {}
            before = None
            while True:
                page = await alice.history("bob@hilltop", before=before, limit=200)
                statuses.update({m["id"]: m["status"] for m in page["messages"]})
                before = page["before"]
                if before is None or not page["messages"]:
                    break
            return len(statuses) == MESSAGES and set(statuses.values()) == {"delivered"}

        await until(all_delivered, 60, "every delivered receipt to reach riverside")
    finally:
        for client in clients:
            await client.aclose()
        hilltop.stop()
        riverside.stop()
