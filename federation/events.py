"""Federation events: what one node tells another, signed by the origin node's key.

Sans-IO (no trio, libp2p or database imports). An event is a JSON object with a
``type``; its exact bytes travel with the origin's Ed25519 signature over
``b"moot/v1/fed-event" || bytes``, so any node can check who said it, however it
arrived. A node speaks only for its own users: every event names the user it is
about (``speaker``), and that user must live on the origin node.

The receiving side runs ``verify_event`` on each event of a batch, in this order
(the first failure is the event's ``reject`` code): size (``too_large``),
signature (``bad_signature``), shape (``bad_event``, ``unknown_type``), version
(``unsupported_version``), origin (``wrong_origin``), speaker (``foreign_sender``).
"""

from __future__ import annotations

import base64
from typing import Annotated, ClassVar, Literal, Union

import msgspec
import nacl.exceptions
import nacl.signing

from federation.wire import NodeName, SignedEvent
from web.frames import ADDRESS_RE, DeviceId, MessageId

VERSION = 1
LABEL = b"moot/v1/fed-event"
DEFAULT_MAX_EVENT = 256 * 1024
EventId = Annotated[str, msgspec.Meta(min_length=1, max_length=300)]
Address = Annotated[str, msgspec.Meta(pattern=ADDRESS_RE.pattern)]  # user@node, checked strictly
Millis = Annotated[int, msgspec.Meta(ge=0)]


class EventRejected(Exception):
    """One event is refused; the stream carries on. ``code`` goes into the reject frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class Event(msgspec.Struct, frozen=True, tag_field="type", omit_defaults=True):
    v: int
    origin: NodeName
    id: EventId
    ts: Millis

    speaker_field: ClassVar[str] = ""

    @property
    def speaker(self) -> str:
        """The user this event speaks for; must be a user of ``origin``."""
        return str(getattr(self, self.speaker_field))


class MessageEvent(Event, tag="message"):
    """A message from ``sender`` (on the origin) to ``to`` (on the receiving node)."""

    sender: Address
    sender_device: DeviceId
    to: Address
    message_id: MessageId
    envelope: msgspec.Raw

    speaker_field: ClassVar[str] = "sender"


class ReceiptEvent(Event, tag="receipt"):
    """``by`` (on the origin) received or read ``to``'s message ``message_id``."""

    kind: Literal["delivered", "read"]
    by: Address
    to: Address
    message_id: MessageId

    speaker_field: ClassVar[str] = "by"


class DevicesEvent(Event, tag="devices"):
    """``user``'s devices changed (added, removed, new keys): drop what you cached."""

    user: Address

    speaker_field: ClassVar[str] = "user"


AnyEvent = Union[MessageEvent, ReceiptEvent, DevicesEvent]

_decoder = msgspec.json.Decoder(AnyEvent)
_encoder = msgspec.json.Encoder()


def message_event_id(sender: str, message_id: str) -> str:
    """Event ids are derived from what they carry, so a re-sent event is recognisably the same."""
    return f"m/{sender}/{message_id}"


def receipt_event_id(kind: str, by: str, message_id: str, to: str) -> str:
    return f"r/{kind}/{by}/{to}/{message_id}"


def b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_event(event: Event, key: nacl.signing.SigningKey) -> tuple[bytes, str]:
    """The event's bytes and the origin's signature over them (base64url)."""
    raw = _encoder.encode(event)
    return raw, b64e(key.sign(LABEL + raw).signature)


def signed(oid: int, event: Event, key: nacl.signing.SigningKey) -> SignedEvent:
    raw, sig = sign_event(event, key)
    return SignedEvent(oid=oid, event=msgspec.Raw(raw), sig=sig)


def node_of(address: str) -> str | None:
    match = ADDRESS_RE.match(address)
    return match.group(2) if match else None


def verify_event(item: SignedEvent, origin: str, origin_key: bytes, *, max_bytes: int = DEFAULT_MAX_EVENT) -> AnyEvent:
    """The event, if ``origin`` (whose Ed25519 public key is ``origin_key``) may say it.

    ``origin`` is the node at the other end of the authenticated link, never a name
    the event itself claims. Raises EventRejected.
    """
    raw = bytes(item.event)
    if len(raw) > max_bytes:
        raise EventRejected("too_large", f"an event of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        nacl.signing.VerifyKey(origin_key).verify(LABEL + raw, b64d(item.sig))
    except (nacl.exceptions.BadSignatureError, ValueError, TypeError):
        raise EventRejected("bad_signature", f"event {item.oid} is not signed by {origin}") from None
    try:
        event: AnyEvent = _decoder.decode(raw)
    except msgspec.ValidationError as exc:
        text = str(exc)
        code = "unknown_type" if "`$.type`" in text and text.startswith("Invalid value") else "bad_event"
        raise EventRejected(code, text) from None
    except msgspec.DecodeError as exc:
        raise EventRejected("bad_event", f"malformed JSON: {exc}") from None
    if event.v != VERSION:
        raise EventRejected("unsupported_version", f"event version {event.v}")
    if event.origin != origin:
        raise EventRejected("wrong_origin", f"an event from {event.origin!r} arrived from {origin!r}")
    if node_of(event.speaker) != origin:
        raise EventRejected("foreign_sender", f"{origin} cannot speak for {event.speaker}")
    return event


class EventSigner:
    """Makes this node's events: the right ids, its name as origin, its signature."""

    def __init__(self, node: str, key: nacl.signing.SigningKey) -> None:
        self.node = node
        self.key = key

    def message(self, *, sender: str, sender_device: str, to: str, message_id: str, envelope: bytes, now: int) -> tuple[bytes, str]:
        return sign_event(MessageEvent(
            v=VERSION, origin=self.node, id=message_event_id(sender, message_id), ts=now, sender=sender,
            sender_device=sender_device, to=to, message_id=message_id, envelope=msgspec.Raw(envelope),
        ), self.key)

    def devices(self, *, user: str, now: int) -> tuple[bytes, str]:
        return sign_event(DevicesEvent(v=VERSION, origin=self.node, id=f"d/{user}/{now}", ts=now, user=user), self.key)

    def receipt(self, *, kind: Literal["delivered", "read"], by: str, to: str, message_id: str, now: int) -> tuple[bytes, str]:
        return sign_event(ReceiptEvent(
            v=VERSION, origin=self.node, id=receipt_event_id(kind, by, message_id, to), ts=now, kind=kind, by=by,
            to=to, message_id=message_id,
        ), self.key)
