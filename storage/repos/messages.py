"""Conversations, messages, receipts, read markers and the per-user event stream.

Every write here is idempotent: a message is keyed by (sender, client id), a
delivered receipt by (message, recipient), and a read marker only moves forward.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

from sqlalchemy import Connection, and_, func, select

from node.errors import BadRequest, IdConflict
from storage.db import Database
from storage.repos._sql import upsert_insert
from storage.repos.attachments import link_blobs
from storage.repos.federation import enqueue
from storage.schema import (
    conversation_members,
    conversations,
    messages,
    read_markers,
    receipts,
    user_events,
    users,
)

KIND_MESSAGE = "message"
KIND_RECEIPT = "receipt"
KIND_READ_SYNC = "read_sync"
KIND_CALL = "call"  # a call-history entry (who called whom, when, how it ended)


def direct_key(a: str, b: str) -> str:
    """The conversation key of the direct chat between two addresses."""
    return " ".join(sorted((a, b)))


def peer_of(key: str, me: str) -> str:
    a, _, b = key.partition(" ")
    return b if a == me else a


@dataclass(frozen=True, slots=True)
class StoreRequest:
    conversation_id: int
    sender: str
    sender_device: str
    client_id: str
    digest: bytes
    envelope: bytes
    now: int
    # Local users whose stream gets the message (recipient, and the sender when
    # they have other devices to sync).
    recipient_user_id: int | None
    sender_user_id: int | None
    # A recipient on another node: (node, signed event bytes, signature) for its outbox.
    federate: tuple[str, bytes, str] | None = None
    # Blobs the message carries (digests), uploaded by ``uploader_user_id`` for this
    # conversation: linked in the same transaction (storage/repos/attachments.py).
    attachments: tuple[str, ...] = ()
    uploader_user_id: int | None = None


@dataclass(frozen=True, slots=True)
class StoreOutcome:
    seq: int
    created_at: int
    duplicate: bool
    recipient_event: int | None
    sender_event: int | None


@dataclass(frozen=True, slots=True)
class ReceiptEvent:
    """A receipt stored in a local user's stream, to push to their devices."""

    user_id: int
    seq: int
    payload: dict[str, Any]


class Receipts(list[ReceiptEvent]):
    """Receipt events queued in local users' streams; ``remote_nodes`` are the other
    nodes that got a receipt in their outbox (their senders need waking)."""

    def __init__(self) -> None:
        super().__init__()
        self.remote_nodes: set[str] = set()


# Signs a receipt event for another node: (kind, by, to, message id, now) -> (bytes, sig).
ReceiptSigner = Callable[[str, str, str, str, int], tuple[bytes, str]]


@dataclass(frozen=True, slots=True)
class MessageRow:
    seq: int
    conversation_key: str
    sender: str
    sender_device: str
    client_id: str
    envelope: bytes
    created_at: int


@dataclass(frozen=True, slots=True)
class StreamEvent:
    seq: int
    kind: str
    message: MessageRow | None
    payload: dict[str, Any] | None


@dataclass(frozen=True, slots=True)
class HistoryItem:
    message: MessageRow
    delivered: bool
    read: bool


@dataclass(frozen=True, slots=True)
class ConversationSummary:
    id: int
    key: str
    last: MessageRow | None
    unread: int
    read_upto: int
    # Whether the peer received / read ``last`` (meaningful when the user sent it).
    last_delivered: bool = False
    last_read: bool = False


_MSG_COLS = (
    messages.c.seq, conversations.c.key, messages.c.sender, messages.c.sender_device,
    messages.c.client_id, messages.c.envelope, messages.c.created_at,
)


def _message(r: Any) -> MessageRow:
    return MessageRow(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), r[6])


