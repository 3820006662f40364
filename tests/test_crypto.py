"""Crypto scheme v1: the Python implementation against the shared vectors.

The vectors in docs/crypto_vectors_v1.json are also the browser client's tests, so
every check here runs in both directions: inputs -> stored bytes, stored bytes ->
plaintext. Some byte layouts are rebuilt here straight from docs/crypto.md rather
than through cli.crypto, so a layout bug cannot hide by agreeing with itself.
"""

from __future__ import annotations

import ast
import hashlib
import hmac
import importlib.util
import json
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cli import crypto as c

ROOT = Path(__file__).resolve().parent.parent
CRYPTO_PY = ROOT / "cli" / "crypto.py"
VECTORS_PATH = ROOT / "docs" / "crypto_vectors_v1.json"
VECTORS: dict[str, Any] = json.loads(VECTORS_PATH.read_text(encoding="utf-8"))

ERRORS: dict[str, type[c.CryptoError]] = {
    "bad_encoding": c.BadEncoding,
    "bad_envelope": c.MalformedEnvelope,
    "unsupported_version": c.UnsupportedVersion,
    "bad_signature": c.BadSignature,
    "not_for_this_device": c.NotForThisDevice,
    "unknown_prekey": c.UnknownPrekey,
    "decryption_failed": c.DecryptionFailed,
    "bad_plaintext": c.BadPlaintext,
    "bad_key": c.InvalidKey,
    "crypto_unavailable": c.CryptoUnavailable,
}


def h(value: str) -> bytes:
    return bytes.fromhex(value)


class ScriptedRandom:
    """Hands out the given byte strings in order; fails on a length mismatch."""

    def __init__(self, *values: bytes) -> None:
        self.values = list(values)

    def __call__(self, n: int) -> bytes:
        value = self.values.pop(0)
        assert len(value) == n
        return value


def device_keys(label: str) -> c.DeviceKeys:
    d = VECTORS["devices"][label]
    spk = d["signed_prekey"]
    return c.DeviceKeys(
        identity_seed=h(d["identity_seed_hex"]),
        dh_private=h(d["dh_private_hex"]),
        signed_prekeys={spk["id"]: h(spk["private_hex"])},
        current_spk_id=spk["id"],
        one_time_prekeys={o["id"]: h(o["private_hex"]) for o in d["one_time_prekeys"]},
    )


def recipient_device(label: str) -> c.RecipientDevice:
    d = VECTORS["devices"][label]
    return c.RecipientDevice(d["address"], d["device_id"], d["signed_prekey"]["id"],
                             h(d["signed_prekey"]["public_hex"]))


# ------------------------------------------------------ spec, written out again


def spec_lp(value: str | bytes) -> bytes:
    data = value.encode("utf-8") if isinstance(value, str) else value
    return struct.pack(">I", len(data)) + data


def spec_b64(text: str) -> bytes:
    import base64
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def spec_sig_input(env: dict[str, Any]) -> bytes:
    out = b"moot/v1/envelope" + bytes([env["v"]])
    for name in ("id", "sender", "sender_device", "conversation"):
        out += spec_lp(env[name])
    for name in ("eph", "nonce", "body"):
        out += spec_lp(spec_b64(env[name]))
    entries = sorted(env["keys"], key=lambda k: (k["to"].encode(), k["device"].encode()))
    out += struct.pack(">I", len(entries))
    for k in entries:
        out += spec_lp(k["to"]) + spec_lp(k["device"]) + struct.pack(">I", k["spk"])
        out += spec_lp(spec_b64(k["wrapped"]))
    return out


def spec_hkdf(ikm: bytes, salt: bytes, info: bytes) -> bytes:
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    return hmac.new(prk, info + b"\x01", hashlib.sha256).digest()


# ----------------------------------------------------------------- primitives


