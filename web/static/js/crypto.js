// Moot end-to-end encryption, scheme v1, for the browser (WebCrypto only).
//
// The specification is docs/crypto.md; the reference implementation is
// cli/crypto.py. Both must reproduce docs/crypto_vectors_v1.json exactly, and
// tests/test_browser_crypto.py checks this module against it in Chromium.
//
// Byte strings are Uint8Array. Every failure caused by data from outside (a peer,
// the node, a key file) throws a CryptoError subclass whose `code` is the same
// string cli/crypto.py uses. Misuse by the caller (no recipients, a payload that
// is not a JSON object) throws TypeError or RangeError.
//
// Randomness comes from crypto.getRandomValues unless a caller passes `rng`
// (n => Uint8Array of n bytes, may be async); only test vectors should.

export const VERSION = 1;

const KEY_LEN = 32;
const NONCE_LEN = 12;
const TAG_LEN = 16;
const SIG_LEN = 64;
const WRAPPED_LEN = KEY_LEN + TAG_LEN;
const PAD_BLOCK = 64;
const SAFETY_ITERATIONS = 5200;
const U32_MAX = 0xffffffff;

const enc = new TextEncoder();
const LABEL_SPK = enc.encode("moot/v1/spk");
const LABEL_WRAP = enc.encode("moot/v1/wrap");
const LABEL_BODY = enc.encode("moot/v1/body");
const LABEL_KEY = enc.encode("moot/v1/key");
const LABEL_ENVELOPE = enc.encode("moot/v1/envelope");

// Each wrap key encrypts exactly one content key, so a fixed nonce is safe.
const WRAP_NONCE = new Uint8Array(NONCE_LEN);
const X25519_BASEPOINT = (() => { const b = new Uint8Array(32); b[0] = 9; return b; })();
const PKCS8_ED25519 = hexToBytes("302e020100300506032b657004220420");
const PKCS8_X25519 = hexToBytes("302e020100300506032b656e04220420");

export const constants = Object.freeze({
  KEY_LEN, NONCE_LEN, TAG_LEN, SIG_LEN, WRAPPED_LEN, PAD_BLOCK, SAFETY_ITERATIONS, U32_MAX,
});

// --------------------------------------------------------------------- errors

export class CryptoError extends Error {
  constructor(message) {
    super(message);
    this.name = new.target.name;
  }
  get code() { return "crypto_error"; }
}

function errorClass(name, code) {
  const cls = class extends CryptoError { get code() { return code; } };
  Object.defineProperty(cls, "name", { value: name });
  Object.defineProperty(cls, "code", { value: code });
  return cls;
}

export const BadEncoding = errorClass("BadEncoding", "bad_encoding");
export const MalformedEnvelope = errorClass("MalformedEnvelope", "bad_envelope");
export const UnsupportedVersion = errorClass("UnsupportedVersion", "unsupported_version");
export const BadSignature = errorClass("BadSignature", "bad_signature");
export const NotForThisDevice = errorClass("NotForThisDevice", "not_for_this_device");
export const UnknownPrekey = errorClass("UnknownPrekey", "unknown_prekey");
export const DecryptionFailed = errorClass("DecryptionFailed", "decryption_failed");
export const BadPlaintext = errorClass("BadPlaintext", "bad_plaintext");
export const InvalidKey = errorClass("InvalidKey", "bad_key");
export const CryptoUnavailable = errorClass("CryptoUnavailable", "crypto_unavailable");

// -------------------------------------------------------------------- bytes

export function hexToBytes(hex) {
  if (typeof hex !== "string" || hex.length % 2 || /[^0-9a-fA-F]/.test(hex)) {
    throw new TypeError("not a hex string");
  }
  const out = new Uint8Array(hex.length / 2);
  for (let i = 0; i < out.length; i++) out[i] = parseInt(hex.substr(2 * i, 2), 16);
  return out;
}

export function bytesToHex(bytes) {
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}

export function concat(...parts) {
  const out = new Uint8Array(parts.reduce((n, p) => n + p.length, 0));
  let at = 0;
  for (const p of parts) { out.set(p, at); at += p.length; }
  return out;
}

function bytesEqual(a, b) {
  if (a.length !== b.length) return false;
  let diff = 0;
  for (let i = 0; i < a.length; i++) diff |= a[i] ^ b[i];
  return diff === 0;
}

/** Compare byte strings as unsigned bytes, lexicographically (a proper prefix first). */
export function compareBytes(a, b) {
  const n = Math.min(a.length, b.length);
  for (let i = 0; i < n; i++) if (a[i] !== b[i]) return a[i] - b[i];
  return a.length - b.length;
}

function toBytes(data, what) {
  if (data instanceof Uint8Array) return data;
  if (data instanceof ArrayBuffer) return new Uint8Array(data);
  if (ArrayBuffer.isView(data)) return new Uint8Array(data.buffer, data.byteOffset, data.byteLength);
  throw new TypeError(`${what}: expected bytes`);
}

function isWellFormed(s) {
  if (typeof s.isWellFormed === "function") return s.isWellFormed();
  return !/[\uD800-\uDBFF](?![\uDC00-\uDFFF])|(?:^|[^\uD800-\uDBFF])[\uDC00-\uDFFF]/.test(s);
}

