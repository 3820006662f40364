"""Crypto scheme v1 in the browser: web/static/js/crypto.js inside a real Chromium.

web/static is served over a throwaway HTTP server on 127.0.0.1 (a secure context,
so WebCrypto works; module scripts need http). Chromium runs through Playwright's
sync API with the system binary. Every vector in docs/crypto_vectors_v1.json is
checked in the page and reported under its own test id; two more tests pass
envelopes between the Python implementation (cli/crypto.py) and the JS one.
"""

from __future__ import annotations

import functools
import http.server
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cli import crypto as c
from tests.browser import chromium

ROOT = Path(__file__).resolve().parent.parent
STATIC = ROOT / "web" / "static"
VECTORS: dict[str, Any] = json.loads((ROOT / "docs" / "crypto_vectors_v1.json").read_text(encoding="utf-8"))
TIMEOUT_MS = 60_000


def vector_names() -> list[str]:
    """The id of every vector, in the same scheme as RUNNER_JS below."""
    p = VECTORS["primitives"]
    names = ["primitives.x25519_rfc7748", "primitives.ed25519_rfc8032_test1"]
    names += [f"primitives.aes256gcm.{v['name']}" for v in p["aes256gcm"]]
    names += [f"primitives.hkdf_sha256.{v['name']}" for v in p["hkdf_sha256"]]
    for group in ("base64url", "base64url_invalid", "length_prefix", "padding"):
        names += [f"primitives.{group}[{i}]" for i in range(len(p[group]))]
    names += [f"devices.{label}" for label in VECTORS["devices"]]
    names += ["signed_prekey", "wrap_key"]
    names += [f"envelopes.{v['name']}" for v in VECTORS["envelopes"]]
    names += [f"safety_numbers.{v['name']}" for v in VECTORS["safety_numbers"]]
    names += [f"negative.{v['name']}" for v in VECTORS["negative"]]
    return names


