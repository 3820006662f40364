"""Attachments across nodes: serving this node's blobs and fetching other nodes' blobs,
one ``/moot/blobs/1`` stream per request (federation/blobwire.py).

Serving: the asking node is known by the peer id Noise authenticated; it may ask
only for its own users (``user`` must be on it), and gets a blob only if that user
is in a conversation the blob belongs to (node/attachments.py decides). The body is
written as it is read from the file, with Yamux's flow control as backpressure.

Fetching: ``fetch`` opens a stream to the uploader's node, sends the request, waits
for the header (bounded) and returns a ``BlobRead`` whose chunks are read from the
stream as the HTTP response that relays them is written.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import trio

from federation import blobwire, wire
from federation.host import FederationStream, HostError
from federation.wire import ProtocolViolation
from node.attachments import BlobRead
from node.errors import BadRequest, MootError, NotFound, RangeNotSatisfiable, Unavailable, UnknownNode
from node.logs import get_logger

if TYPE_CHECKING:
    from federation.service import FederationService
    from node.attachments import AttachmentService

log = get_logger("moot.federation.blobs")

REQUEST_TIMEOUT_S = 10.0  # for the request to arrive, and for the header to come back
IDLE_TIMEOUT_S = 30.0  # a body that stops flowing for this long is given up
RECEIVE_BYTES = 256 * 1024
# What an error answer may say to the asking node (anything else is "unavailable").
_REFUSALS: dict[str, type[MootError]] = {"not_found": NotFound, "bad_range": RangeNotSatisfiable, "bad_request": BadRequest}


class BlobLinks:
    def __init__(self, service: FederationService) -> None:
        self.service = service
        self.attachments: AttachmentService | None = None  # set by the composition root
        self.served = 0  # requests answered with a blob
        self.refused = 0

    # -- serving ----------------------------------------------------------------------

    async def inbound(self, stream: FederationStream) -> None:
        """Answer one ``get_blob`` from another node."""
        service = self.service
        peer_id = stream.remote_peer_id
        try:
            known = await service.repo.node_by_peer(peer_id)
            service.check_not_refused(peer_id, known)
            if known is None:
                raise ProtocolViolation("forbidden", "say hello on /moot/federation/1 first")
            if not service.permitted(known.name):
                raise ProtocolViolation("forbidden", f"{known.name!r} may not federate with this node")
            request = await self._read_request(stream)
        except ProtocolViolation as exc:
            self.refused += 1
            await self._send_error(stream, exc.code, exc.message)
            return
        except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, HostError):
            return
        try:
            if self.attachments is None:
                raise NotFound("this node keeps no attachments")
            blob = await self.attachments.serve_remote(
                known.name, request.user, request.digest, request.conversation, request.offset, request.length,
            )
        except MootError as exc:
            self.refused += 1
            log.info("blobs.refused", node=known.name, code=exc.code)
            await self._send_error(stream, exc.code, exc.message)
            return
        try:
            header = blobwire.BlobHeader(digest=request.digest, size=blob.size, offset=blob.offset, length=blob.length)
            await stream.send_all(blobwire.encode_frame(header))
            async for chunk in blob.chunks():
                await stream.send_all(chunk)
            self.served += 1
        except (trio.BrokenResourceError, trio.ClosedResourceError, HostError) as exc:
            log.info("blobs.send_broken", node=known.name, error=str(exc))
        except MootError as exc:
            log.warning("blobs.read_failed", node=known.name, error=exc.message)
        finally:
            await blob.aclose()
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.aclose()

    async def _read_request(self, stream: FederationStream) -> blobwire.GetBlob:
        deframer = wire.Deframer(blobwire.MAX_REQUEST)
        with trio.fail_after(REQUEST_TIMEOUT_S):
            while True:
                data = await stream.receive_some(RECEIVE_BYTES)
                if not data:
                    raise trio.BrokenResourceError("closed before its request")
                request = blobwire.read_request(deframer, data)
                if request is not None:
                    return request

    @staticmethod
    async def _send_error(stream: FederationStream, code: str, message: str) -> None:
        with trio.move_on_after(2):
            try:
                await stream.send_all(blobwire.encode_frame(wire.Error(code=code, message=message[:1000])))
            except (trio.BrokenResourceError, trio.ClosedResourceError, HostError):
                pass
        with trio.CancelScope(shield=True), trio.move_on_after(2):
            await stream.aclose()

    # -- fetching ---------------------------------------------------------------------

    async def fetch(self, node: str, digest: str, user: str, conversation: str, offset: int, length: int | None) -> BlobRead:
        """Open blob ``digest`` on ``node`` for ``user`` (see node/attachments.py RemoteBlobs)."""
        service = self.service
        if service.host is None:
            raise Unavailable("federation is not running")
        await service.require_node(node)
        record = await service.repo.node(node)
        if record is None or record.peer_id is None:
            raise UnknownNode(f"unknown node {node!r}")
        request = blobwire.GetBlob(digest=digest, user=user, conversation=conversation, offset=offset, length=length)
        receiver = blobwire.BlobReceiver(request)
        try:
            stream = await service._open(record, blobwire.PROTOCOL_ID)
        except HostError as exc:
            raise Unavailable(f"node {node!r} cannot be reached: {exc}") from exc
        first = b""
        try:
            await stream.send_all(blobwire.encode_frame(request))
            with trio.fail_after(REQUEST_TIMEOUT_S):
                while receiver.header is None and receiver.refused is None:
                    data = await stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        receiver.finish()
                        break
                    first += receiver.feed(data)
        except BaseException as exc:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.aclose()
            if isinstance(exc, (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, HostError, ProtocolViolation)):
                raise Unavailable(f"node {node!r} did not send the attachment: {exc}") from exc
            raise
        if receiver.refused is not None:
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                await stream.aclose()
            kind = _REFUSALS.get(receiver.refused.code, Unavailable)
            raise kind(f"{node}: {receiver.refused.message}")
        assert receiver.header is not None
        header = receiver.header

        async def chunks() -> AsyncIterator[bytes]:
            if first:
                yield first
            while not receiver.complete:
                try:
                    with trio.fail_after(IDLE_TIMEOUT_S):
                        data = await stream.receive_some(RECEIVE_BYTES)
                    if not data:
                        receiver.finish()
                    body = receiver.feed(data)
                except (trio.TooSlowError, trio.BrokenResourceError, trio.ClosedResourceError, HostError, ProtocolViolation) as exc:
                    raise Unavailable(f"node {node!r} broke off the attachment: {exc}") from exc
                if body:
                    yield body

        async def aclose() -> None:
            if receiver.complete:
                await stream.aclose()
            else:  # our client went away mid-way: stop the other node's sending at once
                await stream.reset()

        return BlobRead(header.size, header.offset, header.length, chunks, aclose)


__all__ = ["BlobLinks"]
