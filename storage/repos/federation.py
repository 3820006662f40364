"""Remote nodes and the durable outbox of signed events to each of them.

An event for another node is written to ``fed_outbox`` in the same transaction as
the change it reports (a stored message, a receipt), so it can never be lost or
sent for a change that did not happen. ``oid``s increase per destination node;
the node's ``acked_oid`` says what it holds, and acknowledged rows are deleted.

A node's name is pinned to the first peer id seen with it: a second peer id
claiming the same name is recorded as a conflict for the operator and refused.
"""

from __future__ import annotations

import json
import re
from collections import deque
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, func, select, update

from storage.db import Database
from storage.repos._sql import upsert_insert
from storage.schema import conversation_members, fed_nodes, fed_outbox
from storage.writer import note_commit


@dataclass(frozen=True, slots=True)
class NodeRecord:
    name: str
    peer_id: str | None
    addrs: list[str]
    found_by: str
    first_seen: int
    last_seen: int | None
    blocked: bool
    next_oid: int
    acked_oid: int
    conflict: str | None

    @property
    def outbox_depth(self) -> int:
        return self.next_oid - 1 - self.acked_oid


@dataclass(frozen=True, slots=True)
class OutboxItem:
    oid: int
    event: bytes
    sig: str


@dataclass(frozen=True, slots=True)
class Enqueued:
    """The writer's commit note for an event queued for ``node``."""

    node: str
    item: OutboxItem


TAIL_MAX = 5000  # events per node kept in memory; older ones are read from the table


class OutboxTail:
    """The newest committed outbox events per node, in memory, so that a sender
    that keeps up gets them without a database read.

    Fed by the writer's commit notes, which arrive in commit (so oid) order. For a
    node it holds a run of consecutive oids and knows it has every committed event
    above ``floor``; for anything older (events from before this process, or ones
    let go) ``take`` says it cannot answer and the table is read instead.
    """

    def __init__(self, max_items: int = TAIL_MAX) -> None:
        self._max = max_items
        self._items: dict[str, deque[OutboxItem]] = {}
        self._floor: dict[str, int] = {}

    def committed(self, notes: list[Any]) -> None:
        """A commit listener (``GroupCommitWriter.add_commit_listener``)."""
        for note in notes:
            if not isinstance(note, Enqueued):
                continue
            items = self._items.get(note.node)
            if items is None:
                items = self._items[note.node] = deque()
            last = items[-1].oid if items else self._floor.get(note.node)
            if last is None or note.item.oid != last + 1:
                # The first event seen for this node, or not the next one (cannot
                # happen while oids are only handed out by enqueue): start afresh.
                items.clear()
                self._floor[note.node] = note.item.oid - 1
            items.append(note.item)
            if len(items) > self._max:
                self._floor[note.node] = items.popleft().oid

    def take(self, node: str, after: int, limit: int) -> list[OutboxItem] | None:
        """Up to ``limit`` events for ``node`` with an oid above ``after``, oldest first,
        or None when some of them may be in the table only.

        The caller has what is at or below ``after``: that is let go.
        """
        floor = self._floor.get(node)
        if floor is None or after < floor:
            return None
        items = self._items[node]
        while items and items[0].oid <= after:
            items.popleft()
        self._floor[node] = after
        if len(items) <= limit:
            return list(items)
        return [items[i] for i in range(limit)]


def _node(row: Any) -> NodeRecord:
    return NodeRecord(
        name=row.name, peer_id=row.peer_id, addrs=json.loads(row.addrs or "[]"), found_by=row.found_by,
        first_seen=row.first_seen, last_seen=row.last_seen, blocked=bool(row.blocked), next_oid=row.next_oid,
        acked_oid=row.acked_oid, conflict=row.conflict,
    )