# Runs in the page: checks every vector, returns {name: null | "failure text"}.
RUNNER_JS = r"""
async (V) => {
  const m = await import('/js/crypto.js');
  const H = m.hexToBytes, X = m.bytesToHex;
  const results = {};
  const canon = (x) => JSON.stringify(x, (k, v) =>
    v && typeof v === 'object' && !Array.isArray(v)
      ? Object.fromEntries(Object.keys(v).sort().map((key) => [key, v[key]])) : v);
  const eq = (what, got, want) => {
    if (got instanceof Uint8Array) got = X(got);
    if (typeof got !== 'string' || typeof want !== 'string') { got = canon(got); want = canon(want); }
    if (got !== want) throw new Error(`${what}: got ${got}, want ${want}`);
  };
  const code = async (f) => {
    try { await f(); return 'no error'; }
    catch (e) { return e instanceof m.CryptoError ? e.code : `${e.name}: ${e.message}`; }
  };
  const check = async (name, f) => {
    try { await f(); results[name] = null; }
    catch (e) { results[name] = `${e.name}: ${e.message}`; }
  };
  const p = V.primitives;

  await check('primitives.x25519_rfc7748', async () => {
    const t = p.x25519_rfc7748;
    eq('a_public', await m.x25519Public(H(t.a_private_hex)), t.a_public_hex);
    eq('b_public', await m.x25519Public(H(t.b_private_hex)), t.b_public_hex);
    eq('shared ab', await m.x25519(H(t.a_private_hex), H(t.b_public_hex)), t.shared_hex);
    eq('shared ba', await m.x25519(H(t.b_private_hex), H(t.a_public_hex)), t.shared_hex);
    eq('low order', await code(() => m.x25519(H(t.a_private_hex), new Uint8Array(32))), 'bad_key');
  });
  await check('primitives.ed25519_rfc8032_test1', async () => {
    const t = p.ed25519_rfc8032_test1;
    eq('public', await m.ed25519Public(H(t.seed_hex)), t.public_hex);
    eq('sig', await m.ed25519Sign(H(t.seed_hex), H(t.message_hex)), t.sig_hex);
    eq('verify', await m.ed25519Verify(H(t.public_hex), H(t.message_hex), H(t.sig_hex)), true);
    const bad = H(t.sig_hex); bad[0] ^= 1;
    eq('verify tampered', await m.ed25519Verify(H(t.public_hex), H(t.message_hex), bad), false);
  });
  for (const t of p.aes256gcm) await check(`primitives.aes256gcm.${t.name}`, async () => {
    eq('sealed', await m.aes256gcmEncrypt(H(t.key_hex), H(t.nonce_hex), H(t.plaintext_hex), H(t.aad_hex)), t.sealed_hex);
    eq('opened', await m.aes256gcmDecrypt(H(t.key_hex), H(t.nonce_hex), H(t.sealed_hex), H(t.aad_hex)), t.plaintext_hex);
    const bad = H(t.sealed_hex); bad[bad.length - 1] ^= 1;
    eq('tampered', await code(() => m.aes256gcmDecrypt(H(t.key_hex), H(t.nonce_hex), bad, H(t.aad_hex))), 'decryption_failed');
  });
  for (const t of p.hkdf_sha256) await check(`primitives.hkdf_sha256.${t.name}`, async () => {
    eq('prk', await m.hkdfExtract(H(t.salt_hex), H(t.ikm_hex)), t.prk_hex);
    eq('okm', await m.hkdfSha256(H(t.ikm_hex), H(t.salt_hex), H(t.info_hex), t.length), t.okm_hex);
  });
  for (const [i, t] of p.base64url.entries()) await check(`primitives.base64url[${i}]`, async () => {
    eq('encode', m.b64encode(H(t.bytes_hex)), t.text);
    eq('decode', m.b64decode(t.text), t.bytes_hex);
    eq('length', m.b64decode(t.text, { length: t.bytes_hex.length / 2 }), t.bytes_hex);
    eq('wrong length', await code(() => m.b64decode(t.text, { length: t.bytes_hex.length / 2 + 1 })), 'bad_encoding');
  });
  for (const [i, t] of p.base64url_invalid.entries()) await check(`primitives.base64url_invalid[${i}]`, async () => {
    eq(`decode ${JSON.stringify(t)}`, await code(() => m.b64decode(t)), 'bad_encoding');
  });
  for (const [i, t] of p.length_prefix.entries()) await check(`primitives.length_prefix[${i}]`, async () => {
    eq('lp', m.lp(t.string), t.lp_hex);
  });
  for (const [i, t] of p.padding.entries()) await check(`primitives.padding[${i}]`, async () => {
    eq('pad', m.pad(H(t.input_hex)), t.padded_hex);
    eq('unpad', m.unpad(H(t.padded_hex)), t.input_hex);
  });

  // Device keys, imported from the vectors' raw private keys.
  const keys = {};
  const loadDevice = async (d) => m.DeviceKeys.fromRaw({
    identitySeed: H(d.identity_seed_hex), dhPrivate: H(d.dh_private_hex),
    signedPrekeys: new Map([[d.signed_prekey.id, H(d.signed_prekey.private_hex)]]),
    currentSpkId: d.signed_prekey.id,
    oneTimePrekeys: new Map(d.one_time_prekeys.map((o) => [o.id, H(o.private_hex)])),
  });
  for (const [label, d] of Object.entries(V.devices)) {
    await check(`devices.${label}`, async () => {
      const k = keys[label] = await loadDevice(d);
      eq('identity_key', k.identityKey, d.identity_key_hex);
      eq('dh_key', k.dhKey, d.dh_key_hex);
      const spk = d.signed_prekey;
      eq('spk public', k.signedPrekeys.get(spk.id).publicKey, spk.public_hex);
      eq('spk sig_input', m.signedPrekeyInput(spk.id, H(spk.public_hex)), spk.sig_input_hex);
      eq('spk sig', await k.sign(H(spk.sig_input_hex)), spk.sig_hex);
      for (const o of d.one_time_prekeys) eq(`otk ${o.id}`, k.oneTimePrekeys.get(o.id).publicKey, o.public_hex);
      eq('public_bundle', await k.publicBundle(), d.public_bundle);
      const parsed = await m.parsePublicBundle(d.public_bundle);
      eq('parsed spk', parsed.spkPub, spk.public_hex);
      const forged = structuredClone(d.public_bundle);
      forged.signed_prekey.id += 1;
      eq('forged bundle', await code(() => m.parsePublicBundle(forged)), 'bad_signature');
    });
  }
  await check('signed_prekey', async () => {
    const t = V.signed_prekey;
    eq('sig_input', m.signedPrekeyInput(t.id, H(t.public_hex)), t.sig_input_hex);
    eq('public', await m.x25519Public(H(t.private_hex)), t.public_hex);
    eq('sig', await m.ed25519Sign(H(V.devices[t.device].identity_seed_hex), H(t.sig_input_hex)), t.sig_hex);
    eq('verify', await m.verifySignedPrekey(H(t.identity_key_hex), t.id, H(t.public_hex), H(t.sig_hex)), true);
    eq('verify other id', await m.verifySignedPrekey(H(t.identity_key_hex), t.id + 1, H(t.public_hex), H(t.sig_hex)), false);
  });
  await check('wrap_key', async () => {
    const t = V.wrap_key;
    eq('eph_public', await m.x25519Public(H(t.eph_private_hex)), t.eph_public_hex);
    eq('shared (sender)', await m.x25519(H(t.eph_private_hex), H(t.spk_public_hex)), t.shared_secret_hex);
    eq('shared (receiver)', await m.x25519(H(t.spk_private_hex), H(t.eph_public_hex)), t.shared_secret_hex);
    eq('salt', m.concat(H(t.eph_public_hex), H(t.spk_public_hex)), t.hkdf_salt_hex);
    eq('info', m.wrapKeyInfo(t.to, t.device), t.hkdf_info_hex);
    eq('prk', await m.hkdfExtract(H(t.hkdf_salt_hex), H(t.shared_secret_hex)), t.hkdf_prk_hex);
    eq('wrap_key', await m.deriveWrapKey(H(t.shared_secret_hex), H(t.eph_public_hex), H(t.spk_public_hex), t.to, t.device), t.wrap_key_hex);
    eq('wrapped', await m.aes256gcmEncrypt(H(t.wrap_key_hex), H(t.wrap_nonce_hex), H(V.envelopes[0].random.content_key_hex), H(t.key_aad_hex)), t.wrapped_hex);
  });

  for (const t of V.envelopes) await check(`envelopes.${t.name}`, async () => {
    const s = t.steps;
    eq('plaintext_json', X(m.encodePayload(t.payload)), s.plaintext_json_hex);
    eq('padded', m.pad(m.encodePayload(t.payload)), s.padded_plaintext_hex);
    eq('body_aad', m.bodyAad(t.message_id, t.sender.address, t.sender.device_id, t.conversation), s.body_aad_hex);
    eq('key_aad', m.keyAad(t.message_id, t.sender.address, t.sender.device_id), s.key_aad_hex);
    for (const k of s.keys) {
      eq(`info ${k.device}`, m.wrapKeyInfo(k.to, k.device), k.hkdf_info_hex);
      eq(`shared ${k.device}`, await m.x25519(H(t.random.eph_private_hex), H(k.spk_public_hex)), k.shared_secret_hex);
      eq(`wrap_key ${k.device}`, await m.hkdfSha256(H(k.shared_secret_hex), H(k.hkdf_salt_hex), H(k.hkdf_info_hex), 32), k.wrap_key_hex);
    }
    const script = [H(t.random.eph_private_hex), H(t.random.content_key_hex), H(t.random.nonce_hex)];
    const rng = (n) => {
      const v = script.shift();
      if (!v || v.length !== n) throw new Error(`scripted rng: ${n} bytes requested`);
      return v;
    };
    const recipients = [];
    for (const r of t.recipients) recipients.push(await m.recipientFromBundle(r.address, r.device_id, V.devices[r.device].public_bundle));
    const wire = await m.encryptMessage(keys[t.sender.device], t.sender.address, t.sender.device_id,
      t.conversation, t.message_id, t.payload, recipients, { rng });
    eq('rng exhausted', script.length, 0);
    eq('envelope', wire, t.envelope);
    eq('envelope wire key order', JSON.stringify(wire.keys.map((k) => k.device)), JSON.stringify(t.envelope.keys.map((k) => k.device)));
    const env = m.parseEnvelope(t.envelope);
    eq('eph', env.eph, s.eph_public_hex);
    eq('body', env.body, s.body_hex);
    eq('signed_key_order', m.sortKeyEntries(env.keys).map((k) => [k.to, k.device]), s.signed_key_order);
    eq('sig_input', m.signatureInput(env), s.sig_input_hex);
    eq('sig', env.sig, s.sig_hex);
    for (const [i, k] of s.keys.entries()) eq(`wrapped ${k.device}`, env.keys[i].wrapped, k.wrapped_hex);
    const senderKey = H(V.devices[t.sender.device].identity_key_hex);
    for (const r of t.recipients) {
      const got = await m.decryptMessage(keys[r.device], r.address, r.device_id, t.envelope, senderKey);
      eq(`decrypt on ${r.device}`, got, t.payload);
    }
  });

  for (const t of V.safety_numbers) await check(`safety_numbers.${t.name}`, async () => {
    for (const side of [t.a, t.b]) {
      const ks = side.identity_keys_hex.map(H);
      eq(`fingerprint ${side.address}`, await m.fingerprint(side.address, ks), side.fingerprint);
      eq(`fingerprint ${side.address} reversed`, await m.fingerprint(side.address, [...ks].reverse()), side.fingerprint);
    }
    const a = t.a.identity_keys_hex.map(H), b = t.b.identity_keys_hex.map(H);
    eq('safety_number', await m.safetyNumber(t.a.address, a, t.b.address, b), t.safety_number);
    eq('safety_number swapped', await m.safetyNumber(t.b.address, b, t.a.address, a), t.safety_number);
    eq('display', m.formatSafetyNumber(t.safety_number), t.display);
    eq('duplicate key', await code(() => m.fingerprint(t.a.address, [a[0], a[0]])), 'bad_key');
  });

  for (const t of V.negative) await check(`negative.${t.name}`, async () => {
    const d = V.devices[t.device];
    eq('error', await code(() => m.decryptMessage(keys[t.device], d.address, d.device_id, t.envelope,
      H(t.sender_identity_key_hex))), t.error);
  });
  return results;
}
"""


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
        pass


