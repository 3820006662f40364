"""Client protocol v1: the typed frames of the WebSocket at ``/api/v1/ws``.

Sans-IO: this module only turns bytes into frames and frames into bytes; it has no
trio, web-framework or database imports (a test checks). Each WebSocket text
message carries one JSON frame object, or a JSON array of frames (a batch). Every
frame has a ``type``. docs/protocol.md is the reference.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import msgspec

from node.errors import BadFrame, MissingField, MootError, TooLarge, UnknownFrameType

PROTOCOL_VERSION = 1

MessageId = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
Address = Annotated[str, msgspec.Meta(min_length=3, max_length=200)]
DeviceId = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
_TYPE_PATH = re.compile(r"at `\$(\[\d+\])?\.type`$")
ADDRESS_RE = re.compile(r"^([a-z0-9_.-]{1,32})@([a-z0-9][a-z0-9-]{0,62})$")


class _Frame(msgspec.Struct, frozen=True, tag_field="type", omit_defaults=True):
    pass


# -- envelope routing header: the only part of an envelope the node reads --------


class KeyRoute(msgspec.Struct, frozen=True):
    to: Address
    device: DeviceId


class EnvelopeHeader(msgspec.Struct, frozen=True):
    v: int
    id: MessageId
    sender: Address
    sender_device: DeviceId
    conversation: Address
    keys: Annotated[list[KeyRoute], msgspec.Meta(min_length=1, max_length=256)]


# -- client to node -------------------------------------------------------------


BlobDigest = Annotated[str, msgspec.Meta(pattern=r"^[0-9a-f]{64}$")]
MAX_ATTACHMENTS = 16  # blobs one message may carry


class Send(_Frame, tag="send"):
    """Store and deliver a message; answered by ``sent`` (or ``error`` with ``ref``).
    ``attachments``: blobs the sender uploaded for this conversation that the message
    carries (docs/protocol.md section 12)."""

    envelope: msgspec.Raw
    attachments: Annotated[list[BlobDigest], msgspec.Meta(max_length=MAX_ATTACHMENTS)] = []


class Ack(_Frame, tag="ack"):
    """This device has processed its stream up to and including ``seq``."""

    seq: Annotated[int, msgspec.Meta(ge=0)]


class Read(_Frame, tag="read"):
    """The user has read ``conversation`` up to the peer's message ``id``."""

    conversation: Address
    id: MessageId


class Ping(_Frame, tag="ping"):
    nonce: str = ""


class SetPresence(_Frame, tag="presence"):
    """This connection's user is at the device (``online``) or not (``away``: the page
    is hidden, the client idle). The user is away when all their connections are."""

    state: Literal["online", "away"]


class TypingTo(_Frame, tag="typing"):
    """The user is typing in ``conversation`` (or stopped). Ephemeral: never stored;
    clients repeat ``active`` every few seconds while typing and the indicator lapses
    without it."""

    conversation: Address
    active: bool


CallKind = Literal["offer", "answer", "candidate", "ringing", "accept", "reject", "busy", "hangup", "missed"]
CallId = Annotated[str, msgspec.Meta(min_length=8, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")]
CallPayload = Annotated[str, msgspec.Meta(max_length=96 * 1024)]


class CallSignal(_Frame, tag="call"):
    """A call signal for ``to`` (docs/calls.md). ``payload`` is end-to-end encrypted
    (an envelope, as for messages): the node relays it unread."""

    call_id: CallId
    kind: CallKind
    to: Address
    media: Literal["audio", "video"] | None = None
    payload: CallPayload = ""
    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=64)] | None = None


ClientFrame = Union[Send, Ack, Read, Ping, SetPresence, TypingTo, CallSignal]

# -- node to client ---------------------------------------------------------------


class Ready(_Frame, tag="ready"):
    protocol: int
    node: str
    user: str
    device: str
    cursor: int
    max_frame_bytes: int
    max_envelope_bytes: int


class Sent(_Frame, tag="sent"):
    """The message ``id`` is durably stored (status "sent")."""

    id: str
    conversation: str
    ts: int
    duplicate: bool = False


class Message(_Frame, tag="message"):
    seq: int
    conversation: str
    sender: str
    sender_device: str
    id: str
    ts: int
    envelope: msgspec.Raw


class Receipt(_Frame, tag="receipt"):
    """``kind`` is delivered, read (by the peer) or read_sync (by the user's other device)."""

    seq: int
    kind: Literal["delivered", "read", "read_sync"]
    id: str
    conversation: str
    by: str
    ts: int


