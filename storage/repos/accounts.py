"""Users, invites and sessions."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, func, select, update

from node.errors import BadInvite, UnknownUser, UsernameTaken
from storage.db import Database
from storage.schema import avatars, devices, invites, retired_usernames, sessions, user_events, users


@dataclass(frozen=True, slots=True)
class UserRecord:
    id: int
    username: str
    password_hash: str
    created_at: int
    disabled: bool
    read_receipts: bool
    last_seen: int | None
    show_presence: bool


@dataclass(frozen=True, slots=True)
class SessionRecord:
    id: int
    user_id: int
    username: str
    device_id: int | None
    expires_at: int
    revoked: bool
    user_disabled: bool


@dataclass(frozen=True, slots=True)
class InviteRecord:
    id: int
    created_at: int
    expires_at: int | None
    max_uses: int
    uses: int
    revoked: bool
    note: str


def _user(row: object) -> UserRecord:
    return UserRecord(*row)  # type: ignore[misc]


_USER_COLS = (
    users.c.id, users.c.username, users.c.password_hash, users.c.created_at,
    users.c.disabled, users.c.read_receipts, users.c.last_seen, users.c.show_presence,
)


class AccountRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    # -- users -----------------------------------------------------------------

    async def create_user(self, username: str, password_hash: str, now: int, invite_hash: bytes | None) -> int:
        """Create a user, consuming one use of the invite if given.

        Raises UsernameTaken, or BadInvite if the invite is unknown, used up,
        revoked or expired. Both happen in one transaction.
        """

        def op(conn: Connection) -> int:
            if invite_hash is not None:
                used = conn.execute(
                    update(invites)
                    .where(
                        invites.c.code_hash == invite_hash,
                        invites.c.revoked.is_(False),
                        invites.c.uses < invites.c.max_uses,
                        (invites.c.expires_at.is_(None)) | (invites.c.expires_at > now),
                    )
                    .values(uses=invites.c.uses + 1)
                )
                if used.rowcount != 1:
                    raise BadInvite("the invite code is not valid")
            exists = conn.execute(select(users.c.id).where(users.c.username == username)).first()
            if exists:
                raise UsernameTaken(f"the name {username!r} is taken")
            if conn.execute(select(retired_usernames.c.username).where(retired_usernames.c.username == username)).first():
                raise UsernameTaken(f"the name {username!r} belonged to a deleted account and is not given out again")
            result = conn.execute(
                users.insert().values(
                    username=username, password_hash=password_hash, created_at=now,
                    disabled=False, read_receipts=True, show_presence=True,
                )
            )
            return int(result.inserted_primary_key[0])

        return await self.db.write(op)

    async def get_user(self, username: str) -> UserRecord | None:
        def q(conn: Connection) -> UserRecord | None:
            row = conn.execute(select(*_USER_COLS).where(users.c.username == username)).first()
            return _user(row) if row else None

        return await self.db.read(q)

    async def get_user_by_id(self, user_id: int) -> UserRecord | None:
        def q(conn: Connection) -> UserRecord | None:
            row = conn.execute(select(*_USER_COLS).where(users.c.id == user_id)).first()
            return _user(row) if row else None

        return await self.db.read(q)

    async def list_users(self, *, prefix: str = "", limit: int = 1000, listed_only: bool = False) -> list[UserRecord]:
        def q(conn: Connection) -> list[UserRecord]:
            stmt = select(*_USER_COLS).order_by(users.c.username).limit(limit)
            if listed_only:
                stmt = stmt.where(users.c.listed.is_(True))
            if prefix:
                stmt = stmt.where(users.c.username.startswith(prefix, autoescape=True))
            return [_user(r) for r in conn.execute(stmt)]

        return await self.db.read(q)

    async def user_stats(self, user_id: int) -> dict[str, int]:
        def q(conn: Connection) -> dict[str, int]:
            n_devices = conn.execute(select(func.count()).where(devices.c.user_id == user_id)).scalar_one()
            n_sessions = conn.execute(
                select(func.count()).where(sessions.c.user_id == user_id, sessions.c.revoked.is_(False))
            ).scalar_one()
            n_events = conn.execute(select(func.count()).where(user_events.c.user_id == user_id)).scalar_one()
            return {"devices": n_devices, "sessions": n_sessions, "queued_events": n_events}

        return await self.db.read(q)

    async def set_disabled(self, user_id: int, disabled: bool) -> None:
        await self._update_user(user_id, disabled=disabled)

    async def set_password_hash(self, user_id: int, password_hash: str) -> None:
        await self._update_user(user_id, password_hash=password_hash)

    async def set_read_receipts(self, user_id: int, enabled: bool) -> None:
        await self._update_user(user_id, read_receipts=enabled)

    async def set_show_presence(self, user_id: int, shown: bool) -> None:
        await self._update_user(user_id, show_presence=shown)

    async def set_last_seen(self, user_id: int, when: int) -> None:
        await self._update_user(user_id, last_seen=when)

    async def _update_user(self, user_id: int, **values: object) -> None:
        def op(conn: Connection) -> None:
            if conn.execute(update(users).where(users.c.id == user_id).values(**values)).rowcount != 1:
                raise UnknownUser("no such user")

        await self.db.write(op)

    async def delete_user(self, user_id: int, now: int) -> None:
        """Delete the user with their devices, sessions and queued events; retire the name."""

        def op(conn: Connection) -> None:
            name = conn.execute(select(users.c.username).where(users.c.id == user_id)).scalar()
            if name is None:
                raise UnknownUser("no such user")
            conn.execute(retired_usernames.insert().values(username=name, retired_at=now))
            # Deleted explicitly too: SQLite only cascades with foreign_keys on.
            conn.execute(sessions.delete().where(sessions.c.user_id == user_id))
            conn.execute(user_events.delete().where(user_events.c.user_id == user_id))
            conn.execute(devices.delete().where(devices.c.user_id == user_id))
            conn.execute(avatars.delete().where(avatars.c.user_id == user_id))
            if conn.execute(users.delete().where(users.c.id == user_id)).rowcount != 1:
                raise UnknownUser("no such user")

        await self.db.write(op)

    # -- invites ---------------------------------------------------------------

    async def create_invite(self, code_hash: bytes, now: int, expires_at: int | None, max_uses: int, note: str) -> int:
        def op(conn: Connection) -> int:
            result = conn.execute(
                invites.insert().values(
                    code_hash=code_hash, created_at=now, expires_at=expires_at,
                    max_uses=max_uses, uses=0, revoked=False, note=note,
                )
            )
            return int(result.inserted_primary_key[0])

        return await self.db.write(op)

    async def list_invites(self) -> list[InviteRecord]:
        def q(conn: Connection) -> list[InviteRecord]:
            rows = conn.execute(
                select(
                    invites.c.id, invites.c.created_at, invites.c.expires_at, invites.c.max_uses,
                    invites.c.uses, invites.c.revoked, invites.c.note,
                ).order_by(invites.c.id)
            )
            return [InviteRecord(*r) for r in rows]

        return await self.db.read(q)

    async def revoke_invite(self, invite_id: int) -> bool:
        def op(conn: Connection) -> bool:
            return bool(conn.execute(update(invites).where(invites.c.id == invite_id).values(revoked=True)).rowcount)

        return await self.db.write(op)

    # -- sessions --------------------------------------------------------------

    async def create_session(self, token_hash: bytes, user_id: int, device_id: int | None, now: int, ttl_ms: int) -> int:
        def op(conn: Connection) -> int:
            result = conn.execute(
                sessions.insert().values(
                    token_hash=token_hash, user_id=user_id, device_id=device_id,
                    created_at=now, expires_at=now + ttl_ms, revoked=False,
                )
            )
            return int(result.inserted_primary_key[0])

        return await self.db.write(op)

    async def find_session(self, token_hash: bytes) -> SessionRecord | None:
        def q(conn: Connection) -> SessionRecord | None:
            row = conn.execute(
                select(
                    sessions.c.id, sessions.c.user_id, users.c.username, sessions.c.device_id,
                    sessions.c.expires_at, sessions.c.revoked, users.c.disabled,
                )
                .join(users, users.c.id == sessions.c.user_id)
                .where(sessions.c.token_hash == token_hash)
            ).first()
            return SessionRecord(*row) if row else None

        return await self.db.read(q)

    async def bind_session_device(self, session_id: int, device_id: int) -> None:
        def op(conn: Connection) -> None:
            conn.execute(update(sessions).where(sessions.c.id == session_id).values(device_id=device_id))

        await self.db.write(op)

    async def revoke_session(self, session_id: int) -> None:
        def op(conn: Connection) -> None:
            conn.execute(update(sessions).where(sessions.c.id == session_id).values(revoked=True))

        await self.db.write(op)

    async def revoke_user_sessions(self, user_id: int) -> int:
        def op(conn: Connection) -> int:
            return int(
                conn.execute(
                    update(sessions).where(sessions.c.user_id == user_id, sessions.c.revoked.is_(False)).values(revoked=True)
                ).rowcount
            )

        return await self.db.write(op)


__all__ = ["AccountRepo", "InviteRecord", "SessionRecord", "UserRecord"]
