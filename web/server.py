"""Serving the ASGI app with hypercorn's trio worker."""

from __future__ import annotations

from functools import partial
from urllib.parse import urlsplit

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio import serve
from starlette.types import ASGIApp


async def serve_web(
    app: ASGIApp,
    host: str,
    port: int,
    *,
    max_message_bytes: int,
    shutdown: trio.Event,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve ``app`` on host:port until ``shutdown`` is set; reports the bound port.

    WebSocket messages over ``max_message_bytes`` close the socket (code 1009);
    the app itself answers smaller oversized frames with an error frame.
    """
    config = HypercornConfig()
    config.bind = [f"[{host}]:{port}" if ":" in host else f"{host}:{port}"]
    config.accesslog = None
    config.errorlog = "-"
    config.loglevel = "WARNING"
    config.graceful_timeout = 3.0
    config.websocket_max_message_size = max_message_bytes
    config.keep_alive_timeout = 30
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(serve, app, config, shutdown_trigger=shutdown.wait))
        task_status.started(urlsplit(binds[0]).port)
