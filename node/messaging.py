"""One-to-one messaging: storing and pushing messages, receipts, backlog and history.

The hot path never waits for a commit inside a connection's read loop: a ``send``
or ``ack`` is handed to the group-commit writer with a completion callback, which
pushes ``sent``, the message and receipts once the batch is durable. A connection
may have ``MAX_INFLIGHT`` writes pending; past that its reader waits.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import outcome

from node.accounts import Session
from node.config import NodeConfig
from node.devices import DeviceService
from node.errors import BadRequest, MootError, NotFound, SenderMismatch
from node.hub import Connection, Hub
from node.logs import get_logger
from node.remote import NoRemote, Remote
from storage.repos import AccountRepo, DeviceRepo, MessageRepo
from storage.repos.messages import (
    KIND_CALL,
    KIND_MESSAGE,
    ConversationSummary,
    HistoryItem,
    Receipts,
    ReceiptEvent,
    StoreOutcome,
    StoreRequest,
    StreamEvent,
    peer_of,
)
from storage.writer import GroupCommitWriter
from web import frames

log = get_logger("moot.messaging")
MAX_INFLIGHT = 256


class AttachmentLinks(Protocol):
    async def check_links(self, user_id: int, conversation_id: int, digests: tuple[str, ...], message_id: str) -> None:
        """Raise BadRequest (``reason: unknown_attachment``) unless ``user_id`` uploaded
        every blob of ``digests`` for ``conversation_id``."""


def error_frame(exc: MootError, ref: str | None = None) -> bytes:
    """An error frame; ``ref`` defaults to the message id the error names, if any."""
    if ref is None:
        ref = _str_or_none(exc.details.get("id"))
    return frames.encode(frames.Error(code=exc.code, message=exc.message, ref=ref, details=exc.details or None))


class MessagingService:
    def __init__(
        self,
        repo: MessageRepo,
        devices: DeviceService,
        device_repo: DeviceRepo,
        accounts: AccountRepo,
        hub: Hub,
        writer: GroupCommitWriter,
        config: NodeConfig,
        node_name: str,
        *,
        clock_ms: Callable[[], int],
        remote: Remote | None = None,
    ) -> None:
        self.repo = repo
        self.remote: Remote = remote or NoRemote()
        self.devices = devices
        self.device_repo = device_repo
        self.accounts = accounts
        self.hub = hub
        self.writer = writer
        self.config = config
        self.node_name = node_name
        self._clock_ms = clock_ms
        # Small caches on the hot path; entries are immutable facts or invalidated.
        self._conversations: dict[str, int] = {}
        # Told when a conversation is first used in this process (presence introduces the two).
        self.on_conversation: Callable[[int, str, str, int | None], None] = lambda user_id, address, peer, peer_id: None
        self._device_ids: dict[int, frozenset[str]] = {}
        # Checks the blobs a message carries (node/attachments.py); set by the composition root.
        self.attachments: AttachmentLinks | None = None

    # -- caches ------------------------------------------------------------------

    def forget_devices(self, user_id: int) -> None:
        """Drop cached device ids of a user (called when a device is added or removed)."""
        self._device_ids.pop(user_id, None)

    async def device_ids(self, user_id: int) -> frozenset[str]:
        ids = self._device_ids.get(user_id)
        if ids is None:
            ids = frozenset(d.public_id for d in await self.device_repo.list_for_user(user_id))
            self._device_ids[user_id] = ids
        return ids

    async def conversation_with(self, session: Session, peer: str) -> tuple[int, int | None]:
        """(conversation id, peer user id) of the session user's direct chat with ``peer``;
        the peer's id is None for a user of another node.

        Creates the conversation on first use. Raises BadFrame for a malformed
        address, UnknownNode / UnknownUser for a peer that does not exist.
        """
        _, node = frames.split_address(peer)
        if peer == session.address:
            raise BadRequest("a conversation needs another user")
        peer_id: int | None = None
        if node == self.node_name:
            peer_id, _ = await self.devices.resolve_local(peer)
        else:
            await self.remote.require_node(node)
        return await self._conversation(session.address, session.user_id, peer, peer_id), peer_id

    async def _conversation(self, me: str, my_id: int, peer: str, peer_id: int | None) -> int:
        key = f"{me} {peer}"
        conv_id = self._conversations.get(key)
        if conv_id is None:
            conv_id = await self.repo.ensure_direct(me, my_id, peer, peer_id, self._clock_ms())
            self._conversations[key] = conv_id
            self.on_conversation(my_id, me, peer, peer_id)
        return conv_id

    # -- client frames -------------------------------------------------------------

    async def handle_send(self, conn: Connection, frame: frames.Send) -> None:
        """Validate a message and hand it to the writer; answers come by callback."""
        raw = bytes(frame.envelope)
        ref = None
        try:
            header = frames.decode_envelope_header(raw, self.config.max_envelope_bytes)
            ref = header.id
            session = conn.session
            if header.sender != session.address or header.sender_device != conn.device_public_id:
                raise SenderMismatch("the envelope must name your own address and device", id=header.id)
            conv_id, peer_id = await self.conversation_with(session, header.conversation)
            other_devices = (await self.device_ids(session.user_id)) - {conn.device_public_id}
            await self._check_routes(header, peer_id, other_devices)
            blobs = tuple(dict.fromkeys(frame.attachments))
            if blobs:
                if self.attachments is None:
                    raise BadRequest("this node keeps no attachments", id=header.id)
                await self.attachments.check_links(session.user_id, conv_id, blobs, header.id)
        except MootError as exc:
            if exc.details.get("reason") == "devices_changed" and await self._already_stored(conn, header, raw):
                return
            conn.push(error_frame(exc, ref))
            return
        now = self._clock_ms()
        federate = None
        if peer_id is None:
            # The recipient is on another node: the signed event goes into its outbox
            # in the same transaction as the message.
            event, sig = self.remote.sign_message(
                sender=header.sender, sender_device=header.sender_device, to=header.conversation,
                message_id=header.id, envelope=raw, now=now,
            )
            federate = (frames.split_address(header.conversation)[1], event, sig)
        req = StoreRequest(
            conversation_id=conv_id, sender=header.sender, sender_device=header.sender_device,
            client_id=header.id, digest=hashlib.sha256(raw).digest(), envelope=raw, now=now,
            recipient_user_id=peer_id, sender_user_id=session.user_id if other_devices else None, federate=federate,
            attachments=blobs, uploader_user_id=session.user_id,
        )
        await conn.acquire_write_slot(MAX_INFLIGHT)

        def stored(result: outcome.Outcome[StoreOutcome]) -> None:
            conn.release_write_slot()
            self._after_store(conn, header, raw, peer_id, result)
            if federate is not None and isinstance(result, outcome.Value) and not result.value.duplicate:
                self.remote.wake(federate[0])

        self.writer.submit_nowait(self.repo.store_op(req), stored)

    async def _already_stored(self, conn: Connection, header: frames.EnvelopeHeader, raw: bytes) -> bool:
        """A resend of a stored message whose devices changed since: it is answered as a
        duplicate, so a client that lost the ``sent`` frame never has to re-encrypt (which
        would make different bytes under the same id)."""
        found = await self.repo.find_sent(header.sender, header.id)
        if found is None or found[0] != hashlib.sha256(raw).digest():
            return False
        conn.push(frames.encode(frames.Sent(id=header.id, conversation=header.conversation, ts=found[1], duplicate=True)))
        return True

    async def _check_routes(self, header: frames.EnvelopeHeader, peer_id: int | None, other_devices: frozenset[str]) -> None:
        """Every current device of the peer and of the sender must get a key, and no other.

        A remote peer's devices are as this node last heard them from the peer's node.
        """
        given = {(k.to, k.device) for k in header.keys}
        if peer_id is None:
            peer_devices = frozenset(d["device"] for d in await self.remote.devices_of(header.conversation))
            if given != {(header.conversation, d) for d in peer_devices} | {(header.sender, d) for d in other_devices}:
                # Our copy of the remote list may be older than the client's: ask again.
                peer_devices = frozenset(d["device"] for d in await self.remote.devices_of(header.conversation, fresh=True))
        else:
            peer_devices = await self.device_ids(peer_id)
        expected = {(header.conversation, d) for d in peer_devices}
        expected |= {(header.sender, d) for d in other_devices}
        if given != expected or len(given) != len(header.keys):
            missing = sorted(f"{a}/{d}" for a, d in expected - given)
            extra = sorted(f"{a}/{d}" for a, d in given - expected)
            raise BadRequest(
                "the envelope's keys do not match the current devices; fetch them again",
                id=header.id, missing=missing, extra=extra, reason="devices_changed",
            )

    def _after_store(
        self, conn: Connection, header: frames.EnvelopeHeader, raw: bytes, peer_id: int | None,
        result: outcome.Outcome[StoreOutcome],
    ) -> None:
        if isinstance(result, outcome.Error):
            exc = result.error
            if not isinstance(exc, MootError):
                log.error("message.store_failed", error=type(exc).__name__)
                exc = MootError("could not store the message")
            conn.push(error_frame(exc, header.id))
            return
        stored = result.value
        envelope = msgspec.Raw(raw)
        conn.push(frames.encode(frames.Sent(id=header.id, conversation=header.conversation, ts=stored.created_at, duplicate=stored.duplicate)))
        if stored.duplicate:
            return
        if stored.recipient_event is not None and peer_id is not None:
            self.hub.push_event(
                peer_id, stored.recipient_event,
                frames.encode(frames.Message(
                    seq=stored.recipient_event, conversation=header.sender, sender=header.sender,
                    sender_device=header.sender_device, id=header.id, ts=stored.created_at, envelope=envelope,
                )),
            )
        if stored.sender_event is not None:
            self.hub.push_event(
                conn.user_id, stored.sender_event,
                frames.encode(frames.Message(
                    seq=stored.sender_event, conversation=header.conversation, sender=header.sender,
                    sender_device=header.sender_device, id=header.id, ts=stored.created_at, envelope=envelope,
                )),
                skip=conn,
            )

    async def handle_ack(self, conn: Connection, frame: frames.Ack) -> None:
        if frame.seq > conn.sent_seq:
            conn.push(error_frame(BadRequest(f"cannot acknowledge {frame.seq}: only {conn.sent_seq} was delivered")))
            return
        op = self.repo.ack_op(
            conn.user_id, conn.session.address, conn.device_id, frame.seq, self._clock_ms(), self._sign_receipt
        )
        await conn.acquire_write_slot(MAX_INFLIGHT)

        def acked(result: outcome.Outcome[Receipts]) -> None:
            conn.release_write_slot()
            if isinstance(result, outcome.Error):
                conn.push(error_frame(_as_moot(result.error)))
                return
            self._push_receipts(result.value)

        self.writer.submit_nowait(op, acked)

    async def handle_read(self, conn: Connection, frame: frames.Read) -> None:
        session = conn.session
        try:
            conv_id, _ = await self.conversation_with(session, frame.conversation)
            user = await self.accounts.get_user_by_id(session.user_id)
            tell_peer = bool(user and user.read_receipts)
        except MootError as exc:
            conn.push(error_frame(exc, frame.id))
            return
        op = self.repo.read_op(
            conv_id, session.address, session.user_id, frame.conversation, frame.id, self._clock_ms(), tell_peer,
            self._sign_receipt,
        )

        def stored(result: outcome.Outcome[Receipts]) -> None:
            # Pushed from the writer's callback, in commit order, like every stream event:
            # a connection sends its stream in seq order (see Connection.push_event).
            if isinstance(result, outcome.Error):
                conn.push(error_frame(_as_moot(result.error), frame.id))
            else:
                self._push_receipts(result.value)

        self.writer.submit_nowait(op, stored)

    def handle_ping(self, conn: Connection, frame: frames.Ping) -> None:
        """Answer after every write this connection submitted before is committed.

        The writer completes operations in order, so a no-op queued now completes
        after them: a client can use ping as a barrier (e.g. before closing).
        """
        pong = frames.encode(frames.Pong(nonce=frame.nonce))
        self.writer.submit_nowait(_no_write, lambda _result: conn.push(pong))

    def _sign_receipt(self, kind: str, by: str, to: str, message_id: str, now: int) -> tuple[bytes, str]:
        assert kind in ("delivered", "read")
        return self.remote.sign_receipt(kind=kind, by=by, to=to, message_id=message_id, now=now)  # type: ignore[arg-type]

    def _push_receipts(self, events: list[ReceiptEvent]) -> None:
        for node in getattr(events, "remote_nodes", ()):
            self.remote.wake(node)
        for ev in events:
            p = ev.payload
            self.hub.push_event(
                ev.user_id, ev.seq,
                frames.encode(frames.Receipt(seq=ev.seq, kind=p["kind"], id=p["id"], conversation=p["conversation"], by=p["by"], ts=p["ts"])),
            )

    # -- events from other nodes -----------------------------------------------------

    async def remote_message(
        self, *, sender: str, sender_device: str, to: str, message_id: str, envelope: bytes
    ) -> tuple[Any, Callable[[StoreOutcome], None]]:
        """Check a message another node sent for a local user. Returns its write op and
        what to call with the op's result once committed (it pushes the message).
        Raises MootError: the event is rejected with its code.
        """
        to_id, _ = await self.devices.resolve_local(to)
        header = frames.decode_envelope_header(envelope, self.config.max_envelope_bytes)
        if (header.sender, header.sender_device, header.id, header.conversation) != (sender, sender_device, message_id, to):
            raise BadRequest("the envelope does not match the event that carries it")
        conv_id = await self._conversation(to, to_id, sender, None)
        req = StoreRequest(
            conversation_id=conv_id, sender=sender, sender_device=sender_device, client_id=message_id,
            digest=hashlib.sha256(envelope).digest(), envelope=envelope, now=self._clock_ms(),
            recipient_user_id=to_id, sender_user_id=None,
        )

        def after(stored: StoreOutcome) -> None:
            if stored.duplicate or stored.recipient_event is None:
                return
            self.hub.push_event(to_id, stored.recipient_event, frames.encode(frames.Message(
                seq=stored.recipient_event, conversation=sender, sender=sender, sender_device=sender_device,
                id=message_id, ts=stored.created_at, envelope=msgspec.Raw(envelope),
            )))

        return self.repo.store_op(req), after

    async def remote_receipt(self, *, kind: str, by: str, to: str, message_id: str) -> tuple[Any, Callable[[Receipts | None], None]]:
        """The write op for a receipt another node's user sent about a local user's
        message, and what to call with its result (raises NotFound for no such message)."""
        to_id, _ = await self.devices.resolve_local(to)

        def after(result: Receipts | None) -> None:
            if result is None:
                raise NotFound("no such message")
            self._push_receipts(result)

        return self.repo.remote_receipt_op(kind, by, to, to_id, message_id, self._clock_ms()), after

    # -- backlog and history -------------------------------------------------------

    def event_frame(self, address: str, ev: StreamEvent) -> bytes:
        if ev.kind == KIND_MESSAGE and ev.message is not None:
            m = ev.message
            return frames.encode(frames.Message(
                seq=ev.seq, conversation=peer_of(m.conversation_key, address), sender=m.sender,
                sender_device=m.sender_device, id=m.client_id, ts=m.created_at, envelope=msgspec.Raw(m.envelope),
            ))
        p = ev.payload or {}
        if ev.kind == KIND_CALL:
            return frames.encode(frames.CallLog(seq=ev.seq, **p))
        return frames.encode(frames.Receipt(seq=ev.seq, kind=p["kind"], id=p["id"], conversation=p["conversation"], by=p["by"], ts=p["ts"]))

    async def replay_backlog(self, conn: Connection, cursor: int) -> int:
        """Queue everything in the device's stream after ``cursor``, in order, then go live.

        Pages through the stream, waiting for the connection to drain between pages
        so memory stays bounded. Returns how many events were replayed.
        """
        batch = self.config.backlog_batch
        conn.sent_seq = max(conn.sent_seq, cursor)
        replayed = 0
        while not conn.closed:
            events = await self.repo.backlog(conn.user_id, conn.sent_seq, batch)
            for ev in events:
                if ev.seq > conn.sent_seq:
                    conn.sent_seq = ev.seq
                    conn.push(self.event_frame(conn.session.address, ev))
                    replayed += 1
            if len(events) < batch and conn.missed_seq <= conn.sent_seq:
                # No await between the check and the switch: no live event slips by.
                conn.syncing = False
                break
            await conn.wait_queue_below(batch)
        return replayed

    async def history(self, session: Session, peer: str, before: int | None, limit: int) -> list[HistoryItem]:
        conv_id, peer_id = await self.conversation_with(session, peer)
        if peer_id is None:
            shares = True  # another node only ever sends the reads its user shares
        else:
            peer_user = await self.accounts.get_user_by_id(peer_id)
            shares = bool(peer_user and peer_user.read_receipts)
        return await self.repo.history(
            conv_id, peer, before, max(1, min(limit, self.config.history_page_max)), peer_shares_reads=shares,
        )

    async def conversations(self, session: Session) -> list[ConversationSummary]:
        return await self.repo.conversations_of(session.user_id, session.address)


def history_item_json(item: HistoryItem, me: str) -> dict[str, Any]:
    m = item.message
    out: dict[str, Any] = {
        "seq": m.seq, "id": m.client_id, "sender": m.sender, "sender_device": m.sender_device,
        "ts": m.created_at, "envelope": msgspec.Raw(m.envelope),
    }
    if m.sender == me:
        out["status"] = "read" if item.read else "delivered" if item.delivered else "sent"
    return out


def _str_or_none(value: object) -> str | None:
    return value if isinstance(value, str) else None


def _no_write(_conn: object) -> None:
    return None


def _as_moot(exc: BaseException) -> MootError:
    if isinstance(exc, MootError):
        return exc
    log.error("write.failed", error=type(exc).__name__)
    return MootError("internal error")