class MessageRepo:
    def __init__(self, db: Database, node_name: str) -> None:
        self.db = db
        self.node_name = node_name

    async def ensure_direct(self, a: str, a_user: int | None, b: str, b_user: int | None, now: int) -> int:
        """The id of the direct conversation between two addresses, created if new."""
        key = direct_key(a, b)

        def op(conn: Connection) -> int:
            conn.execute(
                upsert_insert(conn, conversations)
                .values(kind="direct", key=key, created_at=now)
                .on_conflict_do_nothing()
            )
            conv_id = int(conn.execute(select(conversations.c.id).where(conversations.c.key == key)).scalar_one())
            conn.execute(
                upsert_insert(conn, conversation_members).on_conflict_do_nothing(),
                [
                    {"conversation_id": conv_id, "address": a, "user_id": a_user},
                    {"conversation_id": conv_id, "address": b, "user_id": b_user},
                ],
            )
            return conv_id

        return await self.db.write(op)

    async def find_direct(self, a: str, b: str) -> int | None:
        key = direct_key(a, b)

        def q(conn: Connection) -> int | None:
            return conn.execute(select(conversations.c.id).where(conversations.c.key == key)).scalar()

        return await self.db.read(q)

    # -- the hot path: ops for the group-commit writer --------------------------

    async def find_sent(self, sender: str, client_id: str) -> tuple[bytes, int] | None:
        """(digest, created_at) of a message already stored under (sender, client id)."""

        def q(conn: Connection) -> tuple[bytes, int] | None:
            row = conn.execute(
                select(messages.c.digest, messages.c.created_at).where(
                    messages.c.sender == sender, messages.c.client_id == client_id
                )
            ).first()
            return (bytes(row[0]), int(row[1])) if row else None

        return await self.db.read(q)

    def store_op(self, req: StoreRequest) -> Any:
        """A write op that stores a message once and queues it in the users' streams.

        A retry with the same (sender, client id) and the same digest returns the
        first outcome with ``duplicate=True``; a different digest raises IdConflict.
        """

        def op(conn: Connection) -> StoreOutcome:
            hot, cur = _hot(conn)
            cur.execute(hot.INSERT_MESSAGE, {
                "conversation_id": req.conversation_id, "sender": req.sender, "sender_device": req.sender_device,
                "client_id": req.client_id, "digest": req.digest, "envelope": req.envelope, "created_at": req.now,
            })
            row = cur.fetchone()
            if row is None:
                cur.execute(hot.MESSAGE_BY_CLIENT_ID, {"sender": req.sender, "client_id": req.client_id})
                existing = cur.fetchone()
                if bytes(existing[1]) != req.digest:
                    raise IdConflict("a different message was already sent with this id", id=req.client_id)
                return StoreOutcome(existing[0], existing[2], True, None, None)
            seq = int(row[0])
            if req.attachments and req.uploader_user_id is not None:
                link_blobs(conn, seq, req.attachments, req.uploader_user_id, req.conversation_id)
            if req.federate is not None:
                enqueue(conn, req.federate[0], req.federate[1], req.federate[2], req.now)
            recipient_event = sender_event = None
            if req.recipient_user_id is not None:
                recipient_event = _append_event(hot, cur, req.recipient_user_id, KIND_MESSAGE, seq, None)
            if req.sender_user_id is not None:
                sender_event = _append_event(hot, cur, req.sender_user_id, KIND_MESSAGE, seq, None)
            return StoreOutcome(seq, req.now, False, recipient_event, sender_event)

        return op

    def ack_op(
        self, user_id: int, address: str, device_id: int, upto: int, now: int, sign_receipt: ReceiptSigner | None = None
    ) -> Any:
        """A write op: the device has everything in its stream up to ``upto``.

        Moves the device cursor forward and records a delivered receipt for each
        newly acknowledged incoming message, queued in the sender's stream when the
        sender is local, or in the outbox to the sender's node (signed by
        ``sign_receipt``) when not. Returns those receipts (none for a repeated ack).
        """

        def op(conn: Connection) -> Receipts:
            hot, cur = _hot(conn)
            events = Receipts()
            cur.execute(hot.DEVICE_CURSOR, {"device_id": device_id})
            row = cur.fetchone()
            if row is None or upto <= row[0]:
                return events
            cur.execute(hot.ACKED_MESSAGES, {"user_id": user_id, "cursor": row[0], "upto": upto, "address": address})
            rows = cur.fetchall()
            cur.execute(hot.MOVE_CURSOR, {"device_id": device_id, "upto": upto})
            for mseq, client_id, sender_id, sender in rows:
                # RETURNING tells whether this device's ack was the first (rowcount is not portable).
                cur.execute(hot.INSERT_RECEIPT, {"message_seq": mseq, "recipient": address, "delivered_at": now})
                if cur.fetchone() is None:
                    continue
                if sender_id is not None:
                    payload = {"kind": "delivered", "id": client_id, "conversation": address, "by": address, "ts": now}
                    seq = _append_event(hot, cur, sender_id, KIND_RECEIPT, None, json.dumps(payload))
                    events.append(ReceiptEvent(sender_id, seq, payload))
                elif sign_receipt is not None and (node := _remote_node(sender, self.node_name)) is not None:
                    raw, sig = sign_receipt("delivered", address, sender, client_id, now)
                    enqueue(conn, node, raw, sig, now)
                    events.remote_nodes.add(node)
            return events

        return op

    def read_op(
        self,
        conversation_id: int, reader: str, reader_id: int, peer: str, upto_id: str, now: int, tell_peer: bool,
        sign_receipt: ReceiptSigner | None = None,
    ) -> Any:
        """A write op: ``reader`` has read the conversation up to the peer's message ``upto_id``.

        The marker only moves forward. Returns the events queued: a read receipt in
        the peer's stream (when local and ``tell_peer``), and a read_sync in the
        reader's own stream for their other devices. Raises BadRequest if the
        message is not the peer's in this conversation.
        """

        def op(conn: Connection) -> Receipts:
            mseq = conn.execute(
                select(messages.c.seq).where(
                    messages.c.sender == peer,
                    messages.c.client_id == upto_id,
                    messages.c.conversation_id == conversation_id,
                )
            ).scalar()
            if mseq is None:
                raise BadRequest("no such message from the peer in this conversation", id=upto_id)
            moved = conn.execute(
                upsert_insert(conn, read_markers)
                .values(conversation_id=conversation_id, reader=reader, upto_seq=mseq, updated_at=now)
                .on_conflict_do_update(
                    index_elements=["conversation_id", "reader"],
                    set_={"upto_seq": mseq, "updated_at": now},
                    where=read_markers.c.upto_seq < mseq,
                )
                .returning(read_markers.c.upto_seq)
            ).first() is not None
            events = Receipts()
            if not moved:
                return events
            hot, cur = _hot(conn)
            peer_id = _local_user_ids(conn, {peer}, self.node_name).get(peer)
            if tell_peer and peer_id is not None:
                payload = {"kind": "read", "id": upto_id, "conversation": reader, "by": reader, "ts": now}
                events.append(ReceiptEvent(peer_id, _append_event(hot, cur, peer_id, KIND_RECEIPT, None, json.dumps(payload)), payload))
            elif tell_peer and sign_receipt is not None and (node := _remote_node(peer, self.node_name)) is not None:
                raw, sig = sign_receipt("read", reader, peer, upto_id, now)
                enqueue(conn, node, raw, sig, now)
                events.remote_nodes.add(node)
            sync = {"kind": "read_sync", "id": upto_id, "conversation": peer, "by": reader, "ts": now}
            events.append(ReceiptEvent(reader_id, _append_event(hot, cur, reader_id, KIND_READ_SYNC, None, json.dumps(sync)), sync))
            return events

        return op

    def remote_receipt_op(self, kind: str, by: str, to: str, to_user_id: int, message_id: str, now: int) -> Any:
        """A write op: ``by`` (a user of another node) received or read ``to``'s message.

        Idempotent like the local receipts. Returns the receipt queued in ``to``'s
        stream (empty when nothing changed), or None when there is no such message.
        """

        def op(conn: Connection) -> Receipts | None:
            hot, cur = _hot(conn)
            cur.execute(hot.REMOTE_RECEIPT_MESSAGE, {"sender": to, "client_id": message_id, "key": direct_key(to, by)})
            found = cur.fetchone()
            if found is None:
                return None
            mseq, conversation_id = int(found[0]), int(found[1])
            events = Receipts()
            if kind == "delivered":
                cur.execute(hot.INSERT_RECEIPT, {"message_seq": mseq, "recipient": by, "delivered_at": now})
                changed = cur.fetchone() is not None
            else:
                changed = conn.execute(
                    upsert_insert(conn, read_markers)
                    .values(conversation_id=conversation_id, reader=by, upto_seq=mseq, updated_at=now)
                    .on_conflict_do_update(
                        index_elements=["conversation_id", "reader"],
                        set_={"upto_seq": mseq, "updated_at": now},
                        where=read_markers.c.upto_seq < mseq,
                    )
                    .returning(read_markers.c.upto_seq)
                ).first() is not None
            if changed:
                payload = {"kind": kind, "id": message_id, "conversation": by, "by": by, "ts": now}
                events.append(ReceiptEvent(to_user_id, _append_event(hot, cur, to_user_id, KIND_RECEIPT, None, json.dumps(payload)), payload))
            return events

        return op

    def call_log_op(self, entries: list[tuple[int, dict[str, Any]]]) -> Any:
        """A write op: append a call-history entry to each (local user id, payload)'s
        stream. Returns the stream events, to push once committed."""

        def op(conn: Connection) -> list[ReceiptEvent]:
            hot, cur = _hot(conn)
            return [ReceiptEvent(user_id, _append_event(hot, cur, user_id, KIND_CALL, None, json.dumps(payload)), payload)
                    for user_id, payload in entries]

        return op

    # -- reads -----------------------------------------------------------------

    async def backlog(self, user_id: int, after: int, limit: int) -> list[StreamEvent]:
        """The user's stream events after ``after``, oldest first, at most ``limit``."""

        def q(conn: Connection) -> list[StreamEvent]:
            rows = conn.execute(
                select(user_events.c.seq, user_events.c.kind, user_events.c.payload, *_MSG_COLS)
                .select_from(user_events)
                .outerjoin(messages, messages.c.seq == user_events.c.message_seq)
                .outerjoin(conversations, conversations.c.id == messages.c.conversation_id)
                .where(user_events.c.user_id == user_id, user_events.c.seq > after)
                .order_by(user_events.c.seq)
                .limit(limit)
            ).all()
            return [
                StreamEvent(
                    r[0], r[1],
                    _message(r[3:]) if r[3] is not None else None,
                    json.loads(r[2]) if r[2] is not None else None,
                )
                for r in rows
            ]

        return await self.db.read(q)

    async def history(
        self, conversation_id: int, peer: str, before: int | None, limit: int, *, peer_shares_reads: bool = True
    ) -> list[HistoryItem]:
        """Messages of the conversation newest first, before message seq ``before``.

        ``delivered`` and ``read`` tell whether ``peer`` received and read each one;
        ``read`` stays false when the peer does not share read receipts.
        """

        def q(conn: Connection) -> list[HistoryItem]:
            marker = _read_marker(conn, conversation_id, peer) if peer_shares_reads else 0
            stmt = (
                select(*_MSG_COLS, receipts.c.delivered_at)
                .select_from(messages)
                .join(conversations, conversations.c.id == messages.c.conversation_id)
                .outerjoin(receipts, and_(receipts.c.message_seq == messages.c.seq, receipts.c.recipient == peer))
                .where(messages.c.conversation_id == conversation_id)
                .order_by(messages.c.seq.desc())
                .limit(limit)
            )
            if before is not None:
                stmt = stmt.where(messages.c.seq < before)
            items = []
            for r in conn.execute(stmt):
                read = r[0] <= marker
                items.append(HistoryItem(_message(r), r[7] is not None or read, read))
            return items

        return await self.db.read(q)

    async def conversations_of(self, user_id: int, address: str) -> list[ConversationSummary]:
        """The user's conversations, most recent first, with unread counts."""

        def q(conn: Connection) -> list[ConversationSummary]:
            convs = conn.execute(
                select(conversations.c.id, conversations.c.key)
                .join(conversation_members, conversation_members.c.conversation_id == conversations.c.id)
                .where(conversation_members.c.user_id == user_id)
            ).all()
            out = []
            for conv_id, key in convs:
                last = conn.execute(
                    select(*_MSG_COLS)
                    .join(conversations, conversations.c.id == messages.c.conversation_id)
                    .where(messages.c.conversation_id == conv_id)
                    .order_by(messages.c.seq.desc())
                    .limit(1)
                ).first()
                marker = _read_marker(conn, conv_id, address)
                unread = conn.execute(
                    select(func.count()).where(
                        messages.c.conversation_id == conv_id, messages.c.seq > marker, messages.c.sender != address
                    )
                ).scalar_one()
                delivered = read = False
                if last is not None and last[2] == address:
                    peer = peer_of(key, address)
                    delivered = conn.execute(
                        select(receipts.c.delivered_at).where(receipts.c.message_seq == last[0], receipts.c.recipient == peer)
                    ).first() is not None
                    if _shares_reads(conn, peer, self.node_name):
                        read = last[0] <= _read_marker(conn, conv_id, peer)
                out.append(ConversationSummary(
                    conv_id, key, _message(last) if last else None, unread, marker, delivered or read, read,
                ))
            out.sort(key=lambda c: c.last.seq if c.last else 0, reverse=True)
            return out

        return await self.db.read(q)

    async def contacts_of(self, user_id: int) -> list[int]:
        """Local users who share a conversation with the user (presence watchers)."""

        def q(conn: Connection) -> list[int]:
            mine = select(conversation_members.c.conversation_id).where(conversation_members.c.user_id == user_id)
            rows = conn.execute(
                select(conversation_members.c.user_id)
                .where(
                    conversation_members.c.conversation_id.in_(mine),
                    conversation_members.c.user_id.is_not(None),
                    conversation_members.c.user_id != user_id,
                )
                .distinct()
            )
            return [int(r[0]) for r in rows]

        return await self.db.read(q)

    async def watchers_of(self, address: str) -> list[tuple[str, int | None]]:
        """Everyone who shares a conversation with ``address`` (a local or remote user):
        (address, local user id or None for users of other nodes)."""

        def q(conn: Connection) -> list[tuple[str, int | None]]:
            theirs = select(conversation_members.c.conversation_id).where(conversation_members.c.address == address)
            rows = conn.execute(
                select(conversation_members.c.address, conversation_members.c.user_id).distinct()
                .where(conversation_members.c.conversation_id.in_(theirs), conversation_members.c.address != address)
            )
            return [(r[0], None if r[1] is None else int(r[1])) for r in rows]

        return await self.db.read(q)

    async def users_watched_by(self, node: str) -> list[int]:
        """Local users who share a conversation with a user of ``node``."""

        def q(conn: Connection) -> list[int]:
            theirs = select(conversation_members.c.conversation_id).where(
                conversation_members.c.user_id.is_(None), conversation_members.c.address.like(f"%@{node}")
            )
            rows = conn.execute(
                select(conversation_members.c.user_id).distinct()
                .where(conversation_members.c.conversation_id.in_(theirs), conversation_members.c.user_id.is_not(None))
            )
            return [int(r[0]) for r in rows]

        return await self.db.read(q)

    async def remote_nodes(self) -> set[str]:
        """Every other node with a user in a conversation here."""

        def q(conn: Connection) -> set[str]:
            rows = conn.execute(
                select(conversation_members.c.address).distinct().where(conversation_members.c.user_id.is_(None))
            )
            return {r[0].partition("@")[2] for r in rows}

        return await self.db.read(q)

    async def stream_head(self, user_id: int) -> int:
        def q(conn: Connection) -> int:
            return int(
                conn.execute(
                    select(func.coalesce(func.max(user_events.c.seq), 0)).where(user_events.c.user_id == user_id)
                ).scalar_one()
            )

        return await self.db.read(q)


