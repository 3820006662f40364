"""Devices and their public keys. The node stores public keys only."""

from __future__ import annotations

from dataclasses import dataclass

from sqlalchemy import Connection, func, select, update

from node.errors import BadRequest, UnknownDevice
from storage.db import Database
from storage.repos._sql import upsert_insert
from storage.schema import devices, one_time_prekeys, sessions, user_events


@dataclass(frozen=True, slots=True)
class DeviceRecord:
    id: int
    public_id: str
    user_id: int
    name: str
    identity_key: bytes
    dh_key: bytes
    spk_id: int
    spk_key: bytes
    spk_sig: bytes
    created_at: int
    cursor: int


@dataclass(frozen=True, slots=True)
class NewDevice:
    public_id: str
    user_id: int
    name: str
    identity_key: bytes
    dh_key: bytes
    spk_id: int
    spk_key: bytes
    spk_sig: bytes
    one_time_prekeys: tuple[tuple[int, bytes], ...]


_COLS = (
    devices.c.id, devices.c.public_id, devices.c.user_id, devices.c.name, devices.c.identity_key,
    devices.c.dh_key, devices.c.spk_id, devices.c.spk_key, devices.c.spk_sig, devices.c.created_at,
    devices.c.cursor,
)


class DeviceRepo:
    def __init__(self, db: Database) -> None:
        self.db = db

    async def add_device(self, new: NewDevice, now: int, max_devices: int, session_id: int) -> DeviceRecord:
        """Register a device, its prekeys, and bind the creating session to it.

        The device's cursor starts at the head of the user's event stream: a new
        device cannot decrypt what was sent before it existed.
        """

        def op(conn: Connection) -> DeviceRecord:
            count = conn.execute(select(func.count()).where(devices.c.user_id == new.user_id)).scalar_one()
            if count >= max_devices:
                raise BadRequest(f"at most {max_devices} devices per user")
            head = conn.execute(
                select(func.coalesce(func.max(user_events.c.seq), 0)).where(user_events.c.user_id == new.user_id)
            ).scalar_one()
            result = conn.execute(
                devices.insert().values(
                    public_id=new.public_id, user_id=new.user_id, name=new.name,
                    identity_key=new.identity_key, dh_key=new.dh_key, spk_id=new.spk_id,
                    spk_key=new.spk_key, spk_sig=new.spk_sig, created_at=now, cursor=head,
                )
            )
            device_id = int(result.inserted_primary_key[0])
            _insert_prekeys(conn, device_id, new.one_time_prekeys)
            conn.execute(update(sessions).where(sessions.c.id == session_id).values(device_id=device_id))
            return DeviceRecord(
                device_id, new.public_id, new.user_id, new.name, new.identity_key, new.dh_key,
                new.spk_id, new.spk_key, new.spk_sig, now, head,
            )

        return await self.db.write(op)

    async def add_prekeys(self, device_id: int, prekeys: tuple[tuple[int, bytes], ...], limit: int) -> int:
        """Add one-time prekeys (ids already present are kept); returns how many are stored."""

        def op(conn: Connection) -> int:
            _insert_prekeys(conn, device_id, prekeys)
            count = int(conn.execute(select(func.count()).where(one_time_prekeys.c.device_id == device_id)).scalar_one())
            if count > limit:
                raise BadRequest(f"at most {limit} one-time prekeys per device")
            return count

        return await self.db.write(op)

    async def rotate_signed_prekey(self, device_id: int, spk_id: int, key: bytes, sig: bytes) -> None:
        def op(conn: Connection) -> None:
            conn.execute(update(devices).where(devices.c.id == device_id).values(spk_id=spk_id, spk_key=key, spk_sig=sig))

        await self.db.write(op)

    async def claim_prekey(self, device_id: int) -> tuple[int, bytes] | None:
        """Remove and return one one-time prekey of the device, oldest id first."""

        def op(conn: Connection) -> tuple[int, bytes] | None:
            row = conn.execute(
                select(one_time_prekeys.c.key_id, one_time_prekeys.c.key)
                .where(one_time_prekeys.c.device_id == device_id)
                .order_by(one_time_prekeys.c.key_id)
                .limit(1)
            ).first()
            if row is None:
                return None
            conn.execute(
                one_time_prekeys.delete().where(
                    one_time_prekeys.c.device_id == device_id, one_time_prekeys.c.key_id == row[0]
                )
            )
            return int(row[0]), bytes(row[1])

        return await self.db.write(op)

    async def list_for_user(self, user_id: int) -> list[DeviceRecord]:
        def q(conn: Connection) -> list[DeviceRecord]:
            rows = conn.execute(select(*_COLS).where(devices.c.user_id == user_id).order_by(devices.c.id))
            return [_record(r) for r in rows]

        return await self.db.read(q)

    async def list_for_users(self, user_ids: list[int]) -> list[DeviceRecord]:
        def q(conn: Connection) -> list[DeviceRecord]:
            rows = conn.execute(select(*_COLS).where(devices.c.user_id.in_(user_ids)).order_by(devices.c.id))
            return [_record(r) for r in rows]

        return await self.db.read(q)

    async def get(self, device_id: int) -> DeviceRecord:
        def q(conn: Connection) -> DeviceRecord:
            row = conn.execute(select(*_COLS).where(devices.c.id == device_id)).first()
            if row is None:
                raise UnknownDevice("no such device")
            return _record(row)

        return await self.db.read(q)

    async def get_by_public_id(self, public_id: str) -> DeviceRecord | None:
        def q(conn: Connection) -> DeviceRecord | None:
            row = conn.execute(select(*_COLS).where(devices.c.public_id == public_id)).first()
            return _record(row) if row else None

        return await self.db.read(q)

    async def prekey_count(self, device_id: int) -> int:
        def q(conn: Connection) -> int:
            return int(conn.execute(select(func.count()).where(one_time_prekeys.c.device_id == device_id)).scalar_one())

        return await self.db.read(q)

    async def remove(self, device_id: int) -> None:
        def op(conn: Connection) -> None:
            conn.execute(sessions.delete().where(sessions.c.device_id == device_id))
            conn.execute(one_time_prekeys.delete().where(one_time_prekeys.c.device_id == device_id))
            conn.execute(devices.delete().where(devices.c.id == device_id))

        await self.db.write(op)


def _insert_prekeys(conn: Connection, device_id: int, prekeys: tuple[tuple[int, bytes], ...]) -> None:
    if prekeys:
        stmt = upsert_insert(conn, one_time_prekeys).on_conflict_do_nothing()
        conn.execute(stmt, [{"device_id": device_id, "key_id": kid, "key": key} for kid, key in prekeys])


def _record(row: object) -> DeviceRecord:
    r = tuple(row)  # type: ignore[call-overload]
    return DeviceRecord(r[0], r[1], r[2], r[3], bytes(r[4]), bytes(r[5]), r[6], bytes(r[7]), bytes(r[8]), r[9], r[10])