@pytest.fixture(scope="module")
def static_origin() -> Iterator[str]:
    """http://127.0.0.1:<port> serving web/static."""
    handler = functools.partial(_QuietHandler, directory=str(STATIC))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def page(static_origin: str) -> Iterator[Any]:
    """A Chromium page on the static origin, with the module importable."""
    with chromium() as browser:
        pg = browser.new_page()
        pg.set_default_timeout(TIMEOUT_MS)
        pg.goto(static_origin + "/", timeout=TIMEOUT_MS)
        assert pg.evaluate("window.isSecureContext") is True
        assert pg.evaluate("async () => typeof (await import('/js/crypto.js')).decryptMessage") == "function"
        yield pg


@pytest.fixture(scope="module")
def vector_results(page: Any) -> dict[str, str | None]:
    return page.evaluate(RUNNER_JS, VECTORS)


def test_every_vector_is_checked(vector_results: dict[str, str | None]) -> None:
    assert sorted(vector_results) == sorted(vector_names())


@pytest.mark.parametrize("name", vector_names())
def test_vector(vector_results: dict[str, str | None], name: str) -> None:
    assert name in vector_results, f"vector {name} was not run in the browser"
    failure = vector_results[name]
    assert failure is None, f"vector {name} failed in the browser: {failure}"


