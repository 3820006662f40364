"""The ASGI application: JSON API, WebSocket and the static web client on one port."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from starlette.applications import Starlette
from starlette.middleware.gzip import GZipMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Receive, Scope, Send

from starlette.websockets import WebSocket

from node.errors import BadRequest, MootError, NotFound
from web.api import error_response, routes
from web.attachments import routes as attachment_routes
from web.frames import Error, encode

if TYPE_CHECKING:
    from node.app import Node

STATIC = Path(__file__).parent / "static"


class _StaticFiles(StaticFiles):
    """The page's files: revalidated on every load (ETag), so an upgraded node is
    never run with yesterday's scripts.

    Starlette's FileResponse, under an ASGI spec below 2.4 (hypercorn says 2.3),
    waits after the last byte for the client to disconnect; hypercorn then keeps
    the request open, so ``Connection: close`` never closed and every file left a
    task behind until the browser dropped the connection. Files need no disconnect
    watch (a send to a gone client is simply dropped), so they run as 2.4.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            scope = {**scope, "asgi": {**scope.get("asgi", {}), "spec_version": "2.4"}}
        await super().__call__(scope, receive, send)

    async def get_response(self, path: str, scope: Scope) -> Response:
        response = await super().get_response(path, scope)
        response.headers["cache-control"] = "no-cache"
        return response

# No inline script, nothing from another origin.
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' blob: data:; media-src 'self' blob:; "
     b"connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; form-action 'self'"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
]


class SecurityHeaders:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: dict) -> None:  # type: ignore[type-arg]
            if message["type"] == "http.response.start":
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


async def _websocket_on_reused_connection(ws: WebSocket) -> None:
    """web/server.py takes every WebSocket upgrade that opens a connection; one sent on
    a kept-alive HTTP connection lands here instead: ask the client to use a new one."""
    await ws.accept()
    exc = BadRequest("open the WebSocket on a new connection")
    await ws.send_text(encode(Error(code=exc.code, message=exc.message)).decode())
    await ws.close(1013, "reconnect")


async def _moot_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, MootError)
    return error_response(exc)


async def _not_found(request: Request, exc: Exception) -> Response:
    if request.url.path.startswith("/api/"):
        return error_response(NotFound("no such endpoint"))
    return Response("not found", status_code=404, media_type="text/plain")


def create_app(node: Node) -> ASGIApp:
    app = Starlette(
        routes=[
            *routes,
            *attachment_routes,
            WebSocketRoute("/api/v1/ws", _websocket_on_reused_connection),
            # Only the static files are compressed: they hold no secrets. (Compressing
            # API answers that mix secrets with attacker-chosen text invites BREACH.)
            Mount("/", app=GZipMiddleware(_StaticFiles(directory=STATIC, html=True), minimum_size=1024), name="static"),
        ],
        exception_handlers={MootError: _moot_error, 404: _not_found},
    )
    app.state.node = node
    return SecurityHeaders(app)
