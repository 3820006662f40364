"""Peer ids of Ed25519 node keys, computed without libp2p (sans-IO).

A node's libp2p peer id is the identity multihash of its Ed25519 public key, so
anyone holding the id holds the key that signs for it: ``verify_key_of`` gets it
back, which is how signed events and signed node records are checked against the
peer at the other end (or the peer a record names) without importing libp2p.
"""

from __future__ import annotations

import nacl.signing

__all__ = ["peer_id_of", "verify_key_of"]

# An Ed25519 peer id is the identity multihash (code 0x00, length 36) of the
# protobuf PublicKey {Type: Ed25519 (1), Data: 32 bytes}, in base58btc.
_PEER_ID_PREFIX = bytes([0x00, 0x24, 0x08, 0x01, 0x12, 0x20])
_PEER_ID_BYTES = len(_PEER_ID_PREFIX) + 32
_SHA256_MULTIHASH = bytes([0x12, 0x20])  # RSA and ECDSA ids hash the key instead
_B58_ALPHABET = "123456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"
_B58_INDEX = {c: i for i, c in enumerate(_B58_ALPHABET)}
# Every 38-byte id encodes to 52 characters; bounding the input first keeps a
# hostile string from costing quadratic time in the big-integer decode.
_MAX_PEER_ID_CHARS = 64


def _b58encode(data: bytes) -> str:
    number = int.from_bytes(data, "big")
    digits: list[str] = []
    while number:
        number, digit = divmod(number, 58)
        digits.append(_B58_ALPHABET[digit])
    zeros = len(data) - len(data.lstrip(b"\0"))
    return "1" * zeros + "".join(reversed(digits))


def _b58decode(text: str) -> bytes:
    number = 0
    for char in text:
        digit = _B58_INDEX.get(char)
        if digit is None:
            raise ValueError(f"peer id {text!r} is not base58 (bad character {char!r})")
        number = number * 58 + digit
    zeros = len(text) - len(text.lstrip("1"))
    return b"\0" * zeros + number.to_bytes((number.bit_length() + 7) // 8, "big")


def peer_id_of(signing_key: nacl.signing.SigningKey) -> str:
    """The libp2p peer id (base58, ``12D3KooW...``) of the node with this key."""
    return _b58encode(_PEER_ID_PREFIX + bytes(signing_key.verify_key))


def verify_key_of(peer_id: str) -> bytes:
    """The 32-byte Ed25519 public key inside ``peer_id``.

    Raises ValueError when ``peer_id`` is not base58, is not an Ed25519 peer id
    (RSA and ECDSA ids carry a hash of the key, not the key), or has any other
    length or header.
    """
    if not isinstance(peer_id, str) or not 0 < len(peer_id) <= _MAX_PEER_ID_CHARS:
        raise ValueError(f"not a peer id: {peer_id!r}")
    raw = _b58decode(peer_id)
    if raw.startswith(_SHA256_MULTIHASH):
        raise ValueError(f"peer id {peer_id!r} is not an Ed25519 id (it holds a SHA-256 hash of a larger key)")
    if len(raw) != _PEER_ID_BYTES or not raw.startswith(_PEER_ID_PREFIX):
        raise ValueError(f"peer id {peer_id!r} is not an Ed25519 peer id")
    return raw[len(_PEER_ID_PREFIX):]