PAYLOAD = {"type": "text", "text": "Grüße 👋 from the other side \u2028 \"quoted\"", "ts": 1767225600123}


def test_python_to_js_and_back(page: Any) -> None:
    """Python encrypts to keys loaded in JS from a Python key file, and the reverse."""
    alice, bob_phone, bob_tablet = c.DeviceKeys.generate(3), c.DeviceKeys.generate(3), c.DeviceKeys.generate(3)
    to_bob = [c.RecipientDevice.from_bundle("bob@hilltop", "bob-phone", bob_phone.public_bundle()),
              c.RecipientDevice.from_bundle("bob@hilltop", "bob-tablet", bob_tablet.public_bundle())]
    py_envelope = c.encrypt_message(alice, "alice@riverside", "alice-phone", "bob@hilltop",
                                    "py-msg-1", PAYLOAD, to_bob)
    out = page.evaluate(
        """async ([bobFile, aliceFile, aliceKey, env, bobBundle]) => {
          const m = await import('/js/crypto.js');
          const bob = await m.DeviceKeys.fromJSON(bobFile, { extractable: true });
          const alice = await m.DeviceKeys.fromJSON(aliceFile);
          const fromPython = await m.decryptMessage(bob, 'bob@hilltop', 'bob-tablet', env, m.b64decode(aliceKey));
          const keyFile = JSON.parse(await bob.toJSON());
          const r = await m.recipientFromBundle('bob@hilltop', 'bob-tablet', bobBundle);
          const fromJs = await m.encryptMessage(alice, 'alice@riverside', 'alice-phone', 'bob@hilltop',
            'js-msg-1', fromPython, [r]);
          return { fromPython, keyFile, fromJs };
        }""",
        [bob_tablet.to_json(), alice.to_json(), c.b64encode(alice.identity_key), py_envelope,
         bob_tablet.public_bundle()])
    assert out["fromPython"] == PAYLOAD
    assert out["keyFile"] == json.loads(bob_tablet.to_json())
    assert c.decrypt_message(bob_tablet, "bob@hilltop", "bob-tablet", out["fromJs"],
                             alice.identity_key) == PAYLOAD


