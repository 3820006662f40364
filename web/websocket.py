"""A server-side WebSocket on a trio stream, driven by the ``websockets`` sans-IO protocol.

The node's WebSocket carries nearly all of its traffic, and per message it is the
web server's overhead that dominates: measured on 200 connections at 1,000 to
5,000 echoes/s (bench/probes/), hypercorn + Starlette cost 140-280 µs of server CPU
per echo, this loop 50-100 µs (a bare TCP echo: 40-75 µs). So the WebSocket route
gets this loop, and every other request still goes to hypercorn (web/server.py).

``websockets.server.ServerProtocol`` does the parsing, masking, fragmentation
limits, ping/pong and the closing handshake; this module only moves bytes between
it and the stream. Two tasks may use a ``ServerWebSocket`` at once: one receiving
and one sending. Writes to the stream are serialised by a lock, and the protocol's
output is taken inside the lock so frames go out in the order they were made.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Mapping

import trio
from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol

RECEIVE_BYTES = 65536
_PROTOCOL_LOG = logging.getLogger("websockets.server")  # capped at WARNING by node.logs


class WebSocketClosed(Exception):
    """The connection is closed (by the peer, by us, or the stream broke)."""


class ServerWebSocket:
    def __init__(self, stream: trio.abc.Stream, *, max_message_bytes: int) -> None:
        self._stream = stream
        # No extensions: permessage-deflate would cost CPU on every message. Its own
        # logger: websockets logs request headers (tokens) at debug level.
        self._protocol = ServerProtocol(max_size=max_message_bytes, logger=_PROTOCOL_LOG)
        self._send_lock = trio.Lock()
        self._messages: deque[bytes] = deque()
        self._eof = False
        self._partial: list[bytes] | None = None  # a fragmented message so far
        self.request: Request | None = None

    # -- handshake -------------------------------------------------------------------

    async def read_request(self, already_read: bytes, *, timeout: float = 10) -> Request | None:
        """Feed the bytes read so far (and more, if needed) until the upgrade request.

        Returns None, after answering the client, if the request is not a valid
        WebSocket handshake.
        """
        self._feed(already_read)
        with trio.move_on_after(timeout):
            while self.request is None and not self._eof:
                self._feed(await self._receive_some())
        if self.request is None:
            await self._flush()
        return self.request

    async def accept(self, headers: Mapping[str, str] | None = None) -> None:
        assert self.request is not None
        response = self._protocol.accept(self.request)
        if isinstance(response, Response) and response.status_code == 101:
            for name, value in (headers or {}).items():
                response.headers[name] = value
        self._protocol.send_response(response)
        await self._flush()
        if self._protocol.state is not State.OPEN:
            raise WebSocketClosed("handshake refused")

    # -- messages --------------------------------------------------------------------

    async def receive(self) -> bytes:
        """The next text or binary message; raises WebSocketClosed once closed."""
        while not self._messages:
            if self._eof or self._protocol.state is State.CLOSED:
                raise WebSocketClosed(self.close_reason)
            self._feed(await self._receive_some())
            # Answers the protocol made (pong, close) go out at once.
            await self._flush()
            if self._protocol.close_expected():
                self._eof = True
        return self._messages.popleft()

    async def send_text(self, data: bytes) -> None:
        if self._protocol.state is not State.OPEN:
            raise WebSocketClosed(self.close_reason)
        self._protocol.send_text(data)
        await self._flush()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Send a close frame (once); the caller then closes the stream."""
        if self._protocol.state is State.OPEN:
            self._protocol.send_close(code, reason[:120])
            try:
                await self._flush()
            except WebSocketClosed:
                pass

    @property
    def close_reason(self) -> str:
        close = self._protocol.close_rcvd or self._protocol.close_sent
        return f"{close.code} {close.reason}".strip() if close else "connection closed"

    # -- plumbing ----------------------------------------------------------------------

    async def _receive_some(self) -> bytes:
        try:
            return await self._stream.receive_some(RECEIVE_BYTES)
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return b""

    def _feed(self, data: bytes) -> None:
        if data:
            self._protocol.receive_data(data)
        else:
            self._eof = True
            self._protocol.receive_eof()
        for event in self._protocol.events_received():
            if isinstance(event, Request):
                self.request = event
            elif event.opcode in (Opcode.TEXT, Opcode.BINARY, Opcode.CONT):
                self._collect(event.opcode, event.data, event.fin)

    # A fragmented message arrives as TEXT/BINARY with fin=False, then CONT frames;
    # the protocol already enforces the size limit across fragments (close 1009).
    def _collect(self, opcode: Opcode, data: bytes, fin: bool) -> None:
        if opcode is not Opcode.CONT:
            if fin:
                self._messages.append(bytes(data))
                return
            self._partial = [bytes(data)]
            return
        if self._partial is None:
            return  # the protocol rejects a stray continuation before we see it
        self._partial.append(bytes(data))
        if fin:
            self._messages.append(b"".join(self._partial))
            self._partial = None

    async def _flush(self) -> None:
        async with self._send_lock:
            chunks = self._protocol.data_to_send()
            try:
                for chunk in chunks:
                    if chunk:
                        await self._stream.send_all(chunk)
            except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                self._eof = True
                raise WebSocketClosed("connection lost") from exc


def is_upgrade_to(head: bytes, path: bytes) -> bool:
    """Whether an HTTP request head asks to upgrade ``path`` to a WebSocket."""
    first, _, rest = head.partition(b"\r\n")
    parts = first.split(b" ")
    if len(parts) != 3 or parts[0] != b"GET" or parts[1].split(b"?", 1)[0] != path:
        return False
    for line in rest.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"upgrade" and value.strip().lower() == b"websocket":
            return True
    return False
