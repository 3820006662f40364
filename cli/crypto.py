"""Moot end-to-end encryption, scheme v1: keys, envelopes and safety numbers.

The specification is ``docs/crypto.md``; the browser client implements the same
scheme with WebCrypto, and both are checked against ``docs/crypto_vectors_v1.json``.

This module is sans-IO: it imports only the standard library and PyNaCl, never
reads the clock and never touches a file or a socket. Randomness comes from
``os.urandom`` unless a caller passes ``rng`` (the test-vector generator does).

Every failure caused by data from outside (a peer, the node, a key file) raises a
subclass of :class:`CryptoError` carrying a stable ``code`` string. Misuse by the
caller (an empty recipient list, a payload that is not a JSON object) raises
``ValueError``.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
import os
import re
import struct
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

import nacl.bindings
import nacl.exceptions
import nacl.signing

__all__ = [
    "VERSION",
    # errors
    "CryptoError", "BadEncoding", "MalformedEnvelope", "UnsupportedVersion", "BadSignature",
    "NotForThisDevice", "UnknownPrekey", "DecryptionFailed", "BadPlaintext", "InvalidKey",
    "CryptoUnavailable",
    # encoding and primitives
    "b64encode", "b64decode", "hkdf_sha256",
    # keys
    "DeviceKeys", "PublicBundle", "parse_public_bundle", "RecipientDevice", "verify_signed_prekey",
    # envelopes
    "KeyEntry", "Envelope", "parse_envelope", "encrypt_message", "decrypt_message",
    # safety numbers
    "fingerprint", "safety_number", "format_safety_number",
]

VERSION = 1

KEY_LEN = 32  # X25519 and Ed25519 public keys, private keys, AES-256 keys
NONCE_LEN = 12
TAG_LEN = 16
SIG_LEN = 64
WRAPPED_LEN = KEY_LEN + TAG_LEN
PAD_BLOCK = 64
SAFETY_ITERATIONS = 5200
U32_MAX = 0xFFFFFFFF

LABEL_SPK = b"moot/v1/spk"
LABEL_WRAP = b"moot/v1/wrap"
LABEL_BODY = b"moot/v1/body"
LABEL_KEY = b"moot/v1/key"
LABEL_ENVELOPE = b"moot/v1/envelope"

# The key wrap uses a fixed all-zero nonce: each wrap key is used exactly once
# (it is derived from a fresh ephemeral key and the recipient device's identity).
WRAP_NONCE = bytes(NONCE_LEN)

Rng = Callable[[int], bytes]


# --------------------------------------------------------------------- errors


class CryptoError(Exception):
    """Base of every error this module raises for bad input from outside."""
    code = "crypto_error"


class BadEncoding(CryptoError):
    """A base64url value is invalid, or decodes to the wrong length."""
    code = "bad_encoding"


class MalformedEnvelope(CryptoError):
    """The envelope is not a JSON object of the v1 shape."""
    code = "bad_envelope"


class UnsupportedVersion(CryptoError):
    """The envelope's ``v`` is an integer this implementation does not know."""
    code = "unsupported_version"


class BadSignature(CryptoError):
    """A signature does not verify under the claimed identity key."""
    code = "bad_signature"


class NotForThisDevice(CryptoError):
    """The envelope has no key entry for this (address, device)."""
    code = "not_for_this_device"


class UnknownPrekey(CryptoError):
    """The key entry names a signed prekey id this device does not hold."""
    code = "unknown_prekey"


class DecryptionFailed(CryptoError):
    """AES-GCM authentication failed, or the key agreement gave no secret."""
    code = "decryption_failed"


class BadPlaintext(CryptoError):
    """The decrypted body has bad padding or is not a UTF-8 JSON object."""
    code = "bad_plaintext"


class InvalidKey(CryptoError):
    """A key is unusable: wrong length, low order, or a duplicate."""
    code = "bad_key"


class CryptoUnavailable(CryptoError):
    """No AES-256-GCM implementation is usable on this machine."""
    code = "crypto_unavailable"