def test_primitive_known_answers() -> None:
    p = VECTORS["primitives"]
    x = p["x25519_rfc7748"]
    assert c.x25519_public(h(x["a_private_hex"])) == h(x["a_public_hex"])
    assert c.x25519_public(h(x["b_private_hex"])) == h(x["b_public_hex"])
    assert c.x25519(h(x["a_private_hex"]), h(x["b_public_hex"])) == h(x["shared_hex"])
    assert c.x25519(h(x["b_private_hex"]), h(x["a_public_hex"])) == h(x["shared_hex"])

    e = p["ed25519_rfc8032_test1"]
    assert c.ed25519_public(h(e["seed_hex"])) == h(e["public_hex"])
    assert c.ed25519_sign(h(e["seed_hex"]), h(e["message_hex"])) == h(e["sig_hex"])
    assert c.ed25519_verify(h(e["public_hex"]), h(e["message_hex"]), h(e["sig_hex"]))

    for g in p["aes256gcm"]:
        sealed = c.aes256gcm_encrypt(h(g["key_hex"]), h(g["nonce_hex"]), h(g["plaintext_hex"]), h(g["aad_hex"]))
        assert sealed == h(g["sealed_hex"])
        assert c.aes256gcm_decrypt(h(g["key_hex"]), h(g["nonce_hex"]), sealed, h(g["aad_hex"])) == h(g["plaintext_hex"])

    for v in p["hkdf_sha256"]:
        assert c.hkdf_extract(h(v["salt_hex"]), h(v["ikm_hex"])) == h(v["prk_hex"])
        assert c.hkdf_sha256(h(v["ikm_hex"]), h(v["salt_hex"]), h(v["info_hex"]), v["length"]) == h(v["okm_hex"])


def test_known_answers_from_the_standards_are_in_the_file() -> None:
    # Literal values from RFC 5869 A.1 and the GCM spec, not produced by our code.
    rfc = VECTORS["primitives"]["hkdf_sha256"][0]
    assert rfc["prk_hex"] == "077709362c2e32df0ddc3f0dc47bba6390b6c73bb50f9c3122ec844ad7c2b3e5"
    assert rfc["okm_hex"] == ("3cb25f25faacd57a90434f64d0362f2a2d2d0a90cf1a5a4c"
                              "5db02d56ecc4c5bf34007208d5b887185865")
    gcm = VECTORS["primitives"]["aes256gcm"][0]
    assert gcm["sealed_hex"] == "cea7403d4d606b6e074ec5d3baf39d18d0d1c8a799996bf0265b98b5d48ab919"


def test_base64url_vectors() -> None:
    p = VECTORS["primitives"]
    for v in p["base64url"]:
        assert c.b64encode(h(v["bytes_hex"])) == v["text"]
        assert c.b64decode(v["text"]) == h(v["bytes_hex"])
    for text in p["base64url_invalid"]:
        with pytest.raises(c.BadEncoding) as info:
            c.b64decode(text)
        assert info.value.code == "bad_encoding"


@pytest.mark.parametrize("value", [None, 12, b"AAAA", ["AAAA"]])
def test_b64decode_rejects_non_strings(value: object) -> None:
    with pytest.raises(c.BadEncoding):
        c.b64decode(value)


def test_b64decode_checks_length() -> None:
    assert c.b64decode(c.b64encode(bytes(32)), length=32) == bytes(32)
    with pytest.raises(c.BadEncoding):
        c.b64decode(c.b64encode(bytes(31)), length=32)


def test_length_prefix_and_padding_vectors() -> None:
    p = VECTORS["primitives"]
    for v in p["length_prefix"]:
        assert c.lp(v["string"]) == h(v["lp_hex"]) == spec_lp(v["string"])
    for v in p["padding"]:
        padded = c.pad(h(v["input_hex"]))
        assert padded == h(v["padded_hex"])
        assert len(padded) % 64 == 0
        assert c.unpad(padded) == h(v["input_hex"])


@pytest.mark.parametrize("padded", [
    b"", bytes(64), b"{}" + bytes(62), b"{}\x80" + bytes(60), b"{}\x80" + bytes(60) + b"\x01",
])
def test_unpad_rejects_bad_padding(padded: bytes) -> None:
    with pytest.raises(c.BadPlaintext):
        c.unpad(padded)


def test_unpad_accepts_extra_blocks() -> None:
    assert c.unpad(b"{}\x80" + bytes(61 + 64)) == b"{}"


def test_lone_surrogate_is_rejected() -> None:
    with pytest.raises(c.MalformedEnvelope):
        c.lp("bob\ud800")


# ------------------------------------------------------------------- devices


