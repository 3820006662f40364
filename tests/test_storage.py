"""Storage: migrations, the group-commit writer and the repositories.

Every test runs on SQLite and on a real PostgreSQL server (the ``db_url`` fixture).
Times are fixed integer milliseconds.
"""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import outcome
import pytest
import trio
from sqlalchemy import Connection, inspect, select, text

from node.errors import BadRequest, IdConflict, Unavailable, UsernameTaken
from storage import Database, open_database
from storage.repos import AccountRepo, DeviceRecord, DeviceRepo, MessageRepo, NewDevice
from storage.repos.federation import FederationRepo, OutboxItem, OutboxTail
from storage.repos.federation import enqueue as fed_enqueue
from storage.repos.messages import KIND_MESSAGE, KIND_READ_SYNC, KIND_RECEIPT, StoreRequest
from storage.schema import metadata, users
from storage.writer import WriteOp, note_commit

NOW = 1_700_000_000_000
NODE = "riverside"


@pytest.fixture
async def db(db_url: str) -> AsyncIterator[Database]:
    async with open_database(db_url) as database:
        yield database


# -- migrations ----------------------------------------------------------------


def _schema_of(conn: Connection) -> dict[str, set[str]]:
    inspector = inspect(conn)
    return {
        table: {c["name"] for c in inspector.get_columns(table)}
        for table in inspector.get_table_names()
        if table != "alembic_version"
    }


def _revisions(conn: Connection) -> list[str]:
    return [r[0] for r in conn.execute(text("SELECT version_num FROM alembic_version"))]


async def test_migrations_create_the_schema_and_reapply_as_a_no_op(db_url: str) -> None:
    async with open_database(db_url) as db:
        first = await db.read(_schema_of)
        revisions = await db.read(_revisions)
        await AccountRepo(db).create_user("alice", "hash", NOW, None)

    expected = {name: {c.name for c in table.columns} for name, table in metadata.tables.items()}
    assert first == expected
    assert len(revisions) == 1

    async with open_database(db_url) as db:
        assert await db.read(_schema_of) == first
        assert await db.read(_revisions) == revisions
        alice = await AccountRepo(db).get_user("alice")
        assert alice is not None and alice.created_at == NOW


# -- the group-commit writer -----------------------------------------------------


def _insert_user(name: str) -> WriteOp[int]:
    def op(conn: Connection) -> int:
        key = conn.execute(users.insert().values(username=name, password_hash="h", created_at=NOW)).inserted_primary_key
        assert key is not None
        return int(key[0])

    return op


def _count_users(conn: Connection) -> int:
    return len(conn.execute(select(users.c.id)).all())


async def test_concurrent_writes_share_batches(db: Database) -> None:
    results: dict[int, int] = {}

    async def writer_task(i: int) -> None:
        results[i] = await db.write(_insert_user(f"u{i}"))

    async with trio.open_nursery() as nursery:
        for i in range(500):
            nursery.start_soon(writer_task, i)

    assert len(set(results.values())) == 500
    assert db.writer.writes == 500
    assert db.writer.batches < db.writer.writes
    assert await db.read(_count_users) == 500


class Boom(Exception):
    pass


def _failing_op(conn: Connection) -> int:
    conn.execute(users.insert().values(username="ghost", password_hash="h", created_at=NOW))
    raise Boom("this op fails after writing")


def _raw_insert_taken(conn: Connection) -> int:
    """Hot-path style: SQL on the DBAPI cursor, whose errors SQLAlchemy never wraps."""
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    cur.execute(
        "INSERT INTO users (username, password_hash, created_at, disabled, read_receipts) "
        "VALUES ('taken', 'x', 0, false, true)"
    )
    return 0