/** UTF-8 of a well-formed string; a lone surrogate is bad_envelope (never replaced). */
export function utf8(s) {
  if (typeof s !== "string") throw new TypeError("expected a string");
  if (!isWellFormed(s)) throw new MalformedEnvelope("string is not valid UTF-8 text");
  return enc.encode(s);
}

// ------------------------------------------------------------------- encoding

const B64_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
const B64_VALUE = new Map(Array.from(B64_ALPHABET, (ch, i) => [ch, i]));
const B64_RE = /^[A-Za-z0-9_-]*$/;

/** base64url without '=' padding (RFC 4648 section 5). */
export function b64encode(data) {
  const bytes = toBytes(data, "b64encode");
  let out = "";
  let i = 0;
  for (; i + 3 <= bytes.length; i += 3) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8) | bytes[i + 2];
    out += B64_ALPHABET[n >> 18] + B64_ALPHABET[(n >> 12) & 63]
      + B64_ALPHABET[(n >> 6) & 63] + B64_ALPHABET[n & 63];
  }
  const rest = bytes.length - i;
  if (rest === 1) {
    const n = bytes[i] << 16;
    out += B64_ALPHABET[n >> 18] + B64_ALPHABET[(n >> 12) & 63];
  } else if (rest === 2) {
    const n = (bytes[i] << 16) | (bytes[i + 1] << 8);
    out += B64_ALPHABET[n >> 18] + B64_ALPHABET[(n >> 12) & 63] + B64_ALPHABET[(n >> 6) & 63];
  }
  return out;
}

/**
 * Decode canonical unpadded base64url; throws BadEncoding for a non-string, any
 * character outside the alphabet (including '=' and whitespace), a length = 1 mod 4,
 * a non-canonical last character, or (with `length`) a wrong decoded length.
 */
export function b64decode(text, { length = null, what = "value" } = {}) {
  if (typeof text !== "string" || !B64_RE.test(text) || text.length % 4 === 1) {
    throw new BadEncoding(`${what}: not unpadded base64url`);
  }
  const out = new Uint8Array(Math.floor((text.length * 3) / 4));
  let acc = 0, bits = 0, at = 0;
  for (const ch of text) {
    acc = (acc << 6) | B64_VALUE.get(ch);
    bits += 6;
    if (bits >= 8) {
      bits -= 8;
      out[at++] = (acc >> bits) & 0xff;
      acc &= (1 << bits) - 1;
    }
  }
  if (b64encode(out) !== text) throw new BadEncoding(`${what}: non-canonical base64url`);
  if (length !== null && out.length !== length) {
    throw new BadEncoding(`${what}: expected ${length} bytes, got ${out.length}`);
  }
  return out;
}

export function u8(n) { return Uint8Array.of(n & 0xff); }

export function u32be(n) {
  if (!isU32(n)) throw new RangeError("u32be: expected an integer in 0..2^32-1");
  const out = new Uint8Array(4);
  new DataView(out.buffer).setUint32(0, n, false);
  return out;
}

/** Length prefix: u32be(len(b)) || b, with strings UTF-8 encoded (lone surrogates rejected). */
export function lp(value) {
  const bytes = typeof value === "string" ? utf8(value) : toBytes(value, "lp");
  return concat(u32be(bytes.length), bytes);
}

function isU32(n) {
  return typeof n === "number" && Number.isInteger(n) && n >= 0 && n <= U32_MAX;
}

// ----------------------------------------------------------------- primitives

function subtle() {
  const s = globalThis.crypto && globalThis.crypto.subtle;
  if (!s) throw new CryptoUnavailable("WebCrypto is not available (insecure context?)");
  return s;
}

function unsupported(err) {
  return err && err.name === "NotSupportedError"
    ? new CryptoUnavailable(`this browser lacks a primitive: ${err.message}`) : null;
}

async function defaultRng(n) {
  const out = new Uint8Array(n);
  globalThis.crypto.getRandomValues(out);
  return out;
}

async function draw(rng, n) {
  const value = toBytes(await rng(n), "rng output");
  if (value.length !== n) throw new RangeError(`rng returned ${value.length} bytes, ${n} requested`);
  return Uint8Array.from(value); // a copy we may erase
}

function checkKey(key, what) {
  if (!(key instanceof Uint8Array) || key.length !== KEY_LEN) {
    throw new InvalidKey(`${what}: expected ${KEY_LEN} bytes`);
  }
}

async function importPrivate(alg, raw, extractable, usages, what) {
  checkKey(raw, what);
  const prefix = alg === "Ed25519" ? PKCS8_ED25519 : PKCS8_X25519;
  try {
    return await subtle().importKey("pkcs8", concat(prefix, raw), { name: alg }, extractable, usages);
  } catch (err) {
    throw unsupported(err) || new InvalidKey(`${what}: ${err.message}`);
  }
}

async function importPublic(alg, raw, usages, what) {
  checkKey(raw, what);
  try {
    return await subtle().importKey("raw", raw, { name: alg }, true, usages);
  } catch (err) {
    throw unsupported(err) || new InvalidKey(`${what}: ${err.message}`);
  }
}

/** Import a raw 32-byte X25519 private key (unclamped; X25519 clamps it). */
export function importX25519Private(raw, { extractable = false } = {}) {
  return importPrivate("X25519", raw, extractable, ["deriveBits"], "X25519 private key");
}

