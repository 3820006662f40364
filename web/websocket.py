"""A server-side WebSocket on a trio stream, driven by the ``websockets`` sans-IO protocol.

The node's WebSocket carries nearly all of its traffic, and per message it is the
web server's overhead that dominates: measured on 200 connections at 1,000 to
5,000 echoes/s (bench/probes/), hypercorn + Starlette cost 140-280 µs of server CPU
per echo, this loop 50-100 µs (a bare TCP echo: 40-75 µs). So the WebSocket route
gets this loop, and every other request still goes to hypercorn (web/server.py).

``websockets.server.ServerProtocol`` does the parsing, masking, fragmentation
limits, ping/pong and the closing handshake; this module only moves bytes between
it and the socket. Two tasks may use a ``ServerWebSocket`` at once: one receiving
and one sending; only one of them writes at a time (see ``_flush``). Socket I/O goes
straight to the non-blocking stdlib socket, waiting through trio only when the
kernel says EAGAIN: per message that saves trio's checkpoints and a failed recv.
"""

from __future__ import annotations

import logging
import socket
from collections import deque

import trio
from websockets.frames import Opcode
from websockets.http11 import Request
from websockets.protocol import State
from websockets.server import ServerProtocol

RECEIVE_BYTES = 65536
_PROTOCOL_LOG = logging.getLogger("websockets.server")  # capped at WARNING by node.logs


class WebSocketClosed(Exception):
    """The connection is closed (by the peer, by us, or the stream broke)."""


class ServerWebSocket:
    def __init__(self, stream: trio.SocketStream, *, max_message_bytes: int) -> None:
        self._stream = stream
        # The stdlib socket under trio's, for the direct I/O below (None: use trio's).
        self._sock: socket.socket | None = getattr(stream.socket, "_sock", None)
        self._sending = False
        self._last_read_full = False
        # No extensions: permessage-deflate would cost CPU on every message. Its own
        # logger: websockets logs request headers (tokens) at debug level.
        self._protocol = ServerProtocol(max_size=max_message_bytes, logger=_PROTOCOL_LOG)
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
            while self.request is None and not self._eof and self._protocol.handshake_exc is None:
                self._feed(await self._receive_some())
        if self.request is None:
            await self._flush()
        return self.request

    async def accept(self) -> None:
        assert self.request is not None
        self._protocol.send_response(self._protocol.accept(self.request))
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
        """Read what the socket has; b"" at end of stream or on a broken connection.

        trio's receive_some tries recv first and waits only on EAGAIN: between two
        sparse messages that is a failed syscall every time. Here we wait first,
        unless the last read filled the buffer (more is probably queued).
        """
        sock = self._sock
        if sock is None:
            try:
                return await self._stream.receive_some(RECEIVE_BYTES)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return b""
        try:
            if not self._last_read_full:
                await trio.lowlevel.wait_readable(sock)
            while True:
                try:
                    data = sock.recv(RECEIVE_BYTES)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_readable(sock)
        except (OSError, trio.ClosedResourceError):
            return b""
        self._last_read_full = len(data) == RECEIVE_BYTES
        return data

    async def _send_all(self, data: bytes) -> None:
        """Write all of ``data``; a send that the kernel takes at once costs no trio
        checkpoint (trio's send_all yields to the scheduler around every syscall)."""
        sock = self._sock
        if sock is None:
            await self._stream.send_all(data)
            return
        view = memoryview(data)
        try:
            while view:
                try:
                    sent = sock.send(view)
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(sock)
                    continue
                view = view[sent:]
        except OSError as exc:
            raise trio.BrokenResourceError(str(exc)) from exc

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
        """Send everything the protocol has to send, in order.

        The receiving task (pongs, close) and the sending task both flush. If one
        is already writing, the other leaves its bytes queued in the protocol: the
        writer loops until the protocol has nothing left, so nothing is reordered
        or forgotten, and no lock is needed (trio switches tasks only at awaits).
        """
        if self._sending:
            return
        self._sending = True
        try:
            while True:
                chunks = self._protocol.data_to_send()
                data = b"".join(chunks)
                if not data:
                    return
                await self._send_all(data)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            self._eof = True
            raise WebSocketClosed("connection lost") from exc
        finally:
            self._sending = False


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