def _read_marker(conn: Connection, conversation_id: int, reader: str) -> int:
    return conn.execute(
        select(read_markers.c.upto_seq).where(read_markers.c.conversation_id == conversation_id, read_markers.c.reader == reader)
    ).scalar() or 0


def _shares_reads(conn: Connection, address: str, node_name: str) -> bool:
    """Whether a user lets others see read receipts. Another node's user: yes, since
    that node only sends the read receipts its user shares."""
    user, _, node = address.partition("@")
    if node != node_name:
        return True
    return bool(conn.execute(select(users.c.read_receipts).where(users.c.username == user)).scalar())


class _HotSQL:
    """The statements of the hot path as driver SQL, run on the raw DBAPI cursor.

    Per message the writer runs about seven statements; through SQLAlchemy Core each
    costs ~25 µs of Python before SQLite starts, more than SQLite's own work. These
    are plain SQL that SQLite and PostgreSQL both accept, written with
    ``%(name)s`` parameters and translated once to ``:name`` for sqlite3.
    """

    INSERT_MESSAGE = (
        "INSERT INTO messages (conversation_id, sender, sender_device, client_id, digest, envelope, created_at) "
        "VALUES (%(conversation_id)s, %(sender)s, %(sender_device)s, %(client_id)s, %(digest)s, %(envelope)s, %(created_at)s) "
        "ON CONFLICT (sender, client_id) DO NOTHING RETURNING seq"
    )
    MESSAGE_BY_CLIENT_ID = (
        "SELECT seq, digest, created_at FROM messages WHERE sender = %(sender)s AND client_id = %(client_id)s"
    )
    INSERT_EVENT = (
        "INSERT INTO user_events (user_id, kind, message_seq, payload) "
        "VALUES (%(user_id)s, %(kind)s, %(message_seq)s, %(payload)s) RETURNING seq"
    )
    DEVICE_CURSOR = 'SELECT "cursor" FROM devices WHERE id = %(device_id)s'
    MOVE_CURSOR = 'UPDATE devices SET "cursor" = %(upto)s WHERE id = %(device_id)s AND "cursor" < %(upto)s'
    # Newly acknowledged incoming messages, with the sender's user id when the
    # sender is local (from the conversation's members: no user lookup).
    ACKED_MESSAGES = (
        "SELECT m.seq, m.client_id, cm.user_id, m.sender FROM user_events e "
        "JOIN messages m ON m.seq = e.message_seq "
        "LEFT JOIN conversation_members cm ON cm.conversation_id = m.conversation_id AND cm.address = m.sender "
        "WHERE e.user_id = %(user_id)s AND e.seq > %(cursor)s AND e.seq <= %(upto)s "
        "AND e.kind = 'message' AND m.sender <> %(address)s ORDER BY e.seq"
    )
    # The local message a receipt from another node's user is about (in their direct chat).
    REMOTE_RECEIPT_MESSAGE = (
        "SELECT m.seq, m.conversation_id FROM messages m JOIN conversations c ON c.id = m.conversation_id "
        "WHERE m.sender = %(sender)s AND m.client_id = %(client_id)s AND c.key = %(key)s"
    )
    INSERT_RECEIPT = (
        "INSERT INTO receipts (message_seq, recipient, delivered_at) VALUES (%(message_seq)s, %(recipient)s, %(delivered_at)s) "
        "ON CONFLICT DO NOTHING RETURNING message_seq"
    )

    def __init__(self, dialect: str) -> None:
        if dialect == "sqlite":
            for name, sql in vars(_HotSQL).items():
                if name.isupper():
                    setattr(self, name, re.sub(r"%\((\w+)\)s", r":\1", sql))


