"""Attachments: encrypted files users upload to their node and fetch from it.

Clients encrypt a file before upload (cli/attachments.py, docs/crypto.md section 12),
so the node stores and serves ciphertext it cannot read. Blobs live on the
filesystem, content-addressed: ``<data_dir>/blobs/ab/cd/<sha-256 hex>``, written to
``blobs/tmp`` first while the digest is computed, then renamed into place; the
database (storage/repos/attachments.py) records who uploaded which blob for which
conversation and which messages carry it. Uploads and downloads stream in pieces:
memory does not grow with a file's size.

A blob is served to members of a conversation it belongs to. A user fetches a blob
of another node through their own node, which asks the uploader's node over
``/moot/blobs/1`` (federation/blobs.py) on the user's behalf and streams the answer
through. A blob no message carries is deleted once its last upload is older than
``attachment_orphan_ttl_s`` (``serve`` runs the cleanup).
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import trio

from cli.attachments import plaintext_size
from cli.crypto import CryptoError
from node.accounts import Session
from node.config import NodeConfig
from node.errors import BadRequest, LengthRequired, MootError, NotFound, RangeNotSatisfiable, TooLarge, UnknownNode
from node.logs import get_logger
from storage.repos.attachments import AttachmentRepo
from storage.writer import GroupCommitWriter
from web import frames

log = get_logger("moot.attachments")

DIGEST_RE = re.compile(r"^[0-9a-f]{64}$")
READ_BYTES = 256 * 1024  # one read from a blob file
WRITE_BYTES = 1024 * 1024  # what an upload gathers before one write to its file
CLEANUP_BATCH = 500
CLEANUP_ROUNDS = 100  # batches one cleanup pass deletes at most, before it sleeps again
UPLOAD_IDLE_S = 60.0  # an upload that sends nothing for this long is dropped
SWEEP_MAX_FILES = 100_000  # files the start-up sweep looks at, at most


def check_digest(digest: str) -> str:
    if not DIGEST_RE.match(digest):
        raise BadRequest("an attachment id is 64 lower-case hex digits (SHA-256)", field="blob")
    return digest


@dataclass
class BlobRead:
    """An open blob (local or another node's): ``length`` bytes from ``offset`` of
    ``size``, read with ``chunks()``; ``aclose()`` releases it (whether read or not)."""

    size: int
    offset: int
    length: int
    chunks: Callable[[], AsyncIterator[bytes]]
    aclose: Callable[[], Awaitable[None]]


class RemoteBlobs(Protocol):
    async def fetch(self, node: str, digest: str, user: str, conversation: str, offset: int, length: int | None) -> BlobRead:
        """Open ``digest`` on ``node`` for its reader ``user`` (of this node) in
        ``conversation`` (as ``user`` sees it). Raises NotFound, RangeNotSatisfiable,
        UnknownNode or Unavailable."""


class BlobStore:
    """The blob files: content-addressed, written through a temporary file."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def path(self, digest: str) -> Path:
        return self.root / digest[:2] / digest[2:4] / digest

    def prepare(self) -> None:
        """Create the directories and drop temporary files left by a crash."""
        self.tmp.mkdir(parents=True, exist_ok=True, mode=0o700)
        for stale in self.tmp.iterdir():
            stale.unlink(missing_ok=True)

    async def receive(self, chunks: AsyncIterator[bytes], expected: int) -> tuple[Path, str]:
        """Write exactly ``expected`` bytes from ``chunks`` to a new temporary file,
        hashing them on the way; returns (its path, the SHA-256 hex). Raises TooLarge
        for more bytes, BadRequest for fewer; the file is gone then."""
        path = self.tmp / f"upload-{os.urandom(12).hex()}"
        fh = await trio.to_thread.run_sync(lambda: open(path, "xb"))
        digest = hashlib.sha256()
        received = 0
        pending = bytearray()

        def write(data: bytes) -> None:
            digest.update(data)
            fh.write(data)

        source = chunks.__aiter__()
        try:
            while True:
                with trio.move_on_after(UPLOAD_IDLE_S) as idle:
                    try:
                        chunk = await source.__anext__()
                    except StopAsyncIteration:
                        break
                if idle.cancelled_caught:
                    raise BadRequest(f"the upload sent nothing for {UPLOAD_IDLE_S:g} s", reason="incomplete")
                received += len(chunk)
                if received > expected:
                    raise TooLarge(f"the body is longer than its Content-Length ({expected} bytes)")
                pending += chunk
                if len(pending) >= WRITE_BYTES:
                    data, pending = bytes(pending), bytearray()
                    await trio.to_thread.run_sync(write, data)
            if received != expected:
                raise BadRequest(f"the body ended after {received} of {expected} bytes", reason="incomplete")
            data = bytes(pending)

            def finish() -> None:
                write(data)
                fh.flush()
                os.fsync(fh.fileno())
                fh.close()

            await trio.to_thread.run_sync(finish)
        except BaseException:
            fh.close()
            path.unlink(missing_ok=True)
            raise
        return path, digest.hexdigest()

    async def commit(self, tmp: Path, digest: str) -> None:
        """Move a received file into place (durably); an existing copy is kept."""

        def move() -> None:
            final = self.path(digest)
            final.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            if final.exists():
                tmp.unlink(missing_ok=True)
                return
            os.replace(tmp, final)
            fd = os.open(final.parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

        await trio.to_thread.run_sync(move)

    async def remove(self, digests: list[str]) -> None:
        def unlink() -> None:
            for digest in digests:
                self.path(digest).unlink(missing_ok=True)

        if digests:
            await trio.to_thread.run_sync(unlink)

    async def open(self, digest: str, size: int, offset: int, length: int) -> BlobRead:
        """Open a stored blob for reading ``length`` bytes from ``offset``."""
        try:
            fh = await trio.open_file(self.path(digest), "rb")
        except FileNotFoundError:
            raise NotFound("the attachment's file is missing") from None
        closed = False

        async def chunks() -> AsyncIterator[bytes]:
            await fh.seek(offset)
            left = length
            while left > 0:
                data = await fh.read(min(READ_BYTES, left))
                if not data:
                    raise MootError("the attachment's file is shorter than recorded")
                left -= len(data)
                yield data

        async def aclose() -> None:
            nonlocal closed
            if not closed:
                closed = True
                with trio.CancelScope(shield=True):
                    await fh.aclose()

        return BlobRead(size, offset, length, chunks, aclose)

    def files(self, limit: int) -> list[tuple[str, float]]:
        """(digest, mtime) of up to ``limit`` blob files (blocking: run it in a thread)."""
        out: list[tuple[str, float]] = []
        for top in sorted(self.root.iterdir()) if self.root.exists() else ():
            if top.name == "tmp" or not top.is_dir():
                continue
            for sub in top.iterdir():
                for f in sub.iterdir():
                    if DIGEST_RE.match(f.name):
                        out.append((f.name, f.stat().st_mtime))
                    if len(out) >= limit:
                        return out
        return out


def byte_range(size: int, offset: int, length: int | None) -> tuple[int, int]:
    """(offset, length) of a request within a blob of ``size`` bytes; RangeNotSatisfiable
    when it starts beyond the end (an empty blob has nothing to range over)."""
    if offset < 0 or (length is not None and length < 0):
        raise RangeNotSatisfiable("a range is not negative", size=size)
    if offset > 0 and offset >= size:
        raise RangeNotSatisfiable(f"the attachment has {size} bytes", size=size)
    rest = size - offset
    return offset, rest if length is None else min(length, rest)


class AttachmentService:
    def __init__(
        self,
        repo: AttachmentRepo,
        store: BlobStore,
        conversations: Any,  # node.messaging.MessagingService: conversation_with, repo.find_direct
        writer: GroupCommitWriter,
        config: NodeConfig,
        node_name: str,
        *,
        clock_ms: Callable[[], int],
        remote: RemoteBlobs | None = None,
    ) -> None:
        self.repo = repo
        self.store = store
        self.conversations = conversations
        self.writer = writer
        self.config = config
        self.node_name = node_name
        self.remote = remote
        self._clock_ms = clock_ms
        # Moving a file into place and recording it, or deleting a row and then its file,
        # happen under this lock: a cleanup never deletes a file an upload just renewed.
        self._files = trio.Lock()
        self.deleted = 0  # blobs deleted (orphans and dropped messages), for tests and status

    # -- uploads -----------------------------------------------------------------------

    async def upload(self, session: Session, peer: str, declared: int | None, chunks: AsyncIterator[bytes]) -> dict[str, Any]:
        """Store an encrypted file ``session``'s user sends in the conversation with ``peer``.

        ``declared`` is the body's Content-Length (required: LengthRequired), at most
        ``max_attachment_bytes`` (TooLarge, before anything is read or written).
        Returns ``{blob, size, node}`` once the file and its record are durable.
        """
        limit = self.config.max_attachment_bytes
        if declared is None:
            raise LengthRequired("an upload needs a Content-Length header")
        if declared > limit:
            raise TooLarge(f"an attachment is at most {limit} bytes (this one is {declared})", limit=limit)
        try:
            plaintext_size(declared)
        except CryptoError:
            raise BadRequest(f"{declared} bytes is not the size of an encrypted attachment", reason="blob_size") from None
        conv_id, _ = await self.conversations.conversation_with(session, peer)
        tmp, digest = await self.store.receive(chunks, declared)
        try:
            async with self._files:
                await self.store.commit(tmp, digest)
                await self.writer.write(self.repo.record_upload_op(digest, declared, session.user_id, conv_id, self._clock_ms()))
        finally:
            tmp.unlink(missing_ok=True)
        log.info("attachment.uploaded", user=session.address, size=declared)
        return {"blob": digest, "size": declared, "node": self.node_name}

    async def check_links(self, user_id: int, conversation_id: int, digests: tuple[str, ...], message_id: str) -> None:
        missing = await self.repo.unlinkable(list(digests), user_id, conversation_id)
        if missing:
            raise BadRequest(
                "no such attachment of yours in this conversation (upload it first)",
                id=message_id, reason="unknown_attachment", blobs=missing,
            )

    # -- downloads ---------------------------------------------------------------------

    async def download(
        self, session: Session, digest: str, peer: str, node: str | None, offset: int = 0, length: int | None = None,
    ) -> BlobRead:
        """Open blob ``digest`` of the conversation with ``peer`` for ``session``'s user:
        from this node's files, or through the uploader's ``node``. Raises NotFound
        (no such blob in this conversation, or not yours to read), RangeNotSatisfiable,
        UnknownNode, Unavailable."""
        check_digest(digest)
        frames.split_address(peer)
        node = node or self.node_name
        if node == self.node_name:
            conv_id = await self.conversations.repo.find_direct(session.address, peer)
            if conv_id is None:
                raise NotFound("no such attachment in this conversation")
            return await self.open_local(digest, session.address, conv_id, offset, length)
        # Another node's blob: that node decides whether this user may read it (it knows
        # the conversation as well as we do, and the blob, which we do not).
        if not frames.ADDRESS_RE.match(f"x@{node}"):
            raise BadRequest(f"not a node name: {node!r}", field="node")
        # Only a node of someone in the conversation can have put a blob in it.
        if frames.split_address(peer)[1] != node:
            raise NotFound("no such attachment in this conversation")
        if self.remote is None:
            raise UnknownNode(f"unknown node {node!r}: this node does not federate")
        return await self.remote.fetch(node, digest, session.address, peer, offset, length)

    async def open_local(self, digest: str, address: str, conversation_id: int, offset: int, length: int | None) -> BlobRead:
        size = await self.repo.readable_size(digest, address, conversation_id)
        if size is None:
            raise NotFound("no such attachment in this conversation")
        offset, length = byte_range(size, offset, length)
        return await self.store.open(digest, size, offset, length)

    async def serve_remote(self, origin: str, user: str, digest: str, conversation: str, offset: int, length: int | None) -> BlobRead:
        """Open a local blob for ``user`` of node ``origin`` (the authenticated peer that
        asks), who sees the conversation as with ``conversation``. Raises NotFound (also
        when ``user`` is not ``origin``'s or not in a conversation the blob is in)."""
        check_digest(digest)
        _, user_node = frames.split_address(user)
        _, conv_node = frames.split_address(conversation)
        if user_node != origin:
            raise BadRequest(f"{origin} asks for {user}, who is not its user", reason="foreign_user")
        if conv_node != self.node_name:
            raise NotFound("no such attachment in this conversation")
        conv_id = await self.conversations.repo.find_direct(user, conversation)
        if conv_id is None:
            raise NotFound("no such attachment in this conversation")
        return await self.open_local(digest, user, conv_id, offset, length)

    # -- deletion ----------------------------------------------------------------------

    async def forget_message(self, message_seq: int) -> list[str]:
        """A message was deleted: its blobs that no other message carries go now.
        Returns their digests. (Call it after the message's own delete committed, or
        use ``storage.repos.attachments.drop_message_blobs`` in that transaction and
        ``remove`` with what it returns.)"""
        async with self._files:
            gone = await self.writer.write(self.repo.drop_message_op(message_seq))
            await self.store.remove(gone)
        self.deleted += len(gone)
        return gone

    async def remove(self, digests: list[str]) -> None:
        """Delete the files of blobs whose rows a committed transaction deleted."""
        async with self._files:
            await self.store.remove(digests)
        self.deleted += len(digests)

    async def cleanup_once(self) -> int:
        """Delete orphans (at most CLEANUP_BATCH); returns how many went."""
        cutoff = self._clock_ms() - int(self.config.attachment_orphan_ttl_s * 1000)
        candidates = await self.repo.orphans(cutoff, CLEANUP_BATCH)
        if not candidates:
            return 0
        async with self._files:
            gone = await self.writer.write(self.repo.delete_orphans_op(candidates, cutoff))
            await self.store.remove(gone)
        self.deleted += len(gone)
        if gone:
            log.info("attachment.orphans_deleted", count=len(gone))
        return len(gone)

    async def sweep_strays(self) -> int:
        """Delete blob files without a row (a crash between the rename and the commit)
        older than the orphan TTL; returns how many. Bounded to SWEEP_MAX_FILES."""
        files = await trio.to_thread.run_sync(self.store.files, SWEEP_MAX_FILES)
        cutoff = self._clock_ms() / 1000 - self.config.attachment_orphan_ttl_s
        removed = 0
        for start in range(0, len(files), CLEANUP_BATCH):
            batch = files[start:start + CLEANUP_BATCH]
            async with self._files:
                known = await self.repo.known([d for d, _ in batch])
                strays = [d for d, mtime in batch if d not in known and mtime < cutoff]
                await self.store.remove(strays)
            removed += len(strays)
        return removed

    @property
    def cleanup_interval_s(self) -> float:
        return min(max(self.config.attachment_orphan_ttl_s / 4, 0.05), 600.0)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Delete orphaned blobs every ``cleanup_interval_s``, until cancelled."""
        await trio.to_thread.run_sync(self.store.prepare)
        task_status.started()
        try:
            await self.sweep_strays()
        except (MootError, OSError) as exc:
            log.warning("attachment.sweep_failed", error=str(exc))
        while True:
            try:
                # A full batch means more may wait: go again at once (each round is bounded).
                for _ in range(CLEANUP_ROUNDS):
                    if await self.cleanup_once() < CLEANUP_BATCH:
                        break
                    await trio.sleep(0)
            except (MootError, OSError) as exc:
                log.warning("attachment.cleanup_failed", error=str(exc))
            await trio.sleep(self.cleanup_interval_s)

    async def storage_used(self, user_id: int) -> dict[str, int]:
        count, size = await self.repo.storage_used(user_id)
        return {"attachments": count, "attachment_bytes": size}