@pytest.mark.parametrize("label", sorted(VECTORS["devices"]))
def test_device_vectors(label: str) -> None:
    d = VECTORS["devices"][label]
    keys = device_keys(label)
    spk = d["signed_prekey"]
    assert keys.identity_key == h(d["identity_key_hex"])
    assert keys.dh_key == h(d["dh_key_hex"])
    assert c.x25519_public(h(spk["private_hex"])) == h(spk["public_hex"])
    expected_input = b"moot/v1/spk" + struct.pack(">I", spk["id"]) + h(spk["public_hex"])
    assert c.signed_prekey_input(spk["id"], h(spk["public_hex"])) == expected_input == h(spk["sig_input_hex"])
    assert keys.sign(expected_input) == h(spk["sig_hex"])
    assert c.verify_signed_prekey(keys.identity_key, spk["id"], h(spk["public_hex"]), h(spk["sig_hex"]))
    assert keys.public_bundle() == d["public_bundle"]
    for o in d["one_time_prekeys"]:
        assert c.x25519_public(h(o["private_hex"])) == h(o["public_hex"])
    bundle = c.parse_public_bundle(d["public_bundle"])
    assert (bundle.spk_id, bundle.spk_pub) == (spk["id"], h(spk["public_hex"]))
    assert c.RecipientDevice.from_bundle(d["address"], d["device_id"], d["public_bundle"]) == recipient_device(label)


def test_signed_prekey_vector() -> None:
    v = VECTORS["signed_prekey"]
    assert c.verify_signed_prekey(h(v["identity_key_hex"]), v["id"], h(v["public_hex"]), h(v["sig_hex"]))
    assert device_keys(v["device"]).sign(h(v["sig_input_hex"])) == h(v["sig_hex"])


def test_signed_prekey_rejections() -> None:
    v = VECTORS["signed_prekey"]
    ik, spk_id, pub, sig = h(v["identity_key_hex"]), v["id"], h(v["public_hex"]), h(v["sig_hex"])
    assert not c.verify_signed_prekey(ik, spk_id + 1, pub, sig)
    assert not c.verify_signed_prekey(ik, spk_id, bytes(32), sig)
    assert not c.verify_signed_prekey(ik, spk_id, pub, sig[:-1] + bytes([sig[-1] ^ 1]))
    assert not c.verify_signed_prekey(device_keys("carol-desk").identity_key, spk_id, pub, sig)
    assert not c.verify_signed_prekey(ik, -1, pub, sig)
    assert not c.verify_signed_prekey(ik, 2**32, pub, sig)
    bundle = json.loads(json.dumps(VECTORS["devices"]["alice-phone"]["public_bundle"]))
    bundle["signed_prekey"]["id"] += 1
    with pytest.raises(c.BadSignature):
        c.parse_public_bundle(bundle)
    bundle["signed_prekey"]["key"] += "A"
    with pytest.raises(c.BadEncoding):
        c.parse_public_bundle(bundle)


def test_wrap_key_vector() -> None:
    v = VECTORS["wrap_key"]
    eph_pub = c.x25519_public(h(v["eph_private_hex"]))
    assert eph_pub == h(v["eph_public_hex"])
    assert c.x25519_public(h(v["spk_private_hex"])) == h(v["spk_public_hex"])
    shared = c.x25519(h(v["eph_private_hex"]), h(v["spk_public_hex"]))
    assert shared == c.x25519(h(v["spk_private_hex"]), eph_pub) == h(v["shared_secret_hex"])
    assert h(v["hkdf_salt_hex"]) == eph_pub + h(v["spk_public_hex"])
    assert h(v["hkdf_info_hex"]) == b"moot/v1/wrap" + spec_lp(v["to"]) + spec_lp(v["device"])
    wrap_key = c.derive_wrap_key(shared, eph_pub, h(v["spk_public_hex"]), v["to"], v["device"])
    assert wrap_key == h(v["wrap_key_hex"]) == spec_hkdf(shared, h(v["hkdf_salt_hex"]), h(v["hkdf_info_hex"]))


# ----------------------------------------------------------------- envelopes