# ------------------------------------------------------------------- encoding

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def b64encode(data: bytes) -> str:
    """Encode ``data`` as base64url without ``=`` padding (RFC 4648 section 5)."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64decode(text: object, *, length: int | None = None, what: str = "value") -> bytes:
    """Decode canonical unpadded base64url.

    Rejects, with :class:`BadEncoding`: non-strings, padding, characters outside
    the URL-safe alphabet, non-canonical encodings (unused trailing bits set,
    which would let two strings carry the same bytes), and, when ``length`` is
    given, a decoded length other than ``length``.
    """
    if not isinstance(text, str) or not _B64URL.fullmatch(text) or len(text) % 4 == 1:
        raise BadEncoding(f"{what}: not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64encode(data) != text:
        raise BadEncoding(f"{what}: non-canonical base64url")
    if length is not None and len(data) != length:
        raise BadEncoding(f"{what}: expected {length} bytes, got {len(data)}")
    return data


def u32be(n: int) -> bytes:
    """Four-byte big-endian unsigned integer; ``n`` must fit."""
    return struct.pack(">I", n)


def lp(value: str | bytes) -> bytes:
    """Length-prefix: ``u32be(len(b)) || b`` where strings are UTF-8 encoded.

    Raises :class:`MalformedEnvelope` for a string that is not valid Unicode
    (a lone surrogate), which JavaScript's TextEncoder would silently replace.
    """
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError:
            raise MalformedEnvelope("string is not valid UTF-8 text") from None
    return u32be(len(value)) + value


# ----------------------------------------------------------------- primitives


def hkdf_extract(salt: bytes, ikm: bytes) -> bytes:
    """HKDF-Extract (RFC 5869) with SHA-256: ``PRK = HMAC(salt, ikm)``."""
    return hmac.new(salt, ikm, hashlib.sha256).digest()


def hkdf_expand(prk: bytes, info: bytes, length: int) -> bytes:
    """HKDF-Expand (RFC 5869) with SHA-256: ``T(i) = HMAC(PRK, T(i-1) || info || i)``."""
    if not 0 < length <= 255 * 32:
        raise ValueError("HKDF-SHA256 output length must be 1..8160")
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (extract then expand), equal to WebCrypto's HKDF deriveBits."""
    return hkdf_expand(hkdf_extract(salt, ikm), info, length)


def _check_key(key: bytes, what: str) -> None:
    # libsodium reads exactly 32 bytes through a raw pointer: a short buffer
    # would be an out-of-bounds read, not an error, so lengths are checked here.
    if not isinstance(key, bytes) or len(key) != KEY_LEN:
        raise InvalidKey(f"{what}: expected {KEY_LEN} bytes")


def x25519_public(private: bytes) -> bytes:
    """The X25519 public key of a 32-byte private key (clamped by X25519 itself)."""
    _check_key(private, "X25519 private key")
    return nacl.bindings.crypto_scalarmult_base(private)


def x25519(private: bytes, public: bytes) -> bytes:
    """X25519 shared secret. Raises :class:`InvalidKey` if it is all zero.

    An all-zero result means ``public`` is a low-order point: the "secret" would
    be known to everyone, so both libsodium and WebCrypto refuse it.
    """
    _check_key(private, "X25519 private key")
    _check_key(public, "X25519 public key")
    try:
        return nacl.bindings.crypto_scalarmult(private, public)
    except nacl.exceptions.RuntimeError:
        raise InvalidKey("X25519 public key has low order") from None


def ed25519_public(seed: bytes) -> bytes:
    """The Ed25519 public key of a 32-byte seed (RFC 8032 private key)."""
    _check_key(seed, "Ed25519 seed")
    return nacl.signing.SigningKey(seed).verify_key.encode()


def ed25519_sign(seed: bytes, message: bytes) -> bytes:
    """Deterministic 64-byte Ed25519 signature of ``message``."""
    _check_key(seed, "Ed25519 seed")
    return nacl.signing.SigningKey(seed).sign(message).signature


def ed25519_verify(public: bytes, message: bytes, signature: bytes) -> bool:
    """True iff ``signature`` is a valid Ed25519 signature of ``message``.

    Any malformed key or signature yields False rather than an exception.
    """
    if len(public) != KEY_LEN or len(signature) != SIG_LEN:
        return False
    try:
        nacl.signing.VerifyKey(public).verify(message, signature)
    except (nacl.exceptions.BadSignatureError, nacl.exceptions.ValueError,
            nacl.exceptions.TypeError, nacl.exceptions.RuntimeError):
        return False
    return True


