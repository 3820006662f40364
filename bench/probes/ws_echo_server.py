"""Probe: WebSocket echo server on 127.0.0.1, one of several stacks.

Every text message received is sent straight back (one receive + one send per echo).
Prints ``READY <port>`` on stdout once listening; runs until killed or --max-seconds.

Stacks:
  tcp_floor        trio, hand-written handshake, raw TCP echo of the frame bytes (no WS parsing)
                   -> the floor of trio's receive_some/send_all alone
  starlette        hypercorn trio worker + Starlette WebSocketRoute, ws.receive()/ws.send_text()
  starlette_q      as starlette, but like web/ws.py: a receive loop feeding a trio channel and a
                   separate sender task doing ws.send_text()
  asgi             hypercorn trio worker + raw ASGI app (receive()/send())
  asgi_nodeflate   as asgi, with hypercorn's permessage-deflate negotiation patched out
  starlette_nodeflate  as starlette, with permessage-deflate patched out
  websockets       trio.serve_tcp + websockets.server.ServerProtocol (sans-IO)
  triows           trio-websocket serve_websocket (wsproto)
  router           the node's web/server.py: /api/v1/ws on web/websocket.py, the rest to hypercorn

Run with .venv/bin/python (trio, hypercorn, starlette, websockets, trio-websocket).
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import os
import sys
from functools import partial

import trio

WS_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC11B85"


def ready(port: int) -> None:
    print(f"READY {port}", flush=True)


# ---------------------------------------------------------------- hypercorn stacks

def patch_out_deflate() -> None:
    import hypercorn.protocol.ws_stream as ws_stream

    ws_stream.server_extensions_handshake = lambda offered, supported: None


def starlette_app(queued: bool):
    from starlette.applications import Starlette
    from starlette.routing import WebSocketRoute
    from starlette.websockets import WebSocket

    async def echo(ws: WebSocket) -> None:
        await ws.accept()
        while True:
            message = await ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            await ws.send_text(message["text"])

    async def echo_queued(ws: WebSocket) -> None:
        await ws.accept()
        send_ch, recv_ch = trio.open_memory_channel[str](20_000)

        async def sender() -> None:
            async for text in recv_ch:
                await ws.send_text(text)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender)
            while True:
                message = await ws.receive()
                if message["type"] == "websocket.disconnect":
                    break
                send_ch.send_nowait(message["text"])
            nursery.cancel_scope.cancel()

    return Starlette(routes=[WebSocketRoute("/api/v1/ws", echo_queued if queued else echo)])


async def raw_asgi_app(scope, receive, send) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] != "websocket":
        await send({"type": "http.response.start", "status": 404, "headers": []})
        await send({"type": "http.response.body", "body": b""})
        return
    message = await receive()  # websocket.connect
    await send({"type": "websocket.accept"})
    while True:
        message = await receive()
        if message["type"] != "websocket.receive":
            return
        text = message.get("text")
        if text is not None:
            await send({"type": "websocket.send", "text": text})
        else:
            await send({"type": "websocket.send", "bytes": message.get("bytes")})


async def serve_hypercorn(app, port: int) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve

    config = Config()
    config.bind = [f"127.0.0.1:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.graceful_timeout = 1.0
    config.websocket_max_message_size = 256 * 1024
    config.keep_alive_timeout = 30
    config.backlog = 1024
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config))
        ready(int(binds[0].rsplit(":", 1)[1]))


# ---------------------------------------------------------------- websockets sans-IO

async def serve_websockets(port: int) -> None:
    from websockets.frames import Opcode
    from websockets.http11 import Request
    from websockets.server import ServerProtocol

    async def handler(stream: trio.SocketStream) -> None:
        proto = ServerProtocol(max_size=256 * 1024)
        try:
            while True:
                data = await stream.receive_some(65536)
                if data:
                    proto.receive_data(data)
                else:
                    proto.receive_eof()
                for event in proto.events_received():
                    if isinstance(event, Request):
                        proto.send_response(proto.accept(event))
                    elif event.opcode is Opcode.TEXT:  # probe: unfragmented messages only
                        proto.send_text(event.data)
                    elif event.opcode is Opcode.BINARY:
                        proto.send_binary(event.data)
                out = proto.data_to_send()
                if out:
                    payload = b"".join(out)
                    if payload:
                        await stream.send_all(payload)
                if not data or proto.close_expected():
                    return
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return
        finally:
            await stream.aclose()

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=1024)
    ready(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


# ---------------------------------------------------------------- trio-websocket

async def serve_triows(port: int) -> None:
    from trio_websocket import ConnectionClosed, serve_websocket

    async def handler(request) -> None:
        ws = await request.accept()
        while True:
            try:
                message = await ws.get_message()
                await ws.send_message(message)
            except ConnectionClosed:
                return

    async with trio.open_nursery() as nursery:
        server = await nursery.start(partial(serve_websocket, handler, "127.0.0.1", port, ssl_context=None))
        ready(server.port)


# ---------------------------------------------------------------- raw TCP floor

async def serve_tcp_floor(port: int) -> None:
    async def handler(stream: trio.SocketStream) -> None:
        buf = b""
        try:
            while b"\r\n\r\n" not in buf:
                chunk = await stream.receive_some(65536)
                if not chunk:
                    return
                buf += chunk
            head, _, rest = buf.partition(b"\r\n\r\n")
            key = b""
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"sec-websocket-key":
                    key = value.strip()
            accept = base64.b64encode(hashlib.sha1(key + WS_GUID).digest())
            await stream.send_all(
                b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Accept: " + accept + b"\r\n\r\n"
            )
            if rest:
                await stream.send_all(rest)
            while True:
                data = await stream.receive_some(65536)
                if not data:
                    return
                await stream.send_all(data)  # echo the (zero-key masked) frames as they are
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            return

    listeners = await trio.open_tcp_listeners(port, host="127.0.0.1", backlog=1024)
    ready(listeners[0].socket.getsockname()[1])
    await trio.serve_listeners(handler, listeners)


async def main(args: argparse.Namespace) -> None:
    with trio.move_on_after(args.max_seconds):
        stack = args.stack
        if stack in ("starlette", "starlette_q", "starlette_nodeflate"):
            if stack.endswith("nodeflate"):
                patch_out_deflate()
            await serve_hypercorn(starlette_app(queued=stack == "starlette_q"), args.port)
        elif stack in ("asgi", "asgi_nodeflate"):
            if stack.endswith("nodeflate"):
                patch_out_deflate()
            await serve_hypercorn(raw_asgi_app, args.port)
        elif stack == "websockets":
            await serve_websockets(args.port)
        elif stack == "triows":
            await serve_triows(args.port)
        elif stack == "router":
            # The node's own router and WebSocket (web/server.py, web/websocket.py).
            sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
            from starlette.applications import Starlette

            from web.server import serve_web
            from web.websocket import ServerWebSocket, WebSocketClosed

            async def echo(stream, head):
                ws = ServerWebSocket(stream, max_message_bytes=1 << 20)
                if await ws.read_request(head) is None:
                    return
                await ws.accept()
                try:
                    while True:
                        await ws.send_text(await ws.receive())
                except WebSocketClosed:
                    pass

            async with trio.open_nursery() as nursery:
                port = await nursery.start(
                    lambda task_status: serve_web(Starlette(), echo, "127.0.0.1", args.port,
                                                  shutdown=trio.Event(), task_status=task_status)
                )
                ready(port)
        elif stack == "tcp_floor":
            await serve_tcp_floor(args.port)
        else:
            sys.exit(f"unknown stack {stack}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--stack", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--cpu", type=int, default=None, help="pin to this CPU")
    parser.add_argument("--max-seconds", type=float, default=120.0)
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})
    trio.run(main, args)