ENVELOPES = {e["name"]: e for e in VECTORS["envelopes"]}


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_encrypt_reproduces_envelope(name: str) -> None:
    v = ENVELOPES[name]
    r = v["random"]
    rng = ScriptedRandom(h(r["eph_private_hex"]), h(r["content_key_hex"]), h(r["nonce_hex"]))
    envelope = c.encrypt_message(
        device_keys(v["sender"]["device"]), v["sender"]["address"], v["sender"]["device_id"],
        v["conversation"], v["message_id"], v["payload"],
        [recipient_device(x["device"]) for x in v["recipients"]], rng=rng)
    assert rng.values == []
    assert envelope == v["envelope"]
    assert json.dumps(envelope, sort_keys=True) == json.dumps(v["envelope"], sort_keys=True)


@pytest.mark.parametrize("name", sorted(ENVELOPES))
def test_envelope_intermediates_match_the_spec(name: str) -> None:
    v = ENVELOPES[name]
    s, env, r = v["steps"], v["envelope"], v["random"]
    plaintext = json.dumps(v["payload"], ensure_ascii=False, separators=(",", ":")).encode()
    assert plaintext == h(s["plaintext_json_hex"]) == s["plaintext_json"].encode()
    padded = h(s["padded_plaintext_hex"])
    assert padded[: len(plaintext) + 1] == plaintext + b"\x80" and len(padded) % 64 == 0
    assert set(padded[len(plaintext) + 1:]) <= {0} and len(padded) - len(plaintext) <= 64

    assert c.x25519_public(h(r["eph_private_hex"])) == h(s["eph_public_hex"]) == spec_b64(env["eph"])
    assert spec_b64(env["nonce"]) == h(r["nonce_hex"])
    ids = spec_lp(env["id"]) + spec_lp(env["sender"]) + spec_lp(env["sender_device"])
    assert h(s["body_aad_hex"]) == b"moot/v1/body" + ids + spec_lp(env["conversation"])
    assert h(s["key_aad_hex"]) == b"moot/v1/key" + ids
    body = c.aes256gcm_encrypt(h(r["content_key_hex"]), h(r["nonce_hex"]), padded, h(s["body_aad_hex"]))
    assert body == h(s["body_hex"]) == spec_b64(env["body"])

    assert [(k["to"], k["device"]) for k in s["keys"]] == [(k["to"], k["device"]) for k in env["keys"]]
    for step, entry in zip(s["keys"], env["keys"]):
        shared = c.x25519(h(r["eph_private_hex"]), h(step["spk_public_hex"]))
        assert shared == h(step["shared_secret_hex"])
        assert h(step["hkdf_salt_hex"]) == h(s["eph_public_hex"]) + h(step["spk_public_hex"])
        assert h(step["hkdf_info_hex"]) == b"moot/v1/wrap" + spec_lp(step["to"]) + spec_lp(step["device"])
        wrap_key = spec_hkdf(shared, h(step["hkdf_salt_hex"]), h(step["hkdf_info_hex"]))
        assert wrap_key == h(step["wrap_key_hex"])
        wrapped = c.aes256gcm_encrypt(wrap_key, bytes(12), h(r["content_key_hex"]), h(s["key_aad_hex"]))
        assert wrapped == h(step["wrapped_hex"]) == spec_b64(entry["wrapped"])
        assert c.aes256gcm_decrypt(wrap_key, bytes(12), wrapped, h(s["key_aad_hex"])) == h(r["content_key_hex"])

    assert [tuple(x) for x in s["signed_key_order"]] == sorted(
        ((k["to"], k["device"]) for k in env["keys"]), key=lambda t: (t[0].encode(), t[1].encode()))
    assert spec_sig_input(env) == h(s["sig_input_hex"]) == c.parse_envelope(env).signature_input()
    sender_pub = device_keys(v["sender"]["device"]).identity_key
    assert c.ed25519_verify(sender_pub, h(s["sig_input_hex"]), h(s["sig_hex"]))
    assert spec_b64(env["sig"]) == h(s["sig_hex"])


RECIPIENT_CASES = [(e["name"], x["device"]) for e in VECTORS["envelopes"] for x in e["recipients"]]


@pytest.mark.parametrize(("name", "device"), RECIPIENT_CASES)
def test_decrypt_stored_envelope(name: str, device: str) -> None:
    v = ENVELOPES[name]
    d = VECTORS["devices"][device]
    sender_key = h(VECTORS["devices"][v["sender"]["device"]]["identity_key_hex"])
    payload = c.decrypt_message(device_keys(device), d["address"], d["device_id"], v["envelope"], sender_key)
    assert payload == v["payload"]


