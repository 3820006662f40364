"""The node record: what a node publishes about itself in the DHT, signed by its key (sans-IO).

A node publishes, under the DHT key ``/moot/node/<name>``, a value that is the JSON
object ``{"record": {...}, "sig": "..."}``. ``record`` holds

- ``v``: 1, the version of this format;
- ``name``: the node's name (the one in the key);
- ``peer_id``: its libp2p peer id, which holds its Ed25519 public key;
- ``addrs``: where its federation host listens, as multiaddrs ending in
  ``/p2p/<peer_id>`` (1 to ``MAX_ADDRS``);
- ``web``: the URL of its web page, or "";
- ``seq``: a number that grows with every record the node publishes (its clock in
  ms, kept strictly increasing), so the newest record wins;
- ``expires``: when the record stops being valid (ms since the epoch).

``sig`` is the Ed25519 signature (base64url) by the key inside ``peer_id`` over
``b"moot/v1/node-record" || the exact bytes of record``: a record says who signed
it, and only that node can publish records naming its peer id. What a record cannot
prove is that the name is rightfully the node's: two nodes may sign records for
one name. ``choose`` settles that with the name's pin, the peer id this node met
first under that name (storage/repos/federation.py).

No I/O, no clock, no trio or libp2p imports (a test checks): ``federation/dht.py``
is the glue, and it passes ``now`` in.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Annotated

import msgspec
import nacl.exceptions
import nacl.signing

from federation.identity import verify_key_of
from federation.wire import NODE_NAME_RE, NodeName

__all__ = [
    "KEY_PREFIX",
    "LIFETIME_MS",
    "NAMESPACE",
    "NodeRecord",
    "RecordRejected",
    "choose",
    "dht_key",
    "name_of_key",
    "open_record",
    "select",
    "sign_record",
]

VERSION = 1
LABEL = b"moot/v1/node-record"
NAMESPACE = "moot"  # the DHT's validators are chosen by the first path segment of the key
KEY_PREFIX = f"/{NAMESPACE}/node/"
LIFETIME_MS = 24 * 3600 * 1000  # how long a freshly signed record stays valid
# A record claiming to stay valid for longer than this is refused: a node's
# refreshed records must be able to replace its old ones within a week at worst.
MAX_LIFETIME_MS = 7 * 24 * 3600 * 1000
MAX_VALUE_BYTES = 8 * 1024
MAX_ADDRS = 16
MAX_ADDR_CHARS = 256
MAX_WEB_CHARS = 512
MAX_SEQ = 2**53  # what a JSON number holds exactly everywhere

Multiaddr = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_ADDR_CHARS, pattern=r"^/[!-~]+$")]
WebUrl = Annotated[str, msgspec.Meta(max_length=MAX_WEB_CHARS, pattern=r"^(https?://[!-~]+)?$")]
PeerIdText = Annotated[str, msgspec.Meta(min_length=1, max_length=64)]


class RecordRejected(Exception):
    """A DHT value that is not a valid node record for its key; ``code`` says why.

    Codes: ``too_large``, ``bad_key``, ``bad_record`` (not the format, or a field
    out of bounds), ``unsupported_version``, ``wrong_name`` (the record is not for
    the name in the key), ``bad_signature``, ``expired``, ``too_long_lived``.
    """

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class NodeRecord(msgspec.Struct, frozen=True):
    """One node's signed claim; unknown fields are ignored (a later version 1 may add some)."""

    v: int
    name: NodeName
    peer_id: PeerIdText
    addrs: Annotated[list[Multiaddr], msgspec.Meta(min_length=1, max_length=MAX_ADDRS)]
    web: WebUrl
    seq: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]
    expires: Annotated[int, msgspec.Meta(ge=0, le=MAX_SEQ)]


class _SignedValue(msgspec.Struct, frozen=True):
    record: msgspec.Raw
    sig: Annotated[str, msgspec.Meta(min_length=1, max_length=100)]


_encoder = msgspec.json.Encoder()
_value_decoder = msgspec.json.Decoder(_SignedValue)
_record_decoder = msgspec.json.Decoder(NodeRecord)


def dht_key(name: str) -> str:
    """The DHT key a node named ``name`` publishes its record under."""
    if not NODE_NAME_RE.match(name):
        raise ValueError(f"not a node name: {name!r}")
    return KEY_PREFIX + name


def name_of_key(key: str) -> str | None:
    """The node name in a DHT key of ours, or None for any other key."""
    if not key.startswith(KEY_PREFIX):
        return None
    name = key[len(KEY_PREFIX):]
    return name if NODE_NAME_RE.match(name) else None


