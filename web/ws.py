"""The WebSocket endpoint ``/api/v1/ws``: glue between a socket and the node's services.

web/server.py hands this module every connection that asks to upgrade
``/api/v1/ws``; the socket speaks through ``web.websocket.ServerWebSocket``.

Per connection: this task reads and dispatches frames; a sender task drains the
connection's queue (several queued frames go out as one JSON array); a replay task
sends the backlog, then ends. Bad input gets an ``error`` frame and the connection
carries on; only authentication failures and slow consumers close it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from starlette.requests import HTTPConnection
from websockets.http11 import Request

from node.accounts import Session
from node.errors import MootError, NoDevice
from node.hub import Connection
from node.logs import get_logger
from node.messaging import error_frame
from storage.repos import DeviceRecord
from web import frames
from web.auth import authenticate
from web.websocket import ServerWebSocket, WebSocketClosed

if TYPE_CHECKING:
    from node.app import Node

log = get_logger("moot.ws")
MAX_QUEUE = 20_000


def _as_connection(request: Request, client: tuple[str, int] | None) -> HTTPConnection:
    """The upgrade request as Starlette sees a request, for the shared auth code."""
    path, _, query = request.path.partition("?")
    scope = {
        "type": "websocket", "path": path, "query_string": query.encode(), "client": client,
        "headers": [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in request.headers.raw_items()],
    }
    return HTTPConnection(scope)


async def serve_websocket(stream: trio.SocketStream, already_read: bytes, node: Node) -> None:
    """Run one client WebSocket from its upgrade request to its close."""
    ws = ServerWebSocket(stream, max_message_bytes=node.config.max_frame_bytes * 4)
    try:
        request = await ws.read_request(already_read)
        if request is None:
            return
        await ws.accept()
        try:
            session = await authenticate(_as_connection(request, _peer(stream)), node.accounts)
            if session.device_id is None:
                raise NoDevice("register a device before opening the WebSocket")
            device = await node.device_repo.get(session.device_id)
        except MootError as exc:
            await ws.send_text(error_frame(exc))
            await ws.close(4401 if exc.status == 401 else 4403, exc.code)
            return
        await _run(ws, node, session, device)
    except WebSocketClosed:
        pass


def _peer(stream: trio.SocketStream) -> tuple[str, int] | None:
    try:
        host, port = stream.socket.getpeername()[:2]
        return str(host), int(port)
    except OSError:
        return None


async def _run(ws: ServerWebSocket, node: Node, session: Session, device: DeviceRecord) -> None:
    conn = Connection(session, device.id, device.public_id, max_queue=MAX_QUEUE)
    if node.hub.add(conn):
        node.presence.changed(session.user_id)
    log.info("ws.open", user=session.username, device=device.public_id)
    try:
        conn.push(frames.encode(frames.Ready(
            protocol=frames.PROTOCOL_VERSION, node=node.name, user=session.address, device=device.public_id,
            cursor=device.cursor, max_frame_bytes=node.config.max_frame_bytes,
            max_envelope_bytes=node.config.max_envelope_bytes,
        )))
        for presence in await node.presence.snapshot(session.address):
            conn.push(frames.encode(presence))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(_send_loop, ws, conn, nursery.cancel_scope)
            nursery.start_soon(node.messaging.replay_backlog, conn, device.cursor)
            await _receive_loop(ws, conn, node)
            conn.close()
    finally:
        conn.close()
        if node.hub.remove(conn):
            node.presence.changed(session.user_id)
        node.calls.connection_closed(conn)
        log.info("ws.close", user=session.username, device=device.public_id, code=conn.close_code)


async def _receive_loop(ws: ServerWebSocket, conn: Connection, node: Node) -> None:
    limit = node.config.max_frame_bytes
    messaging = node.messaging
    while not conn.closed:
        try:
            data = await ws.receive()
        except WebSocketClosed:
            return
        try:
            batch = frames.decode_client(data, limit)
        except MootError as exc:
            conn.push(error_frame(exc))
            continue
        for frame in batch:
            if isinstance(frame, frames.Send):
                await messaging.handle_send(conn, frame)
            elif isinstance(frame, frames.Ack):
                await messaging.handle_ack(conn, frame)
            elif isinstance(frame, frames.Read):
                await messaging.handle_read(conn, frame)
            elif isinstance(frame, frames.Ping):
                messaging.handle_ping(conn, frame)
            elif isinstance(frame, frames.SetPresence):
                node.presence.set_away(conn, frame.state == "away")
            elif isinstance(frame, frames.TypingTo):
                await node.presence.typing(conn, frame)
            elif isinstance(frame, frames.CallSignal):
                await node.calls.from_client(conn, frame)


async def _send_loop(ws: ServerWebSocket, conn: Connection, scope: trio.CancelScope) -> None:
    """Drain the connection's queue to the socket; close it when the connection closes."""
    try:
        while True:
            batch = await conn.next_batch()
            if batch is None:
                break
            await ws.send_text(frames.encode_batch(batch))
        await ws.close(conn.close_code, conn.close_reason)
    except WebSocketClosed:
        pass
    finally:
        conn.close()
        scope.cancel()
