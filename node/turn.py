"""ICE servers for clients, with short-lived TURN credentials. Pure: time is passed in.

The credentials follow the TURN REST API scheme that coturn implements with
``use-auth-secret`` and ``static-auth-secret=<secret>``: the username is
``"<expiry unix seconds>:<user address>"`` and the password is
``base64(HMAC-SHA1(secret, username))``. The TURN server checks the HMAC and that the
expiry has not passed; it never needs to know our users.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

STUN_SCHEMES = ("stun:", "stuns:")
TURN_SCHEMES = ("turn:", "turns:")


@dataclass(frozen=True)
class IceServer:
    """One entry of ``RTCConfiguration.iceServers``."""

    urls: tuple[str, ...]
    username: str | None = None
    credential: str | None = None

    def as_json(self) -> dict[str, object]:
        out: dict[str, object] = {"urls": list(self.urls)}
        if self.username is not None:
            out["username"], out["credential"] = self.username, self.credential
        return out


def check_ice_urls(urls: tuple[str, ...], secret: str) -> str | None:
    """What is wrong with configured ICE server URLs, or None."""
    for url in urls:
        if not url.startswith(STUN_SCHEMES + TURN_SCHEMES):
            return f"{url!r} is not a stun:, stuns:, turn: or turns: URL"
    if any(u.startswith(TURN_SCHEMES) for u in urls) and not secret:
        # Browsers refuse a TURN URL without credentials, and we have none to give.
        return "TURN URLs need turn_secret (coturn's static-auth-secret)"
    return None


def turn_credentials(secret: str, user: str, now: float, ttl_s: int) -> tuple[str, str]:
    """(username, password) valid until ``now + ttl_s`` (unix seconds) for ``user``."""
    if ":" in user:
        raise ValueError("the user part of a TURN username cannot contain ':' (coturn's separator)")
    username = f"{int(now) + ttl_s}:{user}"
    digest = hmac.new(secret.encode(), username.encode(), hashlib.sha1).digest()
    return username, base64.b64encode(digest).decode()


def ice_servers_for(user: str, *, urls: tuple[str, ...], secret: str, ttl_s: int, now: float) -> list[IceServer]:
    """What a client of ``user`` passes as ``iceServers``: the STUN URLs as they are, the
    TURN URLs with credentials for this user. Empty when nothing is configured: then
    calls use host candidates only (enough on one network, and on loopback)."""
    stun = tuple(u for u in urls if u.startswith(STUN_SCHEMES))
    turn = tuple(u for u in urls if u.startswith(TURN_SCHEMES))
    servers = [IceServer(stun)] if stun else []
    if turn and secret:
        username, credential = turn_credentials(secret, user, now, ttl_s)
        servers.append(IceServer(turn, username, credential))
    return servers
