"""The Python client library: one user's device talking to a Moot node.

HTTP (httpx) for accounts, devices and history; the WebSocket (trio-websocket) for
live messages, receipts and presence. Messages are end-to-end encrypted with
``cli.crypto`` (scheme v1): the node only ever sees envelopes.

    client = MootClient("http://127.0.0.1:8470")
    await client.register("alice", "correct horse")
    await client.login("alice", "correct horse")
    await client.create_device("laptop")
    async with client.connect() as live:
        await live.send_text("bob@riverside", "hello")
        event = await live.next_event()
"""

from __future__ import annotations

import json
import math
import os
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import trio
from trio_websocket import ConnectionClosed, WebSocketConnection, open_websocket_url

from cli import attachments as attach
from cli import crypto
from web import frames


class ClientError(Exception):
    """An error answered by the node (``code`` is its stable wire code)."""

    def __init__(self, code: str, message: str, details: dict[str, Any] | None = None) -> None:
        super().__init__(f"{message} ({code})")
        self.code = code
        self.message = message
        self.details = details or {}


@dataclass(frozen=True, slots=True)
class IncomingMessage:
    seq: int
    id: str
    conversation: str
    sender: str
    sender_device: str
    ts: int
    payload: dict[str, Any] | None
    error: str | None = None

    @property
    def text(self) -> str | None:
        return self.payload.get("text") if self.payload else None


@dataclass(frozen=True, slots=True)
class ReceiptEvent:
    kind: str
    id: str
    conversation: str
    by: str
    ts: int


@dataclass(frozen=True, slots=True)
class PresenceEvent:
    user: str
    state: str
    last_seen: int | None


@dataclass(frozen=True, slots=True)
class TypingEvent:
    conversation: str
    user: str
    active: bool


@dataclass(frozen=True, slots=True)
class CallEvent:
    """A call signal; ``sender_device`` is empty when the node made it (busy, missed...)."""

    call_id: str
    kind: str
    sender: str
    sender_device: str
    media: str | None
    payload: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class CallLogEvent:
    seq: int
    call_id: str
    peer: str
    direction: str
    media: str
    reason: str
    started_at: int
    ended_at: int
    answered_at: int | None


@dataclass(frozen=True, slots=True)
class ErrorEvent:
    """An error frame from the node that answers no pending send."""

    code: str
    message: str
    ref: str | None
    details: dict[str, Any] | None


Event = IncomingMessage | ReceiptEvent | PresenceEvent | TypingEvent | CallEvent | CallLogEvent | ErrorEvent


# Acks of batches holding only receipts wait this long (coalesced): they only move
# the device's cursor. Acks of messages go at once: the sender's "delivered" waits.
RECEIPT_ACK_DELAY_S = 1.0


def new_message_id() -> str:
    return secrets.token_urlsafe(16)


