"""Federation protocol ``/moot/federation/1``: frames and their framing on a stream.

Sans-IO: bytes in, typed frames out, and back; no trio, libp2p or database imports
(a test checks). docs/protocol.md (part 2) is the reference.

On the stream every frame is ``u32be(length) || JSON object`` with a ``type``. A
stream carries events one way: the node that opened it sends ``hello`` and then
``batch`` frames; the node that accepted it sends ``hello`` and then ``ack``,
``reject`` and ``pong``. Either side may send ``ping`` and ``error``.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal, Union

import msgspec

PROTOCOL_ID = "/moot/federation/1"
KEYS_PROTOCOL_ID = "/moot/keys/1"
LIVE_PROTOCOL_ID = "/moot/live/1"
VERSION = 1
LENGTH_BYTES = 4
DEFAULT_MAX_FRAME = 1024 * 1024
MAX_EVENTS_PER_BATCH = 1000

NODE_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
NodeName = Annotated[str, msgspec.Meta(pattern=NODE_NAME_RE.pattern)]
Oid = Annotated[int, msgspec.Meta(ge=1, le=2**63 - 1)]
Sig = Annotated[str, msgspec.Meta(min_length=86, max_length=86)]  # 64 bytes in base64url
Code = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
Text = Annotated[str, msgspec.Meta(max_length=1000)]


class ProtocolViolation(Exception):
    """The peer broke the protocol (not one bad event: the stream as a whole).

    The connection ends; ``code`` is a stable string for logs and the error frame.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class _Frame(msgspec.Struct, frozen=True, tag_field="type", omit_defaults=True):
    pass


class Hello(_Frame, tag="hello"):
    """First frame in each direction: protocol version and the node's name."""

    v: int
    node: NodeName


class SignedEvent(msgspec.Struct, frozen=True):
    """One event in a batch: the origin's link-level sequence number, the event's
    exact bytes (what the origin signed) and the origin node's signature."""

    oid: Oid
    event: msgspec.Raw
    sig: Sig


class Batch(_Frame, tag="batch"):
    events: Annotated[list[SignedEvent], msgspec.Meta(min_length=1, max_length=MAX_EVENTS_PER_BATCH)]


class Ack(_Frame, tag="ack"):
    """Every event up to ``upto`` (an oid) is durably stored or was rejected."""

    upto: Oid


class Reject(_Frame, tag="reject"):
    """One event was refused (it still counts as handled: the origin must not resend it)."""

    oid: Oid
    code: Code
    message: Text = ""


class Ping(_Frame, tag="ping"):
    n: int = 0


class Pong(_Frame, tag="pong"):
    n: int = 0


class Error(_Frame, tag="error"):
    """The sender is closing the stream because of a protocol violation."""

    code: Code
    message: Text = ""


# -- /moot/keys/1: one request and its answer per stream ---------------------------------

B64Key = Annotated[str, msgspec.Meta(min_length=43, max_length=43)]  # 32 bytes, base64url
B64Sig = Annotated[str, msgspec.Meta(min_length=86, max_length=86)]


class SignedPrekey(msgspec.Struct, frozen=True):
    id: Annotated[int, msgspec.Meta(ge=0, le=2**32 - 1)]
    key: B64Key
    sig: B64Sig


class DeviceView(msgspec.Struct, frozen=True):
    """A device's public keys, as docs/protocol.md 3.1 shows them to anyone."""

    device: Annotated[str, msgspec.Meta(min_length=1, max_length=64)]
    name: Annotated[str, msgspec.Meta(max_length=200)]
    identity_key: B64Key
    dh_key: B64Key
    signed_prekey: SignedPrekey
    created_at: int


class GetDevices(_Frame, tag="get_devices"):
    user: Annotated[str, msgspec.Meta(min_length=3, max_length=200)]


class Devices(_Frame, tag="devices"):
    user: Annotated[str, msgspec.Meta(min_length=3, max_length=200)]
    devices: Annotated[list[DeviceView], msgspec.Meta(max_length=64)]


# -- /moot/live/1: what is not stored (presence, typing), sent as it happens ----------------

UserAddress = Annotated[str, msgspec.Meta(min_length=3, max_length=200)]
MAX_PRESENCE_USERS = 1000


class PresenceUser(msgspec.Struct, frozen=True, omit_defaults=True):
    user: UserAddress
    state: Literal["online", "away", "offline"]
    last_seen: Annotated[int, msgspec.Meta(ge=0)] | None = None


