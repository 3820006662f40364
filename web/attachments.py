"""HTTP endpoints for attachments (docs/protocol.md section 12): streaming upload and download.

``POST /api/v1/attachments?conversation=<peer>`` takes the encrypted file as the raw
body (``Content-Type: application/octet-stream``, ``Content-Length`` required) and
writes it to disk as it arrives. ``GET /api/v1/attachments/<blob>?conversation=&node=``
streams it back, from this node's files or relayed from the uploader's node, with
``Content-Length`` and single byte ranges (``Range: bytes=a-b``). Neither holds a
whole file in memory.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import trio
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from node.attachments import BlobRead
from node.errors import BadRequest, MootError, RangeNotSatisfiable
from node.logs import get_logger
from web.api import JSON
from web.auth import authenticate

if TYPE_CHECKING:
    from node.app import Node

log = get_logger("moot.web.attachments")
RANGE_RE = re.compile(r"^bytes=(\d{1,15})-(\d{1,15})?$")
UPLOAD_TYPE = "application/octet-stream"


def _node(request: Request) -> Node:
    return request.app.state.node  # type: ignore[no-any-return]


def _param(request: Request, name: str, *, required: bool = True) -> str | None:
    value = request.query_params.get(name)
    if value is None and required:
        raise BadRequest(f"the query parameter {name!r} is required", field=name)
    return value


def parse_range(header: str | None) -> tuple[int, int | None] | None:
    """(offset, length or None for "to the end") of a single ``bytes=a-b`` range;
    None without a header. Suffix ranges (``bytes=-n``) and lists are refused."""
    if header is None:
        return None
    match = RANGE_RE.match(header.strip())
    if not match:
        raise RangeNotSatisfiable("only one range, as bytes=start- or bytes=start-end, is supported")
    start = int(match.group(1))
    if match.group(2) is None:
        return start, None
    end = int(match.group(2))
    if end < start:
        raise RangeNotSatisfiable("a range's end comes before its start")
    return start, end - start + 1


async def upload(request: Request) -> JSON:
    node = _node(request)
    session = await authenticate(request, node.accounts)
    assert node.attachments is not None
    if request.headers.get("content-type", "").split(";")[0].strip().lower() != UPLOAD_TYPE:
        raise BadRequest(f"send the encrypted file as the body, with Content-Type: {UPLOAD_TYPE}", reason="content_type")
    peer = _param(request, "conversation") or ""
    declared = request.headers.get("content-length")
    if declared is not None and not declared.isdigit():
        raise BadRequest("Content-Length is not a number")
    answer = await node.attachments.upload(session, peer, int(declared) if declared else None, _body(request))
    return JSON(answer, status_code=201)


async def _body(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; a client that goes away is a BadRequest here
    (the upload is dropped), not Starlette's ClientDisconnect."""
    try:
        async for chunk in request.stream():
            if chunk:
                yield chunk
    except ClientDisconnect:
        raise BadRequest("the client went away during the upload", reason="incomplete") from None


async def download(request: Request) -> Response:
    node = _node(request)
    session = await authenticate(request, node.accounts)
    assert node.attachments is not None
    digest = request.path_params["blob"]
    peer = _param(request, "conversation") or ""
    wanted = parse_range(request.headers.get("range"))
    offset, length = wanted if wanted is not None else (0, None)
    blob = await node.attachments.download(session, digest, peer, _param(request, "node", required=False), offset, length)
    return BlobResponse(blob, digest, partial=wanted is not None)


class BlobResponse(Response):
    """Streams a ``BlobRead`` and releases it, also when the client goes away first."""

    def __init__(self, blob: BlobRead, digest: str, *, partial: bool) -> None:
        self.blob = blob
        headers = {
            "content-length": str(blob.length), "accept-ranges": "bytes", "etag": f'"{digest}"',
            # The blob under this name never changes; only its conversation's members may read it.
            "cache-control": "private, max-age=31536000, immutable",
        }
        if partial:
            end = blob.offset + blob.length - 1
            headers["content-range"] = f"bytes {blob.offset}-{end}/{blob.size}"
        super().__init__(status_code=206 if partial else 200, headers=headers, media_type="application/octet-stream")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with trio.open_nursery() as nursery:

                async def watch_disconnect() -> None:
                    while (await receive())["type"] != "http.disconnect":
                        pass
                    nursery.cancel_scope.cancel()

                nursery.start_soon(watch_disconnect)
                await send({"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers})
                try:
                    async for chunk in self.blob.chunks():
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except MootError as exc:
                    # Headers are gone already: all a client can see is a cut-short body
                    # (less than Content-Length), which it must treat as a failure.
                    log.warning("attachment.download_broken", error=exc.message)
                    return
                await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
        finally:
            await self.blob.aclose()


routes: list[Any] = [
    Route("/api/v1/attachments", upload, methods=["POST"]),
    Route("/api/v1/attachments/{blob}", download, methods=["GET"]),
]