async def test_a_failing_op_fails_alone_in_its_batch(db: Database) -> None:
    await db.write(_insert_user("taken"))
    outcomes: dict[str, outcome.Outcome[int]] = {}
    all_done = trio.Event()
    names = [f"ok{i}" for i in range(10)]
    ops: dict[str, WriteOp[int]] = {name: _insert_user(name) for name in names}
    ops["boom"] = _failing_op
    ops["duplicate"] = _insert_user("taken")  # a constraint violation in the database
    ops["raw_duplicate"] = _raw_insert_taken  # the same, raised by the driver itself
    order = names[:5] + ["boom"] + names[5:8] + ["duplicate"] + names[8:] + ["raw_duplicate"]

    def on_done(name: str) -> Callable[[outcome.Outcome[int]], None]:
        def record(result: outcome.Outcome[int]) -> None:
            outcomes[name] = result
            if len(outcomes) == len(order):
                all_done.set()

        return record

    batches_before = db.writer.batches
    for name in order:  # no checkpoint in between: one batch
        db.writer.submit_nowait(ops[name], on_done(name))
    await all_done.wait()

    assert db.writer.batches == batches_before + 1
    for name in names:
        assert isinstance(outcomes[name], outcome.Value), name
    assert isinstance(outcomes["boom"], outcome.Error)
    assert isinstance(outcomes["boom"].error, Boom)
    assert isinstance(outcomes["duplicate"], outcome.Error)
    assert isinstance(outcomes["duplicate"].error, Unavailable)
    assert isinstance(outcomes["raw_duplicate"], outcome.Error)
    assert isinstance(outcomes["raw_duplicate"].error, Unavailable)

    accounts = AccountRepo(db)
    for name in names:
        assert await accounts.get_user(name) is not None
    assert await accounts.get_user("ghost") is None  # the failed op was rolled back
    assert await db.read(_count_users) == len(names) + 1

    # The repositories' own errors pass through the writer unchanged.
    with pytest.raises(UsernameTaken):
        await accounts.create_user("taken", "h", NOW, None)


async def test_commit_listeners_get_the_notes_of_what_committed_only(db: Database) -> None:
    seen: list[list[Any]] = []
    db.writer.add_commit_listener(seen.append)

    def noting(name: str, fail: bool = False) -> WriteOp[None]:
        def op(conn: Connection) -> None:
            note_commit(conn, name)
            if fail:
                raise Boom()

        return op

    results: list[outcome.Outcome[None]] = []
    done = trio.Event()

    def record(result: outcome.Outcome[None]) -> None:
        assert seen, "listeners run before the callbacks"
        results.append(result)
        if len(results) == 3:
            done.set()

    for op in (noting("a"), noting("boom", fail=True), noting("b")):  # one batch, replayed op by op
        db.writer.submit_nowait(op, record)
    await done.wait()
    assert [note for notes in seen for note in notes] == ["a", "b"]
    await db.write(noting("c"))
    assert seen[-1] == ["c"]


def test_outbox_tail_answers_only_for_runs_it_holds_whole() -> None:
    from storage.repos.federation import Enqueued

    tail = OutboxTail(max_items=3)

    def item(oid: int) -> Enqueued:
        return Enqueued("hilltop", OutboxItem(oid, f"e{oid}".encode(), "s"))

    assert tail.take("hilltop", 0, 10) is None  # nothing seen: read the table
    tail.committed([item(4), item(5), "not an outbox note"])
    assert tail.take("hilltop", 2, 10) is None  # oid 3 may be in the table only
    assert [i.oid for i in tail.take("hilltop", 3, 1) or []] == [4]
    assert [i.oid for i in tail.take("hilltop", 4, 10) or []] == [5]
    assert tail.take("hilltop", 5, 10) == []  # nothing newer was committed
    assert tail.take("hilltop", 3, 10) is None  # 4 was let go: a sender starting again reads it
    tail.committed([item(6), item(7), item(8), item(9)])  # one more than it keeps
    assert tail.take("hilltop", 5, 10) is None
    assert [i.oid for i in tail.take("hilltop", 6, 10) or []] == [7, 8, 9]
    tail.committed([item(12)])  # not the next oid: start afresh from it
    assert tail.take("hilltop", 9, 10) is None
    assert [i.oid for i in tail.take("hilltop", 11, 10) or []] == [12]
    assert tail.take("meadow", 0, 10) is None


async def test_acknowledged_writes_survive_closing(db_url: str) -> None:
    acked: list[int] = []
    async with open_database(db_url) as db:
        for i in range(20):
            acked.append(await db.write(_insert_user(f"w{i}")))
        # Queued right before closing: the writer drains its queue on exit.
        for i in range(30):
            db.writer.submit_nowait(_insert_user(f"q{i}"), lambda r: acked.append(r.unwrap()))
    assert len(acked) == 50
    with pytest.raises(Unavailable):
        await db.write(_insert_user("late"))

    async with open_database(db_url) as db:
        ids = set(await db.read(lambda conn: [r[0] for r in conn.execute(select(users.c.id))]))
    assert ids == set(acked)


# -- repositories ----------------------------------------------------------------


@dataclass
class Member:
    id: int
    address: str
    devices: list[DeviceRecord]


