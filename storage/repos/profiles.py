"""Profiles, avatars, the user directory, and what a user's data occupies."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, and_, func, or_, select, update

from node.errors import UnknownUser
from storage.db import Database
from storage.schema import avatars, conversation_members, devices, messages, one_time_prekeys, user_events, users


@dataclass(frozen=True, slots=True)
class AvatarInfo:
    content_type: str
    digest: str
    size: int


@dataclass(frozen=True, slots=True)
class ProfileRecord:
    user_id: int
    username: str
    disabled: bool
    display_name: str
    status_text: str
    listed: bool
    updated_at: int | None
    avatar: AvatarInfo | None


@dataclass(frozen=True, slots=True)
class Avatar:
    content_type: str
    digest: str
    data: bytes


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


_COLS = (
    users.c.id, users.c.username, users.c.disabled, users.c.display_name, users.c.status_text, users.c.listed,
    users.c.profile_updated_at, avatars.c.content_type, avatars.c.digest, func.length(avatars.c.data),
)


def _record(row: object) -> ProfileRecord:
    (user_id, username, disabled, display_name, status_text, listed, updated_at, ctype, digest, size) = row  # type: ignore[misc]
    avatar = AvatarInfo(ctype, digest, int(size)) if ctype is not None else None
    return ProfileRecord(user_id, username, disabled, display_name, status_text, listed, updated_at, avatar)


def _profiles() -> object:
    return select(*_COLS).select_from(users.outerjoin(avatars, avatars.c.user_id == users.c.id))


class ProfileRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def get(self, username: str) -> ProfileRecord | None:
        def q(conn: Connection) -> ProfileRecord | None:
            row = conn.execute(_profiles().where(users.c.username == username)).first()  # type: ignore[attr-defined]
            return _record(row) if row else None

        return await self.db.read(q)

    async def update(self, user_id: int, now: int, **values: object) -> None:
        """Set some of display_name, status_text, listed; raises UnknownUser."""

        def op(conn: Connection) -> None:
            changed = conn.execute(update(users).where(users.c.id == user_id).values(profile_updated_at=now, **values))
            if changed.rowcount != 1:
                raise UnknownUser("no such user")

        await self.db.write(op)

    async def set_avatar(self, user_id: int, content_type: str, digest: str, data: bytes, now: int) -> None:
        def op(conn: Connection) -> None:
            if conn.execute(update(users).where(users.c.id == user_id).values(profile_updated_at=now)).rowcount != 1:
                raise UnknownUser("no such user")
            conn.execute(avatars.delete().where(avatars.c.user_id == user_id))
            conn.execute(avatars.insert().values(user_id=user_id, content_type=content_type, digest=digest, data=data, updated_at=now))

        await self.db.write(op)

    async def delete_avatar(self, user_id: int, now: int) -> bool:
        def op(conn: Connection) -> bool:
            conn.execute(update(users).where(users.c.id == user_id).values(profile_updated_at=now))
            return bool(conn.execute(avatars.delete().where(avatars.c.user_id == user_id)).rowcount)

        return await self.db.write(op)

    async def avatar(self, username: str) -> Avatar | None:
        """The avatar of an enabled user, or None."""

        def q(conn: Connection) -> Avatar | None:
            row = conn.execute(
                select(avatars.c.content_type, avatars.c.digest, avatars.c.data)
                .join(users, users.c.id == avatars.c.user_id)
                .where(users.c.username == username, users.c.disabled.is_(False))
            ).first()
            return Avatar(row[0], row[1], bytes(row[2])) if row else None

        return await self.db.read(q)

    async def search_directory(self, query: str, *, after: str = "", limit: int = 20) -> list[ProfileRecord]:
        """Enabled, listed users whose name or display name contains ``query``
        (case-insensitive), by user name, those after ``after`` only."""

        def q(conn: Connection) -> list[ProfileRecord]:
            stmt = _profiles().where(users.c.listed.is_(True), users.c.disabled.is_(False))  # type: ignore[attr-defined]
            if query:
                pattern = f"%{_like_escape(query.lower())}%"
                stmt = stmt.where(or_(
                    users.c.username.like(pattern, escape="\\"),
                    func.lower(users.c.display_name).like(pattern, escape="\\"),
                ))
            if after:
                stmt = stmt.where(users.c.username > after)
            return [_record(r) for r in conn.execute(stmt.order_by(users.c.username).limit(limit))]

        return await self.db.read(q)

    async def storage_used(self, user_id: int, address: str) -> dict[str, int]:
        """Bytes the user's data occupies: messages they sent and received (envelopes),
        their avatar, profile text and device keys; approximate (no index overhead)."""

        def q(conn: Connection) -> dict[str, int]:
            sent_count, sent_bytes = conn.execute(
                select(func.count(), func.coalesce(func.sum(func.length(messages.c.envelope)), 0))
                .where(messages.c.sender == address)
            ).one()
            received_count, received_bytes = conn.execute(
                select(func.count(), func.coalesce(func.sum(func.length(messages.c.envelope)), 0))
                .select_from(messages.join(conversation_members, and_(
                    conversation_members.c.conversation_id == messages.c.conversation_id,
                    conversation_members.c.user_id == user_id,
                )))
                .where(messages.c.sender != address)
            ).one()
            avatar_bytes = conn.execute(
                select(func.coalesce(func.sum(func.length(avatars.c.data)), 0)).where(avatars.c.user_id == user_id)
            ).scalar_one()
            profile_bytes = conn.execute(
                select(func.length(users.c.display_name) + func.length(users.c.status_text)).where(users.c.id == user_id)
            ).scalar() or 0
            n_devices = conn.execute(select(func.count()).where(devices.c.user_id == user_id)).scalar_one()
            n_prekeys = conn.execute(
                select(func.count()).select_from(one_time_prekeys.join(devices, devices.c.id == one_time_prekeys.c.device_id))
                .where(devices.c.user_id == user_id)
            ).scalar_one()
            n_events = conn.execute(select(func.count()).where(user_events.c.user_id == user_id)).scalar_one()
            # A device row holds 192 bytes of keys and signature; a one-time prekey 32.
            key_bytes = n_devices * 192 + n_prekeys * 32
            total = int(sent_bytes) + int(received_bytes) + int(avatar_bytes) + int(profile_bytes) + key_bytes
            return {
                "messages_sent": int(sent_count), "messages_sent_bytes": int(sent_bytes),
                "messages_received": int(received_count), "messages_received_bytes": int(received_bytes),
                "avatar_bytes": int(avatar_bytes), "profile_bytes": int(profile_bytes), "key_bytes": key_bytes,
                "queued_events": int(n_events), "total_bytes": total,
            }

        return await self.db.read(q)


__all__ = ["Avatar", "AvatarInfo", "ProfileRecord", "ProfileRepo"]
