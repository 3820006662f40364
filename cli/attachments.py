"""Attachments, end to end: a file encrypted in chunks before it leaves the device.

The format is ``docs/crypto.md`` section 12 ("Attachments"); the browser implements
the same in ``web/static/js/attachments.js`` and both are checked against
``docs/crypto_vectors_attachments_v1.json``.

A fresh random 32-byte file key per attachment. The blob the node stores is

    blob    = prefix || chunk_0 || chunk_1 || ... || chunk_{n-1}
    prefix  = 8 random bytes
    chunk_i = AES-256-GCM(file_key, nonce = prefix || u32be(i), plain_i,
                          aad = b"moot/v1/attachment" || u32be(i) || u8(final))

where ``plain_i`` are 64 KiB pieces of the file (the last one shorter, possibly
empty for an empty file: there is always at least one chunk) and ``final`` is 1 for
the last chunk only. A blob cut short, extended, or with chunks reordered fails to
decrypt. The blob's id is the SHA-256 of all its bytes (hex); the key, id, size,
name and type travel inside the end-to-end encrypted message.

Sans-IO like ``cli.crypto``: no clock, no files, no sockets; randomness from
``os.urandom`` unless a caller passes ``rng``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from collections.abc import Callable

from cli.crypto import DecryptionFailed, InvalidKey, MalformedEnvelope, aes256gcm_decrypt, aes256gcm_encrypt

__all__ = [
    "CHUNK_SIZE", "KEY_LEN", "PREFIX_LEN", "LABEL", "chunk_aad", "chunk_nonce", "encrypted_size", "plaintext_size",
    "AttachmentEncryptor", "AttachmentDecryptor", "encrypt_bytes", "decrypt_bytes", "new_file_key",
]

CHUNK_SIZE = 64 * 1024  # plaintext bytes per chunk
TAG_LEN = 16
SEALED_CHUNK = CHUNK_SIZE + TAG_LEN  # a full chunk as stored
KEY_LEN = 32
PREFIX_LEN = 8
LABEL = b"moot/v1/attachment"
MAX_CHUNKS = 2**32

Rng = Callable[[int], bytes]


def chunk_nonce(prefix: bytes, index: int) -> bytes:
    return prefix + struct.pack(">I", index)


def chunk_aad(index: int, final: bool) -> bytes:
    return LABEL + struct.pack(">IB", index, 1 if final else 0)


def chunk_count(size: int) -> int:
    """Chunks of a file of ``size`` bytes: at least one (an empty file has one empty chunk)."""
    return max(1, -(-size // CHUNK_SIZE))


def encrypted_size(size: int) -> int:
    """The blob's size for a file of ``size`` bytes (what the node stores and limits)."""
    if size < 0:
        raise ValueError("a size is not negative")
    return PREFIX_LEN + size + TAG_LEN * chunk_count(size)


def plaintext_size(blob_size: int) -> int:
    """The file's size for a blob of ``blob_size`` bytes; MalformedEnvelope if none fits."""
    body = blob_size - PREFIX_LEN
    if body < TAG_LEN:
        raise MalformedEnvelope("an attachment is at least 24 bytes")
    full, rest = divmod(body, SEALED_CHUNK)
    if rest == 0:
        return full * CHUNK_SIZE
    if rest < TAG_LEN or (rest == TAG_LEN and full > 0):
        # Only an empty file has an empty chunk; a short last chunk holds at least a byte.
        raise MalformedEnvelope("not the size of an attachment")
    return full * CHUNK_SIZE + rest - TAG_LEN


def new_file_key(rng: Rng | None = None) -> bytes:
    return (rng or os.urandom)(KEY_LEN)


def _check_key(key: bytes) -> None:
    if not isinstance(key, (bytes, bytearray)) or len(key) != KEY_LEN:
        raise InvalidKey(f"a file key is {KEY_LEN} bytes")