class World:
    """Users on the node ``riverside`` with devices, and the repositories."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.accounts = AccountRepo(db)
        self.device_repo = DeviceRepo(db)
        self.messages = MessageRepo(db, node_name=NODE)
        self._tokens = 0
        self._sent = 0

    async def user(self, name: str, n_devices: int = 1) -> Member:
        user_id = await self.accounts.create_user(name, "argon2id$hash", NOW, None)
        member = Member(user_id, f"{name}@{NODE}", [])
        for i in range(n_devices):
            self._tokens += 1
            token = hashlib.sha256(b"token %d" % self._tokens).digest()
            session_id = await self.accounts.create_session(token, user_id, None, NOW, 86_400_000)
            new = NewDevice(
                public_id=f"{name}-dev{i}", user_id=user_id, name=f"{name}'s device {i}",
                identity_key=bytes(32), dh_key=bytes(32), spk_id=1, spk_key=bytes(32), spk_sig=bytes(64),
                one_time_prekeys=((1, bytes(32)), (2, bytes(32))),
            )
            member.devices.append(await self.device_repo.add_device(new, NOW, 5, session_id))
        return member

    def request(
        self, conv: int, sender: str, sender_id: int | None, recipient_id: int | None,
        client_id: str, body: bytes, now: int = NOW,
    ) -> StoreRequest:
        return StoreRequest(
            conversation_id=conv, sender=sender, sender_device=f"{sender}/dev0", client_id=client_id,
            digest=hashlib.sha256(body).digest(), envelope=body, now=now,
            recipient_user_id=recipient_id, sender_user_id=sender_id,
        )

    async def send(self, conv: int, sender: Member, recipient: Member, client_id: str) -> int:
        """Store a message between two local users; return the recipient's event seq."""
        self._sent += 1
        req = self.request(conv, sender.address, sender.id, recipient.id, client_id, b"cipher " + client_id.encode(),
                           now=NOW + self._sent)
        stored = await self.db.write(self.messages.store_op(req))
        assert not stored.duplicate and stored.recipient_event is not None
        return int(stored.recipient_event)

    async def cursor(self, device: DeviceRecord) -> int:
        return (await self.device_repo.get(device.id)).cursor


async def test_ensure_direct_is_idempotent(db: Database) -> None:
    world = World(db)
    alice, bob = await world.user("alice"), await world.user("bob")
    conv = await world.messages.ensure_direct(alice.address, alice.id, bob.address, bob.id, NOW)
    assert await world.messages.ensure_direct(alice.address, alice.id, bob.address, bob.id, NOW + 1) == conv
    assert await world.messages.ensure_direct(bob.address, bob.id, alice.address, alice.id, NOW + 2) == conv
    assert await world.messages.find_direct(bob.address, alice.address) == conv

    for member in (alice, bob):
        summaries = await world.messages.conversations_of(member.id, member.address)
        assert [(s.id, s.key) for s in summaries] == [(conv, f"{alice.address} {bob.address}")]
    assert await world.messages.contacts_of(alice.id) == [bob.id]

    remote = await world.messages.ensure_direct(alice.address, alice.id, "carol@hillside", None, NOW)
    assert remote != conv
    assert await world.messages.ensure_direct("carol@hillside", None, alice.address, alice.id, NOW) == remote
    assert await world.messages.contacts_of(alice.id) == [bob.id]


async def test_store_is_idempotent_on_sender_and_client_id(db: Database) -> None:
    world = World(db)
    alice, bob = await world.user("alice"), await world.user("bob")
    conv = await world.messages.ensure_direct(alice.address, alice.id, bob.address, bob.id, NOW)
    req = world.request(conv, alice.address, alice.id, bob.id, "m-1", b"ciphertext one")

    first = await db.write(world.messages.store_op(req))
    assert not first.duplicate
    assert first.created_at == NOW
    assert first.recipient_event is not None and first.sender_event is not None

    retry = await db.write(world.messages.store_op(world.request(conv, alice.address, alice.id, bob.id, "m-1",
                                                                 b"ciphertext one", now=NOW + 5000)))
    assert retry.duplicate
    assert (retry.seq, retry.created_at) == (first.seq, NOW)
    assert retry.recipient_event is None and retry.sender_event is None

    with pytest.raises(IdConflict):
        await db.write(world.messages.store_op(world.request(conv, alice.address, alice.id, bob.id, "m-1", b"other")))

    # Another sender may reuse the client id.
    other = await db.write(world.messages.store_op(world.request(conv, bob.address, bob.id, alice.id, "m-1", b"x")))
    assert not other.duplicate and other.seq != first.seq

    bob_events = await world.messages.backlog(bob.id, 0, 100)
    incoming = [e for e in bob_events if e.message is not None and e.message.sender == alice.address]
    assert [e.seq for e in incoming] == [first.recipient_event]
    alice_events = await world.messages.backlog(alice.id, 0, 100)
    assert [e.seq for e in alice_events if e.message and e.message.client_id == "m-1" and e.message.sender == alice.address] == [
        first.sender_event
    ]