def _b64e(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _b64d(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def sign_record(record: NodeRecord, key: nacl.signing.SigningKey) -> bytes:
    """The DHT value for ``record``, signed with ``key`` (which must be the key of ``record.peer_id``)."""
    if verify_key_of(record.peer_id) != bytes(key.verify_key):
        raise ValueError("a node record must be signed by the key of the peer id it names")
    raw = _encoder.encode(record)
    return _encoder.encode(_SignedValue(record=msgspec.Raw(raw), sig=_b64e(key.sign(LABEL + raw).signature)))


def open_record(key: str, value: bytes, now: int) -> NodeRecord:
    """The node record in DHT ``value`` under ``key``, checked as of ``now`` (ms).

    Checks, in this order: size, key, format, version, that the record is for the
    name in the key, that every address ends in the record's own peer id, the
    signature by the key inside that peer id, and that it has not expired nor
    claims to live longer than ``MAX_LIFETIME_MS``. Raises RecordRejected.
    """
    if len(value) > MAX_VALUE_BYTES:
        raise RecordRejected("too_large", f"a value of {len(value)} bytes exceeds {MAX_VALUE_BYTES}")
    name = name_of_key(key)
    if name is None:
        raise RecordRejected("bad_key", f"not a node record key: {key[:100]!r}")
    try:
        signed = _value_decoder.decode(value)
        raw = bytes(signed.record)
        record = _record_decoder.decode(raw)
    except (msgspec.ValidationError, msgspec.DecodeError) as exc:
        raise RecordRejected("bad_record", str(exc)[:200]) from None
    if record.v != VERSION:
        raise RecordRejected("unsupported_version", f"node record version {record.v}")
    if record.name != name:
        raise RecordRejected("wrong_name", f"a record for {record.name!r} under the key of {name!r}")
    suffix = f"/p2p/{record.peer_id}"
    if not all(addr.endswith(suffix) and len(addr) > len(suffix) for addr in record.addrs):
        raise RecordRejected("bad_record", "every address must end in /p2p/<the record's peer id>")
    try:
        verify_key = verify_key_of(record.peer_id)
        nacl.signing.VerifyKey(verify_key).verify(LABEL + raw, _b64d(signed.sig))
    except ValueError as exc:  # not an Ed25519 peer id, or a signature that is not base64
        raise RecordRejected("bad_signature", f"cannot check the signature of {name!r}'s record: {exc}") from None
    except nacl.exceptions.BadSignatureError:
        raise RecordRejected("bad_signature", f"the record for {name!r} is not signed by {record.peer_id}") from None
    if record.expires <= now:
        raise RecordRejected("expired", f"the record for {name!r} expired at {record.expires}")
    if record.expires > now + MAX_LIFETIME_MS:
        raise RecordRejected("too_long_lived", f"the record for {name!r} claims to be valid until {record.expires}")
    return record


def select(key: str, values: Sequence[bytes], now: int, *, pinned: str | None = None) -> int:
    """The index of the best of ``values`` (DHT values under ``key``), as libp2p's ``Validator.select`` asks.

    Valid records beat invalid ones; then a record from the ``pinned`` peer id (when
    given) beats any other peer's; then the higher ``seq``; on a tie, the earlier
    value. Raises ValueError for an empty list.
    """
    if not values:
        raise ValueError("no values to select from")

    def rank(index: int) -> tuple[bool, bool, int, int]:
        try:
            record = open_record(key, values[index], now)
        except RecordRejected:
            return (False, False, -1, -index)
        return (True, pinned is not None and record.peer_id == pinned, record.seq, -index)

    return max(range(len(values)), key=rank)


def choose(records: Sequence[NodeRecord], pinned: str | None) -> tuple[NodeRecord | None, list[NodeRecord]]:
    """Of the valid records found for one name, the one to use and the conflicting claims.

    With a ``pinned`` peer id for the name, only that peer's newest record may be
    used (None if there is none) and every other peer's claim is a conflict. A name
    not pinned yet goes to the newest record (highest ``seq``; on a tie, the lowest
    peer id, so that every node decides alike), and the other peers' claims are the
    conflicts. A conflict is reported once per peer, with its newest record.
    """
    newest: dict[str, NodeRecord] = {}
    for record in records:
        held = newest.get(record.peer_id)
        if held is None or record.seq > held.seq:
            newest[record.peer_id] = record
    if pinned is not None:
        chosen = newest.get(pinned)
    elif newest:
        chosen = min(newest.values(), key=lambda r: (-r.seq, r.peer_id))
    else:
        chosen = None
    owner = pinned if pinned is not None else (chosen.peer_id if chosen else None)
    conflicts = sorted((r for peer, r in newest.items() if peer != owner), key=lambda r: r.peer_id)
    return chosen, conflicts