_aes_backend: str | None = None


def _aes_gcm_backend() -> str:
    """Pick AES-256-GCM: libsodium when the CPU has AES-NI, else ``cryptography``."""
    global _aes_backend  # a process-wide fact about the CPU, probed once
    if _aes_backend is None:
        available = getattr(nacl.bindings, "crypto_aead_aes256gcm_is_available", None)
        if available is not None:
            usable = bool(available())
        else:  # PyNaCl 1.6 does not export the probe; try one encryption instead
            try:
                nacl.bindings.crypto_aead_aes256gcm_encrypt(b"", None, WRAP_NONCE, bytes(32))
                usable = True
            except nacl.exceptions.UnavailableError:
                usable = False
        if usable:
            _aes_backend = "nacl"
        else:
            try:
                import cryptography.hazmat.primitives.ciphers.aead  # noqa: F401
            except ImportError:
                raise CryptoUnavailable(
                    "AES-256-GCM needs a CPU with AES-NI for libsodium, "
                    "or the 'cryptography' package installed") from None
            _aes_backend = "cryptography"
    return _aes_backend


def aes256gcm_encrypt(key: bytes, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
    """AES-256-GCM; returns ``ciphertext || 16-byte tag`` like WebCrypto."""
    if _aes_gcm_backend() == "nacl":
        return nacl.bindings.crypto_aead_aes256gcm_encrypt(plaintext, aad, nonce, key)
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    return AESGCM(key).encrypt(nonce, plaintext, aad)


def aes256gcm_decrypt(key: bytes, nonce: bytes, sealed: bytes, aad: bytes) -> bytes:
    """Open ``ciphertext || tag``; raises :class:`DecryptionFailed` if it does not verify."""
    if _aes_gcm_backend() == "nacl":
        try:
            return nacl.bindings.crypto_aead_aes256gcm_decrypt(sealed, aad, nonce, key)
        except nacl.exceptions.CryptoError:
            raise DecryptionFailed("AES-GCM authentication failed") from None
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM
    try:
        return AESGCM(key).decrypt(nonce, sealed, aad)
    except InvalidTag:
        raise DecryptionFailed("AES-GCM authentication failed") from None


# ------------------------------------------------------------------ plaintext


def encode_payload(payload: Mapping[str, Any]) -> bytes:
    """Compact UTF-8 JSON of ``payload`` (what ``JSON.stringify`` produces).

    Raises ValueError if ``payload`` is not a dict or holds NaN/Infinity or text
    that is not valid Unicode.
    """
    if not isinstance(payload, dict):
        raise ValueError("payload must be a JSON object (dict)")
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.encode("utf-8")


def pad(data: bytes) -> bytes:
    """ISO/IEC 7816-4 padding: append 0x80, then zeros to a multiple of 64 bytes."""
    data += b"\x80"
    return data + bytes(-len(data) % PAD_BLOCK)


def unpad(padded: bytes) -> bytes:
    """Strip :func:`pad`'s padding; raises :class:`BadPlaintext` if it is malformed.

    Longer padding than needed (whole extra 64-byte blocks) is accepted so that
    a sender may choose bigger buckets.
    """
    if not padded or len(padded) % PAD_BLOCK:
        raise BadPlaintext("padded plaintext is not a multiple of 64 bytes")
    end = len(padded.rstrip(b"\x00"))
    if end == 0 or padded[end - 1] != 0x80:
        raise BadPlaintext("bad padding")
    return padded[: end - 1]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_payload(data: bytes) -> dict[str, Any]:
    """Parse the unpadded plaintext; raises :class:`BadPlaintext` unless it is a JSON object."""
    try:
        payload = json.loads(data.decode("utf-8"), parse_constant=_reject_constant)
    except ValueError:  # also covers UnicodeDecodeError and JSONDecodeError
        raise BadPlaintext("plaintext is not UTF-8 JSON") from None
    if not isinstance(payload, dict):
        raise BadPlaintext("plaintext is not a JSON object")
    return payload


# ---------------------------------------------------------------------- keys


def signed_prekey_input(spk_id: int, spk_pub: bytes) -> bytes:
    """The bytes an identity key signs to certify a signed prekey."""
    return LABEL_SPK + u32be(spk_id) + spk_pub


def verify_signed_prekey(identity_key: bytes, spk_id: int, spk_pub: bytes, sig: bytes) -> bool:
    """True iff ``sig`` is ``identity_key``'s signature over ``signed_prekey_input``."""
    if not _is_u32(spk_id) or len(spk_pub) != KEY_LEN:
        return False
    return ed25519_verify(identity_key, signed_prekey_input(spk_id, spk_pub), sig)


def _is_u32(n: object) -> bool:
    return isinstance(n, int) and not isinstance(n, bool) and 0 <= n <= U32_MAX


def _int_field(obj: Mapping[str, Any], name: str) -> int:
    value = obj.get(name)
    if not _is_u32(value):
        raise MalformedEnvelope(f"{name}: expected an integer in 0..2^32-1")
    return value  # type: ignore[return-value]


def _str_field(obj: Mapping[str, Any], name: str) -> str:
    value = obj.get(name)
    if not isinstance(value, str) or not value:
        raise MalformedEnvelope(f"{name}: expected a non-empty string")
    lp(value)  # rejects lone surrogates now rather than at signing time
    return value


@dataclass
class DeviceKeys:
    """The private key material of one device. Keep it secret; never send it.

    ``signed_prekeys`` keeps superseded prekeys so that messages encrypted to them
    while the new one propagated can still be read; ``current_spk_id`` is the one
    published. ``one_time_prekeys`` are published for v2 and unused by v1.
    All private keys are 32 raw bytes; X25519 clamps them when used.
    """

    # repr=False: a stray log line or traceback must not print private keys.
    identity_seed: bytes = field(repr=False)
    dh_private: bytes = field(repr=False)
    signed_prekeys: dict[int, bytes] = field(repr=False)
    current_spk_id: int
    one_time_prekeys: dict[int, bytes] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for what, key in [("identity_seed", self.identity_seed), ("dh_private", self.dh_private),
                          *((f"signed prekey {i}", k) for i, k in self.signed_prekeys.items()),
                          *((f"one-time prekey {i}", k) for i, k in self.one_time_prekeys.items())]:
            _check_key(key, what)
        if self.current_spk_id not in self.signed_prekeys:
            raise InvalidKey("current signed prekey id has no private key")

    @classmethod
    def generate(cls, n_one_time: int = 20, *, rng: Rng | None = None) -> DeviceKeys:
        """Fresh keys: signed prekey id 1 and one-time prekeys with ids 1..n_one_time."""
        rng = rng or os.urandom
        return cls(
            identity_seed=rng(KEY_LEN),
            dh_private=rng(KEY_LEN),
            signed_prekeys={1: rng(KEY_LEN)},
            current_spk_id=1,
            one_time_prekeys={i: rng(KEY_LEN) for i in range(1, n_one_time + 1)},
        )

    @property
    def identity_key(self) -> bytes:
        """The Ed25519 public identity key."""
        return ed25519_public(self.identity_seed)

    @property
    def dh_key(self) -> bytes:
        """The X25519 public identity DH key (reserved for v2)."""
        return x25519_public(self.dh_private)

    def sign(self, message: bytes) -> bytes:
        """Ed25519 signature by this device's identity key."""
        return ed25519_sign(self.identity_seed, message)

    def rotate_signed_prekey(self, *, rng: Rng | None = None) -> int:
        """Make a new current signed prekey (id = highest + 1); keep the old ones."""
        new_id = max(self.signed_prekeys) + 1
        if new_id > U32_MAX:
            raise ValueError("signed prekey ids exhausted")
        self.signed_prekeys[new_id] = (rng or os.urandom)(KEY_LEN)
        self.current_spk_id = new_id
        return new_id

    def forget_signed_prekey(self, spk_id: int) -> None:
        """Delete an old signed prekey: what was wrapped to it becomes unreadable."""
        if spk_id == self.current_spk_id:
            raise ValueError("cannot forget the current signed prekey")
        self.signed_prekeys.pop(spk_id, None)

    def public_bundle(self) -> dict[str, Any]:
        """The public keys to publish, in the wire shape (base64url values)."""
        spk_pub = x25519_public(self.signed_prekeys[self.current_spk_id])
        return {
            "identity_key": b64encode(self.identity_key),
            "dh_key": b64encode(self.dh_key),
            "signed_prekey": {
                "id": self.current_spk_id,
                "key": b64encode(spk_pub),
                "sig": b64encode(self.sign(signed_prekey_input(self.current_spk_id, spk_pub))),
            },
            "one_time_prekeys": [
                {"id": i, "key": b64encode(x25519_public(k))}
                for i, k in sorted(self.one_time_prekeys.items())
            ],
        }

    def to_json(self) -> str:
        """Serialise for the local key file (the caller writes it with mode 0600)."""
        return json.dumps({
            "format": "moot-device-keys",
            "v": VERSION,
            "identity_seed": b64encode(self.identity_seed),
            "dh_private": b64encode(self.dh_private),
            "current_spk_id": self.current_spk_id,
            "signed_prekeys": [{"id": i, "private": b64encode(k)}
                               for i, k in sorted(self.signed_prekeys.items())],
            "one_time_prekeys": [{"id": i, "private": b64encode(k)}
                                 for i, k in sorted(self.one_time_prekeys.items())],
        }, indent=2)

    @classmethod
    def from_json(cls, text: str | bytes) -> DeviceKeys:
        """Load :meth:`to_json` output; raises :class:`CryptoError` if it is damaged."""
        try:
            obj = json.loads(text)
        except ValueError:
            raise BadEncoding("key file is not JSON") from None
        if not isinstance(obj, dict) or obj.get("format") != "moot-device-keys" or obj.get("v") != 1:
            raise BadEncoding("not a v1 moot device key file")

        def by_id(name: str) -> dict[int, bytes]:
            entries = obj.get(name)
            if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
                raise BadEncoding(f"{name}: expected a list of objects")
            out = {_int_field(e, "id"): b64decode(e.get("private"), length=KEY_LEN, what=name)
                   for e in entries}
            if len(out) != len(entries):
                raise BadEncoding(f"{name}: duplicate id")
            return out

        try:
            return cls(
                identity_seed=b64decode(obj.get("identity_seed"), length=KEY_LEN, what="identity_seed"),
                dh_private=b64decode(obj.get("dh_private"), length=KEY_LEN, what="dh_private"),
                signed_prekeys=by_id("signed_prekeys"),
                current_spk_id=_int_field(obj, "current_spk_id"),
                one_time_prekeys=by_id("one_time_prekeys"),
            )
        except MalformedEnvelope as exc:  # _int_field's error, re-labelled for a key file
            raise BadEncoding(str(exc)) from None


@dataclass(frozen=True)
class PublicBundle:
    """A device's published keys, decoded and with the prekey signature checked."""

    identity_key: bytes
    dh_key: bytes
    spk_id: int
    spk_pub: bytes
    spk_sig: bytes
    one_time_prekeys: tuple[tuple[int, bytes], ...]


def parse_public_bundle(bundle: object) -> PublicBundle:
    """Decode a ``public_bundle()`` dict and verify its signed prekey.

    Raises :class:`MalformedEnvelope` for a wrong shape, :class:`BadEncoding` for
    bad base64url or key lengths, :class:`BadSignature` if the signed prekey is not
    signed by the bundle's identity key. The node should run this on upload.
    """
    if not isinstance(bundle, dict) or not isinstance(bundle.get("signed_prekey"), dict):
        raise MalformedEnvelope("bundle: expected an object with signed_prekey")
    spk = bundle["signed_prekey"]
    otks = bundle.get("one_time_prekeys", [])
    if not isinstance(otks, list) or not all(isinstance(e, dict) for e in otks):
        raise MalformedEnvelope("one_time_prekeys: expected a list of objects")
    parsed = PublicBundle(
        identity_key=b64decode(bundle.get("identity_key"), length=KEY_LEN, what="identity_key"),
        dh_key=b64decode(bundle.get("dh_key"), length=KEY_LEN, what="dh_key"),
        spk_id=_int_field(spk, "id"),
        spk_pub=b64decode(spk.get("key"), length=KEY_LEN, what="signed_prekey.key"),
        spk_sig=b64decode(spk.get("sig"), length=SIG_LEN, what="signed_prekey.sig"),
        one_time_prekeys=tuple((_int_field(e, "id"),
                                b64decode(e.get("key"), length=KEY_LEN, what="one_time_prekey"))
                               for e in otks),
    )
    if not verify_signed_prekey(parsed.identity_key, parsed.spk_id, parsed.spk_pub, parsed.spk_sig):
        raise BadSignature("signed prekey signature does not verify")
    return parsed


@dataclass(frozen=True)
class RecipientDevice:
    """One device a message is encrypted to, with its current signed prekey."""

    address: str
    device_id: str
    spk_id: int
    spk_pub: bytes

    @classmethod
    def from_bundle(cls, address: str, device_id: str, bundle: object) -> RecipientDevice:
        """Build from a published bundle after verifying its prekey signature.

        The identity key inside the bundle is only as trustworthy as the node that
        served it: compare safety numbers. Raises like :func:`parse_public_bundle`.
        """
        parsed = parse_public_bundle(bundle)
        return cls(address, device_id, parsed.spk_id, parsed.spk_pub)


# ------------------------------------------------------------------ envelope


@dataclass(frozen=True)
class KeyEntry:
    """The content key wrapped for one device."""

    to: str
    device: str
    spk: int
    wrapped: bytes

    def sort_key(self) -> tuple[bytes, bytes]:
        # Order by UTF-8 bytes, not by UTF-16 code units as JavaScript's sort would.
        return (self.to.encode("utf-8"), self.device.encode("utf-8"))


@dataclass(frozen=True)
class Envelope:
    """A v1 envelope with its binary fields decoded. Construct via :func:`parse_envelope`."""

    id: str
    sender: str
    sender_device: str
    conversation: str
    eph: bytes
    nonce: bytes
    body: bytes
    keys: tuple[KeyEntry, ...]
    sig: bytes
    v: int = VERSION

    def signature_input(self) -> bytes:
        """The bytes the sender device signs (everything but ``sig``)."""
        parts = [LABEL_ENVELOPE, bytes([self.v]), lp(self.id), lp(self.sender),
                 lp(self.sender_device), lp(self.conversation), lp(self.eph),
                 lp(self.nonce), lp(self.body), u32be(len(self.keys))]
        for entry in sorted(self.keys, key=KeyEntry.sort_key):
            parts += [lp(entry.to), lp(entry.device), u32be(entry.spk), lp(entry.wrapped)]
        return b"".join(parts)

    def body_aad(self) -> bytes:
        return body_aad(self.id, self.sender, self.sender_device, self.conversation)

    def key_aad(self) -> bytes:
        return key_aad(self.id, self.sender, self.sender_device)

    def key_for(self, address: str, device: str) -> KeyEntry | None:
        """The key entry for (address, device), or None."""
        return next((k for k in self.keys if k.to == address and k.device == device), None)

    def to_json(self) -> dict[str, Any]:
        """The wire form."""
        return {
            "v": self.v, "id": self.id, "sender": self.sender,
            "sender_device": self.sender_device, "conversation": self.conversation,
            "eph": b64encode(self.eph), "nonce": b64encode(self.nonce),
            "body": b64encode(self.body),
            "keys": [{"to": k.to, "device": k.device, "spk": k.spk, "wrapped": b64encode(k.wrapped)}
                     for k in self.keys],
            "sig": b64encode(self.sig),
        }


def body_aad(message_id: str, sender: str, sender_device: str, conversation: str) -> bytes:
    """Associated data of the body encryption."""
    return LABEL_BODY + lp(message_id) + lp(sender) + lp(sender_device) + lp(conversation)


def key_aad(message_id: str, sender: str, sender_device: str) -> bytes:
    """Associated data of each content-key wrap."""
    return LABEL_KEY + lp(message_id) + lp(sender) + lp(sender_device)


def wrap_key_info(to: str, device: str) -> bytes:
    """HKDF info for the wrap key of device ``device`` of user ``to``."""
    return LABEL_WRAP + lp(to) + lp(device)


def derive_wrap_key(shared_secret: bytes, eph_pub: bytes, spk_pub: bytes, to: str, device: str) -> bytes:
    """The 32-byte AES key that wraps the content key for one device."""
    return hkdf_sha256(shared_secret, eph_pub + spk_pub, wrap_key_info(to, device), 32)


def parse_envelope(obj: object) -> Envelope:
    """Validate the wire form and decode it; does not check the signature.

    Checks in the order of docs/crypto.md section 6.4, steps 1 to 5: object shape
    and integer ``v`` (:class:`MalformedEnvelope`), ``v == 1``
    (:class:`UnsupportedVersion`), strings, integers and lists
    (:class:`MalformedEnvelope`), base64url and lengths (:class:`BadEncoding`),
    then body size 16 + 64n and unique (to, device) (:class:`MalformedEnvelope`).
    Unknown fields are ignored.
    """
    if not isinstance(obj, dict):
        raise MalformedEnvelope("envelope: expected a JSON object")
    v = obj.get("v")
    if not isinstance(v, int) or isinstance(v, bool):
        raise MalformedEnvelope("v: expected an integer")
    if v != VERSION:
        raise UnsupportedVersion(f"envelope version {v} is not supported")

    strings = {name: _str_field(obj, name) for name in ("id", "sender", "sender_device", "conversation")}
    raw_keys = obj.get("keys")
    if not isinstance(raw_keys, list) or not raw_keys or not all(isinstance(k, dict) for k in raw_keys):
        raise MalformedEnvelope("keys: expected a non-empty list of objects")
    shapes = [(_str_field(k, "to"), _str_field(k, "device"), _int_field(k, "spk")) for k in raw_keys]

    keys = tuple(KeyEntry(to, device, spk, b64decode(k.get("wrapped"), length=WRAPPED_LEN, what="wrapped"))
                 for (to, device, spk), k in zip(shapes, raw_keys))
    env = Envelope(
        v=v,
        eph=b64decode(obj.get("eph"), length=KEY_LEN, what="eph"),
        nonce=b64decode(obj.get("nonce"), length=NONCE_LEN, what="nonce"),
        body=b64decode(obj.get("body"), what="body"),
        keys=keys,
        sig=b64decode(obj.get("sig"), length=SIG_LEN, what="sig"),
        **strings,
    )

    if len(env.body) < TAG_LEN + PAD_BLOCK or (len(env.body) - TAG_LEN) % PAD_BLOCK:
        raise MalformedEnvelope("body: size is not 16 + a multiple of 64 bytes")
    if len({k.sort_key() for k in keys}) != len(keys):
        raise MalformedEnvelope("keys: duplicate (to, device)")
    return env


def encrypt_message(
    sender_keys: DeviceKeys,
    sender: str,
    sender_device: str,
    conversation: str,
    message_id: str,
    payload: dict[str, Any],
    recipients: Sequence[RecipientDevice],
    *,
    rng: Rng | None = None,
) -> dict[str, Any]:
    """Encrypt ``payload`` to every device in ``recipients`` and sign it.

    ``recipients`` must already hold verified signed prekeys (see
    :meth:`RecipientDevice.from_bundle`) and should include the sender's other
    devices. Key entries keep the order of ``recipients``. ``rng`` (default
    ``os.urandom``) is drawn from exactly three times, in this order: ephemeral
    private key (32), content key (32), body nonce (12); pass a scripted one only
    to reproduce test vectors.

    Returns the envelope in wire form. Raises ValueError for an empty or repeated
    recipient, empty strings, or a payload that is not a JSON object;
    :class:`InvalidKey` for a low-order recipient prekey.
    """
    rng = rng or os.urandom
    if not recipients:
        raise ValueError("no recipient devices")
    if len({(r.address, r.device_id) for r in recipients}) != len(recipients):
        raise ValueError("a recipient device appears twice")
    for name, value in [("sender", sender), ("sender_device", sender_device),
                        ("conversation", conversation), ("message_id", message_id),
                        *(("address", r.address) for r in recipients),
                        *(("device_id", r.device_id) for r in recipients)]:
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name} must be a non-empty string")
    padded = pad(encode_payload(payload))

    eph_priv, content_key, nonce = rng(KEY_LEN), rng(KEY_LEN), rng(NONCE_LEN)
    eph_pub = x25519_public(eph_priv)
    unsigned = Envelope(
        id=message_id, sender=sender, sender_device=sender_device, conversation=conversation,
        eph=eph_pub, nonce=nonce, body=b"", keys=(), sig=b"",
    )
    entries = []
    for r in recipients:
        if not _is_u32(r.spk_id):
            raise ValueError("spk_id must be an integer in 0..2^32-1")
        wrap_key = derive_wrap_key(x25519(eph_priv, r.spk_pub), eph_pub, r.spk_pub,
                                   r.address, r.device_id)
        wrapped = aes256gcm_encrypt(wrap_key, WRAP_NONCE, content_key, unsigned.key_aad())
        entries.append(KeyEntry(r.address, r.device_id, r.spk_id, wrapped))
    body = aes256gcm_encrypt(content_key, nonce, padded, unsigned.body_aad())
    unsigned = dataclasses.replace(unsigned, body=body, keys=tuple(entries))
    signed = dataclasses.replace(unsigned, sig=sender_keys.sign(unsigned.signature_input()))
    return signed.to_json()