class AttachmentEncryptor:
    """Encrypts a file fed in pieces of any size; ``update`` and ``finish`` return blob
    bytes (the first call's include the prefix). ``digest`` is the blob id after ``finish``.

    Holds at most one chunk of plaintext, whatever the file's size.
    """

    def __init__(self, key: bytes, *, rng: Rng | None = None, prefix: bytes | None = None) -> None:
        _check_key(key)
        self.key = bytes(key)
        self.prefix = prefix if prefix is not None else (rng or os.urandom)(PREFIX_LEN)
        if len(self.prefix) != PREFIX_LEN:
            raise ValueError(f"the nonce prefix is {PREFIX_LEN} bytes")
        self._pending = bytearray()
        self._index = 0
        self._hash = hashlib.sha256()
        self._started = False
        self._finished = False
        self.digest: str | None = None

    def _out(self, data: bytes) -> bytes:
        if not self._started:
            self._started = True
            data = self.prefix + data
        self._hash.update(data)
        return data

    def _seal(self, plain: bytes, final: bool) -> bytes:
        if self._index >= MAX_CHUNKS:
            raise ValueError("a file of more than 2^32 chunks")
        sealed = aes256gcm_encrypt(self.key, chunk_nonce(self.prefix, self._index), plain, chunk_aad(self._index, final))
        self._index += 1
        return sealed

    def update(self, data: bytes) -> bytes:
        if self._finished:
            raise ValueError("finished already")
        self._pending += data
        out = []
        # A full chunk is sealed only once more data follows: it may be the final one.
        while len(self._pending) > CHUNK_SIZE:
            out.append(self._seal(bytes(self._pending[:CHUNK_SIZE]), False))
            del self._pending[:CHUNK_SIZE]
        return self._out(b"".join(out))

    def finish(self) -> bytes:
        if self._finished:
            raise ValueError("finished already")
        self._finished = True
        out = self._out(self._seal(bytes(self._pending), True))
        self._pending.clear()
        self.digest = self._hash.hexdigest()
        return out


class AttachmentDecryptor:
    """Decrypts a blob fed in pieces of any size; ``feed`` returns the plaintext of the
    chunks known complete and not final, ``finish`` the last chunk's (raising
    DecryptionFailed if the blob was cut short, extended, reordered or altered).
    ``digest`` is the blob's SHA-256 (hex) after ``finish``: compare it with the id."""

    def __init__(self, key: bytes) -> None:
        _check_key(key)
        self.key = bytes(key)
        self.prefix: bytes | None = None
        self._pending = bytearray()
        self._index = 0
        self._hash = hashlib.sha256()
        self.digest: str | None = None
        self.size = 0  # plaintext bytes so far

    def _open(self, sealed: bytes, final: bool) -> bytes:
        assert self.prefix is not None
        plain = aes256gcm_decrypt(self.key, chunk_nonce(self.prefix, self._index), sealed, chunk_aad(self._index, final))
        self._index += 1
        self.size += len(plain)
        return plain

    def feed(self, data: bytes) -> bytes:
        self._hash.update(data)
        self._pending += data
        if self.prefix is None:
            if len(self._pending) < PREFIX_LEN:
                return b""
            self.prefix = bytes(self._pending[:PREFIX_LEN])
            del self._pending[:PREFIX_LEN]
        out = []
        # Keep the last whole chunk back until more arrives: it may be the final one.
        while len(self._pending) > SEALED_CHUNK:
            out.append(self._open(bytes(self._pending[:SEALED_CHUNK]), False))
            del self._pending[:SEALED_CHUNK]
        return b"".join(out)

    def finish(self) -> bytes:
        if self.prefix is None or len(self._pending) < TAG_LEN:
            raise DecryptionFailed("the attachment is cut short")
        if len(self._pending) == TAG_LEN and self._index > 0:
            raise DecryptionFailed("an empty chunk after others")
        plain = self._open(bytes(self._pending), True)
        self._pending.clear()
        self.digest = self._hash.hexdigest()
        return plain


def encrypt_bytes(key: bytes, data: bytes, *, rng: Rng | None = None, prefix: bytes | None = None) -> tuple[bytes, str]:
    """The whole blob of ``data`` and its id (for small files and tests)."""
    enc = AttachmentEncryptor(key, rng=rng, prefix=prefix)
    blob = enc.update(data) + enc.finish()
    assert enc.digest is not None
    return blob, enc.digest


def decrypt_bytes(key: bytes, blob: bytes, digest: str | None = None) -> bytes:
    """The file in ``blob``; DecryptionFailed if it does not open, or is not ``digest``."""
    dec = AttachmentDecryptor(key)
    data = dec.feed(blob) + dec.finish()
    if digest is not None and dec.digest != digest:
        raise DecryptionFailed("the attachment is not the one the message names")
    return data
