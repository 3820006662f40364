"""Profiles of other nodes' users, asked of their own node over ``/moot/keys/1``.

``RemoteProfiles`` asks (``get_profile``, ``get_avatar``), checks what comes back
as untrusted input, and keeps answers for a short while: the page shows a profile
next to every conversation, and each question costs the other node a stream.
``ProfileCache`` never reads the clock: time is passed in.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

import msgspec

from federation import wire
from node.errors import MootError, NotFound, Unavailable, UnknownUser
from node.profiles import check_avatar
from storage.repos import Avatar

PROFILE_TTL_S = 30.0
AVATAR_TTL_S = 300.0
PROFILE_CACHE_MAX = 10_000
AVATAR_CACHE_BYTES = 16 * 1024 * 1024

T = TypeVar("T")


class ProfileCache(Generic[T]):
    """Entries that expire ``ttl_s`` after they were put, at most ``max_cost`` in all
    (each entry costs what ``put`` says; the oldest go first)."""

    def __init__(self, ttl_s: float, max_cost: int) -> None:
        self.ttl_s = ttl_s
        self.max_cost = max_cost
        self._entries: OrderedDict[str, tuple[float, int, T]] = OrderedDict()
        self._cost = 0

    def get(self, key: str, now: float) -> T | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if now - entry[0] >= self.ttl_s:
            self.drop(key)
            return None
        return entry[2]

    def put(self, key: str, value: T, now: float, cost: int = 1) -> None:
        self.drop(key)
        if cost > self.max_cost:
            return
        self._entries[key] = (now, cost, value)
        self._cost += cost
        while self._cost > self.max_cost:
            _, (_, old_cost, _) = self._entries.popitem(last=False)
            self._cost -= old_cost

    def drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self._cost -= entry[1]

    def __len__(self) -> int:
        return len(self._entries)


# The codes another node may answer with, as this node reports them to its client.
_ANSWERED: dict[str, type[MootError]] = {"unknown_user": UnknownUser, "not_found": NotFound}


def answer_error(node: str, address: str, answer: wire.Error) -> MootError:
    """What an ``error`` answer to a question about ``address`` means for our client."""
    kind = _ANSWERED.get(answer.code)
    if kind is not None:
        return kind(f"{node}: {answer.message}", address=address)
    return Unavailable(f"node {node!r} answered {answer.code}: {answer.message}")


def avatar_from_frame(address: str, frame: wire.Avatar) -> Avatar:
    """The image in an ``avatar`` answer, checked as if a client had uploaded it."""
    try:
        data = base64.urlsafe_b64decode(frame.data + "=" * (-len(frame.data) % 4))
    except (binascii.Error, ValueError):
        raise Unavailable(f"the avatar of {address} is not valid base64url") from None
    try:
        kind = check_avatar(frame.content_type, data)
    except MootError as exc:
        raise Unavailable(f"the avatar of {address} was refused: {exc.message}") from None
    return Avatar(kind, hashlib.sha256(data).hexdigest(), data)


def avatar_frame(address: str, avatar: Avatar) -> wire.Avatar:
    data = base64.urlsafe_b64encode(avatar.data).rstrip(b"=").decode()
    return wire.Avatar(user=address, content_type=avatar.content_type, data=data)  # type: ignore[arg-type]


def profile_frame(profile: dict[str, Any]) -> wire.Profile:
    return msgspec.convert(profile, wire.Profile)


class RemoteProfiles:
    """Profiles and avatars of other nodes' users, cached.

    ``ask(node, frame)`` sends one question to ``node`` over ``/moot/keys/1`` and
    returns its one answer (raising UnknownNode or Unavailable); ``now`` is the clock.
    """

    def __init__(self, ask: Callable[[str, Any], Awaitable[Any]], now: Callable[[], float]) -> None:
        self._ask = ask
        self._now = now
        self.profiles: ProfileCache[dict[str, Any]] = ProfileCache(PROFILE_TTL_S, PROFILE_CACHE_MAX)
        self.avatars: ProfileCache[Avatar] = ProfileCache(AVATAR_TTL_S, AVATAR_CACHE_BYTES)

    async def profile_of(self, address: str, node: str) -> dict[str, Any]:
        cached = self.profiles.get(address, self._now())
        if cached is not None:
            return cached
        answer = await self._ask(node, wire.GetProfile(user=address))
        if isinstance(answer, wire.Error):
            raise answer_error(node, address, answer)
        if not isinstance(answer, wire.Profile) or answer.user != address:
            raise Unavailable(f"node {node!r} answered something else")
        profile = msgspec.to_builtins(answer)
        profile = {"display_name": "", "status_text": "", "avatar": None, "updated_at": None, **profile}
        profile.pop("type", None)
        self.profiles.put(address, profile, self._now())
        return profile

    async def avatar_of(self, address: str, node: str) -> Avatar:
        """The avatar the user's profile names now (fetched again only when its digest changed)."""
        meta = (await self.profile_of(address, node)).get("avatar")
        if meta is None:
            raise NotFound(f"{address} has no avatar", address=address)
        cached = self.avatars.get(address, self._now())
        if cached is not None and cached.digest == meta["digest"]:
            return cached
        answer = await self._ask(node, wire.GetAvatar(user=address))
        if isinstance(answer, wire.Error):
            raise answer_error(node, address, answer)
        if not isinstance(answer, wire.Avatar) or answer.user != address:
            raise Unavailable(f"node {node!r} answered something else")
        avatar = avatar_from_frame(address, answer)
        self.avatars.put(address, avatar, self._now(), cost=len(avatar.data))
        if avatar.digest != meta["digest"]:
            self.profiles.drop(address)  # it changed meanwhile: ask for the profile afresh next time
        return avatar


__all__ = ["ProfileCache", "RemoteProfiles", "avatar_frame", "avatar_from_frame", "profile_frame"]