/** Import a raw 32-byte Ed25519 seed as a signing key. */
export function importEd25519Private(seed, { extractable = false } = {}) {
  return importPrivate("Ed25519", seed, extractable, ["sign"], "Ed25519 seed");
}

/** The raw 32 private bytes of an extractable X25519 or Ed25519 CryptoKey. */
export async function exportPrivate(key) {
  if (!key.extractable) throw new TypeError("private key is not extractable");
  const jwk = await subtle().exportKey("jwk", key);
  return b64decode(jwk.d, { length: KEY_LEN, what: "jwk.d" });
}

async function asX25519Private(priv) {
  return priv instanceof Uint8Array ? importX25519Private(priv) : priv;
}

/**
 * X25519(priv, pub): priv is raw bytes or an X25519 CryptoKey, pub raw bytes.
 * Throws InvalidKey if the result would be all zero (low-order pub).
 */
export async function x25519(priv, pub) {
  const privateKey = await asX25519Private(priv);
  const publicKey = await importPublic("X25519", pub, [], "X25519 public key");
  let out;
  try {
    out = new Uint8Array(await subtle().deriveBits({ name: "X25519", public: publicKey }, privateKey, 256));
  } catch (err) {
    // Chromium throws OperationError for an all-zero result.
    throw unsupported(err) || new InvalidKey("X25519 public key has low order");
  }
  if (out.every((b) => b === 0)) throw new InvalidKey("X25519 public key has low order");
  return out;
}

/** The X25519 public key X25519(priv, 9) of raw bytes or a (possibly non-extractable) CryptoKey. */
export async function x25519Public(priv) {
  return x25519(priv, X25519_BASEPOINT);
}

/** The Ed25519 public key of a 32-byte seed. */
export async function ed25519Public(seed) {
  const key = await importEd25519Private(seed, { extractable: true });
  const jwk = await subtle().exportKey("jwk", key);
  return b64decode(jwk.x, { length: KEY_LEN, what: "jwk.x" });
}

/** Deterministic Ed25519 signature; `signer` is a 32-byte seed or an Ed25519 CryptoKey. */
export async function ed25519Sign(signer, message) {
  const key = signer instanceof Uint8Array ? await importEd25519Private(signer) : signer;
  return new Uint8Array(await subtle().sign({ name: "Ed25519" }, key, toBytes(message, "message")));
}

/** True iff signature is a valid Ed25519 signature; malformed keys give false. */
export async function ed25519Verify(publicKey, message, signature) {
  if (!(publicKey instanceof Uint8Array) || publicKey.length !== KEY_LEN
      || !(signature instanceof Uint8Array) || signature.length !== SIG_LEN) {
    return false;
  }
  try {
    const key = await subtle().importKey("raw", publicKey, { name: "Ed25519" }, true, ["verify"]);
    return await subtle().verify({ name: "Ed25519" }, key, signature, toBytes(message, "message"));
  } catch (err) {
    const u = unsupported(err);
    if (u) throw u;
    return false;
  }
}

async function hmacSha256(key, message) {
  // An HMAC key shorter than the block is zero-padded, so an empty key equals 32 zeros
  // (WebCrypto refuses empty HMAC keys).
  const k = await subtle().importKey("raw", key.length ? key : new Uint8Array(32),
    { name: "HMAC", hash: "SHA-256" }, false, ["sign"]);
  return new Uint8Array(await subtle().sign("HMAC", k, message));
}

/** HKDF-Extract with SHA-256: PRK = HMAC(salt, ikm). */
export function hkdfExtract(salt, ikm) {
  return hmacSha256(toBytes(salt, "salt"), toBytes(ikm, "ikm"));
}

/** HKDF-SHA256 (RFC 5869), extract then expand, via WebCrypto HKDF deriveBits. */
export async function hkdfSha256(ikm, salt, info, length = 32) {
  if (!Number.isInteger(length) || length < 1 || length > 255 * 32) {
    throw new RangeError("HKDF-SHA256 output length must be 1..8160");
  }
  const key = await subtle().importKey("raw", toBytes(ikm, "ikm"), "HKDF", false, ["deriveBits"]);
  const bits = await subtle().deriveBits(
    { name: "HKDF", hash: "SHA-256", salt: toBytes(salt, "salt"), info: toBytes(info, "info") },
    key, 8 * length);
  return new Uint8Array(bits);
}

async function aesKey(key, usage) {
  if (!(key instanceof Uint8Array) || key.length !== KEY_LEN) throw new InvalidKey("AES key: expected 32 bytes");
  try {
    return await subtle().importKey("raw", key, "AES-GCM", false, [usage]);
  } catch (err) {
    throw unsupported(err) || err;
  }
}

/** AES-256-GCM; returns ciphertext || 16-byte tag. */
export async function aes256gcmEncrypt(key, nonce, plaintext, aad) {
  const k = await aesKey(key, "encrypt");
  return new Uint8Array(await subtle().encrypt(
    { name: "AES-GCM", iv: nonce, additionalData: aad, tagLength: 128 }, k, plaintext));
}