def test_browser_generated_keys_round_trip(page: Any) -> None:
    """Non-extractable keys made in the browser: JS -> Python and Python -> JS."""
    bob = c.DeviceKeys.generate(2)
    first = page.evaluate(
        """async (bobBundle) => {
          const m = await import('/js/crypto.js');
          const me = await m.DeviceKeys.generate({ nOneTime: 2 });
          globalThis.__mootTestKeys = me;
          const extractable = me.identity.extractable || me.signedPrekeys.get(1).privateKey.extractable;
          const recipients = [await m.recipientFromBundle('bob@hilltop', 'bob-phone', bobBundle),
                              m.recipientDevice('alice@riverside', 'alice-phone', 1, me.signedPrekeys.get(1).publicKey)];
          const payload = { type: 'text', text: 'from the browser ✓', ts: 1767225600999 };
          const env = await m.encryptMessage(me, 'alice@riverside', 'alice-laptop', 'bob@hilltop',
            'js-msg-2', payload, recipients);
          return { bundle: await me.publicBundle(), env, extractable, payload };
        }""",
        bob.public_bundle())
    assert first["extractable"] is False
    js_bundle = c.parse_public_bundle(first["bundle"])  # verifies the JS prekey signature
    assert c.decrypt_message(bob, "bob@hilltop", "bob-phone", first["env"],
                             js_bundle.identity_key) == first["payload"]
    with pytest.raises(c.NotForThisDevice):
        c.decrypt_message(bob, "bob@hilltop", "bob-tablet", first["env"], js_bundle.identity_key)

    to_js = c.RecipientDevice.from_bundle("alice@riverside", "alice-laptop", first["bundle"])
    py_envelope = c.encrypt_message(bob, "bob@hilltop", "bob-phone", "alice@riverside",
                                    "py-msg-2", PAYLOAD, [to_js])
    second = page.evaluate(
        """async ([env, bobKey, ownEnv]) => {
          const m = await import('/js/crypto.js');
          const me = globalThis.__mootTestKeys;
          const got = await m.decryptMessage(me, 'alice@riverside', 'alice-laptop', env, m.b64decode(bobKey));
          const own = await m.decryptMessage(me, 'alice@riverside', 'alice-phone', ownEnv, me.identityKey);
          let wrongKey;
          try { await m.decryptMessage(me, 'alice@riverside', 'alice-laptop', env, me.identityKey); }
          catch (e) { wrongKey = e.code; }
          return { got, own, wrongKey };
        }""",
        [py_envelope, c.b64encode(bob.identity_key), first["env"]])
    assert second["got"] == PAYLOAD
    assert second["own"] == first["payload"]
    assert second["wrongKey"] == "bad_signature"


def test_signed_key_order_is_utf8_bytes(page: Any) -> None:
    """Recipients whose UTF-16 order differs from their UTF-8 byte order (and that share
    a device name across users, or an address prefix): Python must verify JS's signature."""
    alice = c.DeviceKeys.generate(0)
    devices = [("x\uff61@h", "d"), ("x\U0001f600@h", "d"), ("x@h", "d\uff61"), ("x@h", "d\U0001f600"),
               ("x@h", "d"), ("x@hh", "a"), ("y@h", "d")]
    keys = {dev: c.DeviceKeys.generate(0) for dev in devices}
    bundles = [[to, device, keys[(to, device)].public_bundle()] for to, device in devices]
    env = page.evaluate(
        """async ([aliceFile, bundles]) => {
          const m = await import('/js/crypto.js');
          const alice = await m.DeviceKeys.fromJSON(aliceFile);
          const rs = [];
          for (const [to, device, b] of bundles) rs.push(await m.recipientFromBundle(to, device, b));
          return m.encryptMessage(alice, 'alice@riverside', 'alice-phone', 'x@h', 'order-1', {n: 1}, rs);
        }""",
        [alice.to_json(), bundles])
    assert [(k["to"], k["device"]) for k in env["keys"]] == devices
    for (to, device), k in keys.items():
        assert c.decrypt_message(k, to, device, env, alice.identity_key) == {"n": 1}
