"""Devices and their public key bundles (the node never sees a private key)."""

from __future__ import annotations

import base64
import secrets
import struct
from collections.abc import Callable
from typing import Any

import nacl.exceptions
import nacl.signing

from node.accounts import Session
from node.config import NodeConfig
from node.errors import BadRequest, Forbidden, UnknownDevice, UnknownNode, UnknownUser
from node.logs import get_logger
from storage.repos import AccountRepo, DeviceRecord, DeviceRepo, NewDevice

log = get_logger("moot.devices")
SPK_LABEL = b"moot/v1/spk"
LOCAL_USER_CACHE_MAX = 200_000


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: Any, *, length: int | None = None, field: str = "value") -> bytes:
    """Decode base64url without padding; raises BadRequest naming the field."""
    if not isinstance(text, str) or len(text) > 4096:
        raise BadRequest(f"{field} must be a base64url string")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (ValueError, TypeError):
        raise BadRequest(f"{field} is not valid base64url") from None
    if length is not None and len(raw) != length:
        raise BadRequest(f"{field} must be {length} bytes")
    return raw


def _int(value: Any, field: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value < 2**53:
        raise BadRequest(f"{field} must be a non-negative integer")
    return value


def parse_prekeys(items: Any, limit: int) -> tuple[tuple[int, bytes], ...]:
    if not isinstance(items, list) or len(items) > limit:
        raise BadRequest(f"one_time_prekeys must be a list of at most {limit}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise BadRequest("each one-time prekey is {id, key}")
        out.append((_int(item.get("id"), f"one_time_prekeys[{i}].id"), b64d(item.get("key"), length=32, field=f"one_time_prekeys[{i}].key")))
    return tuple(out)


def parse_signed_prekey(identity_key: bytes, spk: Any) -> tuple[int, bytes, bytes]:
    """Validate ``{id, key, sig}``: the signature must verify under the identity key."""
    if not isinstance(spk, dict):
        raise BadRequest("signed_prekey must be {id, key, sig}")
    spk_id = _int(spk.get("id"), "signed_prekey.id")
    key = b64d(spk.get("key"), length=32, field="signed_prekey.key")
    sig = b64d(spk.get("sig"), length=64, field="signed_prekey.sig")
    try:
        nacl.signing.VerifyKey(identity_key).verify(SPK_LABEL + struct.pack(">I", spk_id) + key, sig)
    except (nacl.exceptions.BadSignatureError, ValueError):
        raise BadRequest("signed_prekey.sig does not verify under identity_key") from None
    return spk_id, key, sig


def public_view(device: DeviceRecord) -> dict[str, Any]:
    """What anyone may fetch about a device: its id and public keys."""
    return {
        "device": device.public_id,
        "name": device.name,
        "identity_key": b64e(device.identity_key),
        "dh_key": b64e(device.dh_key),
        "signed_prekey": {"id": device.spk_id, "key": b64e(device.spk_key), "sig": b64e(device.spk_sig)},
        "created_at": device.created_at,
    }


class DeviceService:
    def __init__(self, repo: DeviceRepo, accounts: AccountRepo, config: NodeConfig, node_name: str, *, clock_ms: Callable[[], int]) -> None:
        self.repo = repo
        self.accounts = accounts
        self.config = config
        self.node_name = node_name
        self._clock_ms = clock_ms
        # username -> (user id, username) of enabled local users: every send
        # resolves its peer, and a database read per message costs more than the
        # rest of the send. Dropped by forget_user when an account changes.
        self._local: dict[str, tuple[int, str]] = {}
        self._local_generation = 0

    def forget_user(self, username: str) -> None:
        self._local.pop(username, None)
        self._local_generation += 1

    async def register(self, session: Session, body: Any) -> DeviceRecord:
        """Register a device for the session's user from its public key bundle.

        The session becomes bound to the new device. Raises BadRequest for any
        malformed key, a signed prekey whose signature fails, or too many devices.
        """
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        name = body.get("name", "")
        if not isinstance(name, str) or len(name) > 64:
            raise BadRequest("name must be a string of at most 64 characters")
        identity_key = b64d(body.get("identity_key"), length=32, field="identity_key")
        try:
            nacl.signing.VerifyKey(identity_key)
        except (ValueError, nacl.exceptions.CryptoError):
            raise BadRequest("identity_key is not an Ed25519 public key") from None
        dh_key = b64d(body.get("dh_key"), length=32, field="dh_key")
        spk_id, spk_key, spk_sig = parse_signed_prekey(identity_key, body.get("signed_prekey"))
        prekeys = parse_prekeys(body.get("one_time_prekeys", []), self.config.max_one_time_prekeys)
        new = NewDevice(
            public_id=secrets.token_urlsafe(9), user_id=session.user_id, name=name, identity_key=identity_key,
            dh_key=dh_key, spk_id=spk_id, spk_key=spk_key, spk_sig=spk_sig, one_time_prekeys=prekeys,
        )
        device = await self.repo.add_device(new, self._clock_ms(), self.config.max_devices_per_user, session.id)
        log.info("device.registered", user=session.username, device=device.public_id, prekeys=len(prekeys))
        return device

    async def own_device(self, session: Session, public_id: str) -> DeviceRecord:
        device = await self.repo.get_by_public_id(public_id)
        if device is None or device.user_id != session.user_id:
            raise UnknownDevice("no such device of yours")
        return device

    async def add_prekeys(self, session: Session, public_id: str, body: Any) -> int:
        device = await self.own_device(session, public_id)
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        if "signed_prekey" in body:
            spk_id, key, sig = parse_signed_prekey(device.identity_key, body["signed_prekey"])
            await self.repo.rotate_signed_prekey(device.id, spk_id, key, sig)
        prekeys = parse_prekeys(body.get("one_time_prekeys", []), self.config.max_one_time_prekeys)
        return await self.repo.add_prekeys(device.id, prekeys, self.config.max_one_time_prekeys)

    async def remove(self, session: Session, public_id: str) -> None:
        device = await self.own_device(session, public_id)
        await self.repo.remove(device.id)
        log.info("device.removed", user=session.username, device=public_id)

    async def resolve_local(self, address: str) -> tuple[int, str]:
        """The user id and name for an address on this node.

        Raises UnknownNode for another node's address (federation comes later) and
        UnknownUser for a name this node does not have.
        """
        local, _, node = address.partition("@")
        if node != self.node_name:
            raise UnknownNode(f"unknown node {node!r}", address=address)
        cached = self._local.get(local)
        if cached is not None:
            return cached
        generation = self._local_generation
        user = await self.accounts.get_user(local)
        if user is None or user.disabled:
            raise UnknownUser(f"no user {address}", address=address)
        found = (user.id, user.username)
        # Not cached if the account changed while we read it (the read may be stale).
        if generation == self._local_generation and len(self._local) < LOCAL_USER_CACHE_MAX:
            self._local[local] = found
        return found

    async def devices_of(self, address: str) -> list[DeviceRecord]:
        user_id, _ = await self.resolve_local(address)
        return await self.repo.list_for_user(user_id)

    async def claim_prekey(self, address: str, public_id: str) -> tuple[int, bytes] | None:
        user_id, _ = await self.resolve_local(address)
        device = await self.repo.get_by_public_id(public_id)
        if device is None or device.user_id != user_id:
            raise UnknownDevice("no such device")
        return await self.repo.claim_prekey(device.id)

    def check_forbidden(self, session: Session) -> None:
        if session.device_id is None:
            raise Forbidden("register a device first")