def decrypt_message(
    my_keys: DeviceKeys,
    my_address: str,
    my_device: str,
    envelope: object,
    sender_identity_key: bytes,
) -> dict[str, Any]:
    """Verify and decrypt an envelope addressed to this device; return the payload.

    ``sender_identity_key`` must be the Ed25519 identity key of the device
    (``envelope["sender"]``, ``envelope["sender_device"]``) as the caller knows it.
    The caller must also drop duplicates by (sender, id) and check that the sender
    may post in ``conversation``: this function keeps no state.

    Raises, in the order checked: :class:`MalformedEnvelope`,
    :class:`UnsupportedVersion`, :class:`BadEncoding` (see :func:`parse_envelope`);
    :class:`BadSignature`; :class:`NotForThisDevice`; :class:`UnknownPrekey`;
    :class:`DecryptionFailed` (wrapped key or body); :class:`BadPlaintext`.
    """
    env = parse_envelope(envelope)
    if not ed25519_verify(sender_identity_key, env.signature_input(), env.sig):
        raise BadSignature("envelope signature does not verify")
    entry = env.key_for(my_address, my_device)
    if entry is None:
        raise NotForThisDevice(f"no key entry for {my_address} / {my_device}")
    spk_priv = my_keys.signed_prekeys.get(entry.spk)
    if spk_priv is None:
        raise UnknownPrekey(f"signed prekey {entry.spk} is not held by this device")
    try:
        shared = x25519(spk_priv, env.eph)
    except InvalidKey:
        raise DecryptionFailed("ephemeral key has low order") from None
    wrap_key = derive_wrap_key(shared, env.eph, x25519_public(spk_priv), my_address, my_device)
    content_key = aes256gcm_decrypt(wrap_key, WRAP_NONCE, entry.wrapped, env.key_aad())
    padded = aes256gcm_decrypt(content_key, env.nonce, env.body, env.body_aad())
    return decode_payload(unpad(padded))


