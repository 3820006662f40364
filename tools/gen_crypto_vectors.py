"""Regenerate docs/crypto_vectors_v1.json, the shared test vectors of crypto scheme v1.

    python tools/gen_crypto_vectors.py          # rewrite the file
    python tools/gen_crypto_vectors.py --check  # exit 1 if the file is stale

Every input is fixed (private keys are SHA-256 of a label, see ``fixed``) and
Ed25519 signatures are deterministic, so the output is byte-identical on rerun.
Byte values are hex in fields ending ``_hex``; wire objects (bundles, envelopes)
are exactly what travels, with base64url values.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import struct
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cli import crypto as c  # noqa: E402

OUTPUT = ROOT / "docs" / "crypto_vectors_v1.json"


def fixed(label: str, n: int = 32) -> bytes:
    """A fixed 'random' value: the first n bytes of SHA-256(b"moot/v1/test-vector/" + label)."""
    return hashlib.sha256(b"moot/v1/test-vector/" + label.encode()).digest()[:n]


class ScriptedRandom:
    """An rng that hands out given byte strings in order, checking each length."""

    def __init__(self, *values: bytes) -> None:
        self._values = list(values)

    def __call__(self, n: int) -> bytes:
        value = self._values.pop(0)
        if len(value) != n:
            raise ValueError(f"scripted value has {len(value)} bytes, {n} requested")
        return value

    def exhausted(self) -> bool:
        return not self._values


# address, device id, signed prekey id (varied to exercise u32be), label
DEVICES = [
    ("alice@riverside", "alice-phone", 1, "alice-phone"),
    ("alice@riverside", "alice-laptop", 1, "alice-laptop"),
    ("bob@hilltop", "bob-phone", 7, "bob-phone"),
    ("bob@hilltop", "bob-tablet", 0x01020304, "bob-tablet"),
    ("carol@meadow", "carol-desk", 0xFFFFFFFE, "carol-desk"),
]


def device_keys(label: str, spk_id: int) -> c.DeviceKeys:
    return c.DeviceKeys(
        identity_seed=fixed(f"{label}/identity"),
        dh_private=fixed(f"{label}/dh"),
        signed_prekeys={spk_id: fixed(f"{label}/spk/{spk_id}")},
        current_spk_id=spk_id,
        one_time_prekeys={i: fixed(f"{label}/otk/{i}") for i in (1, 2)},
    )


KEYS = {label: device_keys(label, spk_id) for _, _, spk_id, label in DEVICES}
ADDRESS = {label: (address, device) for address, device, _, label in DEVICES}


def recipient(label: str) -> c.RecipientDevice:
    keys = KEYS[label]
    address, device = ADDRESS[label]
    return c.RecipientDevice.from_bundle(address, device, keys.public_bundle())


def device_vector(label: str) -> dict[str, Any]:
    keys = KEYS[label]
    address, device = ADDRESS[label]
    spk_priv = keys.signed_prekeys[keys.current_spk_id]
    spk_pub = c.x25519_public(spk_priv)
    spk_input = c.signed_prekey_input(keys.current_spk_id, spk_pub)
    return {
        "address": address,
        "device_id": device,
        "identity_seed_hex": keys.identity_seed.hex(),
        "identity_key_hex": keys.identity_key.hex(),
        "dh_private_hex": keys.dh_private.hex(),
        "dh_key_hex": keys.dh_key.hex(),
        "signed_prekey": {
            "id": keys.current_spk_id,
            "private_hex": spk_priv.hex(),
            "public_hex": spk_pub.hex(),
            "sig_input_hex": spk_input.hex(),
            "sig_hex": keys.sign(spk_input).hex(),
        },
        "one_time_prekeys": [
            {"id": i, "private_hex": k.hex(), "public_hex": c.x25519_public(k).hex()}
            for i, k in sorted(keys.one_time_prekeys.items())
        ],
        "public_bundle": keys.public_bundle(),
    }


def hkdf_vector(name: str, ikm: bytes, salt: bytes, info: bytes, length: int) -> dict[str, Any]:
    return {
        "name": name,
        "ikm_hex": ikm.hex(),
        "salt_hex": salt.hex(),
        "info_hex": info.hex(),
        "length": length,
        "prk_hex": c.hkdf_extract(salt, ikm).hex(),
        "okm_hex": c.hkdf_sha256(ikm, salt, info, length).hex(),
    }


def wrap_steps(eph_priv: bytes, r: c.RecipientDevice, spk_priv: bytes, aad: bytes,
               content_key: bytes) -> dict[str, Any]:
    eph_pub = c.x25519_public(eph_priv)
    shared = c.x25519(eph_priv, r.spk_pub)
    assert shared == c.x25519(spk_priv, eph_pub)  # both sides agree
    salt = eph_pub + r.spk_pub
    info = c.wrap_key_info(r.address, r.device_id)
    wrap_key = c.derive_wrap_key(shared, eph_pub, r.spk_pub, r.address, r.device_id)
    return {
        "to": r.address,
        "device": r.device_id,
        "spk": r.spk_id,
        "spk_public_hex": r.spk_pub.hex(),
        "shared_secret_hex": shared.hex(),
        "hkdf_salt_hex": salt.hex(),
        "hkdf_info_hex": info.hex(),
        "hkdf_prk_hex": c.hkdf_extract(salt, shared).hex(),
        "wrap_key_hex": wrap_key.hex(),
        "wrap_nonce_hex": c.WRAP_NONCE.hex(),
        "key_aad_hex": aad.hex(),
        "wrapped_hex": c.aes256gcm_encrypt(wrap_key, c.WRAP_NONCE, content_key, aad).hex(),
    }


def envelope_vector(name: str, description: str, sender: str, conversation: str,
                    message_id: str, payload: dict[str, Any], recipients: list[str]) -> dict[str, Any]:
    eph_priv = fixed(f"{name}/ephemeral")
    content_key = fixed(f"{name}/content-key")
    nonce = fixed(f"{name}/nonce", c.NONCE_LEN)
    address, device = ADDRESS[sender]
    rng = ScriptedRandom(eph_priv, content_key, nonce)
    wire = c.encrypt_message(KEYS[sender], address, device, conversation, message_id, payload,
                             [recipient(label) for label in recipients], rng=rng)
    assert rng.exhausted()
    env = c.parse_envelope(wire)
    plaintext = c.encode_payload(payload)
    keys = [wrap_steps(eph_priv, recipient(label),
                       KEYS[label].signed_prekeys[KEYS[label].current_spk_id],
                       env.key_aad(), content_key) for label in recipients]
    for step, entry in zip(keys, env.keys):
        assert step["wrapped_hex"] == entry.wrapped.hex()
    return {
        "name": name,
        "description": description,
        "sender": {"address": address, "device_id": device, "device": sender},
        "conversation": conversation,
        "message_id": message_id,
        "payload": payload,
        "recipients": [{"address": ADDRESS[label][0], "device_id": ADDRESS[label][1],
                        "device": label} for label in recipients],
        "random": {
            "eph_private_hex": eph_priv.hex(),
            "content_key_hex": content_key.hex(),
            "nonce_hex": nonce.hex(),
        },
        "steps": {
            "plaintext_json": plaintext.decode("utf-8"),
            "plaintext_json_hex": plaintext.hex(),
            "padded_plaintext_hex": c.pad(plaintext).hex(),
            "eph_public_hex": env.eph.hex(),
            "body_aad_hex": env.body_aad().hex(),
            "body_hex": env.body.hex(),
            "key_aad_hex": env.key_aad().hex(),
            "keys": keys,
            "signed_key_order": [[k.to, k.device] for k in sorted(env.keys, key=c.KeyEntry.sort_key)],
            "sig_input_hex": env.signature_input().hex(),
            "sig_hex": env.sig.hex(),
        },
        "envelope": wire,
    }


def resign(env: c.Envelope, signer: str) -> dict[str, Any]:
    return dataclasses.replace(env, sig=KEYS[signer].sign(env.signature_input())).to_json()


def flip_bit(data: bytes, index: int) -> bytes:
    return data[:index] + bytes([data[index] ^ 0x01]) + data[index + 1:]


def negative_vectors(one: dict[str, Any], three: dict[str, Any]) -> list[dict[str, Any]]:
    env1 = c.parse_envelope(one["envelope"])
    env3 = c.parse_envelope(three["envelope"])
    sender_key = KEYS["alice-phone"].identity_key.hex()
    out: list[dict[str, Any]] = []

    def add(name: str, description: str, envelope: dict[str, Any], error: str,
            device: str = "bob-phone", sender_identity_key_hex: str = sender_key) -> None:
        out.append({"name": name, "description": description, "device": device,
                    "sender_identity_key_hex": sender_identity_key_hex,
                    "envelope": envelope, "error": error})

    add("tampered_body", "one bit of the body flipped; signature left as it was",
        dataclasses.replace(env1, body=flip_bit(env1.body, 0)).to_json(), "bad_signature")
    add("tampered_body_resigned",
        "one bit of the body flipped, then re-signed by the sender: the body's GCM tag fails",
        resign(dataclasses.replace(env1, body=flip_bit(env1.body, 0)), "alice-phone"),
        "decryption_failed")
    entry = env1.keys[0]
    tampered_keys = (dataclasses.replace(entry, wrapped=flip_bit(entry.wrapped, 5)),)
    add("tampered_wrapped_key", "one bit of bob-phone's wrapped key flipped; signature left as it was",
        dataclasses.replace(env1, keys=tampered_keys).to_json(), "bad_signature")
    add("tampered_wrapped_key_resigned",
        "one bit of bob-phone's wrapped key flipped, then re-signed: the wrap's GCM tag fails",
        resign(dataclasses.replace(env1, keys=tampered_keys), "alice-phone"), "decryption_failed")
    add("wrong_signature", "signed over the correct input, but by carol-desk's identity key",
        resign(env1, "carol-desk"), "bad_signature")
    add("wrong_sender_key", "a valid envelope checked against carol-desk's identity key",
        one["envelope"], "bad_signature",
        sender_identity_key_hex=KEYS["carol-desk"].identity_key.hex())
    add("unknown_version", "v is 2: rejected before anything else is looked at",
        {**one["envelope"], "v": 2}, "unsupported_version")
    add("conversation_changed_resigned",
        "conversation changed to carol@meadow, re-signed: the body AAD no longer matches",
        resign(dataclasses.replace(env1, conversation="carol@meadow"), "alice-phone"),
        "decryption_failed")
    add("message_id_changed_resigned",
        "message id changed, re-signed: the key AAD no longer matches, so the unwrap fails",
        resign(dataclasses.replace(env1, id=env1.id + "X"), "alice-phone"), "decryption_failed")
    by_device = {k.device: k for k in env3.keys}
    swapped = tuple(
        dataclasses.replace(k, wrapped=by_device["bob-tablet"].wrapped) if k.device == "bob-phone"
        else dataclasses.replace(k, wrapped=by_device["bob-phone"].wrapped) if k.device == "bob-tablet"
        else k for k in env3.keys)
    add("wrapped_keys_swapped_resigned",
        "the 3-device envelope with bob-phone's and bob-tablet's wrapped keys exchanged, "
        "re-signed: the wrap key is bound to (to, device), so the unwrap fails",
        resign(dataclasses.replace(env3, keys=swapped), "alice-phone"), "decryption_failed")
    add("not_for_this_device", "the 1-recipient envelope opened by bob-tablet",
        one["envelope"], "not_for_this_device", device="bob-tablet")
    add("unknown_prekey_resigned", "bob-phone's entry names signed prekey 99, re-signed",
        resign(dataclasses.replace(env1, keys=(dataclasses.replace(entry, spk=99),)), "alice-phone"),
        "unknown_prekey")
    add("low_order_ephemeral_resigned",
        "eph is the all-zero point (low order; the X25519 result is all zero), re-signed",
        resign(dataclasses.replace(env1, eph=bytes(32)), "alice-phone"), "decryption_failed")

    # A body that decrypts but whose padding is wrong: the JSON followed by zeros only.
    content_key = bytes.fromhex(one["random"]["content_key_hex"])
    plaintext = bytes.fromhex(one["steps"]["plaintext_json_hex"])
    bad_padded = plaintext + bytes(-len(plaintext) % c.PAD_BLOCK or c.PAD_BLOCK)
    bad_body = c.aes256gcm_encrypt(content_key, env1.nonce, bad_padded, env1.body_aad())
    add("bad_padding_resigned",
        "the body encrypts the JSON followed by zero bytes without the 0x80 marker "
        f"(padded plaintext {bad_padded.hex()}), re-signed",
        resign(dataclasses.replace(env1, body=bad_body), "alice-phone"), "bad_plaintext")

    add("padded_base64", "eph carries '=' padding", {**one["envelope"], "eph": one["envelope"]["eph"] + "="},
        "bad_encoding")
    add("non_canonical_base64",
        "eph (32 bytes, 43 characters) with one of the 2 unused trailing bits of its last "
        "character set: it would decode to the same bytes, but only the canonical form is valid",
        {**one["envelope"], "eph": non_canonical(one["envelope"]["eph"])}, "bad_encoding")
    field_name, text = next((f, one["envelope"][f]) for f in ("eph", "sig", "body", "nonce")
                            if "-" in one["envelope"][f] or "_" in one["envelope"][f])
    add("standard_alphabet_base64", f"{field_name} written with '+' and '/' instead of '-' and '_'",
        {**one["envelope"], field_name: text.replace("-", "+").replace("_", "/")}, "bad_encoding")
    add("short_eph", "eph decodes to 31 bytes", {**one["envelope"], "eph": c.b64encode(env1.eph[:31])},
        "bad_encoding")
    add("body_not_bucketed", "body one byte short of 16 + a multiple of 64",
        {**one["envelope"], "body": c.b64encode(env1.body[:-1])}, "bad_envelope")
    add("duplicate_key_entry", "the key entry listed twice",
        {**one["envelope"], "keys": one["envelope"]["keys"] * 2}, "bad_envelope")
    add("missing_sender_device", "sender_device absent",
        {k: v for k, v in one["envelope"].items() if k != "sender_device"}, "bad_envelope")
    return out


def non_canonical(text: str) -> str:
    """Set the lowest unused bit of a base64url string whose last character has spare bits."""
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    assert len(text) % 4 in (2, 3), "this length has no spare bits"
    return text[:-1] + alphabet[alphabet.index(text[-1]) ^ 1]


def safety_side(address: str, labels: list[str]) -> dict[str, Any]:
    keys = [KEYS[label].identity_key for label in labels]
    key_bytes = b"".join(sorted(keys))
    h0 = struct.pack(">H", 0) + key_bytes + address.encode()
    h1 = hashlib.sha512(h0 + key_bytes).digest()
    digest = h0
    for _ in range(5200):  # written out again here so the vector does not just echo cli.crypto
        digest = hashlib.sha512(digest + key_bytes).digest()
    chunks = [int.from_bytes(digest[i:i + 5], "big") for i in range(0, 30, 5)]
    assert c.fingerprint(address, keys) == "".join(f"{n % 100000:05d}" for n in chunks)
    return {
        "address": address,
        "devices": labels,
        "identity_keys_hex": [k.hex() for k in keys],
        "sorted_keys_concat_hex": key_bytes.hex(),
        "initial_hex": h0.hex(),
        "round_1_hex": h1.hex(),
        "round_5200_hex": digest.hex(),
        "first_30_bytes_hex": digest[:30].hex(),
        "chunks": chunks,
        "fingerprint": c.fingerprint(address, keys),
    }


def safety_vector(name: str, a: tuple[str, list[str]], b: tuple[str, list[str]]) -> dict[str, Any]:
    side_a, side_b = safety_side(*a), safety_side(*b)
    number = c.safety_number(a[0], [KEYS[x].identity_key for x in a[1]],
                             b[0], [KEYS[x].identity_key for x in b[1]])
    return {"name": name, "a": side_a, "b": side_b, "safety_number": number,
            "display": c.format_safety_number(number)}


def build_vectors() -> dict[str, Any]:
    """All vectors as one JSON-ready dict (deterministic)."""
    one = envelope_vector(
        "one_recipient", "alice-phone writes to bob@hilltop, encrypted to bob-phone only",
        "alice-phone", "bob@hilltop", "01JGZ0MOOT0000000000000001",
        {"type": "text", "text": "Hello Bob", "ts": 1767225600000}, ["bob-phone"])
    three = envelope_vector(
        "three_devices",
        "alice-phone writes to bob@hilltop, encrypted to bob-phone, bob-tablet and "
        "alice-laptop (listed in that order, so the wire order differs from the signed order)",
        "alice-phone", "bob@hilltop", "01JGZ0MOOT0000000000000002",
        {"type": "text", "text": "Grüße aus Riverside 👋 — see you at the bridge at five?",
         "ts": 1767225660000},
        ["bob-phone", "bob-tablet", "alice-laptop"])
    wrap_example = one["steps"]["keys"][0]
    padding = [{"input_hex": data.hex(), "padded_hex": c.pad(data).hex()}
               for data in (b"", b"{}", bytes(range(1, 64)), bytes(range(1, 65)))]
    return {
        "scheme": "moot e2e v1",
        "spec": "docs/crypto.md",
        "generator": "tools/gen_crypto_vectors.py",
        "conventions": (
            "Fields ending _hex are lowercase hex. Objects under 'envelope' and "
            "'public_bundle' are the wire form: byte values in base64url without "
            "padding. Fixed private keys and random values are SHA-256(\"moot/v1/test-vector/\" "
            "|| label), truncated for the 12-byte nonces."),
        "primitives": {
            "x25519_rfc7748": {
                "a_private_hex": "77076d0a7318a57d3c16c17251b26645df4c2f87ebc0992ab177fba51db92c2a",
                "a_public_hex": "8520f0098930a754748b7ddcb43ef75a0dbf3a0d26381af4eba4a98eaa9b4e6a",
                "b_private_hex": "5dab087e624a8a4b79e17f8b83800ee66f3bb1292618b6fd1c2f8b27ff88e0eb",
                "b_public_hex": "de9edb7d7b7dc1b4d35b61c2ece435373f8343c85b78674dadfc7e146f882b4f",
                "shared_hex": "4a5d9d5ba4ce2de1728e3bf480350f25e07e21c947d19e3376f09b3c1e161742",
            },
            "ed25519_rfc8032_test1": {
                "seed_hex": "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60",
                "public_hex": "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a",
                "message_hex": "",
                "sig_hex": "e5564300c360ac729086e2cc806e828a84877f1eb8e5d974d873e065224901555fb8821590a33bacc61e39701cf9b46bd25bf5f0595bbe24655141438e7a100b",
            },
            "aes256gcm": [
                {"name": "gcm_spec_test_case_14", "key_hex": "00" * 32, "nonce_hex": "00" * 12,
                 "plaintext_hex": "00" * 16, "aad_hex": "",
                 "sealed_hex": c.aes256gcm_encrypt(bytes(32), bytes(12), bytes(16), b"").hex()},
            ],
            "hkdf_sha256": [
                hkdf_vector("rfc5869_test_case_1", bytes([0x0B] * 22), bytes(range(13)),
                            bytes(range(0xF0, 0xFA)), 42),
                hkdf_vector("moot_wrap_key_one_recipient",
                            bytes.fromhex(wrap_example["shared_secret_hex"]),
                            bytes.fromhex(wrap_example["hkdf_salt_hex"]),
                            bytes.fromhex(wrap_example["hkdf_info_hex"]), 32),
            ],
            "base64url": [{"bytes_hex": data.hex(), "text": c.b64encode(data)}
                          for data in (b"", b"\xfb", b"\xfb\xff", b"\xfb\xff\xbf", bytes(range(250, 256)))],
            "base64url_invalid": ["A", "AB==", "AB=", "AB", "+w", "/w", "-w==", "Zm9v YmFy", "Zm9v\n"],
            "length_prefix": [{"string": s, "lp_hex": c.lp(s).hex()} for s in ("", "bob@hilltop", "Grüße")],
            "padding": padding,
        },
        "devices": {label: device_vector(label) for _, _, _, label in DEVICES},
        "signed_prekey": {"device": "alice-phone", **device_vector("alice-phone")["signed_prekey"],
                          "identity_key_hex": KEYS["alice-phone"].identity_key.hex()},
        "wrap_key": {"description": "the wrap key for bob-phone in envelope one_recipient",
                     "eph_private_hex": one["random"]["eph_private_hex"],
                     "eph_public_hex": one["steps"]["eph_public_hex"],
                     "spk_private_hex": KEYS["bob-phone"].signed_prekeys[7].hex(),
                     **wrap_example},
        "envelopes": [one, three],
        "safety_numbers": [
            safety_vector("alice_2_devices_carol_1_device",
                          ("alice@riverside", ["alice-phone", "alice-laptop"]),
                          ("carol@meadow", ["carol-desk"])),
            safety_vector("alice_2_devices_bob_2_devices",
                          ("alice@riverside", ["alice-laptop", "alice-phone"]),
                          ("bob@hilltop", ["bob-phone", "bob-tablet"])),
        ],
        "negative": negative_vectors(one, three),
    }


def render() -> str:
    return json.dumps(build_vectors(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run tools/gen_crypto_vectors.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
