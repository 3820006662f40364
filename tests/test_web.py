"""The one-port web server: WebSocket upgrades on the fast path, everything else via hypercorn."""

from __future__ import annotations

import json

import trio
from trio_websocket import ConnectionClosed, open_websocket_url

import web.server
from tests.nodes import new_user, running_node


async def raw_exchange(port: int, request: bytes, *, until: bytes = b"", timeout: float = 5) -> bytes:
    """Send raw bytes on a fresh connection; read until ``until`` appears or the node closes."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    got = b""
    with trio.fail_after(timeout):
        await stream.send_all(request)
        while not (until and until in got):
            chunk = await stream.receive_some(65536)
            if not chunk:
                break
            got += chunk
    await stream.aclose()
    return got


async def test_http_keep_alive_and_static_page_through_the_router(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        port = node.web_port
        two = (
            b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
        )
        got = await raw_exchange(port, two)
        assert got.count(b"HTTP/1.1 200") == 2
        assert got.count(b'"node":"riverside"') == 2
        page = await raw_exchange(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", until=b"</html>")
        assert page.startswith(b"HTTP/1.1 200")
        assert b"content-security-policy: default-src 'self'" in page.lower()


async def test_garbage_and_bad_handshakes_are_refused_and_the_node_carries_on(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        port = node.web_port
        garbage = await raw_exchange(port, b"\x16\x03\x01 this is not http\r\n\r\n")
        assert garbage == b"" or garbage.startswith(b"HTTP/1.1 400")
        # An upgrade without a key is not a WebSocket handshake.
        bad = await raw_exchange(
            port, b"GET /api/v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
        )
        assert bad.startswith(b"HTTP/1.1 4")
        # A head that is not valid HTTP is dropped at once, not after the head timeout.
        broken = await raw_exchange(
            port, b"GET /api/v1/ws HTTP/1.1\r\nUpgrade: websocket\r\nno colon here\r\n\r\n", timeout=3
        )
        assert not broken.startswith(b"HTTP/1.1 101")
        # A head longer than the router reads is handed on whole to hypercorn.
        long = b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40_000 + b"\r\n\r\n"
        answer = await raw_exchange(port, long, until=b'"node":"riverside"')
        assert answer.startswith(b"HTTP/1.1 200")
        # Everyone else is served as before.
        alice = await new_user(node.web_url, "alice")
        async with alice.connect() as live:
            assert live.ready is not None and live.ready.user == "alice@riverside"
        await alice.aclose()


async def test_a_websocket_on_a_kept_alive_connection_is_asked_to_reconnect(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        upgrade = (
            b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\n\r\n"
            b"GET /api/v1/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        got = await raw_exchange(node.web_port, upgrade, until=b"reconnect")
        assert b"HTTP/1.1 200" in got and b"HTTP/1.1 101" in got
        assert b'"code":"bad_request"' in got


async def test_fragmented_messages_are_reassembled(tmp_path, sqlite_url):
    from websockets.sync.client import connect

    async with running_node(tmp_path / "n", sqlite_url) as node:
        alice = await new_user(node.web_url, "alice")
        url = node.web_url.replace("http://", "ws://") + "/api/v1/ws"

        def talk() -> list[dict]:
            with connect(url, additional_headers={"Authorization": f"Bearer {alice.token}"}, open_timeout=5) as ws:
                ready = json.loads(ws.recv(timeout=5))
                # One ping frame split over three WebSocket fragments.
                ws.send(iter(['{"type":"ping",', '"nonce":"in-', 'pieces"}']))
                return [ready, json.loads(ws.recv(timeout=5))]

        ready, pong = await trio.to_thread.run_sync(talk)
        assert ready["type"] == "ready"
        assert pong == {"type": "pong", "nonce": "in-pieces"}
        await alice.aclose()


async def test_shutdown_closes_websockets_with_going_away(tmp_path, sqlite_url):
    stop = trio.Event()

    async def node_until_stopped(*, task_status=trio.TASK_STATUS_IGNORED):  # type: ignore[no-untyped-def]
        async with running_node(tmp_path / "n", sqlite_url) as node:
            task_status.started(node)
            await stop.wait()

    async with trio.open_nursery() as nursery:
        node = await nursery.start(node_until_stopped)
        alice = await new_user(node.web_url, "alice")
        url = node.web_url.replace("http://", "ws://") + "/api/v1/ws"
        async with open_websocket_url(url, extra_headers=[("authorization", f"Bearer {alice.token}")]) as ws:
            assert json.loads(await ws.get_message())["type"] == "ready"
            stop.set()
            with trio.fail_after(5):
                try:
                    while True:
                        await ws.get_message()
                except ConnectionClosed as exc:
                    assert exc.reason.code == 1001  # going away
        await alice.aclose()


async def test_shutdown_does_not_wait_for_idle_kept_alive_connections(tmp_path, sqlite_url, monkeypatch):
    """Browsers keep HTTP connections open, and open spare ones they never use: neither
    may hold a stopping node for the grace period (made ten minutes long here)."""
    monkeypatch.setattr(web.server, "GRACE_S", 600.0)
    monkeypatch.setattr(web.server, "HEAD_TIMEOUT_S", 600.0)
    with trio.fail_after(30):
        async with running_node(tmp_path / "n", sqlite_url) as node:
            kept = await trio.open_tcp_stream("127.0.0.1", node.web_port)
            await kept.send_all(b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while b'"node":"riverside"' not in got:
                got += await kept.receive_some(65536)
            spare = await trio.open_tcp_stream("127.0.0.1", node.web_port)
        # the node has stopped: it closed both connections
        assert await kept.receive_some(65536) == b""
        assert await spare.receive_some(65536) == b""
        await kept.aclose()
        await spare.aclose()


async def test_static_files_are_compressed_and_revalidated_api_answers_are_not_compressed(tmp_path, sqlite_url):
    async with running_node(tmp_path / "n", sqlite_url) as node:
        port = node.web_port
        gz = b"Accept-Encoding: gzip\r\nConnection: close\r\n"
        script = await raw_exchange(port, b"GET /js/crypto.js HTTP/1.1\r\nHost: x\r\n" + gz + b"\r\n")
        head = script.split(b"\r\n\r\n")[0].lower()
        assert b"content-encoding: gzip" in head and b"cache-control: no-cache" in head and b"etag:" in head
        info = await raw_exchange(port, b"GET /api/v1/info HTTP/1.1\r\nHost: x\r\n" + gz + b"\r\n")
        assert b"content-encoding" not in info.split(b"\r\n\r\n")[0].lower()