def test_decrypt_ignores_wire_order_of_keys() -> None:
    v = ENVELOPES["three_devices"]
    env = {**v["envelope"], "keys": list(reversed(v["envelope"]["keys"]))}
    sender_key = device_keys("alice-phone").identity_key
    assert c.decrypt_message(device_keys("bob-tablet"), "bob@hilltop", "bob-tablet", env, sender_key) == v["payload"]


NEGATIVE = {n["name"]: n for n in VECTORS["negative"]}


@pytest.mark.parametrize("name", sorted(NEGATIVE))
def test_negative_vector_is_rejected(name: str) -> None:
    n = NEGATIVE[name]
    d = VECTORS["devices"][n["device"]]
    with pytest.raises(ERRORS[n["error"]]) as info:
        c.decrypt_message(device_keys(n["device"]), d["address"], d["device_id"], n["envelope"],
                          h(n["sender_identity_key_hex"]))
    assert info.value.code == n["error"]
    assert isinstance(info.value, c.CryptoError)


def test_negative_vectors_cover_the_brief() -> None:
    needed = {"tampered_body", "tampered_wrapped_key", "wrong_signature", "unknown_version"}
    assert needed <= set(NEGATIVE)
    assert {n["error"] for n in VECTORS["negative"]} >= set(ERRORS) - {"bad_key", "crypto_unavailable"}


@pytest.mark.parametrize("mutate", [
    lambda e: [],
    lambda e: {**e, "v": "1"},
    lambda e: {**e, "v": True},
    lambda e: {k: v for k, v in e.items() if k != "v"},
    lambda e: {**e, "id": ""},
    lambda e: {**e, "sender": 5},
    lambda e: {**e, "keys": []},
    lambda e: {**e, "keys": [{**e["keys"][0], "spk": 2**32}]},
    lambda e: {**e, "keys": [{**e["keys"][0], "spk": 7.0}]},
    lambda e: {**e, "keys": [{**e["keys"][0], "device": None}]},
])
def test_malformed_envelopes(mutate: Any) -> None:
    env = mutate(ENVELOPES["one_recipient"]["envelope"])
    with pytest.raises(c.MalformedEnvelope):
        c.decrypt_message(device_keys("bob-phone"), "bob@hilltop", "bob-phone", env,
                          device_keys("alice-phone").identity_key)


# ------------------------------------------------------------ safety numbers


@pytest.mark.parametrize("vector", VECTORS["safety_numbers"], ids=lambda v: v["name"])
def test_safety_number_vector(vector: dict[str, Any]) -> None:
    a, b = vector["a"], vector["b"]
    keys_a = [h(k) for k in a["identity_keys_hex"]]
    keys_b = [h(k) for k in b["identity_keys_hex"]]
    for side, keys in ((a, keys_a), (b, keys_b)):
        key_bytes = b"".join(sorted(keys))
        assert key_bytes == h(side["sorted_keys_concat_hex"])
        assert h(side["initial_hex"]) == b"\x00\x00" + key_bytes + side["address"].encode()
        assert hashlib.sha512(h(side["initial_hex"]) + key_bytes).digest() == h(side["round_1_hex"])
        assert h(side["round_5200_hex"])[:30] == h(side["first_30_bytes_hex"])
        assert side["chunks"] == [int.from_bytes(h(side["first_30_bytes_hex"])[i:i + 5], "big")
                                  for i in range(0, 30, 5)]
        assert side["fingerprint"] == "".join(f"{x % 100000:05d}" for x in side["chunks"])
        assert c.fingerprint(side["address"], keys) == side["fingerprint"]
        assert c.fingerprint(side["address"], list(reversed(keys))) == side["fingerprint"]
    number = c.safety_number(a["address"], keys_a, b["address"], keys_b)
    assert number == vector["safety_number"] == "".join(sorted([a["fingerprint"], b["fingerprint"]]))
    assert c.safety_number(b["address"], keys_b, a["address"], keys_a) == number
    assert len(number) == 60 and number.isdigit()
    assert c.format_safety_number(number) == vector["display"]
    assert len(vector["display"].split(" ")) == 12