class Presence(_Frame, tag="presence"):
    user: str
    state: Literal["online", "away", "offline"]
    last_seen: int | None = None


class Typing(_Frame, tag="typing"):
    """``user`` is typing in ``conversation`` (as this user sees it), or stopped."""

    conversation: str
    user: str
    active: bool


class Call(_Frame, tag="call"):
    """A call signal from ``sender`` (``sender_device`` empty: the node made it, e.g.
    busy, missed, answered elsewhere). Sent ahead of other queued frames."""

    call_id: str
    kind: str
    sender: str
    sender_device: str
    media: str | None = None
    payload: str = ""
    reason: str | None = None


class CallLog(_Frame, tag="call_log"):
    """A call-history entry in the user's stream: how a call with ``peer`` ended.
    Times in ms; ``reason``: completed, missed, rejected, busy, cancelled or failed."""

    seq: int
    call_id: str
    peer: str
    direction: Literal["outgoing", "incoming"]
    media: str
    reason: str
    started_at: int
    ended_at: int
    answered_at: int | None = None


class Error(_Frame, tag="error"):
    code: str
    message: str
    ref: str | None = None
    details: dict[str, Any] | None = None


class Pong(_Frame, tag="pong"):
    nonce: str = ""


ServerFrame = Union[Ready, Sent, Message, Receipt, Presence, Typing, Call, CallLog, Error, Pong]

_client_decoder = msgspec.json.Decoder(Union[ClientFrame, list[ClientFrame]])
_server_decoder = msgspec.json.Decoder(Union[ServerFrame, list[ServerFrame]])
_envelope_decoder = msgspec.json.Decoder(EnvelopeHeader)
_encoder = msgspec.json.Encoder()


def _translate(exc: msgspec.MsgspecError) -> MootError:
    text = str(exc)
    if isinstance(exc, msgspec.DecodeError) and not isinstance(exc, msgspec.ValidationError):
        return BadFrame("malformed JSON: " + text)
    if "missing required field" in text:
        return MissingField(text)
    if text.startswith("Invalid value") and _TYPE_PATH.search(text):
        return UnknownFrameType(text)
    return BadFrame(text)


def decode_client(data: bytes | str, max_bytes: int) -> list[ClientFrame]:
    """Parse one WebSocket message from a client into frames.

    Raises TooLarge, BadFrame, MissingField or UnknownFrameType; never anything else.
    """
    if len(data) > max_bytes:
        raise TooLarge(f"frame of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        decoded = _client_decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise _translate(exc) from None
    return decoded if isinstance(decoded, list) else [decoded]


def decode_server(data: bytes | str) -> list[ServerFrame]:
    """Parse one WebSocket message from the node (used by the client library)."""
    try:
        decoded = _server_decoder.decode(data)
    except msgspec.MsgspecError as exc:
        raise _translate(exc) from None
    return decoded if isinstance(decoded, list) else [decoded]


def decode_envelope_header(raw: bytes, max_bytes: int) -> EnvelopeHeader:
    """Read the routing fields of an envelope; raises TooLarge or BadFrame.

    The header is parsed before the size is checked (the frame limit already
    bounds the work) so that an oversized envelope is refused by its id.
    """
    try:
        header = _envelope_decoder.decode(raw)
    except msgspec.MsgspecError as exc:
        err = _translate(exc)
        err.message = "envelope: " + err.message
        raise err from None
    if len(raw) > max_bytes:
        raise TooLarge(f"envelope of {len(raw)} bytes exceeds the limit of {max_bytes}", id=header.id)
    if header.v != 1:
        raise BadFrame(f"envelope version {header.v} is not supported")
    return header


def encode(frame: _Frame | list[Any]) -> bytes:
    return _encoder.encode(frame)


def encode_batch(encoded: list[bytes]) -> bytes:
    """Join already-encoded frames into one message (a JSON array when several)."""
    if len(encoded) == 1:
        return encoded[0]
    return b"[" + b",".join(encoded) + b"]"


def split_address(address: str) -> tuple[str, str]:
    """``alice@riverside`` -> (``alice``, ``riverside``); raises BadFrame if malformed."""
    match = ADDRESS_RE.match(address)
    if not match:
        raise BadFrame(f"not an address: {address!r} (expected user@node)")
    return match.group(1), match.group(2)
