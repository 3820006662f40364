"""Attachments: which encrypted blobs exist, who uploaded them for which conversation,
and which messages carry them. The bytes themselves are files (node/attachments.py).

A blob is readable by the members of a conversation it belongs to (the one it was
uploaded for, or the conversation of a message that carries it), and deleted when
no message carries it and its last upload is older than the orphan TTL.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import Connection, delete, exists, func, select, union

from node.errors import BadRequest
from storage.db import Database
from storage.repos._sql import upsert_insert
from storage.schema import blob_refs, blob_uploads, blobs, conversation_members, messages


def link_blobs(conn: Connection, message_seq: int, digests: Iterable[str], user_id: int, conversation_id: int) -> None:
    """Inside a write op: the message ``message_seq`` carries these blobs.

    Each must have been uploaded by ``user_id`` for ``conversation_id`` (and not be
    deleted since); otherwise BadRequest (``reason: unknown_attachment``) rolls the
    whole transaction back, message included.
    """
    for digest in digests:
        found = conn.execute(
            select(blob_uploads.c.digest).where(
                blob_uploads.c.digest == digest, blob_uploads.c.user_id == user_id,
                blob_uploads.c.conversation_id == conversation_id,
            )
        ).first()
        if found is None:
            raise BadRequest(
                "no such attachment of yours in this conversation (upload it first)",
                reason="unknown_attachment", blob=digest,
            )
        conn.execute(upsert_insert(conn, blob_refs).values(digest=digest, message_seq=message_seq).on_conflict_do_nothing())


def drop_message_blobs(conn: Connection, message_seq: int) -> list[str]:
    """Inside a write op: the message no longer carries its blobs (it was deleted).

    Returns the digests that no message carries any more; their rows are deleted
    (the caller deletes their files after the commit: ``AttachmentService.forget``).
    """
    digests = [r[0] for r in conn.execute(select(blob_refs.c.digest).where(blob_refs.c.message_seq == message_seq))]
    if not digests:
        return []
    conn.execute(delete(blob_refs).where(blob_refs.c.message_seq == message_seq))
    gone = conn.execute(
        delete(blobs)
        .where(blobs.c.digest.in_(digests), ~exists().where(blob_refs.c.digest == blobs.c.digest))
        .returning(blobs.c.digest)
    )
    return sorted(r[0] for r in gone)


class AttachmentRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    def record_upload_op(self, digest: str, size: int, user_id: int, conversation_id: int, now: int) -> Any:
        """A write op: ``user_id`` uploaded the blob ``digest`` for ``conversation_id``.
        Idempotent; a repeated upload renews the blob's orphan deadline."""

        def op(conn: Connection) -> None:
            conn.execute(
                upsert_insert(conn, blobs).values(digest=digest, size=size, created_at=now, last_upload_at=now)
                .on_conflict_do_update(index_elements=["digest"], set_={"last_upload_at": now})
            )
            conn.execute(
                upsert_insert(conn, blob_uploads)
                .values(digest=digest, user_id=user_id, conversation_id=conversation_id, created_at=now)
                .on_conflict_do_nothing()
            )

        return op

    async def unlinkable(self, digests: list[str], user_id: int, conversation_id: int) -> list[str]:
        """Those of ``digests`` that ``user_id`` did not upload for ``conversation_id``."""

        def q(conn: Connection) -> list[str]:
            found = {r[0] for r in conn.execute(
                select(blob_uploads.c.digest).where(
                    blob_uploads.c.digest.in_(digests), blob_uploads.c.user_id == user_id,
                    blob_uploads.c.conversation_id == conversation_id,
                )
            )}
            return [d for d in digests if d not in found]

        return await self.db.read(q)

    async def readable_size(self, digest: str, address: str, conversation_id: int) -> int | None:
        """The blob's size if it belongs to ``conversation_id`` (uploaded for it, or carried
        by one of its messages) and ``address`` is a member of that conversation; else None."""

        def q(conn: Connection) -> int | None:
            member = conn.execute(
                select(conversation_members.c.address).where(
                    conversation_members.c.conversation_id == conversation_id, conversation_members.c.address == address,
                )
            ).first()
            if member is None:
                return None
            belongs = union(
                select(blob_uploads.c.digest).where(
                    blob_uploads.c.digest == digest, blob_uploads.c.conversation_id == conversation_id,
                ),
                select(blob_refs.c.digest).select_from(blob_refs.join(messages, messages.c.seq == blob_refs.c.message_seq))
                .where(blob_refs.c.digest == digest, messages.c.conversation_id == conversation_id),
            ).subquery()
            size = conn.execute(
                select(blobs.c.size).where(blobs.c.digest == digest, blobs.c.digest.in_(select(belongs.c.digest)))
            ).scalar()
            return int(size) if size is not None else None

        return await self.db.read(q)

    async def orphans(self, cutoff: int, limit: int) -> list[str]:
        """Blobs no message carries whose last upload was before ``cutoff`` (oldest first)."""

        def q(conn: Connection) -> list[str]:
            return [r[0] for r in conn.execute(
                select(blobs.c.digest)
                .where(blobs.c.last_upload_at < cutoff, ~exists().where(blob_refs.c.digest == blobs.c.digest))
                .order_by(blobs.c.last_upload_at).limit(limit)
            )]

        return await self.db.read(q)

    def delete_orphans_op(self, digests: list[str], cutoff: int) -> Any:
        """A write op: delete those of ``digests`` that are still orphans (checked again in
        the transaction: a message may have linked one meanwhile). Returns those deleted."""

        def op(conn: Connection) -> list[str]:
            if not digests:
                return []
            gone = conn.execute(
                delete(blobs)
                .where(
                    blobs.c.digest.in_(digests), blobs.c.last_upload_at < cutoff,
                    ~exists().where(blob_refs.c.digest == blobs.c.digest),
                )
                .returning(blobs.c.digest)
            )
            return sorted(r[0] for r in gone)

        return op

    def drop_message_op(self, message_seq: int) -> Any:
        """A write op around ``drop_message_blobs``."""

        def op(conn: Connection) -> list[str]:
            return drop_message_blobs(conn, message_seq)

        return op

    async def known(self, digests: list[str]) -> set[str]:
        """Which of ``digests`` have a row."""

        def q(conn: Connection) -> set[str]:
            return {r[0] for r in conn.execute(select(blobs.c.digest).where(blobs.c.digest.in_(digests)))}

        return await self.db.read(q)

    async def refs(self, digest: str) -> list[int]:
        """The seqs of the messages that carry ``digest``."""

        def q(conn: Connection) -> list[int]:
            return sorted(int(r[0]) for r in conn.execute(select(blob_refs.c.message_seq).where(blob_refs.c.digest == digest)))

        return await self.db.read(q)

    async def storage_used(self, user_id: int) -> tuple[int, int]:
        """(count, bytes) of the blobs the user uploaded (each counted once)."""

        def q(conn: Connection) -> tuple[int, int]:
            mine = select(blob_uploads.c.digest).where(blob_uploads.c.user_id == user_id).distinct().subquery()
            count, total = conn.execute(
                select(func.count(), func.coalesce(func.sum(blobs.c.size), 0))
                .select_from(blobs.join(mine, mine.c.digest == blobs.c.digest))
            ).one()
            return int(count), int(total)

        return await self.db.read(q)

    async def totals(self) -> tuple[int, int]:
        """(count, bytes) of every blob on the node."""

        def q(conn: Connection) -> tuple[int, int]:
            count, total = conn.execute(select(func.count(), func.coalesce(func.sum(blobs.c.size), 0))).one()
            return int(count), int(total)

        return await self.db.read(q)


__all__ = ["AttachmentRepo", "drop_message_blobs", "link_blobs"]