/** Open ciphertext || tag; throws DecryptionFailed if it does not authenticate. */
export async function aes256gcmDecrypt(key, nonce, sealed, aad) {
  const k = await aesKey(key, "decrypt");
  try {
    return new Uint8Array(await subtle().decrypt(
      { name: "AES-GCM", iv: nonce, additionalData: aad, tagLength: 128 }, k, sealed));
  } catch (err) {
    throw unsupported(err) || new DecryptionFailed("AES-GCM authentication failed");
  }
}

// ------------------------------------------------------------------ plaintext

function isPlainObject(x) {
  return x !== null && typeof x === "object" && !Array.isArray(x);
}

function checkJsonValue(value, path) {
  if (typeof value === "number" && !Number.isFinite(value)) {
    throw new RangeError(`${path}: NaN and Infinity are not JSON`);
  }
  if (typeof value === "string" && !isWellFormed(value)) {
    throw new RangeError(`${path}: string is not valid Unicode`);
  }
  if (value !== null && typeof value === "object") {
    for (const [k, v] of Object.entries(value)) {
      if (!isWellFormed(k)) throw new RangeError(`${path}: key is not valid Unicode`);
      checkJsonValue(v, `${path}.${k}`);
    }
  }
}

/** Compact UTF-8 JSON of a payload object (JSON.stringify). */
export function encodePayload(payload) {
  if (!isPlainObject(payload)) throw new TypeError("payload must be a JSON object");
  checkJsonValue(payload, "payload");
  return enc.encode(JSON.stringify(payload));
}

/** ISO/IEC 7816-4 padding: append 0x80, then zeros to a multiple of 64 bytes. */
export function pad(data) {
  const bytes = toBytes(data, "pad");
  const n = bytes.length + 1;
  const out = new Uint8Array(n + ((PAD_BLOCK - (n % PAD_BLOCK)) % PAD_BLOCK));
  out.set(bytes);
  out[bytes.length] = 0x80;
  return out;
}

/** Strip pad()'s padding (extra whole zero blocks accepted); BadPlaintext if malformed. */
export function unpad(padded) {
  if (!padded.length || padded.length % PAD_BLOCK) {
    throw new BadPlaintext("padded plaintext is not a multiple of 64 bytes");
  }
  let end = padded.length;
  while (end > 0 && padded[end - 1] === 0) end--;
  if (end === 0 || padded[end - 1] !== 0x80) throw new BadPlaintext("bad padding");
  return padded.slice(0, end - 1);
}

/** Parse the unpadded plaintext; BadPlaintext unless it is UTF-8 JSON of an object. */
export function decodePayload(data) {
  let payload;
  try {
    // ignoreBOM keeps a leading U+FEFF so JSON.parse rejects it, as Python does.
    const text = new TextDecoder("utf-8", { fatal: true, ignoreBOM: true }).decode(data);
    payload = JSON.parse(text);
  } catch {
    throw new BadPlaintext("plaintext is not UTF-8 JSON");
  }
  if (!isPlainObject(payload)) throw new BadPlaintext("plaintext is not a JSON object");
  return payload;
}

// ---------------------------------------------------------------------- keys

/** The bytes an identity key signs to certify a signed prekey. */
export function signedPrekeyInput(spkId, spkPub) {
  return concat(LABEL_SPK, u32be(spkId), spkPub);
}

export async function verifySignedPrekey(identityKey, spkId, spkPub, sig) {
  if (!isU32(spkId) || !(spkPub instanceof Uint8Array) || spkPub.length !== KEY_LEN) return false;
  return ed25519Verify(identityKey, signedPrekeyInput(spkId, spkPub), sig);
}

function intField(obj, name) {
  const value = Object.hasOwn(obj, name) ? obj[name] : undefined;
  if (!isU32(value)) throw new MalformedEnvelope(`${name}: expected an integer in 0..2^32-1`);
  return value;
}

function strField(obj, name) {
  const value = Object.hasOwn(obj, name) ? obj[name] : undefined;
  if (typeof value !== "string" || !value) throw new MalformedEnvelope(`${name}: expected a non-empty string`);
  lp(value); // rejects lone surrogates now rather than at signing time
  return value;
}

function field(obj, name) {
  return Object.hasOwn(obj, name) ? obj[name] : undefined;
}

async function x25519Pair(raw, extractable) {
  const privateKey = await importX25519Private(raw, { extractable });
  return { privateKey, publicKey: await x25519Public(privateKey) };
}

async function generateX25519Pair() {
  try {
    const pair = await subtle().generateKey({ name: "X25519" }, false, ["deriveBits"]);
    return { privateKey: pair.privateKey,
      publicKey: new Uint8Array(await subtle().exportKey("raw", pair.publicKey)) };
  } catch (err) {
    throw unsupported(err) || err;
  }
}

/**
 * The private keys of one device, held as WebCrypto CryptoKeys.
 *
 * Fields: identity (Ed25519 private CryptoKey), identityKey (32-byte public),
 * dh {privateKey, publicKey}, signedPrekeys Map<id, {privateKey, publicKey}>,
 * currentSpkId, oneTimePrekeys Map<id, {privateKey, publicKey}>. Keys made by
 * generate() are non-extractable; keys imported with fromRaw/fromJSON are
 * non-extractable unless {extractable: true} is passed (needed for toJSON).
 */
