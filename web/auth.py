"""Finding the session behind a request: a bearer token, or the HttpOnly session cookie.

A cookie is sent by the browser on cross-site requests too, so a request that
authenticates by cookie must come from this node's own origin (checked through the
``Origin`` header): that is what stops CSRF and cross-site WebSocket hijacking.
Bearer tokens cannot be attached by another site, so they need no such check.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.requests import HTTPConnection

from node.accounts import AccountService, Session
from node.errors import Forbidden

COOKIE = "moot_session"


def _same_origin(conn: HTTPConnection) -> bool:
    origin = conn.headers.get("origin")
    if origin is None:
        # Browsers always send Origin on WebSocket and cross-site POSTs; a request
        # without one did not come from another site's page.
        return conn.scope["type"] == "http" and conn.method in ("GET", "HEAD")
    host = conn.headers.get("host", "")
    return urlsplit(origin).netloc == host


def token_of(conn: HTTPConnection) -> tuple[str | None, bool]:
    """The token and whether it came from the cookie."""
    header = conn.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip(), False
    cookie = conn.cookies.get(COOKIE)
    return (cookie, True) if cookie else (None, False)


async def authenticate(conn: HTTPConnection, accounts: AccountService) -> Session:
    token, from_cookie = token_of(conn)
    if from_cookie and not _same_origin(conn):
        raise Forbidden("cross-origin request with a session cookie")
    return await accounts.authenticate(token)

