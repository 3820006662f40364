"""Conversations, messages, receipts, read markers and the per-user event stream.

Every write here is idempotent: a message is keyed by (sender, client id), a
delivered receipt by (message, recipient), and a read marker only moves forward.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, and_, bindparam, func, select, update
from sqlalchemy.dialects import postgresql, sqlite

from node.errors import BadRequest, IdConflict
from storage.db import Database
from storage.repos._sql import upsert_insert
from storage.schema import (
    conversation_members,
    conversations,
    devices,
    messages,
    read_markers,
    receipts,
    user_events,
    users,
)

KIND_MESSAGE = "message"
KIND_RECEIPT = "receipt"
KIND_READ_SYNC = "read_sync"


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

    def store_op(self, req: StoreRequest) -> Any:
        """A write op that stores a message once and queues it in the users' streams.

        A retry with the same (sender, client id) and the same digest returns the
        first outcome with ``duplicate=True``; a different digest raises IdConflict.
        """

        def op(conn: Connection) -> StoreOutcome:
            hot = _hot(conn)
            seq = conn.execute(hot.insert_message, {
                "conversation_id": req.conversation_id, "sender": req.sender, "sender_device": req.sender_device,
                "client_id": req.client_id, "digest": req.digest, "envelope": req.envelope, "created_at": req.now,
            }).scalar()
            if seq is None:
                existing = conn.execute(hot.message_by_client_id, {"sender": req.sender, "client_id": req.client_id}).one()
                if bytes(existing[1]) != req.digest:
                    raise IdConflict("a different message was already sent with this id", id=req.client_id)
                return StoreOutcome(existing[0], existing[2], True, None, None)
            recipient_event = sender_event = None
            if req.recipient_user_id is not None:
                recipient_event = _append_event(conn, req.recipient_user_id, KIND_MESSAGE, seq, None)
            if req.sender_user_id is not None:
                sender_event = _append_event(conn, req.sender_user_id, KIND_MESSAGE, seq, None)
            return StoreOutcome(seq, req.now, False, recipient_event, sender_event)

        return op

    def ack_op(self, user_id: int, address: str, device_id: int, upto: int, now: int) -> Any:
        """A write op: the device has everything in its stream up to ``upto``.

        Moves the device cursor forward and records a delivered receipt for each
        newly acknowledged incoming message, queued in the sender's stream when the
        sender is local. Returns those receipt events (none for a repeated ack).
        """

        def op(conn: Connection) -> list[ReceiptEvent]:
            hot = _hot(conn)
            cursor = conn.execute(hot.device_cursor, {"id": device_id}).scalar()
            if cursor is None or upto <= cursor:
                return []
            rows = conn.execute(
                hot.acked_messages, {"user_id": user_id, "cursor": cursor, "upto": upto, "address": address}
            ).all()
            conn.execute(hot.move_cursor, {"device_id": device_id, "upto": upto})
            events: list[ReceiptEvent] = []
            for mseq, client_id, sender_id in rows:
                # RETURNING, not rowcount: SQLAlchemy does not keep INSERT row counts on psycopg.
                inserted = conn.execute(
                    hot.insert_receipt, {"message_seq": mseq, "recipient": address, "delivered_at": now}
                ).first() is not None
                if inserted and sender_id is not None:
                    payload = {"kind": "delivered", "id": client_id, "conversation": address, "by": address, "ts": now}
                    seq = _append_event(conn, sender_id, KIND_RECEIPT, None, json.dumps(payload))
                    events.append(ReceiptEvent(sender_id, seq, payload))
            return events

        return op

    def read_op(
        self,
        conversation_id: int, reader: str, reader_id: int, peer: str, upto_id: str, now: int, tell_peer: bool
    ) -> Any:
        """A write op: ``reader`` has read the conversation up to the peer's message ``upto_id``.

        The marker only moves forward. Returns the events queued: a read receipt in
        the peer's stream (when local and ``tell_peer``), and a read_sync in the
        reader's own stream for their other devices. Raises BadRequest if the
        message is not the peer's in this conversation.
        """

        def op(conn: Connection) -> list[ReceiptEvent]:
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
            events: list[ReceiptEvent] = []
            if not moved:
                return events
            peer_id = _local_user_ids(conn, {peer}, self.node_name).get(peer)
            if tell_peer and peer_id is not None:
                payload = {"kind": "read", "id": upto_id, "conversation": reader, "by": reader, "ts": now}
                events.append(ReceiptEvent(peer_id, _append_event(conn, peer_id, KIND_RECEIPT, None, json.dumps(payload)), payload))
            sync = {"kind": "read_sync", "id": upto_id, "conversation": peer, "by": reader, "ts": now}
            events.append(ReceiptEvent(reader_id, _append_event(conn, reader_id, KIND_READ_SYNC, None, json.dumps(sync)), sync))
            return events

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

    async def history(self, conversation_id: int, peer: str, before: int | None, limit: int) -> list[HistoryItem]:
        """Messages of the conversation newest first, before message seq ``before``.

        ``delivered`` and ``read`` tell whether ``peer`` received and read each one.
        """

        def q(conn: Connection) -> list[HistoryItem]:
            marker = conn.execute(
                select(read_markers.c.upto_seq).where(
                    read_markers.c.conversation_id == conversation_id, read_markers.c.reader == peer
                )
            ).scalar() or 0
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
                marker = conn.execute(
                    select(read_markers.c.upto_seq).where(
                        read_markers.c.conversation_id == conv_id, read_markers.c.reader == address
                    )
                ).scalar() or 0
                unread = conn.execute(
                    select(func.count()).where(
                        messages.c.conversation_id == conv_id, messages.c.seq > marker, messages.c.sender != address
                    )
                ).scalar_one()
                out.append(ConversationSummary(conv_id, key, _message(last) if last else None, unread, marker))
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

    async def stream_head(self, user_id: int) -> int:
        def q(conn: Connection) -> int:
            return int(
                conn.execute(
                    select(func.coalesce(func.max(user_events.c.seq), 0)).where(user_events.c.user_id == user_id)
                ).scalar_one()
            )

        return await self.db.read(q)


class _HotStatements:
    """The statements of the hot path, built once per dialect.

    Building a SQLAlchemy statement costs more than running it on SQLite, so the
    writer's ops only bind parameters to these.
    """

    def __init__(self, dialect: str) -> None:
        insert = postgresql.insert if dialect == "postgresql" else sqlite.insert
        self.insert_message = (
            insert(messages)
            .on_conflict_do_nothing(index_elements=["sender", "client_id"])
            .returning(messages.c.seq)
        )
        self.message_by_client_id = select(messages.c.seq, messages.c.digest, messages.c.created_at).where(
            messages.c.sender == bindparam("sender"), messages.c.client_id == bindparam("client_id")
        )
        self.insert_event = user_events.insert()
        self.device_cursor = select(devices.c.cursor).where(devices.c.id == bindparam("id"))
        self.move_cursor = (
            update(devices)
            .where(devices.c.id == bindparam("device_id"), devices.c.cursor < bindparam("upto"))
            .values(cursor=bindparam("upto"))
        )
        # Newly acknowledged incoming messages, with the sender's user id when the
        # sender is local (from the conversation's members: no user lookup).
        self.acked_messages = (
            select(messages.c.seq, messages.c.client_id, conversation_members.c.user_id)
            .select_from(user_events)
            .join(messages, messages.c.seq == user_events.c.message_seq)
            .outerjoin(
                conversation_members,
                and_(
                    conversation_members.c.conversation_id == messages.c.conversation_id,
                    conversation_members.c.address == messages.c.sender,
                ),
            )
            .where(
                user_events.c.user_id == bindparam("user_id"),
                user_events.c.seq > bindparam("cursor"),
                user_events.c.seq <= bindparam("upto"),
                user_events.c.kind == KIND_MESSAGE,
                messages.c.sender != bindparam("address"),
            )
            .order_by(user_events.c.seq)
        )
        self.insert_receipt = insert(receipts).on_conflict_do_nothing().returning(receipts.c.message_seq)


_HOT: dict[str, _HotStatements] = {}


def _hot(conn: Connection) -> _HotStatements:
    name = conn.dialect.name
    hot = _HOT.get(name)
    if hot is None:
        hot = _HOT[name] = _HotStatements(name)
    return hot


def _append_event(conn: Connection, user_id: int, kind: str, message_seq: int | None, payload: str | None) -> int:
    result = conn.execute(
        _hot(conn).insert_event, {"user_id": user_id, "kind": kind, "message_seq": message_seq, "payload": payload}
    )
    return int(result.inserted_primary_key[0])


def _local_user_ids(conn: Connection, addresses: set[str], node_name: str) -> dict[str, int]:
    """Map the addresses of this node's users to their ids (others are left out)."""
    suffix = "@" + node_name
    names = {a[: -len(suffix)]: a for a in addresses if a.endswith(suffix)}
    if not names:
        return {}
    rows = conn.execute(select(users.c.username, users.c.id).where(users.c.username.in_(list(names))))
    return {names[name]: int(uid) for name, uid in rows}