export class DeviceKeys {
  constructor({ identity, identityKey, dh, signedPrekeys, currentSpkId, oneTimePrekeys = new Map() }) {
    if (!signedPrekeys.has(currentSpkId)) throw new InvalidKey("current signed prekey id has no private key");
    Object.assign(this, { identity, identityKey, dh, signedPrekeys, currentSpkId, oneTimePrekeys });
  }

  /** Import raw keys: identitySeed, dhPrivate, signedPrekeys and oneTimePrekeys as {id: bytes} or Map. */
  static async fromRaw({ identitySeed, dhPrivate, signedPrekeys, currentSpkId, oneTimePrekeys = {} },
    { extractable = false } = {}) {
    const byId = async (entries, what) => {
      const out = new Map();
      for (const [id, raw] of entries instanceof Map ? entries : Object.entries(entries)) {
        const n = typeof id === "string" ? Number(id) : id;
        if (!isU32(n)) throw new RangeError(`${what}: bad id ${id}`);
        out.set(n, await x25519Pair(raw, extractable));
      }
      return out;
    };
    checkKey(identitySeed, "identity_seed");
    return new DeviceKeys({
      identity: await importEd25519Private(identitySeed, { extractable }),
      identityKey: await ed25519Public(identitySeed),
      dh: await x25519Pair(dhPrivate, extractable),
      signedPrekeys: await byId(signedPrekeys, "signed prekey"),
      currentSpkId,
      oneTimePrekeys: await byId(oneTimePrekeys, "one-time prekey"),
    });
  }

  /**
   * Fresh keys: signed prekey id 1 and one-time prekeys 1..nOneTime. Without rng
   * they are generated by WebCrypto and never extractable; with rng (tests only)
   * the raw bytes are drawn in Python's order and imported.
   */
  static async generate({ nOneTime = 20, rng = null, extractable = false } = {}) {
    if (rng) {
      const identitySeed = await draw(rng, KEY_LEN);
      const dhPrivate = await draw(rng, KEY_LEN);
      const signedPrekeys = new Map([[1, await draw(rng, KEY_LEN)]]);
      const oneTimePrekeys = new Map();
      for (let i = 1; i <= nOneTime; i++) oneTimePrekeys.set(i, await draw(rng, KEY_LEN));
      return DeviceKeys.fromRaw({ identitySeed, dhPrivate, signedPrekeys, currentSpkId: 1, oneTimePrekeys },
        { extractable });
    }
    let identity;
    try {
      identity = await subtle().generateKey({ name: "Ed25519" }, extractable, ["sign", "verify"]);
    } catch (err) {
      throw unsupported(err) || err;
    }
    const gen = async () => {
      if (!extractable) return generateX25519Pair();
      const pair = await subtle().generateKey({ name: "X25519" }, true, ["deriveBits"]);
      return { privateKey: pair.privateKey, publicKey: new Uint8Array(await subtle().exportKey("raw", pair.publicKey)) };
    };
    const oneTimePrekeys = new Map();
    for (let i = 1; i <= nOneTime; i++) oneTimePrekeys.set(i, await gen());
    return new DeviceKeys({
      identity: identity.privateKey,
      identityKey: new Uint8Array(await subtle().exportKey("raw", identity.publicKey)),
      dh: await gen(),
      signedPrekeys: new Map([[1, await gen()]]),
      currentSpkId: 1,
      oneTimePrekeys,
    });
  }

  /** The X25519 public identity DH key (reserved for v2). */
  get dhKey() { return this.dh.publicKey; }

  /** Ed25519 signature by this device's identity key. */
  sign(message) { return ed25519Sign(this.identity, message); }

  /** Make a new current signed prekey (id = highest + 1); keep the old ones. */
  async rotateSignedPrekey({ rng = null } = {}) {
    const newId = Math.max(...this.signedPrekeys.keys()) + 1;
    if (newId > U32_MAX) throw new RangeError("signed prekey ids exhausted");
    const extractable = this.identity.extractable;
    const pair = rng ? await x25519Pair(await draw(rng, KEY_LEN), extractable)
      : extractable ? await x25519Pair(await defaultRng(KEY_LEN), true) : await generateX25519Pair();
    this.signedPrekeys.set(newId, pair);
    this.currentSpkId = newId;
    return newId;
  }

  /** Delete an old signed prekey: what was wrapped to it becomes unreadable. */
  forgetSignedPrekey(spkId) {
    if (spkId === this.currentSpkId) throw new RangeError("cannot forget the current signed prekey");
    this.signedPrekeys.delete(spkId);
  }

  /** The public keys to publish, in wire shape (base64url values). */
  async publicBundle() {
    const spkPub = this.signedPrekeys.get(this.currentSpkId).publicKey;
    const sig = await this.sign(signedPrekeyInput(this.currentSpkId, spkPub));
    return {
      identity_key: b64encode(this.identityKey),
      dh_key: b64encode(this.dhKey),
      signed_prekey: { id: this.currentSpkId, key: b64encode(spkPub), sig: b64encode(sig) },
      one_time_prekeys: [...this.oneTimePrekeys.entries()].sort((a, b) => a[0] - b[0])
        .map(([id, pair]) => ({ id, key: b64encode(pair.publicKey) })),
    };
  }