class Presence(_Frame, tag="presence"):
    """Presence of some of the sender's users. With no users it is a heartbeat: what
    the sender said still holds. A snapshot (``snapshot``) states every user the
    receiver watches; it may span several frames, all but the last with ``more``."""

    users: Annotated[list[PresenceUser], msgspec.Meta(max_length=MAX_PRESENCE_USERS)] = []
    snapshot: bool = False
    more: bool = False


class Typing(_Frame, tag="typing"):
    """``sender`` (a user of the sending node) is typing to ``to``, or stopped."""

    sender: UserAddress
    to: UserAddress
    active: bool


class Signal(_Frame, tag="signal"):
    """A call signal (node/calls.py) between a user of the sending node and one of the
    receiver's; ``payload`` is the client's end-to-end ciphertext."""

    call_id: Annotated[str, msgspec.Meta(min_length=8, max_length=64)]
    kind: Annotated[str, msgspec.Meta(min_length=1, max_length=16)]
    sender: UserAddress
    sender_device: Annotated[str, msgspec.Meta(max_length=64)]
    to: UserAddress
    to_device: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    media: Annotated[str, msgspec.Meta(max_length=16)] | None = None
    payload: Annotated[str, msgspec.Meta(max_length=96 * 1024)] = ""
    reason: Annotated[str, msgspec.Meta(max_length=64)] | None = None


# -- /moot/keys/1 again: profiles, public metadata of a node's own users ------------------

MAX_AVATAR_BYTES = 256 * 1024
AvatarType = Literal["image/png", "image/jpeg", "image/webp"]


class AvatarMeta(msgspec.Struct, frozen=True):
    type: AvatarType
    size: Annotated[int, msgspec.Meta(ge=1, le=MAX_AVATAR_BYTES)]
    digest: Annotated[str, msgspec.Meta(pattern="^[0-9a-f]{64}$")]  # SHA-256 of the image, hex


class GetProfile(_Frame, tag="get_profile"):
    user: UserAddress


class Profile(_Frame, tag="profile"):
    """A user's public profile, answered only by the user's own node."""

    user: UserAddress
    display_name: Annotated[str, msgspec.Meta(max_length=64)] = ""
    status_text: Annotated[str, msgspec.Meta(max_length=140)] = ""
    avatar: AvatarMeta | None = None
    updated_at: Annotated[int, msgspec.Meta(ge=0)] | None = None


class GetAvatar(_Frame, tag="get_avatar"):
    user: UserAddress


class Avatar(_Frame, tag="avatar"):
    """The image itself, base64url without padding (its own request: profiles are
    asked for often, pictures seldom, and only when their digest changed)."""

    user: UserAddress
    content_type: AvatarType
    data: Annotated[str, msgspec.Meta(min_length=1, max_length=(MAX_AVATAR_BYTES * 4 + 2) // 3)]


Frame = Union[
    Hello, Batch, Ack, Reject, Ping, Pong, Error, GetDevices, Devices, Presence, Typing, Signal,
    GetProfile, Profile, GetAvatar, Avatar,
]

_decoder = msgspec.json.Decoder(Frame)
_encoder = msgspec.json.Encoder()


def encode(frame: _Frame) -> bytes:
    """One frame with its length prefix."""
    body = _encoder.encode(frame)
    return len(body).to_bytes(LENGTH_BYTES, "big") + body


def decode(body: bytes) -> Frame:
    """One frame body (without its prefix); raises ProtocolViolation."""
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "`$.type`" in text and text.startswith("Invalid value"):
            raise ProtocolViolation("unknown_type", text) from None
        raise ProtocolViolation("bad_frame", text) from None
    except msgspec.DecodeError as exc:
        raise ProtocolViolation("bad_frame", f"malformed JSON: {exc}") from None


class Deframer:
    """Splits a byte stream into frame bodies, refusing a frame over ``max_frame``
    before buffering it (the length prefix says how much is coming)."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        bodies = []
        while len(self._buffer) >= LENGTH_BYTES:
            length = int.from_bytes(self._buffer[:LENGTH_BYTES], "big")
            if length > self.max_frame:
                raise ProtocolViolation("too_large", f"a frame of {length} bytes exceeds the limit of {self.max_frame}")
            if length == 0:
                raise ProtocolViolation("bad_frame", "an empty frame")
            if len(self._buffer) < LENGTH_BYTES + length:
                break
            bodies.append(bytes(self._buffer[LENGTH_BYTES:LENGTH_BYTES + length]))
            del self._buffer[:LENGTH_BYTES + length]
        return bodies

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame waiting for the rest."""
        return len(self._buffer)


def encode_many(frames: list[Any]) -> bytes:
    """Several frames in one write (one write costs far more than its bytes)."""
    return b"".join(encode(f) for f in frames)
