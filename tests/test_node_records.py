"""Node records as published in the DHT: signed, checked, chosen (federation/records.py, sans-IO)."""

from __future__ import annotations

import json
import subprocess
import sys

import msgspec
import nacl.signing
import pytest

from federation import records
from federation.identity import peer_id_of
from federation.records import NodeRecord, RecordRejected, choose, dht_key, open_record, select, sign_record
from tests.nodes import REPO

NOW = 1_700_000_000_000
KEY = dht_key("riverside")


def new_key(seed: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes([seed]) * 32)


def record_of(key: nacl.signing.SigningKey, name: str = "riverside", *, seq: int = NOW, **fields: object) -> NodeRecord:
    peer = peer_id_of(key)
    values: dict[str, object] = {
        "v": 1, "name": name, "peer_id": peer, "addrs": [f"/ip4/127.0.0.1/tcp/8471/p2p/{peer}"],
        "web": "http://127.0.0.1:8470", "seq": seq, "expires": seq + records.LIFETIME_MS,
    }
    values.update(fields)
    return NodeRecord(**values)  # type: ignore[arg-type]


def test_the_records_module_imports_no_io_library():
    code = (
        "import sys, json; import federation.records; "
        "print(json.dumps(sorted({m.split('.')[0] for m in sys.modules})))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    loaded = set(json.loads(out))
    assert "msgspec" in loaded
    assert loaded & {"trio", "libp2p", "multiaddr", "sqlalchemy", "socket", "zeroconf"} == set()


def test_a_signed_record_opens_to_what_was_signed():
    key = new_key(1)
    record = record_of(key)
    value = sign_record(record, key)
    assert open_record(KEY, value, NOW) == record
    outer = json.loads(value)
    assert set(outer) == {"record", "sig"}
    assert outer["record"] == {
        "v": 1, "name": "riverside", "peer_id": peer_id_of(key), "addrs": record.addrs,
        "web": "http://127.0.0.1:8470", "seq": NOW, "expires": NOW + records.LIFETIME_MS,
    }


def test_a_node_signs_only_for_its_own_peer_id():
    with pytest.raises(ValueError):
        sign_record(record_of(new_key(1)), new_key(2))


def forge(record: NodeRecord, key: nacl.signing.SigningKey) -> bytes:
    """A value signed by ``key`` whatever peer id the record names."""
    raw = msgspec.json.encode(record)
    sig = records._b64e(key.sign(records.LABEL + raw).signature)
    return msgspec.json.encode({"record": msgspec.Raw(raw), "sig": sig})


def tamper(value: bytes, **changes: object) -> bytes:
    """The value with fields of its record changed, its signature kept."""
    outer = json.loads(value)
    outer["record"].update(changes)
    return json.dumps(outer).encode()


@pytest.mark.parametrize(
    ("make", "code"),
    [
        # someone else's key signing a record that names the victim's peer id
        (lambda: forge(record_of(new_key(1)), new_key(2)), "bad_signature"),
        # a signed record changed afterwards: other addresses, a higher seq
        (lambda: tamper(sign_record(record_of(new_key(1)), new_key(1)), web="http://evil.example"), "bad_signature"),
        (lambda: tamper(sign_record(record_of(new_key(1)), new_key(1)), seq=NOW + 5), "bad_signature"),
        (lambda: json.dumps({"record": json.loads(sign_record(record_of(new_key(1)), new_key(1)))["record"],
                             "sig": "!!"}).encode(), "bad_signature"),
        # a record for another name, under riverside's key
        (lambda: sign_record(record_of(new_key(1), "hilltop"), new_key(1)), "wrong_name"),
        (lambda: sign_record(record_of(new_key(1), seq=NOW - records.LIFETIME_MS - 1), new_key(1)), "expired"),
        (lambda: sign_record(record_of(new_key(1), expires=NOW), new_key(1)), "expired"),
        (lambda: sign_record(record_of(new_key(1), expires=NOW + 30 * 24 * 3600 * 1000), new_key(1)), "too_long_lived"),
        (lambda: sign_record(record_of(new_key(1), v=2), new_key(1)), "unsupported_version"),
        # an address that leads to another peer, or to none
        (lambda: sign_record(record_of(new_key(1), addrs=[f"/ip4/10.0.0.1/tcp/1/p2p/{peer_id_of(new_key(2))}"]), new_key(1)),
         "bad_record"),
        (lambda: sign_record(record_of(new_key(1), addrs=["/ip4/10.0.0.1/tcp/1"]), new_key(1)), "bad_record"),
        (lambda: sign_record(record_of(new_key(1), addrs=[]), new_key(1)), "bad_record"),
        (lambda: sign_record(record_of(new_key(1), addrs=[f"/ip4/10.0.0.{i}/tcp/1/p2p/{peer_id_of(new_key(1))}"
                                                          for i in range(17)]), new_key(1)), "bad_record"),
        (lambda: sign_record(record_of(new_key(1), web="javascript:alert(1)"), new_key(1)), "bad_record"),
        (lambda: sign_record(record_of(new_key(1), seq=-1), new_key(1)), "bad_record"),
        (lambda: sign_record(record_of(new_key(1), name="Not A Name"), new_key(1)), "bad_record"),
        (lambda: b"not json", "bad_record"),
        (lambda: b'{"record": 1, "sig": "x"}', "bad_record"),
        (lambda: b"{" + b" " * records.MAX_VALUE_BYTES + b"}", "too_large"),
        (lambda: sign_record(record_of(new_key(1), web="http://x/" + "a" * 9000), new_key(1)), "too_large"),
    ],
)
def test_hostile_records_are_rejected_with_the_reason(make, code):
    with pytest.raises(RecordRejected) as err:
        open_record(KEY, make(), NOW)
    assert err.value.code == code


def test_a_key_that_is_not_a_node_record_key_is_rejected():
    value = sign_record(record_of(new_key(1)), new_key(1))
    for key in ("/moot/node/", "/moot/node/Riverside", "/moot/user/riverside", "/pk/riverside", "riverside"):
        with pytest.raises(RecordRejected) as err:
            open_record(key, value, NOW)
        assert err.value.code == "bad_key"


def test_a_peer_id_that_holds_no_ed25519_key_cannot_sign():
    # "Qm..." ids carry a hash of an RSA key: nothing to check a signature with
    record = record_of(new_key(1), peer_id="QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N",
                       addrs=["/ip4/10.0.0.1/tcp/1/p2p/QmYyQSo1c1Ym7orWxLYvCrM2EmxFTANf8wXmmE7DWjhx5N"])
    with pytest.raises(RecordRejected) as err:
        open_record(KEY, forge(record, new_key(1)), NOW)
    assert err.value.code == "bad_signature"


def test_select_prefers_valid_then_pinned_then_newest():
    a, b = new_key(1), new_key(2)
    old = sign_record(record_of(a, seq=NOW - 10), a)
    new = sign_record(record_of(a, seq=NOW), a)
    squatter = sign_record(record_of(b, seq=NOW + 10), b)
    expired = sign_record(record_of(a, seq=NOW + 20, expires=NOW - 1), a)
    assert select(KEY, [old, new], NOW) == 1  # a stale seq loses
    assert select(KEY, [new, old], NOW) == 0
    assert select(KEY, [expired, old], NOW) == 1  # however high its seq
    assert select(KEY, [b"garbage", old], NOW) == 1
    assert select(KEY, [new, squatter], NOW) == 1  # without a pin, the newest
    assert select(KEY, [new, squatter], NOW, pinned=peer_id_of(a)) == 0  # with one, the pinned peer's
    assert select(KEY, [squatter, old, new], NOW, pinned=peer_id_of(a)) == 2
    assert select(KEY, [new, new], NOW) == 0  # a tie keeps the first
    with pytest.raises(ValueError):
        select(KEY, [], NOW)


def test_choose_uses_the_pin_and_reports_the_other_claims():
    a, b, c = new_key(1), new_key(2), new_key(3)
    a_old, a_new = record_of(a, seq=NOW - 10), record_of(a, seq=NOW)
    b_rec, c_rec = record_of(b, seq=NOW + 10), record_of(c, seq=NOW + 5)
    assert choose([], None) == (None, [])
    assert choose([a_old, a_new], None) == (a_new, [])
    # pinned to a: a's newest, even though b's is newer; b and c are conflicts
    chosen, conflicts = choose([b_rec, a_old, c_rec, a_new], peer_id_of(a))
    assert chosen == a_new
    assert conflicts == sorted([b_rec, c_rec], key=lambda r: r.peer_id)
    # pinned to a, and only a squatter's record is found: nothing to use
    assert choose([b_rec], peer_id_of(a)) == (None, [b_rec])
    # no pin yet: the newest claim, the others are conflicts
    assert choose([a_new, b_rec], None) == (b_rec, [a_new])
    # equal seqs: the lowest peer id, whatever the order they came in
    tie_a, tie_b = record_of(a, seq=NOW), record_of(b, seq=NOW)
    lowest = min(tie_a, tie_b, key=lambda r: r.peer_id)
    assert choose([tie_a, tie_b], None)[0] == lowest == choose([tie_b, tie_a], None)[0]