  /** The key file of cli/crypto.py (DeviceKeys.to_json); only for extractable keys. */
  async toJSON() {
    const list = async (m) => {
      const out = [];
      for (const [id, pair] of [...m.entries()].sort((a, b) => a[0] - b[0])) {
        out.push({ id, private: b64encode(await exportPrivate(pair.privateKey)) });
      }
      return out;
    };
    return JSON.stringify({
      format: "moot-device-keys",
      v: VERSION,
      identity_seed: b64encode(await exportPrivate(this.identity)),
      dh_private: b64encode(await exportPrivate(this.dh.privateKey)),
      current_spk_id: this.currentSpkId,
      signed_prekeys: await list(this.signedPrekeys),
      one_time_prekeys: await list(this.oneTimePrekeys),
    }, null, 2);
  }

  /** Load a key file (cli/crypto.py DeviceKeys.to_json); BadEncoding if damaged. */
  static async fromJSON(text, { extractable = false } = {}) {
    let obj;
    try {
      obj = typeof text === "string" ? JSON.parse(text) : text;
    } catch {
      throw new BadEncoding("key file is not JSON");
    }
    if (!isPlainObject(obj) || obj.format !== "moot-device-keys" || obj.v !== 1) {
      throw new BadEncoding("not a v1 moot device key file");
    }
    try {
      const byId = (name) => {
        const entries = field(obj, name);
        if (!Array.isArray(entries) || !entries.every(isPlainObject)) {
          throw new BadEncoding(`${name}: expected a list of objects`);
        }
        const out = new Map(entries.map((e) => [intField(e, "id"),
          b64decode(field(e, "private"), { length: KEY_LEN, what: name })]));
        if (out.size !== entries.length) throw new BadEncoding(`${name}: duplicate id`);
        return out;
      };
      const raw = {
        identitySeed: b64decode(field(obj, "identity_seed"), { length: KEY_LEN, what: "identity_seed" }),
        dhPrivate: b64decode(field(obj, "dh_private"), { length: KEY_LEN, what: "dh_private" }),
        signedPrekeys: byId("signed_prekeys"),
        currentSpkId: intField(obj, "current_spk_id"),
        oneTimePrekeys: byId("one_time_prekeys"),
      };
      return await DeviceKeys.fromRaw(raw, { extractable });
    } catch (err) {
      if (err instanceof MalformedEnvelope) throw new BadEncoding(err.message);
      throw err;
    }
  }
}

/**
 * Decode a public bundle and verify its signed prekey. Returns
 * {identityKey, dhKey, spkId, spkPub, spkSig, oneTimePrekeys: [[id, key]]}.
 * Throws MalformedEnvelope (shape), BadEncoding, BadSignature.
 */
export async function parsePublicBundle(bundle) {
  if (!isPlainObject(bundle) || !isPlainObject(field(bundle, "signed_prekey"))) {
    throw new MalformedEnvelope("bundle: expected an object with signed_prekey");
  }
  const spk = bundle.signed_prekey;
  const otks = Object.hasOwn(bundle, "one_time_prekeys") ? bundle.one_time_prekeys : [];
  if (!Array.isArray(otks) || !otks.every(isPlainObject)) {
    throw new MalformedEnvelope("one_time_prekeys: expected a list of objects");
  }
  const parsed = {
    identityKey: b64decode(field(bundle, "identity_key"), { length: KEY_LEN, what: "identity_key" }),
    dhKey: b64decode(field(bundle, "dh_key"), { length: KEY_LEN, what: "dh_key" }),
    spkId: intField(spk, "id"),
    spkPub: b64decode(field(spk, "key"), { length: KEY_LEN, what: "signed_prekey.key" }),
    spkSig: b64decode(field(spk, "sig"), { length: SIG_LEN, what: "signed_prekey.sig" }),
    oneTimePrekeys: otks.map((e) => [intField(e, "id"),
      b64decode(field(e, "key"), { length: KEY_LEN, what: "one_time_prekey" })]),
  };
  if (!(await verifySignedPrekey(parsed.identityKey, parsed.spkId, parsed.spkPub, parsed.spkSig))) {
    throw new BadSignature("signed prekey signature does not verify");
  }
  return parsed;
}

/** One device a message is encrypted to: {address, deviceId, spkId, spkPub}. */
export function recipientDevice(address, deviceId, spkId, spkPub) {
  return Object.freeze({ address, deviceId, spkId, spkPub });
}

/** A recipient from a published bundle, after verifying its prekey signature. */
export async function recipientFromBundle(address, deviceId, bundle) {
  const parsed = await parsePublicBundle(bundle);
  return recipientDevice(address, deviceId, parsed.spkId, parsed.spkPub);
}

// ------------------------------------------------------------------ envelope

export function bodyAad(messageId, sender, senderDevice, conversation) {
  return concat(LABEL_BODY, lp(messageId), lp(sender), lp(senderDevice), lp(conversation));
}

export function keyAad(messageId, sender, senderDevice) {
  return concat(LABEL_KEY, lp(messageId), lp(sender), lp(senderDevice));
}

export function wrapKeyInfo(to, device) {
  return concat(LABEL_WRAP, lp(to), lp(device));
}

/** The 32-byte AES key that wraps the content key for one device. */
export function deriveWrapKey(sharedSecret, ephPub, spkPub, to, device) {
  return hkdfSha256(sharedSecret, concat(ephPub, spkPub), wrapKeyInfo(to, device), 32);
}

