"""The WebSocket endpoint ``/api/v1/ws``: glue between a socket and the node's services.

Per connection: this task reads and dispatches frames; a sender task drains the
connection's queue (several queued frames go out as one JSON array); a replay task
sends the backlog, then ends. Bad input gets an ``error`` frame and the connection
carries on; only authentication failures and slow consumers close it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio
from starlette.websockets import WebSocket, WebSocketDisconnect

from node.errors import MootError, NoDevice
from node.hub import Connection
from node.logs import get_logger
from node.messaging import error_frame
from web import frames
from web.auth import session_from_websocket

if TYPE_CHECKING:
    from node.app import Node

log = get_logger("moot.ws")
MAX_QUEUE = 20_000


async def websocket_endpoint(ws: WebSocket) -> None:
    node: Node = ws.app.state.node
    await ws.accept()
    try:
        session = await session_from_websocket(ws, node.accounts)
        if session.device_id is None:
            raise NoDevice("register a device before opening the WebSocket")
        device = await node.device_repo.get(session.device_id)
    except MootError as exc:
        await ws.send_text(error_frame(exc).decode())
        await ws.close(4401 if exc.status == 401 else 4403, exc.code)
        return
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
        for presence in await node.presence.snapshot(session.user_id):
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
        log.info("ws.close", user=session.username, device=device.public_id, code=conn.close_code)


async def _receive_loop(ws: WebSocket, conn: Connection, node: Node) -> None:
    limit = node.config.max_frame_bytes
    messaging = node.messaging
    while not conn.closed:
        try:
            message = await ws.receive()
        except WebSocketDisconnect:
            return
        if message["type"] == "websocket.disconnect":
            return
        data = message.get("text")
        if data is None:
            data = message.get("bytes") or b""
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


async def _send_loop(ws: WebSocket, conn: Connection, scope: trio.CancelScope) -> None:
    """Drain the connection's queue to the socket; close it when the connection closes."""
    try:
        while True:
            batch = await conn.next_batch()
            if batch is None:
                break
            await ws.send_text(frames.encode_batch(batch).decode())
        if conn.close_code != 1000:
            await ws.close(conn.close_code, conn.close_reason)
    except (WebSocketDisconnect, RuntimeError, trio.BrokenResourceError, trio.ClosedResourceError):
        pass
    finally:
        conn.close()
        scope.cancel()
