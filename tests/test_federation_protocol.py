"""The federation protocol without any network: in-memory pairs of sessions, byte
vectors, signed events and everything a lying or broken peer can send."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import pytest

from federation import events as ev
from federation import wire
from federation.session import (
    Acked,
    Backoff,
    BatchReceived,
    InboundSession,
    Misbehaviour,
    OutboundSession,
    PeerClosing,
    PeerReady,
    Rejected,
)
from federation.wire import ProtocolViolation
from tests.nodes import REPO
from tools.gen_federation_vectors import node_key, render

VECTORS = json.loads((REPO / "docs" / "federation_vectors_v1.json").read_text())
RIVERSIDE, HILLTOP = node_key("riverside"), node_key("hilltop")


def message(n: int, *, origin: str = "riverside", sender: str = "alice@riverside") -> ev.MessageEvent:
    envelope = json.dumps({"v": 1, "id": f"m{n}", "sender": sender, "n": n}).encode()
    return ev.MessageEvent(
        v=1, origin=origin, id=ev.message_event_id(sender, f"m{n}"), ts=1_767_225_600_000 + n, sender=sender,
        sender_device="d1", to="bob@hilltop", message_id=f"m{n}", envelope=msgspec.Raw(envelope),
    )


def connected(**outbound: object) -> tuple[OutboundSession, InboundSession]:
    """riverside opened a stream to hilltop; both hellos have crossed."""
    out = OutboundSession("riverside", **outbound)  # type: ignore[arg-type]
    inn = InboundSession("hilltop", expected_peer="riverside")
    assert inn.receive_data(out.start()) == [PeerReady("riverside")]
    assert out.receive_data(inn.start()) == [PeerReady("hilltop")]
    return out, inn


# -- the happy path --------------------------------------------------------------------


def test_batches_cross_and_are_acknowledged():
    out, inn = connected()
    batch = [ev.signed(i, message(i), RIVERSIDE) for i in (1, 2, 3)]
    [received] = inn.receive_data(out.send_batch(batch))
    assert isinstance(received, BatchReceived) and received.upto == 3
    got = [ev.verify_event(item, "riverside", RIVERSIDE.verify_key.encode()) for item in received.events]
    assert [e.message_id for e in got] == ["m1", "m2", "m3"]
    assert bytes(got[0].envelope) == bytes(message(1).envelope)
    assert out.room == 5000 - 3
    assert out.receive_data(inn.ack(3)) == [Acked(3)]
    assert out.acked == 3 and out.room == 5000
    assert out.receive_data(inn.ack(3)) == []  # a repeated ack changes nothing


def test_frames_split_anywhere_or_joined_parse_the_same():
    out, inn = connected()
    data = out.send_batch([ev.signed(1, message(1), RIVERSIDE)]) + out.send_batch([ev.signed(2, message(2), RIVERSIDE)])
    events = []
    for i in range(len(data)):  # one byte at a time
        events += inn.receive_data(data[i:i + 1])
    assert [e.upto for e in events if isinstance(e, BatchReceived)] == [1, 2]
    ping_pong = out.ping(5) + out.ping(6)
    assert inn.receive_data(ping_pong) == []
    assert inn.data_to_send() == wire.encode(wire.Pong(n=5)) + wire.encode(wire.Pong(n=6))


def test_a_resumed_stream_starts_after_what_was_acknowledged():
    out, inn = connected(acked=41)
    with pytest.raises(ValueError):
        out.send_batch([ev.signed(41, message(41), RIVERSIDE)])
    [batch] = inn.receive_data(out.send_batch([ev.signed(42, message(42), RIVERSIDE)]))
    assert isinstance(batch, BatchReceived)
    assert out.receive_data(inn.reject(42, "foreign_sender", "no")) == [Rejected(42, "foreign_sender", "no")]


def test_the_window_bounds_what_is_in_flight():
    out, inn = connected(window=3)
    inn.receive_data(out.send_batch([ev.signed(i, message(i), RIVERSIDE) for i in (1, 2, 3)]))
    assert out.room == 0
    out.receive_data(inn.ack(2))
    assert out.room == 2


# -- byte vectors ------------------------------------------------------------------------


def test_vectors_file_is_current():
    assert (REPO / "docs" / "federation_vectors_v1.json").read_text() == render()


@pytest.mark.parametrize("vector", VECTORS["frames"], ids=lambda v: v["name"])
def test_frame_vectors_decode_and_encode_back(vector):
    data = bytes.fromhex(vector["frame_hex"])
    length = int.from_bytes(data[:4], "big")
    assert length == len(data) - 4
    frame = wire.decode(data[4:])
    assert type(frame).__name__.lower() == vector["name"]
    assert wire.encode(frame) == data


@pytest.mark.parametrize("vector", VECTORS["events"], ids=lambda v: v["name"])
def test_event_vectors_verify_under_their_origin_key(vector):
    item = wire.SignedEvent(oid=1, event=msgspec.Raw(vector["event"].encode()), sig=vector["sig"])
    key = bytes.fromhex(vector["origin_public_hex"])
    event = ev.verify_event(item, vector["origin"], key)
    assert event.origin == vector["origin"]
    assert bytes.fromhex(vector["signature_input_hex"]) == ev.LABEL + vector["event"].encode()


# -- events a node must refuse -------------------------------------------------------------


def reject_code(item: wire.SignedEvent, origin: str = "riverside", key: bytes | None = None, **kw: int) -> str:
    with pytest.raises(ev.EventRejected) as err:
        ev.verify_event(item, origin, key or RIVERSIDE.verify_key.encode(), **kw)
    return err.value.code


def test_forged_and_foreign_events_are_rejected_each_with_its_reason():
    good = ev.signed(1, message(1), RIVERSIDE)
    # signed by another node's key, claiming to be riverside's
    assert reject_code(ev.signed(1, message(1), HILLTOP)) == "bad_signature"
    # one byte of the event changed after signing
    tampered = bytes(good.event).replace(b"alice", b"alicf")
    assert reject_code(wire.SignedEvent(oid=1, event=msgspec.Raw(tampered), sig=good.sig)) == "bad_signature"
    # a signature that is not base64url
    assert reject_code(wire.SignedEvent(oid=1, event=good.event, sig="!" * 86)) == "bad_signature"
    # hilltop (authenticated) relays an event riverside signed: origin is the link, not the claim
    assert reject_code(good, origin="hilltop", key=HILLTOP.verify_key.encode()) == "bad_signature"
    # hilltop signs an event naming riverside as its origin
    assert reject_code(ev.signed(1, message(1), HILLTOP), origin="hilltop", key=HILLTOP.verify_key.encode()) == "wrong_origin"
    # riverside speaks for a user of another node
    assert reject_code(ev.signed(1, message(1, sender="carol@meadow"), RIVERSIDE)) == "foreign_sender"
    # too large, before any signature work
    assert reject_code(good, max_bytes=10) == "too_large"


def signed_raw(obj: dict[str, object]) -> wire.SignedEvent:
    raw = json.dumps(obj).encode()
    return wire.SignedEvent(oid=1, event=msgspec.Raw(raw), sig=ev.b64e(RIVERSIDE.sign(ev.LABEL + raw).signature))


def test_well_signed_nonsense_is_rejected_too():
    base = json.loads(bytes(ev.signed(1, message(1), RIVERSIDE).event))
    assert reject_code(signed_raw({**base, "type": "teleport"})) == "unknown_type"
    assert reject_code(signed_raw({**base, "v": 2})) == "unsupported_version"
    assert reject_code(signed_raw({k: v for k, v in base.items() if k != "to"})) == "bad_event"
    assert reject_code(signed_raw({**base, "to": "not an address"})) == "bad_event"
    raw = b"{not json"
    item = wire.SignedEvent(oid=1, event=msgspec.Raw(raw), sig=ev.b64e(RIVERSIDE.sign(ev.LABEL + raw).signature))
    assert reject_code(item) == "bad_event"


# -- streams a node must close -------------------------------------------------------------


def violation(session: OutboundSession | InboundSession, data: bytes) -> str:
    with pytest.raises(ProtocolViolation) as err:
        session.receive_data(data)
    return err.value.code


def frame_bytes(obj: dict[str, object]) -> bytes:
    body = json.dumps(obj).encode()
    return len(body).to_bytes(4, "big") + body


def test_broken_streams_are_protocol_violations():
    assert violation(InboundSession("hilltop"), frame_bytes({"type": "ack", "upto": 1})) == "unexpected"
    assert violation(InboundSession("hilltop"), frame_bytes({"type": "hello", "v": 9, "node": "riverside"})) == "unsupported_version"
    assert violation(InboundSession("hilltop"), frame_bytes({"type": "hello", "v": 1, "node": "hilltop"})) == "wrong_node"
    assert violation(InboundSession("hilltop", expected_peer="riverside"), OutboundSession("meadow").start()) == "wrong_node"
    assert violation(InboundSession("hilltop"), frame_bytes({"type": "hello", "v": 1, "node": "Not A Name"})) == "bad_frame"
    assert violation(InboundSession("hilltop"), frame_bytes({"type": "teleport"})) == "unknown_type"
    assert violation(InboundSession("hilltop"), b"\x00\x00\x00\x05{oops") == "bad_frame"
    assert violation(InboundSession("hilltop"), b"\x00\x00\x00\x00") == "bad_frame"
    # the length alone is enough to refuse a huge frame: nothing of it is buffered
    assert violation(InboundSession("hilltop", max_frame=1000), (10**6).to_bytes(4, "big")) == "too_large"

    out, inn = connected()
    assert violation(inn, OutboundSession("riverside").start()) == "unexpected"  # a second hello
    out, inn = connected()
    assert violation(inn, frame_bytes({"type": "ack", "upto": 1})) == "unexpected"  # wrong direction
    out, inn = connected()
    inn.receive_data(out.send_batch([ev.signed(5, message(5), RIVERSIDE)]))
    again = wire.encode(wire.Batch(events=[ev.signed(5, message(5), RIVERSIDE)]))
    assert violation(inn, again) == "bad_oid"
    out, inn = connected()
    assert violation(out, frame_bytes({"type": "ack", "upto": 1})) == "bad_ack"
    out, inn = connected()
    assert violation(out, frame_bytes({"type": "reject", "oid": 3, "code": "x"})) == "bad_reject"
    out, inn = connected()
    assert violation(inn, frame_bytes({"type": "batch", "events": []})) == "bad_frame"


def test_closing_with_a_reason():
    out, inn = connected()
    goodbye = inn.violation_frame(ProtocolViolation("too_large", "enough"))
    assert out.receive_data(goodbye) == [PeerClosing("too_large", "enough")]
    assert not out.ready
    with pytest.raises(RuntimeError):
        out.send_batch([ev.signed(1, message(1), RIVERSIDE)])
    # an error instead of a hello is a goodbye too
    assert InboundSession("hilltop").receive_data(goodbye) == [PeerClosing("too_large", "enough")]


# -- deciding when to give up on a peer ------------------------------------------------------


def test_misbehaviour_counts_within_a_sliding_window():
    judge = Misbehaviour(limit=3, window_s=10)
    assert not judge.record(0) and not judge.record(5)
    assert not judge.record(11)  # the first one has expired
    assert judge.record(12)


def test_backoff_doubles_from_about_a_second_with_jitter_and_a_cap():
    backoff = Backoff(initial_s=1, max_s=60)
    assert backoff.delay(0, 0.5) == 0
    assert [backoff.delay(n, 0.0) for n in (1, 2, 3, 4)] == [0.5, 1, 2, 4]
    assert [backoff.delay(n, 0.999) for n in (1, 2)] == pytest.approx([0.9995, 1.999])
    assert backoff.delay(100, 0.0) == 30 and backoff.delay(100, 0.999) <= 60


# -- purity --------------------------------------------------------------------------------------


def test_protocol_modules_import_no_io_library():
    code = (
        "import sys, json; import federation.wire, federation.events, federation.session; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert {"msgspec", "nacl"} <= loaded
    assert loaded & {"trio", "libp2p", "multiaddr", "zeroconf", "sqlalchemy", "httpx", "socket", "starlette"} == set()


# -- /moot/keys/1: profiles ---------------------------------------------------------------

PROFILE_VECTORS = [
    (wire.GetProfile(user="bob@hilltop"), b'\x00\x00\x00\x2b{"type":"get_profile","user":"bob@hilltop"}'),
    (
        wire.Profile(
            user="bob@hilltop", display_name="Bob", status_text="out", updated_at=1767225600000,
            avatar=wire.AvatarMeta(type="image/png", size=68, digest="ab" * 32),
        ),
        b'\x00\x00\x00\xdf{"type":"profile","user":"bob@hilltop","display_name":"Bob","status_text":"out",'
        b'"avatar":{"type":"image/png","size":68,"digest":"' + b"ab" * 32 + b'"},"updated_at":1767225600000}',
    ),
    (wire.Profile(user="bob@hilltop"), b'\x00\x00\x00\x27{"type":"profile","user":"bob@hilltop"}'),
    (wire.GetAvatar(user="bob@hilltop"), b'\x00\x00\x00\x2a{"type":"get_avatar","user":"bob@hilltop"}'),
    (
        wire.Avatar(user="bob@hilltop", content_type="image/jpeg", data="_9j_"),
        b'\x00\x00\x00\x50{"type":"avatar","user":"bob@hilltop","content_type":"image/jpeg","data":"_9j_"}',
    ),
]


@pytest.mark.parametrize(("frame", "framed"), PROFILE_VECTORS)
def test_profile_frames_match_their_byte_vectors_both_ways(frame, framed):
    assert wire.encode(frame) == framed
    [body] = wire.Deframer().feed(framed)
    assert wire.decode(body) == frame
    assert wire.encode(wire.decode(body)) == framed


@pytest.mark.parametrize("body", [
    b'{"type":"profile","user":"bob@hilltop","display_name":"' + b"x" * 65 + b'"}',
    b'{"type":"profile","user":"bob@hilltop","status_text":"' + b"x" * 141 + b'"}',
    b'{"type":"profile","user":"bob@hilltop","avatar":{"type":"image/gif","size":1,"digest":"' + b"a" * 64 + b'"}}',
    b'{"type":"profile","user":"bob@hilltop","avatar":{"type":"image/png","size":0,"digest":"' + b"a" * 64 + b'"}}',
    b'{"type":"profile","user":"bob@hilltop","avatar":{"type":"image/png","size":262145,"digest":"' + b"a" * 64 + b'"}}',
    b'{"type":"profile","user":"bob@hilltop","avatar":{"type":"image/png","size":1,"digest":"XYZ"}}',
    b'{"type":"avatar","user":"bob@hilltop","content_type":"image/png","data":"' + b"A" * 349527 + b'"}',
    b'{"type":"avatar","user":"bob@hilltop","content_type":"image/svg+xml","data":"AAAA"}',
    b'{"type":"get_profile"}',
])
def test_malformed_profile_frames_are_bad_frames(body):
    with pytest.raises(ProtocolViolation) as caught:
        wire.decode(body)
    assert caught.value.code == "bad_frame"


def test_the_largest_avatar_fits_in_a_frame():
    biggest = wire.Avatar(user="bob@hilltop", content_type="image/png", data="A" * ((wire.MAX_AVATAR_BYTES * 4 + 2) // 3))
    assert len(wire.encode(biggest)) < wire.DEFAULT_MAX_FRAME
    assert wire.decode(wire.encode(biggest)[4:]) == biggest