async def test_ack_records_delivered_receipts_once_and_moves_the_cursor_forward(db: Database) -> None:
    world = World(db)
    alice, bob = await world.user("alice"), await world.user("bob", n_devices=2)
    phone, laptop = bob.devices
    conv = await world.messages.ensure_direct(alice.address, alice.id, bob.address, bob.id, NOW)
    e1 = await world.send(conv, alice, bob, "a1")
    e2 = await world.send(conv, alice, bob, "a2")
    e3 = await world.send(conv, alice, bob, "a3")
    assert await world.cursor(phone) == 0

    receipts = await db.write(world.messages.ack_op(bob.id, bob.address, phone.id, e2, NOW + 100))
    assert [(r.user_id, r.payload["kind"], r.payload["id"]) for r in receipts] == [
        (alice.id, "delivered", "a1"), (alice.id, "delivered", "a2")
    ]
    assert all(r.payload["by"] == bob.address and r.payload["ts"] == NOW + 100 for r in receipts)
    assert await world.cursor(phone) == e2

    # Repeated and backward acks change nothing.
    assert await db.write(world.messages.ack_op(bob.id, bob.address, phone.id, e2, NOW + 200)) == []
    assert await db.write(world.messages.ack_op(bob.id, bob.address, phone.id, e1, NOW + 200)) == []
    assert await world.cursor(phone) == e2

    # Another device of bob acking the same messages adds no second receipt.
    assert await db.write(world.messages.ack_op(bob.id, bob.address, laptop.id, e2, NOW + 300)) == []
    assert await world.cursor(laptop) == e2

    receipts = await db.write(world.messages.ack_op(bob.id, bob.address, phone.id, e3, NOW + 400))
    assert [r.payload["id"] for r in receipts] == ["a3"]
    assert await world.cursor(phone) == e3

    # The receipts are queued in alice's stream, in order, after her own messages.
    alice_receipts = [e for e in await world.messages.backlog(alice.id, 0, 100) if e.kind == KIND_RECEIPT]
    assert [(e.payload or {}).get("id") for e in alice_receipts] == ["a1", "a2", "a3"]
    assert all(e.message is None for e in alice_receipts)

    history = await world.messages.history(conv, bob.address, None, 10)
    assert [(h.message.client_id, h.delivered, h.read) for h in history] == [
        ("a3", True, False), ("a2", True, False), ("a1", True, False)
    ]


async def test_ack_of_own_and_remote_messages(db: Database) -> None:
    world = World(db)
    alice, bob = await world.user("alice"), await world.user("bob")
    conv = await world.messages.ensure_direct(alice.address, alice.id, bob.address, bob.id, NOW)
    remote = await world.messages.ensure_direct(alice.address, alice.id, "carol@hillside", None, NOW)

    # alice's own message is synced to her other devices: acking it is no delivery.
    own = await db.write(world.messages.store_op(world.request(conv, alice.address, alice.id, bob.id, "mine", b"m")))
    # A message from a remote user: the receipt is stored, but the sender's node
    # (not a local stream) gets told, so no event is returned.
    from_carol = await db.write(
        world.messages.store_op(world.request(remote, "carol@hillside", None, alice.id, "c1", b"c"))
    )
    assert from_carol.sender_event is None
    head = await world.messages.stream_head(alice.id)
    assert head == from_carol.recipient_event and own.sender_event is not None

    device = alice.devices[0]
    assert await db.write(world.messages.ack_op(alice.id, alice.address, device.id, head, NOW + 10)) == []
    assert await world.cursor(device) == head

    (item,) = await world.messages.history(remote, alice.address, None, 10)
    assert item.message.client_id == "c1" and item.delivered and not item.read
    (mine,) = await world.messages.history(conv, bob.address, None, 10)
    assert mine.message.client_id == "mine" and not mine.delivered