_HOT: dict[str, _HotSQL] = {}


def _hot(conn: Connection) -> tuple[_HotSQL, Any]:
    """The hot SQL for this connection's dialect and a DBAPI cursor in its transaction."""
    name = conn.dialect.name
    hot = _HOT.get(name)
    if hot is None:
        hot = _HOT[name] = _HotSQL(name)
    return hot, conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]


def _append_event(hot: _HotSQL, cur: Any, user_id: int, kind: str, message_seq: int | None, payload: str | None) -> int:
    cur.execute(hot.INSERT_EVENT, {"user_id": user_id, "kind": kind, "message_seq": message_seq, "payload": payload})
    return int(cur.fetchone()[0])


def _remote_node(address: str, node_name: str) -> str | None:
    """The node of an address on another node; None for this node's own users."""
    _, _, node = address.partition("@")
    return node if node and node != node_name else None


def _local_user_ids(conn: Connection, addresses: set[str], node_name: str) -> dict[str, int]:
    """Map the addresses of this node's users to their ids (others are left out)."""
    suffix = "@" + node_name
    names = {a[: -len(suffix)]: a for a in addresses if a.endswith(suffix)}
    if not names:
        return {}
    rows = conn.execute(select(users.c.username, users.c.id).where(users.c.username.in_(list(names))))
    return {names[name]: int(uid) for name, uid in rows}