# ------------------------------------------------------------- safety number


def _fingerprint_digest(address: str, identity_keys: Iterable[bytes]) -> bytes:
    keys = sorted(identity_keys)
    if not keys:
        raise InvalidKey("a user needs at least one device key")
    for key in keys:
        _check_key(key, "identity key")
    if len(set(keys)) != len(keys):
        raise InvalidKey("the same identity key is listed twice")
    key_bytes = b"".join(keys)
    try:
        address_bytes = address.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate: refused like everywhere in the scheme
        raise MalformedEnvelope("address is not valid UTF-8 text") from None
    h = struct.pack(">H", 0) + key_bytes + address_bytes
    for _ in range(SAFETY_ITERATIONS):
        h = hashlib.sha512(h + key_bytes).digest()
    return h


def fingerprint(address: str, identity_keys: Iterable[bytes]) -> str:
    """The 30-digit fingerprint of one user: their address and all device identity keys.

    Raises :class:`InvalidKey` for no keys, a key not 32 bytes, or a repeated key,
    and :class:`MalformedEnvelope` for an address that is not valid Unicode.
    """
    digest = _fingerprint_digest(address, identity_keys)[:30]
    return "".join(f"{int.from_bytes(digest[i:i + 5], 'big') % 100000:05d}"
                   for i in range(0, 30, 5))


def safety_number(addr_a: str, keys_a: Iterable[bytes], addr_b: str, keys_b: Iterable[bytes]) -> str:
    """The 60-digit safety number of two users; the same from either side."""
    return "".join(sorted([fingerprint(addr_a, keys_a), fingerprint(addr_b, keys_b)]))


def format_safety_number(number: str) -> str:
    """Show a 60-digit safety number as 12 space-separated groups of 5 digits."""
    return " ".join(number[i:i + 5] for i in range(0, len(number), 5))