def test_safety_number_changes_with_devices_and_rejects_bad_keys() -> None:
    alice = [device_keys("alice-phone").identity_key]
    carol = [device_keys("carol-desk").identity_key]
    one = c.safety_number("alice@riverside", alice, "carol@meadow", carol)
    two = c.safety_number("alice@riverside", alice + [device_keys("alice-laptop").identity_key],
                          "carol@meadow", carol)
    assert one != two
    for bad in ([], [bytes(31)], alice + alice):
        with pytest.raises(c.InvalidKey):
            c.fingerprint("alice@riverside", bad)
    with pytest.raises(c.MalformedEnvelope):  # a lone surrogate, as the browser refuses it
        c.fingerprint("alice\ud800@riverside", alice)


# ---------------------------------------------------------------- round trips


def test_round_trip_with_random_keys() -> None:
    alice, alice2, bob, bob2 = (c.DeviceKeys.generate(n_one_time=3) for _ in range(4))
    recipients = [
        c.RecipientDevice.from_bundle("bob@hilltop", "b1", bob.public_bundle()),
        c.RecipientDevice.from_bundle("bob@hilltop", "b2", bob2.public_bundle()),
        c.RecipientDevice.from_bundle("alice@riverside", "a2", alice2.public_bundle()),
    ]
    seen_eph = set()
    for size in (0, 1, 30, 31, 32, 100, 1000, 5000):
        payload = {"type": "text", "text": "é" * size + "🙂", "ts": 1_700_000_000_000 + size}
        env = c.encrypt_message(alice, "alice@riverside", "a1", "bob@hilltop", f"m{size}", payload, recipients)
        assert (len(c.b64decode(env["body"])) - 16) % 64 == 0
        seen_eph.add(env["eph"])
        for keys, addr, dev in ((bob, "bob@hilltop", "b1"), (bob2, "bob@hilltop", "b2"),
                                (alice2, "alice@riverside", "a2")):
            assert c.decrypt_message(keys, addr, dev, env, alice.identity_key) == payload
        with pytest.raises(c.NotForThisDevice):
            c.decrypt_message(alice, "alice@riverside", "a1", env, alice.identity_key)
        with pytest.raises(c.BadSignature):
            c.decrypt_message(bob, "bob@hilltop", "b1", env, bob.identity_key)
    assert len(seen_eph) == 8


def test_envelope_survives_json_transport() -> None:
    alice, bob = c.DeviceKeys.generate(n_one_time=0), c.DeviceKeys.generate(n_one_time=0)
    to_bob = c.RecipientDevice.from_bundle("bob@hilltop", "b1", bob.public_bundle())
    env = c.encrypt_message(alice, "alice@riverside", "a1", "bob@hilltop", "m1",
                            {"type": "text", "text": "hi", "ts": 1}, [to_bob])
    wire = json.loads(json.dumps(env))
    assert c.decrypt_message(bob, "bob@hilltop", "b1", wire, alice.identity_key)["text"] == "hi"
    assert c.parse_envelope(wire).to_json() == env


def test_signed_prekey_rotation() -> None:
    alice, bob = c.DeviceKeys.generate(n_one_time=0), c.DeviceKeys.generate(n_one_time=0)
    payload = {"type": "text", "text": "old", "ts": 1}
    old = c.encrypt_message(alice, "a@x", "a1", "b@y", "m1", payload,
                            [c.RecipientDevice.from_bundle("b@y", "b1", bob.public_bundle())])
    new_id = bob.rotate_signed_prekey()
    assert new_id == 2 and bob.public_bundle()["signed_prekey"]["id"] == 2
    assert c.decrypt_message(bob, "b@y", "b1", old, alice.identity_key) == payload
    bob.forget_signed_prekey(1)
    with pytest.raises(c.UnknownPrekey):
        c.decrypt_message(bob, "b@y", "b1", old, alice.identity_key)
    with pytest.raises(ValueError):
        bob.forget_signed_prekey(2)


