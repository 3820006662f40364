"""``/moot/blobs/1``: one attachment fetched from the node that stores it.

Sans-IO (no trio, libp2p or database imports; a test checks). One request per
stream. The asking node sends one framed ``get_blob``; the answering node sends one
framed ``blob`` header and then exactly ``length`` raw bytes of the blob, and closes;
or one framed ``error``. Framing is that of ``/moot/federation/1``
(``u32be(length) || JSON``, federation/wire.py). The body is not framed: it is the
ciphertext as stored, streamed with the transport's flow control (Yamux), so
neither node holds more than a window of it. docs/protocol.md section 12.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Union

import msgspec

from federation.wire import Deframer, Error, ProtocolViolation, UserAddress, encode

PROTOCOL_ID = "/moot/blobs/1"
MAX_REQUEST = 4 * 1024
DIGEST_PATTERN = r"^[0-9a-f]{64}$"
Digest = Annotated[str, msgspec.Meta(pattern=DIGEST_PATTERN)]
Size = Annotated[int, msgspec.Meta(ge=0, le=2**50)]


class GetBlob(msgspec.Struct, frozen=True, tag_field="type", tag="get_blob", omit_defaults=True):
    """Asks for ``length`` bytes (None: to the end) from ``offset`` of blob ``digest``,
    for ``user`` (a user of the asking node) who sees the conversation the blob is in
    as the one with ``conversation``."""

    digest: Digest
    user: UserAddress
    conversation: UserAddress
    offset: Size = 0
    length: Size | None = None


class BlobHeader(msgspec.Struct, frozen=True, tag_field="type", tag="blob"):
    """``length`` raw bytes follow, from ``offset`` of a blob of ``size`` bytes."""

    digest: Digest
    size: Size
    offset: Size
    length: Size


_decoder = msgspec.json.Decoder(Union[GetBlob, BlobHeader, Error])
_encoder = msgspec.json.Encoder()


def decode(body: bytes) -> GetBlob | BlobHeader | Error:
    try:
        return _decoder.decode(body)
    except msgspec.ValidationError as exc:
        text = str(exc)
        if "`$.type`" in text and text.startswith("Invalid value"):
            raise ProtocolViolation("unknown_type", text) from None
        raise ProtocolViolation("bad_frame", text) from None
    except msgspec.DecodeError as exc:
        raise ProtocolViolation("bad_frame", f"malformed JSON: {exc}") from None


def encode_frame(frame: GetBlob | BlobHeader | Error) -> bytes:
    return encode(frame)  # type: ignore[arg-type]


def read_request(deframer: Deframer, data: bytes) -> GetBlob | None:
    """The request once its frame is complete (None until then); ProtocolViolation
    for anything but one ``get_blob``."""
    bodies = deframer.feed(data)
    if not bodies:
        return None
    frame = decode(bodies[0])
    if not isinstance(frame, GetBlob) or len(bodies) > 1 or deframer.pending:
        raise ProtocolViolation("unexpected", "expected one get_blob")
    return frame


@dataclass(frozen=True, slots=True)
class Refused:
    """The answering node refused: ``code`` and ``message`` from its ``error``."""

    code: str
    message: str


class BlobReceiver:
    """The asking side: feed what arrives, get the header, then body bytes.

    ``feed(data)`` returns the body bytes in ``data`` (after the header); ``header``
    (or ``refused``) is set once known. ``finish()`` checks at EOF that exactly the
    header's ``length`` arrived. A header that does not answer the request, or more
    bytes than it announced, is a ProtocolViolation.
    """

    def __init__(self, request: GetBlob) -> None:
        self.request = request
        self.header: BlobHeader | None = None
        self.refused: Refused | None = None
        self.received = 0
        self._buffer = bytearray()  # the header frame, until complete

    def feed(self, data: bytes) -> bytes:
        if self.refused is not None:
            raise ProtocolViolation("unexpected", "bytes after an error")
        if self.header is None:
            # Only the header is framed: the bytes after it are the body, not frames.
            self._buffer += data
            buffer = self._buffer
            if len(buffer) < 4:
                return b""
            length = int.from_bytes(buffer[:4], "big")
            if length == 0 or length > MAX_REQUEST:
                raise ProtocolViolation("bad_frame", f"a header of {length} bytes")
            if len(buffer) < 4 + length:
                return b""
            frame = decode(bytes(buffer[4:4 + length]))
            rest = bytes(buffer[4 + length:])
            buffer.clear()
            if isinstance(frame, Error):
                self.refused = Refused(frame.code, frame.message)
                if rest:
                    raise ProtocolViolation("unexpected", "bytes after an error")
                return b""
            if not isinstance(frame, BlobHeader):
                raise ProtocolViolation("unexpected", "expected a blob header or an error")
            self._check(frame)
            self.header = frame
            data = rest
        self.received += len(data)
        if self.received > self.header.length:
            raise ProtocolViolation("too_large", f"more than the {self.header.length} bytes announced")
        return data

    def _check(self, header: BlobHeader) -> None:
        req = self.request
        if header.digest != req.digest or header.offset != req.offset or header.offset + header.length > header.size:
            raise ProtocolViolation("bad_frame", "a blob header that does not answer the request")
        wanted = header.size - req.offset if req.length is None else min(req.length, header.size - req.offset)
        if header.length != wanted:
            raise ProtocolViolation("bad_frame", f"{header.length} bytes announced, {wanted} asked for")

    @property
    def complete(self) -> bool:
        return self.header is not None and self.received == self.header.length

    def finish(self) -> None:
        """At EOF: everything announced arrived (ProtocolViolation otherwise)."""
        if self.refused is not None:
            return
        if self.header is None:
            raise ProtocolViolation("unexpected", "the stream ended before the blob header")
        if self.received != self.header.length:
            raise ProtocolViolation("bad_frame", f"the blob ended after {self.received} of {self.header.length} bytes")


__all__ = ["PROTOCOL_ID", "BlobHeader", "BlobReceiver", "GetBlob", "Refused", "decode", "encode_frame", "read_request"]