function keySortKey(entry) {
  return [utf8(entry.to), utf8(entry.device)];
}

/** Key entries in signing order: by UTF-8 bytes of `to`, then of `device`. */
export function sortKeyEntries(keys) {
  return keys.map((k) => [keySortKey(k), k])
    .sort((a, b) => compareBytes(a[0][0], b[0][0]) || compareBytes(a[0][1], b[0][1]))
    .map(([, k]) => k);
}

/** The bytes the sender device signs (everything but sig), from a parsed envelope. */
export function signatureInput(env) {
  const parts = [LABEL_ENVELOPE, u8(env.v), lp(env.id), lp(env.sender), lp(env.senderDevice),
    lp(env.conversation), lp(env.eph), lp(env.nonce), lp(env.body), u32be(env.keys.length)];
  for (const e of sortKeyEntries(env.keys)) {
    parts.push(lp(e.to), lp(e.device), u32be(e.spk), lp(e.wrapped));
  }
  return concat(...parts);
}

/** The wire form of a parsed envelope. */
export function envelopeToJSON(env) {
  return {
    v: env.v, id: env.id, sender: env.sender, sender_device: env.senderDevice,
    conversation: env.conversation, eph: b64encode(env.eph), nonce: b64encode(env.nonce),
    body: b64encode(env.body),
    keys: env.keys.map((k) => ({ to: k.to, device: k.device, spk: k.spk, wrapped: b64encode(k.wrapped) })),
    sig: b64encode(env.sig),
  };
}

/**
 * Validate the wire form and decode it (section 6.4 steps 1-5); does not check
 * the signature. Returns {v, id, sender, senderDevice, conversation, eph, nonce,
 * body, keys: [{to, device, spk, wrapped}], sig}. Unknown fields are ignored.
 */
export function parseEnvelope(obj) {
  if (!isPlainObject(obj)) throw new MalformedEnvelope("envelope: expected a JSON object");
  const v = field(obj, "v");
  if (typeof v !== "number" || !Number.isInteger(v)) throw new MalformedEnvelope("v: expected an integer");
  if (v !== VERSION) throw new UnsupportedVersion(`envelope version ${v} is not supported`);

  const id = strField(obj, "id");
  const sender = strField(obj, "sender");
  const senderDevice = strField(obj, "sender_device");
  const conversation = strField(obj, "conversation");
  const rawKeys = field(obj, "keys");
  if (!Array.isArray(rawKeys) || !rawKeys.length || !rawKeys.every(isPlainObject)) {
    throw new MalformedEnvelope("keys: expected a non-empty list of objects");
  }
  const shapes = rawKeys.map((k) => [strField(k, "to"), strField(k, "device"), intField(k, "spk")]);
  const keys = shapes.map(([to, device, spk], i) => Object.freeze({
    to, device, spk, wrapped: b64decode(field(rawKeys[i], "wrapped"), { length: WRAPPED_LEN, what: "wrapped" }),
  }));
  const env = Object.freeze({
    v, id, sender, senderDevice, conversation,
    eph: b64decode(field(obj, "eph"), { length: KEY_LEN, what: "eph" }),
    nonce: b64decode(field(obj, "nonce"), { length: NONCE_LEN, what: "nonce" }),
    body: b64decode(field(obj, "body"), { what: "body" }),
    keys: Object.freeze(keys),
    sig: b64decode(field(obj, "sig"), { length: SIG_LEN, what: "sig" }),
  });

  if (env.body.length < TAG_LEN + PAD_BLOCK || (env.body.length - TAG_LEN) % PAD_BLOCK) {
    throw new MalformedEnvelope("body: size is not 16 + a multiple of 64 bytes");
  }
  const seen = new Set(keys.map((k) => JSON.stringify([k.to, k.device])));
  if (seen.size !== keys.length) throw new MalformedEnvelope("keys: duplicate (to, device)");
  return env;
}

/**
 * Encrypt `payload` to every device in `recipients` (from recipientFromBundle,
 * including the sender's other devices) and sign it; returns the wire form.
 * `rng` is drawn from exactly three times, in order: ephemeral private key (32),
 * content key (32), body nonce (12). Key entries keep the order of `recipients`.
 * Throws TypeError/RangeError for misuse, InvalidKey for a low-order prekey.
 */
