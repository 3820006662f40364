"""One port for everything: the client WebSocket on a fast path, all else via hypercorn.

Each accepted connection's request head is read first (at most 16 KiB, 10 s). An
upgrade of ``/api/v1/ws`` goes to the node's WebSocket loop (web/ws.py on
web/websocket.py); anything else is handed, with the bytes already read, to
hypercorn's per-connection server, which runs the Starlette app (JSON API, static
page) exactly as hypercorn's own listener would. Why: per message, hypercorn and
Starlette cost about three times the CPU of the sans-IO loop (web/websocket.py).

hypercorn's ``TCPServer`` is an internal class; pyproject.toml pins hypercorn to a
minor version for that reason, and tests/test_web.py exercises both paths.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import trio
from hypercorn.app_wrappers import ASGIWrapper
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from starlette.types import ASGIApp

from node.logs import get_logger
from web.websocket import is_upgrade_to

log = get_logger("moot.web")
MAX_HEAD_BYTES = 16 * 1024
HEAD_TIMEOUT_S = 10.0
GRACE_S = 3.0
WS_PATH = b"/api/v1/ws"

WebSocketHandler = Callable[[trio.SocketStream, bytes], Awaitable[None]]


class _Replay(trio.abc.HalfCloseableStream):
    """A socket stream whose first read returns the bytes we already read from it.

    It also knows when its HTTP connection is idle: something was sent and nothing
    arrived since. At shutdown an idle connection reads as closed at once, so a
    browser's kept-alive connections do not hold the node for the grace period
    (requests still being received or handled get it). "Idle" begins with the first
    bytes of a response, so a long response still being written when the node stops
    can be cut short: the client sees a dropped connection, as with any network
    failure, and every store is idempotent.

    No ``do_handshake``: hypercorn takes the AttributeError as "not TLS" and then
    reads ``.socket`` for the addresses.
    """

    def __init__(self, stream: trio.SocketStream, prefix: bytes, shutdown: trio.Event) -> None:
        self._stream = stream
        self._prefix = prefix
        self._shutdown = shutdown
        self._idle = trio.Event()  # set once a response went out and nothing arrived since
        self.socket = stream.socket

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if self._prefix:
            data, self._prefix = self._prefix, b""
            await trio.lowlevel.checkpoint()
            return data
        # hypercorn reads while the app is still answering, so the read may begin
        # before the connection turns idle: watch for both.
        box: list[bytes] = []
        async with trio.open_nursery() as nursery:

            async def read() -> None:
                try:
                    box.append(await self._stream.receive_some(max_bytes))
                except trio.ClosedResourceError:
                    box.append(b"")  # hypercorn closed an idle keep-alive connection meanwhile
                nursery.cancel_scope.cancel()

            async def close_when_idle_at_shutdown() -> None:
                await self._shutdown.wait()
                await self._idle.wait()
                nursery.cancel_scope.cancel()

            nursery.start_soon(read)
            nursery.start_soon(close_when_idle_at_shutdown)
        if not box:
            return b""  # shut down while idle: as if the client closed
        if box[0]:
            self._idle = trio.Event()
        return box[0]

    async def send_all(self, data: Any) -> None:
        await self._stream.send_all(data)
        self._idle.set()

    async def wait_send_all_might_not_block(self) -> None:
        await self._stream.wait_send_all_might_not_block()

    async def send_eof(self) -> None:
        await self._stream.send_eof()

    async def aclose(self) -> None:
        await self._stream.aclose()


async def _read_head(stream: trio.SocketStream, shutdown: trio.Event) -> bytes | None:
    """The request head, or what arrived of it; None if the client sent nothing in time
    (or nothing before shutdown: browsers open spare connections they may never use)."""
    head = b""
    async with trio.open_nursery() as nursery:
        async def stop_at_shutdown() -> None:
            await shutdown.wait()
            if not head:
                nursery.cancel_scope.cancel()

        nursery.start_soon(stop_at_shutdown)
        with trio.move_on_after(HEAD_TIMEOUT_S):
            while b"\r\n\r\n" not in head and len(head) < MAX_HEAD_BYTES:
                try:
                    chunk = await stream.receive_some(MAX_HEAD_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    head = b""
                    break
                if not chunk:
                    break
                head += chunk
        nursery.cancel_scope.cancel()
    return head or None


async def serve_web(
    app: ASGIApp,
    websocket: WebSocketHandler,
    host: str,
    port: int,
    *,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve on host:port until ``shutdown`` is set; reports the bound port.

    On shutdown it stops accepting, then gives open connections GRACE_S to finish
    (the node closes its WebSockets itself before setting ``shutdown``).
    """
    config = HypercornConfig()
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.keep_alive_timeout = 30
    asgi = ASGIWrapper(app)
    context = WorkerContext(None)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            head = await _read_head(stream, shutdown)
            if head is None:
                return
            if is_upgrade_to(head, WS_PATH):
                await websocket(stream, head)
            else:
                await TCPServer(asgi, config, context, ConnectionState({}), _Replay(stream, head, shutdown))
        except Exception:
            # One connection's failure must not take the listener down.
            log.exception("web.connection_failed")
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host=host or None, backlog=4096)
    async with trio.open_nursery() as connections:
        async with trio.open_nursery() as accepting:
            accepting.start_soon(partial(trio.serve_listeners, handle, listeners, handler_nursery=connections))
            task_status.started(listeners[0].socket.getsockname()[1])
            await shutdown.wait()
            accepting.cancel_scope.cancel()
        for listener in listeners:
            await listener.aclose()
        await context.terminated.set()
        connections.cancel_scope.deadline = trio.current_time() + GRACE_S