@dataclass
class MootClient:
    base_url: str
    token: str | None = None
    address: str | None = None
    device: str | None = None
    keys: crypto.DeviceKeys | None = None
    # (address, device id) -> identity key, as first seen (trust on first use).
    known_identities: dict[tuple[str, str], bytes] = field(default_factory=dict)
    key_changes: list[tuple[str, str]] = field(default_factory=list)
    _http: httpx.AsyncClient | None = None

    # -- persistence -------------------------------------------------------------

    def save(self, path: Path) -> None:
        """Store the device's private keys and session in a 0600 file."""
        assert self.keys is not None
        data = {
            "base_url": self.base_url, "token": self.token, "address": self.address, "device": self.device,
            "keys": json.loads(self.keys.to_json()),
        }
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            json.dump(data, fh)

    @classmethod
    def load(cls, path: Path) -> MootClient:
        data = json.loads(Path(path).read_text())
        return cls(data["base_url"], data["token"], data["address"], data["device"], crypto.DeviceKeys.from_json(json.dumps(data["keys"])))

    # -- HTTP --------------------------------------------------------------------

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(base_url=self.base_url, timeout=30)
        return self._http

    async def aclose(self) -> None:
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def request(self, method: str, path: str, body: Any = None, **params: Any) -> Any:
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        response = await self.http.request(method, path, json=body, headers=headers, params=params or None)
        return self._answer(response)

    async def register(self, username: str, password: str, invite: str | None = None) -> str:
        body = {"username": username, "password": password}
        if invite:
            body["invite"] = invite
        return str((await self.request("POST", "/api/v1/register", body))["user"])

    async def login(self, username: str, password: str) -> str:
        body: dict[str, Any] = {"username": username, "password": password}
        if self.device:
            body["device"] = self.device
        data = await self.request("POST", "/api/v1/login", body)
        self.token, self.address = data["token"], data["user"]
        return str(self.token)

    async def logout(self) -> None:
        await self.request("POST", "/api/v1/logout", {})
        self.token = None

    async def create_device(self, name: str = "python", *, one_time_prekeys: int = 20) -> str:
        """Generate this device's keys locally and publish the public half."""
        self.keys = crypto.DeviceKeys.generate(one_time_prekeys)
        bundle = {"name": name, **self.keys.public_bundle()}
        self.device = str((await self.request("POST", "/api/v1/devices", bundle))["device"])
        return self.device

    async def user_devices(self, address: str) -> list[dict[str, Any]]:
        """The devices of a user, recording identity keys and noticing changes."""
        devices: list[dict[str, Any]] = (await self.request("GET", f"/api/v1/users/{address}/devices"))["devices"]
        for d in devices:
            ident = crypto.b64decode(d["identity_key"], length=32, what="identity_key")
            known = self.known_identities.get((address, d["device"]))
            if known is not None and known != ident:
                self.key_changes.append((address, d["device"]))
            self.known_identities[(address, d["device"])] = ident
        return devices

    async def safety_number(self, peer: str) -> str:
        assert self.address is not None
        mine = [crypto.b64decode(d["identity_key"]) for d in await self.user_devices(self.address)]
        theirs = [crypto.b64decode(d["identity_key"]) for d in await self.user_devices(peer)]
        return crypto.safety_number(self.address, mine, peer, theirs)

    async def conversations(self) -> list[dict[str, Any]]:
        return list((await self.request("GET", "/api/v1/conversations"))["conversations"])

    async def history(self, peer: str, before: int | None = None, limit: int = 50) -> dict[str, Any]:
        params: dict[str, Any] = {"limit": limit}
        if before is not None:
            params["before"] = before
        return dict(await self.request("GET", f"/api/v1/conversations/{peer}/messages", **params))

    async def ice_servers(self) -> list[dict[str, Any]]:
        """The node's ICE servers for calls (``RTCConfiguration.iceServers``), with fresh TURN credentials."""
        return list((await self.request("GET", "/api/v1/ice"))["ice_servers"])

    async def set_read_receipts(self, enabled: bool) -> None:
        await self.request("PATCH", "/api/v1/me/settings", {"read_receipts": enabled})

    async def set_show_presence(self, shown: bool) -> None:
        """Whether others see this user online, away, and when last seen."""
        await self.request("PATCH", "/api/v1/me/settings", {"show_presence": shown})

    # -- profiles and the directory (public metadata: not end-to-end encrypted) --------

    async def profile(self) -> dict[str, Any]:
        """This user's profile: ``{user, display_name, status_text, avatar, updated_at, listed}``."""
        return dict((await self.request("GET", "/api/v1/me/profile"))["profile"])

    async def set_profile(
        self, *, display_name: str | None = None, status_text: str | None = None, listed: bool | None = None
    ) -> dict[str, Any]:
        """Change some of the profile; returns it as the node now has it."""
        changes = {k: v for k, v in (("display_name", display_name), ("status_text", status_text), ("listed", listed)) if v is not None}
        return dict((await self.request("PATCH", "/api/v1/me/profile", changes))["profile"])

    async def set_avatar(self, data: bytes, content_type: str) -> dict[str, Any]:
        """Upload a PNG, JPEG or WebP avatar (at most 256 KiB)."""
        headers = {"authorization": f"Bearer {self.token}", "content-type": content_type}
        response = await self.http.put("/api/v1/me/avatar", content=data, headers=headers)
        return dict(self._answer(response)["profile"])

    async def delete_avatar(self) -> dict[str, Any]:
        return dict((await self.request("DELETE", "/api/v1/me/avatar"))["profile"])

    async def user_profile(self, address: str) -> dict[str, Any]:
        """Anyone's profile; a user of another node is asked of their node."""
        return dict((await self.request("GET", f"/api/v1/users/{address}/profile"))["profile"])

    async def user_avatar(self, address: str) -> tuple[str, bytes]:
        """Anyone's avatar: its content type and bytes (ClientError ``not_found`` if none)."""
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        response = await self.http.get(f"/api/v1/users/{address}/avatar", headers=headers)
        if response.status_code >= 400:
            self._answer(response)
        return response.headers.get("content-type", ""), response.content

    async def directory(self, query: str = "", *, after: str | None = None, limit: int = 20) -> tuple[list[dict[str, Any]], str | None]:
        """Listed users of this node whose name or display name contains ``query``: one
        page of profiles and the ``after`` of the next page (None at the end)."""
        params: dict[str, Any] = {"q": query, "limit": limit}
        if after:
            params["after"] = after
        data = await self.request("GET", "/api/v1/directory", **params)
        return list(data["users"]), data["next"]

    # -- attachments (encrypted here; the node stores ciphertext: docs/protocol.md 12) ------

    async def limits(self) -> dict[str, int]:
        return dict((await self.request("GET", "/api/v1/info"))["limits"])

    async def upload_attachment(
        self, peer: str, path: Path | str, *, mime: str = "application/octet-stream", name: str | None = None,
    ) -> dict[str, Any]:
        """Encrypt the file at ``path`` with a fresh key while streaming it to the node, for
        the conversation with ``peer``. Returns the ``attachment`` payload to send
        (``send_attachment`` does both); ClientError ``too_large`` over the node's limit."""
        path = Path(path)
        size = path.stat().st_size
        blob_size = attach.encrypted_size(size)
        limit = (await self.limits()).get("max_attachment_bytes")
        if limit is not None and blob_size > limit:
            raise ClientError("too_large", f"{path.name} is {blob_size} bytes encrypted; the node takes {limit}")
        key = attach.new_file_key()
        encryptor = attach.AttachmentEncryptor(key)

        async def body() -> AsyncIterator[bytes]:
            async with await trio.open_file(path, "rb") as fh:
                while chunk := await fh.read(attach.CHUNK_SIZE * 4):
                    yield encryptor.update(chunk)
            yield encryptor.finish()

        headers = {
            "authorization": f"Bearer {self.token}", "content-type": "application/octet-stream",
            "content-length": str(blob_size),
        }
        response = await self.http.post("/api/v1/attachments", params={"conversation": peer}, content=body(), headers=headers)
        answer = self._answer(response)
        if answer["blob"] != encryptor.digest:
            raise ClientError("bad_answer", "the node named another blob than the one sent")
        return {
            "type": "attachment", "blob": answer["blob"], "node": answer["node"], "key": crypto.b64encode(key),
            "size": size, "mime": mime, "name": name or path.name,
        }

    async def download_attachment(self, attachment: dict[str, Any], conversation: str, dest: Path | str) -> Path:
        """Fetch the blob an ``attachment`` payload names (through this node, from the
        uploader's), decrypt it while it arrives and write the file to ``dest``.
        ClientError for the node's refusals; ``crypto.CryptoError`` when the blob is not
        the one the message names (nothing is left at ``dest`` then)."""
        dest = Path(dest)
        key = crypto.b64decode(attachment["key"], length=attach.KEY_LEN, what="key")
        decryptor = attach.AttachmentDecryptor(key)
        part = dest.with_name(dest.name + ".part")
        headers = {"authorization": f"Bearer {self.token}"} if self.token else {}
        params = {"conversation": conversation, "node": attachment["node"]}
        try:
            async with self.http.stream("GET", f"/api/v1/attachments/{attachment['blob']}", params=params, headers=headers) as response:
                if response.status_code >= 400:
                    await response.aread()
                    self._answer(response)
                async with await trio.open_file(part, "wb") as fh:
                    async for chunk in response.aiter_raw(attach.SEALED_CHUNK):
                        await fh.write(decryptor.feed(chunk))
                    await fh.write(decryptor.finish())
            if decryptor.digest != attachment["blob"] or decryptor.size != attachment["size"]:
                raise crypto.DecryptionFailed("the attachment is not the one the message names")
            part.replace(dest)
        finally:
            part.unlink(missing_ok=True)
        return dest

    @staticmethod
    def _answer(response: httpx.Response) -> Any:
        data = response.json() if response.content else {}
        if response.status_code >= 400:
            err = data.get("error", {}) if isinstance(data, dict) else {}
            raise ClientError(err.get("code", str(response.status_code)), err.get("message", response.text), err.get("details"))
        return data

    def decrypt(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """Decrypt an envelope for this device (sender identity must be known)."""
        assert self.keys and self.address and self.device
        ident = self.known_identities.get((envelope.get("sender", ""), envelope.get("sender_device", "")))
        if ident is None:
            raise crypto.BadSignature("unknown sender device")
        return crypto.decrypt_message(self.keys, self.address, self.device, envelope, ident)

    async def encrypt_text(self, peer: str, text: str, message_id: str) -> dict[str, Any]:
        payload = {"type": "text", "text": text, "ts": int(time.time() * 1000)}
        return await self.encrypt_payload(peer, payload, message_id)

    async def encrypt_payload(self, peer: str, payload: dict[str, Any], message_id: str, *, own_devices: bool = True) -> dict[str, Any]:
        """An envelope of ``payload`` for ``peer``'s devices (and this user's other devices)."""
        assert self.keys and self.address and self.device
        recipients = []
        for address in (peer, self.address) if own_devices else (peer,):
            for d in await self.user_devices(address):
                if address == self.address and d["device"] == self.device:
                    continue
                recipients.append(crypto.RecipientDevice.from_bundle(address, d["device"], d))
        return crypto.encrypt_message(self.keys, self.address, self.device, peer, message_id, payload, recipients)

    async def open_call_payload(self, event: CallEvent) -> dict[str, Any]:
        """Decrypt a call signal's payload (the sender's device keys are fetched if new)."""
        envelope = json.loads(event.payload)
        if (event.sender, event.sender_device) not in self.known_identities:
            await self.user_devices(event.sender)
        return self.decrypt(envelope)

    @asynccontextmanager
    async def connect(self, *, auto_ack: bool = True) -> AsyncIterator[LiveSession]:
        """Open the WebSocket; yields a LiveSession. The backlog arrives first."""
        url = self.base_url.replace("http://", "ws://").replace("https://", "wss://") + "/api/v1/ws"
        async with open_websocket_url(url, extra_headers=[("authorization", f"Bearer {self.token}")], max_message_size=16 * 2**20) as ws:
            live = LiveSession(self, ws, auto_ack)
            async with trio.open_nursery() as nursery:
                await nursery.start(live._read_loop)
                if auto_ack:
                    nursery.start_soon(live._lazy_acker)
                try:
                    yield live
                    await live.flush()
                finally:
                    nursery.cancel_scope.cancel()


class LiveSession:
    """An open WebSocket: send messages, receive decrypted events."""

    def __init__(self, client: MootClient, ws: WebSocketConnection, auto_ack: bool) -> None:
        self.client = client
        self.ws = ws
        self.auto_ack = auto_ack
        self.ready: frames.Ready | None = None
        self.presence: dict[str, PresenceEvent] = {}
        self.closed_reason: str | None = None
        self._events_send, self.events = trio.open_memory_channel[Event](math.inf)
        self._waiters: dict[str, tuple[trio.Event, list[Any]]] = {}
        self._last_seq = 0  # highest stream seq received
        self._acked_seq = 0  # highest stream seq acknowledged
        self._message_unacked = False  # a message arrived since the last ack
        self._lazy_wake = trio.Event()
        self._pongs: dict[str, trio.Event] = {}
        self.answer_timeout_s = 30.0

    async def next_event(self) -> Event:
        return await self.events.receive()

    async def send_frame(self, frame: Any) -> None:
        await self.ws.send_message(frames.encode(frame).decode())

    async def send_envelope(self, envelope: dict[str, Any], *, attachments: list[str] | None = None) -> frames.Sent:
        """Send an already encrypted envelope; return once the node stored it.
        ``attachments``: the blobs (uploaded for this conversation) the message carries."""
        message_id = envelope["id"]
        frame: dict[str, Any] = {"type": "send", "envelope": envelope}
        if attachments:
            frame["attachments"] = attachments
        data = json.dumps(frame)
        if self.ready is not None and len(data) > self.ready.max_frame_bytes:
            # The node could not say which message it refused: refuse it here.
            raise ClientError("too_large", f"the message is {len(data)} bytes; the node takes {self.ready.max_frame_bytes}")
        done = trio.Event()
        box: list[Any] = []
        self._waiters[message_id] = (done, box)
        try:
            await self.ws.send_message(data)
            with trio.move_on_after(self.answer_timeout_s):
                await done.wait()
            if not box:
                raise ClientError("timeout", f"no answer from the node within {self.answer_timeout_s} s")
        finally:
            self._waiters.pop(message_id, None)
        result = box[0]
        if isinstance(result, frames.Error):
            raise ClientError(result.code, result.message, result.details)
        return result  # type: ignore[no-any-return]

    async def send_text(self, peer: str, text: str, *, message_id: str | None = None) -> str:
        """Encrypt ``text`` to every device of ``peer`` and our other devices, and send it.

        Returns the message id once it is stored (status "sent"). If the devices
        changed since they were fetched, fetches them again and retries once.
        """
        message_id = message_id or new_message_id()
        for attempt in (1, 2):
            envelope = await self.client.encrypt_text(peer, text, message_id)
            try:
                await self.send_envelope(envelope)
                return message_id
            except ClientError as exc:
                if attempt == 2 or exc.details.get("reason") != "devices_changed":
                    raise
        raise AssertionError("unreachable")

    async def send_payload(self, peer: str, payload: dict[str, Any], *, message_id: str | None = None, attachments: list[str] | None = None) -> str:
        """Encrypt ``payload`` for ``peer`` and send it (retrying once if devices changed)."""
        message_id = message_id or new_message_id()
        for attempt in (1, 2):
            envelope = await self.client.encrypt_payload(peer, payload, message_id)
            try:
                await self.send_envelope(envelope, attachments=attachments)
                return message_id
            except ClientError as exc:
                if attempt == 2 or exc.details.get("reason") != "devices_changed":
                    raise
        raise AssertionError("unreachable")

    async def send_attachment(
        self, peer: str, path: Path | str, *, mime: str = "application/octet-stream", name: str | None = None,
        caption: str | None = None, message_id: str | None = None,
    ) -> tuple[str, dict[str, Any]]:
        """Upload ``path`` encrypted and send the message that carries it: (message id, payload)."""
        payload = await self.client.upload_attachment(peer, path, mime=mime, name=name)
        payload["ts"] = int(time.time() * 1000)
        if caption:
            payload["text"] = caption
        return await self.send_payload(peer, payload, message_id=message_id, attachments=[payload["blob"]]), payload

    async def flush(self, timeout: float = 5) -> None:
        """Acknowledge what was received and wait until the node has committed it all."""
        if self.closed_reason is not None:
            return
        with trio.move_on_after(timeout):
            try:
                if self.auto_ack and self._last_seq > self._acked_seq:
                    await self.ack(self._last_seq)
                nonce = new_message_id()
                self._pongs[nonce] = trio.Event()
                await self.send_frame(frames.Ping(nonce=nonce))
                await self._pongs[nonce].wait()
            except ConnectionClosed:
                return  # the node closed the connection: unacknowledged events come again next time

    async def ack(self, seq: int) -> None:
        """Tell the node this device has processed its stream up to ``seq``."""
        self._acked_seq = max(self._acked_seq, seq)
        self._message_unacked = False
        await self.send_frame(frames.Ack(seq=seq))

    async def _lazy_acker(self) -> None:
        """Ack receipt-only batches within RECEIPT_ACK_DELAY_S, coalesced."""
        try:
            while True:
                await self._lazy_wake.wait()
                await trio.sleep(RECEIPT_ACK_DELAY_S)
                self._lazy_wake = trio.Event()
                if self._last_seq > self._acked_seq:
                    await self.ack(self._last_seq)
        except (ConnectionClosed, trio.BrokenResourceError, trio.ClosedResourceError):
            return

    async def mark_read(self, peer: str, message_id: str) -> None:
        await self.send_frame(frames.Read(conversation=peer, id=message_id))

    async def set_presence(self, state: str) -> None:
        """``online`` (at this device) or ``away``."""
        await self.send_frame(frames.SetPresence(state=state))  # type: ignore[arg-type]

    async def call_signal(
        self, call_id: str, kind: str, to: str, *, media: str | None = None, payload: str = "", reason: str | None = None,
    ) -> None:
        """Send one call signal (docs/calls.md); ``payload`` should be an encrypted envelope
        (``encrypt_payload``), as JSON."""
        await self.send_frame(frames.CallSignal(
            call_id=call_id, kind=kind, to=to, media=media, payload=payload, reason=reason,  # type: ignore[arg-type]
        ))

    async def typing(self, peer: str, active: bool = True) -> None:
        """Tell ``peer`` this user is typing to them (repeat every few seconds), or stopped."""
        await self.send_frame(frames.TypingTo(conversation=peer, active=active))

    async def _read_loop(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        started = False
        try:
            while True:
                data = await self.ws.get_message()
                for frame in frames.decode_server(data):
                    await self._dispatch(frame)
                    if isinstance(frame, frames.Ready) and not started:
                        started = True
                        task_status.started()
                if self.auto_ack and self._last_seq > self._acked_seq:
                    if self._message_unacked:
                        # The sender's "delivered" waits for this ack: send it now.
                        await self.ack(self._last_seq)
                    else:
                        # Only receipts: acking them just moves the cursor, so it can wait.
                        self._lazy_wake.set()
        except ConnectionClosed as exc:
            self.closed_reason = str(exc.reason)
            for done, box in self._waiters.values():
                box.append(frames.Error(code="disconnected", message=str(exc.reason)))
                done.set()
            if not started:
                raise ClientError("disconnected", str(exc.reason)) from None
        finally:
            self._events_send.close()

    async def _dispatch(self, frame: frames.ServerFrame) -> None:
        if isinstance(frame, frames.Ready):
            self.ready = frame
        elif isinstance(frame, frames.Sent):
            self._resolve(frame.id, frame)
        elif isinstance(frame, frames.Error):
            if frame.ref and frame.ref in self._waiters:
                self._resolve(frame.ref, frame)
            else:
                self._events_send.send_nowait(ErrorEvent(frame.code, frame.message, frame.ref, frame.details))
        elif isinstance(frame, frames.Message):
            self._events_send.send_nowait(await self._open(frame))
            self._last_seq = max(self._last_seq, frame.seq)
            self._message_unacked = True
        elif isinstance(frame, frames.Receipt):
            self._events_send.send_nowait(ReceiptEvent(frame.kind, frame.id, frame.conversation, frame.by, frame.ts))
            self._last_seq = max(self._last_seq, frame.seq)
        elif isinstance(frame, frames.Pong):
            pong = self._pongs.pop(frame.nonce, None)
            if pong is not None:
                pong.set()
        elif isinstance(frame, frames.Presence):
            event = PresenceEvent(frame.user, frame.state, frame.last_seen)
            self.presence[frame.user] = event
            self._events_send.send_nowait(event)
        elif isinstance(frame, frames.Typing):
            self._events_send.send_nowait(TypingEvent(frame.conversation, frame.user, frame.active))
        elif isinstance(frame, frames.Call):
            self._events_send.send_nowait(CallEvent(
                frame.call_id, frame.kind, frame.sender, frame.sender_device, frame.media, frame.payload, frame.reason,
            ))
        elif isinstance(frame, frames.CallLog):
            self._events_send.send_nowait(CallLogEvent(
                frame.seq, frame.call_id, frame.peer, frame.direction, frame.media, frame.reason, frame.started_at,
                frame.ended_at, frame.answered_at,
            ))
            self._last_seq = max(self._last_seq, frame.seq)

    def _resolve(self, message_id: str, result: Any) -> None:
        waiter = self._waiters.get(message_id)
        if waiter is not None:
            waiter[1].append(result)
            waiter[0].set()

    async def _open(self, frame: frames.Message) -> IncomingMessage:
        envelope = json.loads(bytes(frame.envelope))
        client = self.client
        payload, error = None, None
        if frame.sender == client.address and frame.sender_device == client.device:
            error = "own message"
        else:
            if (frame.sender, frame.sender_device) not in client.known_identities:
                try:
                    await client.user_devices(frame.sender)
                except ClientError as exc:
                    error = exc.code
            if error is None:
                try:
                    payload = client.decrypt(envelope)
                except crypto.CryptoError as exc:
                    error = exc.code
        return IncomingMessage(frame.seq, frame.id, frame.conversation, frame.sender, frame.sender_device, frame.ts, payload, error)