export async function encryptMessage(senderKeys, sender, senderDevice, conversation, messageId, payload,
  recipients, { rng = null } = {}) {
  rng = rng || defaultRng;
  if (!Array.isArray(recipients) || !recipients.length) throw new TypeError("no recipient devices");
  const seen = new Set(recipients.map((r) => JSON.stringify([r.address, r.deviceId])));
  if (seen.size !== recipients.length) throw new TypeError("a recipient device appears twice");
  const named = [["sender", sender], ["sender_device", senderDevice], ["conversation", conversation],
    ["message_id", messageId], ...recipients.map((r) => ["address", r.address]),
    ...recipients.map((r) => ["device_id", r.deviceId])];
  for (const [name, value] of named) {
    if (typeof value !== "string" || !value) throw new TypeError(`${name} must be a non-empty string`);
    if (!isWellFormed(value)) throw new RangeError(`${name} is not valid Unicode`);
  }
  for (const r of recipients) {
    if (!isU32(r.spkId)) throw new RangeError("spk_id must be an integer in 0..2^32-1");
    checkKey(r.spkPub, "recipient signed prekey");
  }
  const padded = pad(encodePayload(payload));

  const ephPriv = await draw(rng, KEY_LEN);
  const contentKey = await draw(rng, KEY_LEN);
  const nonce = await draw(rng, NONCE_LEN);
  try {
    const ephKey = await importX25519Private(ephPriv);
    const ephPub = await x25519Public(ephKey);
    const kAad = keyAad(messageId, sender, senderDevice);
    const keys = [];
    for (const r of recipients) {
      const shared = await x25519(ephKey, r.spkPub);
      const wrapKey = await deriveWrapKey(shared, ephPub, r.spkPub, r.address, r.deviceId);
      const wrapped = await aes256gcmEncrypt(wrapKey, WRAP_NONCE, contentKey, kAad);
      shared.fill(0);
      wrapKey.fill(0);
      keys.push({ to: r.address, device: r.deviceId, spk: r.spkId, wrapped });
    }
    const body = await aes256gcmEncrypt(contentKey, nonce,
      padded, bodyAad(messageId, sender, senderDevice, conversation));
    const env = { v: VERSION, id: messageId, sender, senderDevice, conversation, eph: ephPub, nonce, body, keys };
    env.sig = await senderKeys.sign(signatureInput(env));
    return envelopeToJSON(env);
  } finally {
    ephPriv.fill(0);
    contentKey.fill(0);
  }
}

/**
 * Verify and decrypt an envelope addressed to device `myDevice` of `myAddress`;
 * returns the payload object. `senderIdentityKey` is the 32-byte Ed25519 identity
 * key of (sender, sender_device) as the caller knows it. The caller must drop
 * duplicates by (sender, id) and check the conversation: this keeps no state.
 * Throws, in order: MalformedEnvelope, UnsupportedVersion, BadEncoding,
 * BadSignature, NotForThisDevice, UnknownPrekey, DecryptionFailed, BadPlaintext.
 */
export async function decryptMessage(myKeys, myAddress, myDevice, envelope, senderIdentityKey) {
  const env = parseEnvelope(envelope);
  if (!(await ed25519Verify(senderIdentityKey, signatureInput(env), env.sig))) {
    throw new BadSignature("envelope signature does not verify");
  }
  const entry = env.keys.find((k) => k.to === myAddress && k.device === myDevice);
  if (!entry) throw new NotForThisDevice(`no key entry for ${myAddress} / ${myDevice}`);
  const spk = myKeys.signedPrekeys.get(entry.spk);
  if (!spk) throw new UnknownPrekey(`signed prekey ${entry.spk} is not held by this device`);
  let shared;
  try {
    shared = await x25519(spk.privateKey, env.eph);
  } catch (err) {
    if (err instanceof InvalidKey) throw new DecryptionFailed("ephemeral key has low order");
    throw err;
  }
  const wrapKey = await deriveWrapKey(shared, env.eph, spk.publicKey, myAddress, myDevice);
  const contentKey = await aes256gcmDecrypt(wrapKey, WRAP_NONCE, entry.wrapped, keyAad(env.id, env.sender, env.senderDevice));
  try {
    const padded = await aes256gcmDecrypt(contentKey, env.nonce, env.body,
      bodyAad(env.id, env.sender, env.senderDevice, env.conversation));
    return decodePayload(unpad(padded));
  } finally {
    shared.fill(0);
    wrapKey.fill(0);
    contentKey.fill(0);
  }
}

// ------------------------------------------------------------- safety number

async function fingerprintDigest(address, identityKeys) {
  const keys = [...identityKeys];
  if (!keys.length) throw new InvalidKey("a user needs at least one device key");
  for (const k of keys) checkKey(k, "identity key");
  keys.sort(compareBytes);
  for (let i = 1; i < keys.length; i++) {
    if (bytesEqual(keys[i - 1], keys[i])) throw new InvalidKey("the same identity key is listed twice");
  }
  const keyBytes = concat(...keys);
  let h = concat(new Uint8Array(2), keyBytes, utf8(address));
  for (let i = 0; i < SAFETY_ITERATIONS; i++) {
    h = new Uint8Array(await subtle().digest("SHA-512", concat(h, keyBytes)));
  }
  return h;
}

/** The 30-digit fingerprint of one user: address and all device identity keys. */
export async function fingerprint(address, identityKeys) {
  const digest = (await fingerprintDigest(address, identityKeys)).slice(0, 30);
  let out = "";
  for (let i = 0; i < 30; i += 5) {
    let n = 0n;
    for (let j = i; j < i + 5; j++) n = (n << 8n) | BigInt(digest[j]);
    out += (n % 100000n).toString().padStart(5, "0");
  }
  return out;
}

/** The 60-digit safety number of two users; the same from either side. */
export async function safetyNumber(addrA, keysA, addrB, keysB) {
  const fa = await fingerprint(addrA, keysA);
  const fb = await fingerprint(addrB, keysB);
  return fa < fb ? fa + fb : fb + fa;
}

/** 12 space-separated groups of 5 digits. */
export function formatSafetyNumber(number) {
  return number.match(/.{1,5}/g).join(" ");
}