# The outbox is written once per federated message and receipt, and trimmed once
# per acknowledgement, on the writer's thread: as driver SQL on the raw DBAPI
# cursor (like messages.py's hot path) an event costs ~15 µs, through SQLAlchemy
# Core ~450 µs of Python holding the GIL.
_ENQUEUE_SQL = {
    "bump": "UPDATE fed_nodes SET next_oid = next_oid + 1 WHERE name = %(node)s RETURNING next_oid",
    "new_node": (
        "INSERT INTO fed_nodes (name, addrs, found_by, first_seen, blocked, next_oid, acked_oid) "
        "VALUES (%(node)s, '[]', 'outbox', %(now)s, %(blocked)s, 1, 0) ON CONFLICT (name) DO NOTHING"
    ),
    "event": (
        "INSERT INTO fed_outbox (node, oid, event, sig, created_at) "
        "VALUES (%(node)s, %(oid)s, %(event)s, %(sig)s, %(now)s)"
    ),
    # acked_op, once per acknowledgement from each node
    "acked": "UPDATE fed_nodes SET acked_oid = %(upto)s WHERE name = %(node)s AND acked_oid < %(upto)s",
    "forget": "DELETE FROM fed_outbox WHERE node = %(node)s AND oid <= %(upto)s",
}
_ENQUEUE_BY_DIALECT: dict[str, dict[str, str]] = {}


def _enqueue_sql(dialect: str) -> dict[str, str]:
    sql = _ENQUEUE_BY_DIALECT.get(dialect)
    if sql is None:
        sql = dict(_ENQUEUE_SQL)
        if dialect == "sqlite":  # sqlite3 takes :name parameters
            sql = {k: re.sub(r"%\((\w+)\)s", r":\1", v) for k, v in sql.items()}
        _ENQUEUE_BY_DIALECT[dialect] = sql
    return sql


def enqueue(conn: Connection, node: str, event: bytes, sig: str, now: int) -> int:
    """Inside a write op: queue a signed event for ``node``; returns its oid."""
    sql = _enqueue_sql(conn.dialect.name)
    cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cur.execute(sql["bump"], {"node": node})
        row = cur.fetchone()
        if row is None:  # the first event for a node this one has not met
            cur.execute(sql["new_node"], {"node": node, "now": now, "blocked": False})
            cur.execute(sql["bump"], {"node": node})
            row = cur.fetchone()
        oid = int(row[0]) - 1
        cur.execute(sql["event"], {"node": node, "oid": oid, "event": event, "sig": sig, "now": now})
    finally:
        cur.close()
    note_commit(conn, Enqueued(node, OutboxItem(oid, event, sig)))
    return oid