def test_key_file_round_trip() -> None:
    keys = c.DeviceKeys.generate(n_one_time=5)
    keys.rotate_signed_prekey()
    loaded = c.DeviceKeys.from_json(keys.to_json())
    assert loaded == keys
    assert loaded.public_bundle() == keys.public_bundle()
    bundle = keys.public_bundle()
    assert set(bundle) == {"identity_key", "dh_key", "signed_prekey", "one_time_prekeys"}
    assert set(bundle["signed_prekey"]) == {"id", "key", "sig"}
    assert [o["id"] for o in bundle["one_time_prekeys"]] == [1, 2, 3, 4, 5]
    assert all(set(o) == {"id", "key"} for o in bundle["one_time_prekeys"])
    assert len(c.DeviceKeys.generate().one_time_prekeys) == 20
    assert keys.identity_seed.hex() not in repr(keys) and "identity_seed" not in repr(keys)


@pytest.mark.parametrize("damage", [
    lambda o: "not json",
    lambda o: json.dumps({**o, "format": "other"}),
    lambda o: json.dumps({**o, "identity_seed": o["identity_seed"][:-2]}),
    lambda o: json.dumps({**o, "current_spk_id": "1"}),
    lambda o: json.dumps({**o, "signed_prekeys": o["signed_prekeys"] * 2}),
])
def test_damaged_key_file(damage: Any) -> None:
    text = damage(json.loads(c.DeviceKeys.generate(n_one_time=1).to_json()))
    with pytest.raises(c.CryptoError):
        c.DeviceKeys.from_json(text)


def test_encrypt_rejects_misuse() -> None:
    alice, bob = c.DeviceKeys.generate(n_one_time=0), c.DeviceKeys.generate(n_one_time=0)
    to_bob = c.RecipientDevice.from_bundle("b@y", "b1", bob.public_bundle())
    args = (alice, "a@x", "a1", "b@y", "m1")
    with pytest.raises(ValueError):
        c.encrypt_message(*args, {"type": "text"}, [])
    with pytest.raises(ValueError):
        c.encrypt_message(*args, {"type": "text"}, [to_bob, to_bob])
    with pytest.raises(ValueError):
        c.encrypt_message(*args, ["not", "an", "object"], [to_bob])  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        c.encrypt_message(*args, {"x": float("nan")}, [to_bob])
    with pytest.raises(ValueError):
        c.encrypt_message(alice, "a@x", "", "b@y", "m1", {"type": "text"}, [to_bob])
    with pytest.raises(c.InvalidKey):
        c.encrypt_message(*args, {"type": "text"}, [c.RecipientDevice("b@y", "b1", 1, bytes(32))])
    with pytest.raises(c.InvalidKey):
        c.encrypt_message(*args, {"type": "text"}, [c.RecipientDevice("b@y", "b1", 1, bytes(31))])


def test_error_codes_are_stable_and_distinct() -> None:
    for code, cls in ERRORS.items():
        assert cls.code == code and issubclass(cls, c.CryptoError)
    assert len({cls.code for cls in ERRORS.values()}) == len(ERRORS)


# --------------------------------------------------------------- hygiene

FORBIDDEN = {"trio", "socket", "sqlalchemy", "libp2p", "httpx"}


def test_crypto_module_imports_nothing_with_io() -> None:
    tree = ast.parse(CRYPTO_PY.read_text(encoding="utf-8"))
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add((node.module or "").split(".")[0])
    assert imported <= {"__future__", "base64", "dataclasses", "hashlib", "hmac", "json", "os",
                        "re", "struct", "typing", "nacl", "cryptography"}
    # Loaded on its own (not through cli/__init__), nothing it pulls in may load them.
    probe = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('moot_crypto_probe', {str(CRYPTO_PY)!r})\n"
        "module = importlib.util.module_from_spec(spec)\n"
        "sys.modules[spec.name] = module  # dataclasses look their module up here\n"
        "spec.loader.exec_module(module)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    result = subprocess.run([sys.executable, "-I", "-c", probe], capture_output=True, text=True,
                            check=True, timeout=60)
    loaded = {name.split(".")[0] for name in result.stdout.split()}
    assert not loaded & FORBIDDEN


def test_vector_file_is_what_the_generator_writes() -> None:
    spec = importlib.util.spec_from_file_location("gen_crypto_vectors", ROOT / "tools" / "gen_crypto_vectors.py")
    assert spec and spec.loader
    generator = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(generator)
    assert generator.render() == VECTORS_PATH.read_text(encoding="utf-8")
