"""Profiles and the user directory: display name, status text, avatar, being listed.

Profiles are public metadata, not end-to-end encrypted: any signed-in user of this
node, and any node it federates with, may read the profile of a user of this node
(the page shows it next to their address). Directory searches find only enabled
users who are ``listed``; a user who is not is still reachable by their address.
"""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import Callable
from typing import Any

from node.accounts import Session
from node.errors import BadRequest, NotFound, TooLarge, UnknownNode, UnknownUser
from node.logs import get_logger
from node.remote import Remote
from storage.repos import Avatar, ProfileRecord, ProfileRepo

log = get_logger("moot.profiles")

MAX_DISPLAY_NAME = 64
MAX_STATUS_TEXT = 140
MAX_AVATAR_BYTES = 256 * 1024
MAX_QUERY = 64
DIRECTORY_PAGE_MAX = 50
AVATAR_TYPES = ("image/png", "image/jpeg", "image/webp")
ADDRESS_RE = re.compile(r"^([a-z0-9_.-]{1,32})@([a-z0-9][a-z0-9-]{0,62})$")
# Bidirectional overrides and isolates let a name display as something it is not.
_BIDI_CONTROLS = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def sniff_image(data: bytes) -> str | None:
    """The image type by its magic bytes (PNG, JPEG, WebP), or None."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def check_avatar(content_type: str, data: bytes) -> str:
    """The content type of an acceptable avatar; raises TooLarge or BadRequest."""
    if len(data) > MAX_AVATAR_BYTES:
        raise TooLarge(f"an avatar is at most {MAX_AVATAR_BYTES} bytes")
    if not data:
        raise BadRequest("the avatar is empty")
    sniffed = sniff_image(data)
    if sniffed is None:
        raise BadRequest("an avatar is a PNG, JPEG or WebP image", reason="image_type")
    declared = content_type.split(";")[0].strip().lower()
    if declared != sniffed:
        raise BadRequest(f"the body is {sniffed}, not {declared or 'untyped'}", reason="image_type")
    return sniffed


def clean_text(value: Any, field: str, limit: int) -> str:
    """A single line of at most ``limit`` characters, trimmed; raises BadRequest."""
    if not isinstance(value, str):
        raise BadRequest(f"{field} must be a string", field=field)
    value = unicodedata.normalize("NFC", value).strip()
    if len(value) > limit:
        raise BadRequest(f"{field} is at most {limit} characters", field=field)
    if any(unicodedata.category(ch) == "Cc" or ch in _BIDI_CONTROLS for ch in value):
        raise BadRequest(f"{field} may not hold control characters or line breaks", field=field)
    return value


def profile_json(address: str, record: ProfileRecord) -> dict[str, Any]:
    """What anyone may read of a profile (``listed`` is the owner's business)."""
    avatar = record.avatar
    return {
        "user": address, "display_name": record.display_name, "status_text": record.status_text,
        "avatar": {"type": avatar.content_type, "size": avatar.size, "digest": avatar.digest} if avatar else None,
        "updated_at": record.updated_at,
    }


class ProfileService:
    def __init__(self, repo: ProfileRepo, node_name: str, remote: Remote, *, clock_ms: Callable[[], int]) -> None:
        self.repo = repo
        self.node_name = node_name
        self.remote = remote
        self._clock_ms = clock_ms

    def _address(self, username: str) -> str:
        return f"{username}@{self.node_name}"

    async def _own(self, session: Session) -> ProfileRecord:
        record = await self.repo.get(session.username)
        if record is None:
            raise UnknownUser("no such user")
        return record

    async def mine(self, session: Session) -> dict[str, Any]:
        record = await self._own(session)
        return {**profile_json(session.address, record), "listed": record.listed}

    async def update(self, session: Session, body: dict[str, Any]) -> dict[str, Any]:
        """Change some of ``display_name``, ``status_text`` and ``listed``; raises BadRequest."""
        values: dict[str, Any] = {}
        if "display_name" in body:
            values["display_name"] = clean_text(body["display_name"], "display_name", MAX_DISPLAY_NAME)
        if "status_text" in body:
            values["status_text"] = clean_text(body["status_text"], "status_text", MAX_STATUS_TEXT)
        if "listed" in body:
            if not isinstance(body["listed"], bool):
                raise BadRequest("listed must be true or false", field="listed")
            values["listed"] = body["listed"]
        if values:
            await self.repo.update(session.user_id, self._clock_ms(), **values)
            log.info("profile.updated", user=session.username, fields=sorted(values))
        return await self.mine(session)

    async def set_avatar(self, session: Session, content_type: str, data: bytes) -> dict[str, Any]:
        kind = check_avatar(content_type, data)
        await self.repo.set_avatar(session.user_id, kind, hashlib.sha256(data).hexdigest(), data, self._clock_ms())
        log.info("profile.avatar_set", user=session.username, type=kind, size=len(data))
        return await self.mine(session)

    async def delete_avatar(self, session: Session) -> dict[str, Any]:
        await self.repo.delete_avatar(session.user_id, self._clock_ms())
        return await self.mine(session)

    # -- anyone's profile ---------------------------------------------------------------

    def _split(self, address: str) -> tuple[str, str]:
        match = ADDRESS_RE.match(address)
        if not match:
            raise BadRequest(f"not an address: {address!r} (expected user@node)")
        return match.group(1), match.group(2)

    async def local_profile(self, address: str) -> dict[str, Any]:
        """The profile of an enabled user of this node; raises UnknownUser, UnknownNode."""
        username, node = self._split(address)
        if node != self.node_name:
            raise UnknownNode(f"{node!r} is not this node", address=address)
        record = await self.repo.get(username)
        if record is None or record.disabled:
            raise UnknownUser(f"no user {address}", address=address)
        return profile_json(address, record)

    async def local_avatar(self, address: str) -> Avatar:
        username, node = self._split(address)
        if node != self.node_name:
            raise UnknownNode(f"{node!r} is not this node", address=address)
        avatar = await self.repo.avatar(username)
        if avatar is None:
            await self.local_profile(address)  # unknown_user rather than not_found, if so
            raise NotFound(f"{address} has no avatar", address=address)
        return avatar

    async def profile_of(self, address: str) -> dict[str, Any]:
        """Anyone's profile: this node's users from storage, others' asked of their node."""
        _, node = self._split(address)
        if node == self.node_name:
            return await self.local_profile(address)
        return await self.remote.profile_of(address)

    async def avatar_of(self, address: str) -> Avatar:
        _, node = self._split(address)
        if node == self.node_name:
            return await self.local_avatar(address)
        return await self.remote.avatar_of(address)

    async def directory(self, query: Any, *, after: Any = "", limit: Any = 20) -> tuple[list[dict[str, Any]], str | None]:
        """Listed users of this node matching ``query``, a page at a time: the page and
        the ``after`` of the next one (None at the end)."""
        if not isinstance(query, str) or len(query) > MAX_QUERY:
            raise BadRequest(f"q is at most {MAX_QUERY} characters", field="q")
        if not isinstance(after, str) or len(after) > 32:
            raise BadRequest("after must be a user name", field="after")
        if not isinstance(limit, int) or not 1 <= limit <= DIRECTORY_PAGE_MAX:
            raise BadRequest(f"limit is 1 to {DIRECTORY_PAGE_MAX}", field="limit")
        records = await self.repo.search_directory(query.strip(), after=after, limit=limit + 1)
        page = records[:limit]
        following = page[-1].username if len(records) > limit else None
        return [profile_json(self._address(r.username), r) for r in page], following