class FederationRepo:
    def __init__(self, db: Database) -> None:
        self.db = db
        self.tail = OutboxTail()
        db.writer.add_commit_listener(self.tail.committed)

    async def node(self, name: str) -> NodeRecord | None:
        def q(conn: Connection) -> NodeRecord | None:
            row = conn.execute(select(fed_nodes).where(fed_nodes.c.name == name)).first()
            return _node(row) if row else None

        return await self.db.read(q)

    async def node_by_peer(self, peer_id: str) -> NodeRecord | None:
        def q(conn: Connection) -> NodeRecord | None:
            row = conn.execute(select(fed_nodes).where(fed_nodes.c.peer_id == peer_id)).first()
            return _node(row) if row else None

        return await self.db.read(q)

    async def nodes(self) -> list[NodeRecord]:
        def q(conn: Connection) -> list[NodeRecord]:
            return [_node(r) for r in conn.execute(select(fed_nodes).order_by(fed_nodes.c.name))]

        return await self.db.read(q)

    def seen_op(self, name: str, peer_id: str, addrs: list[str], found_by: str, now: int, *, replace: bool = False) -> Any:
        """A write op: ``peer_id`` says it is node ``name``. Returns the pinned name
        for this peer id, or None when the name belongs to another peer id (a
        conflict, recorded for the operator). With ``replace`` (the operator's
        choice) the name goes to ``peer_id`` whoever held it."""

        def op(conn: Connection) -> str | None:
            by_peer = conn.execute(select(fed_nodes.c.name).where(fed_nodes.c.peer_id == peer_id)).scalar()
            if by_peer is not None and by_peer != name:
                return None  # this peer id already is another node
            row = conn.execute(select(fed_nodes).where(fed_nodes.c.name == name)).first()
            if row is None:
                conn.execute(fed_nodes.insert().values(
                    name=name, peer_id=peer_id, addrs=json.dumps(addrs), found_by=found_by, first_seen=now,
                    last_seen=now, blocked=False, next_oid=1, acked_oid=0,
                ))
                return name
            if row.peer_id is not None and row.peer_id != peer_id and replace:
                conn.execute(update(fed_nodes).where(fed_nodes.c.name == name).values(
                    peer_id=peer_id, addrs=json.dumps(addrs[-16:]), found_by=found_by, last_seen=now,
                    conflict=f"{row.peer_id} held this name until the operator gave it to {peer_id}"))
                return name
            if row.peer_id is not None and row.peer_id != peer_id:
                where = f" at {' '.join(addrs[:2])}" if addrs else ""
                conn.execute(update(fed_nodes).where(fed_nodes.c.name == name).values(
                    conflict=f"{peer_id}{where} also claims this name (last seen {now}); "
                             f"`moot peers pin <its address>` gives it the name"))
                return None
            known = json.loads(row.addrs or "[]")
            merged = known + [a for a in addrs if a not in known]
            values: dict[str, Any] = {"peer_id": peer_id, "addrs": json.dumps(merged[-16:]), "last_seen": now}
            if row.found_by == "outbox":
                values["found_by"] = found_by
            conn.execute(update(fed_nodes).where(fed_nodes.c.name == name).values(**values))
            return name

        return op

    def acked_op(self, name: str, upto: int) -> Any:
        """A write op: ``name`` holds every event up to ``upto``: forget them."""

        def op(conn: Connection) -> None:
            sql = _enqueue_sql(conn.dialect.name)
            cur = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cur.execute(sql["acked"], {"node": name, "upto": upto})
                cur.execute(sql["forget"], {"node": name, "upto": upto})
            finally:
                cur.close()

        return op

    async def pending(self, name: str, after: int, limit: int) -> list[OutboxItem]:
        """Queued events for ``name`` with an oid above ``after``, oldest first.

        From memory when the tail has them all (then ``after`` and older are
        forgotten there: see ``OutboxTail.take``).
        """
        recent = self.tail.take(name, after, limit)
        if recent is not None:
            return recent

        def q(conn: Connection) -> list[OutboxItem]:
            rows = conn.execute(
                select(fed_outbox.c.oid, fed_outbox.c.event, fed_outbox.c.sig)
                .where(fed_outbox.c.node == name, fed_outbox.c.oid > after)
                .order_by(fed_outbox.c.oid).limit(limit)
            )
            return [OutboxItem(int(r[0]), bytes(r[1]), r[2]) for r in rows]

        return await self.db.read(q)

    async def nodes_talking_to(self, address: str) -> set[str]:
        """Other nodes with a user who shares a conversation with ``address``."""

        def q(conn: Connection) -> set[str]:
            mine = select(conversation_members.c.conversation_id).where(conversation_members.c.address == address)
            rows = conn.execute(
                select(conversation_members.c.address).distinct()
                .where(conversation_members.c.conversation_id.in_(mine), conversation_members.c.user_id.is_(None))
            )
            return {r[0].partition("@")[2] for r in rows}

        return await self.db.read(q)

    async def depth(self, name: str) -> int:
        def q(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).where(fed_outbox.c.node == name)).scalar_one())

        return await self.db.read(q)

    def blocked_op(self, name: str, blocked: bool, now: int) -> Any:
        def op(conn: Connection) -> bool:
            conn.execute(
                upsert_insert(conn, fed_nodes)
                .values(name=name, peer_id=None, addrs="[]", found_by="operator", first_seen=now, blocked=blocked,
                        next_oid=1, acked_oid=0)
                .on_conflict_do_update(index_elements=["name"], set_={"blocked": blocked})
            )
            return blocked

        return op