async def test_read_marker_moves_forward_and_tells_the_peer_only_when_asked(db: Database) -> None:
    world = World(db)
    alice, bob = await world.user("alice"), await world.user("bob")
    conv = await world.messages.ensure_direct(alice.address, alice.id, bob.address, bob.id, NOW)
    for cid in ("a1", "a2", "a3"):
        await world.send(conv, alice, bob, cid)

    def read(upto: str, now: int, tell_peer: bool) -> Any:
        return world.messages.read_op(conv, bob.address, bob.id, alice.address, upto, now, tell_peer)

    # Read receipts turned off: only bob's other devices are told.
    events = await db.write(read("a2", NOW + 10, False))
    assert [(e.user_id, e.payload["kind"], e.payload["id"]) for e in events] == [(bob.id, "read_sync", "a2")]
    assert events[0].payload["conversation"] == alice.address

    # Backwards or repeated: nothing moves, nothing is queued.
    assert await db.write(read("a1", NOW + 20, True)) == []
    assert await db.write(read("a2", NOW + 30, True)) == []
    (summary,) = await world.messages.conversations_of(bob.id, bob.address)
    assert summary.unread == 1

    events = await db.write(read("a3", NOW + 40, True))
    assert [(e.user_id, e.payload["kind"], e.payload["id"]) for e in events] == [
        (alice.id, "read", "a3"), (bob.id, "read_sync", "a3")
    ]
    assert events[0].payload["by"] == bob.address
    assert await db.write(read("a3", NOW + 50, True)) == []

    alice_kinds = [(e.kind, (e.payload or {}).get("kind")) for e in await world.messages.backlog(alice.id, 0, 100)]
    assert alice_kinds.count((KIND_RECEIPT, "read")) == 1
    bob_syncs = [e for e in await world.messages.backlog(bob.id, 0, 100) if e.kind == KIND_READ_SYNC]
    assert [(e.payload or {}).get("id") for e in bob_syncs] == ["a2", "a3"]

    history = await world.messages.history(conv, bob.address, None, 10)
    assert [(h.message.client_id, h.read) for h in history] == [("a3", True), ("a2", True), ("a1", True)]

    with pytest.raises(BadRequest):
        await db.write(read("no-such-id", NOW + 60, True))
    await world.send(conv, bob, alice, "b1")
    with pytest.raises(BadRequest):  # bob's own message is not the peer's
        await db.write(read("b1", NOW + 70, True))


async def test_backlog_returns_events_in_order_after_a_cursor(db: Database) -> None:
    world = World(db)
    alice, bob = await world.user("alice"), await world.user("bob")
    conv = await world.messages.ensure_direct(alice.address, alice.id, bob.address, bob.id, NOW)
    seqs = [await world.send(conv, alice, bob, f"a{i}") for i in range(5)]
    await db.write(world.messages.read_op(conv, bob.address, bob.id, alice.address, "a0", NOW + 99, True))

    events = await world.messages.backlog(bob.id, seqs[1], 100)
    assert [e.seq for e in events[:3]] == seqs[2:]
    assert [e.kind for e in events] == [KIND_MESSAGE] * 3 + [KIND_READ_SYNC]
    first = events[0].message
    assert first is not None
    assert (first.client_id, first.sender, first.sender_device) == ("a2", alice.address, f"{alice.address}/dev0")
    assert first.envelope == b"cipher a2" and isinstance(first.envelope, bytes)
    assert first.conversation_key == f"{alice.address} {bob.address}"
    assert first.created_at == NOW + 3
    assert events[0].payload is None
    assert events[3].message is None and events[3].payload == {
        "kind": "read_sync", "id": "a0", "conversation": alice.address, "by": bob.address, "ts": NOW + 99
    }

    assert [e.seq for e in await world.messages.backlog(bob.id, 0, 2)] == seqs[:2]
    assert await world.messages.backlog(bob.id, events[-1].seq, 100) == []


async def test_history_pages_newest_first(db: Database) -> None:
    world = World(db)
    alice, bob = await world.user("alice"), await world.user("bob")
    conv = await world.messages.ensure_direct(alice.address, alice.id, bob.address, bob.id, NOW)
    for i in range(5):
        sender, recipient = (alice, bob) if i % 2 == 0 else (bob, alice)
        await world.send(conv, sender, recipient, f"m{i}")

    pages = []
    before = None
    while True:
        page = await world.messages.history(conv, bob.address, before, 2)
        if not page:
            break
        pages.append([h.message.client_id for h in page])
        before = page[-1].message.seq
    assert pages == [["m4", "m3"], ["m2", "m1"], ["m0"]]
    senders = [h.message.sender for h in await world.messages.history(conv, bob.address, None, 10)]
    assert senders == [alice.address, bob.address, alice.address, bob.address, alice.address]


async def test_conversations_report_unread_counts(db: Database) -> None:
    world = World(db)
    alice, bob, dora = await world.user("alice"), await world.user("bob"), await world.user("dora")
    with_bob = await world.messages.ensure_direct(alice.address, alice.id, bob.address, bob.id, NOW)
    with_dora = await world.messages.ensure_direct(alice.address, alice.id, dora.address, dora.id, NOW)
    empty = await world.messages.ensure_direct(alice.address, alice.id, "carol@hillside", None, NOW)

    for cid in ("b1", "b2", "b3"):
        await world.send(with_bob, bob, alice, cid)
    await world.send(with_bob, alice, bob, "a1")  # her own message is never unread
    await world.send(with_dora, dora, alice, "d1")
    await db.write(world.messages.read_op(with_bob, alice.address, alice.id, bob.address, "b1", NOW + 50, True))

    summaries = await world.messages.conversations_of(alice.id, alice.address)
    assert [s.id for s in summaries] == [with_dora, with_bob, empty]  # most recent first
    by_id = {s.id: s for s in summaries}
    assert by_id[with_bob].unread == 2
    last = by_id[with_bob].last
    assert last is not None and last.client_id == "a1"
    assert by_id[with_bob].read_upto > 0
    assert by_id[with_dora].unread == 1 and by_id[with_dora].read_upto == 0
    assert by_id[empty].unread == 0 and by_id[empty].last is None

    (bobs,) = await world.messages.conversations_of(bob.id, bob.address)
    assert bobs.id == with_bob and bobs.unread == 1


# -- federation: remote nodes and the outbox ---------------------------------------------


async def test_federation_outbox_orders_acknowledges_and_forgets(db_url: str) -> None:
    async with open_database(db_url) as db:
        repo = FederationRepo(db)

        def queue(node: str, n: int) -> WriteOp[list[int]]:
            return lambda conn: [fed_enqueue(conn, node, f"event {i}".encode(), "s" * 86, NOW) for i in range(n)]

        assert await db.write(queue("hilltop", 3)) == [1, 2, 3]
        assert await db.write(queue("meadow", 1)) == [1]  # oids count per destination
        assert await db.write(queue("hilltop", 2)) == [4, 5]
        assert [i.oid for i in await repo.pending("hilltop", 0, 10)] == [1, 2, 3, 4, 5]
        assert [i.event for i in await repo.pending("hilltop", 3, 1)] == [b"event 0"]
        await db.write(repo.acked_op("hilltop", 3))
        await db.write(repo.acked_op("hilltop", 2))  # late, older ack: no effect
        node = await repo.node("hilltop")
        assert node is not None and node.acked_oid == 3 and node.outbox_depth == 2 and node.peer_id is None
        assert await repo.depth("hilltop") == 2
        assert [i.oid for i in await repo.pending("hilltop", 0, 10)] == [4, 5]


async def test_federation_node_names_are_pinned_to_their_first_peer_id(db_url: str) -> None:
    async with open_database(db_url) as db:
        repo = FederationRepo(db)
        assert await db.write(repo.seen_op("hilltop", "PeerA", ["/ip4/127.0.0.1/tcp/1"], "static", NOW)) == "hilltop"
        assert await db.write(repo.seen_op("hilltop", "PeerA", ["/ip4/127.0.0.1/tcp/2"], "mdns", NOW + 1)) == "hilltop"
        # another peer id claiming the same name is refused and noted for the operator
        assert await db.write(repo.seen_op("hilltop", "PeerB", [], "mdns", NOW + 2)) is None
        # and a known peer id cannot take on a second name
        assert await db.write(repo.seen_op("meadow", "PeerA", [], "mdns", NOW + 3)) is None
        node = await repo.node("hilltop")
        assert node is not None and node.peer_id == "PeerA" and node.found_by == "static"
        assert node.addrs == ["/ip4/127.0.0.1/tcp/1", "/ip4/127.0.0.1/tcp/2"] and node.last_seen == NOW + 1
        assert node.conflict is not None and "PeerB" in node.conflict
        assert (await repo.node_by_peer("PeerA")) == node
        assert await repo.node("meadow") is None
        await db.write(repo.blocked_op("hilltop", True, NOW))
        assert (await repo.node("hilltop")).blocked  # type: ignore[union-attr]
