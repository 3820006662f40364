"""Regenerate docs/crypto_vectors_attachments_v1.json, the vectors of attachment encryption.

    python tools/gen_attachment_vectors.py          # rewrite the file
    python tools/gen_attachment_vectors.py --check  # exit 1 if the file is stale

Inputs are fixed (keys and prefixes are SHA-256 of a label, as in
tools/gen_crypto_vectors.py), so the output is byte-identical on rerun. A file of
``size`` bytes is ``pattern(size)``: byte i is ``i % 251``. Small blobs are given
whole (``blob_hex``); every vector gives the blob's size, its SHA-256 (the blob id)
and each chunk's 16-byte tag, so an implementation can find the first chunk it
gets wrong.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from cli import attachments as a  # noqa: E402
from cli import crypto as c  # noqa: E402

OUTPUT = ROOT / "docs" / "crypto_vectors_attachments_v1.json"
WHOLE_LIMIT = 256  # blobs up to this size are listed whole


def fixed(label: str, n: int = 32) -> bytes:
    return hashlib.sha256(b"moot/v1/test-vector/" + label.encode()).digest()[:n]


def pattern(size: int) -> bytes:
    return bytes(i % 251 for i in range(size))


def tags(blob: bytes) -> list[str]:
    body = blob[a.PREFIX_LEN:]
    out = []
    for start in range(0, len(body), a.SEALED_CHUNK):
        chunk = body[start:start + a.SEALED_CHUNK]
        out.append(chunk[-a.TAG_LEN:].hex())
    return out


def vector(name: str, size: int) -> dict[str, Any]:
    key, prefix = fixed(f"attachment/{name}/key"), fixed(f"attachment/{name}/prefix", a.PREFIX_LEN)
    data = pattern(size)
    blob, digest = a.encrypt_bytes(key, data, prefix=prefix)
    assert a.decrypt_bytes(key, blob, digest) == data
    assert len(blob) == a.encrypted_size(size) and a.plaintext_size(len(blob)) == size
    out: dict[str, Any] = {
        "name": name, "key_hex": key.hex(), "key_b64": c.b64encode(key), "prefix_hex": prefix.hex(), "size": size,
        "plaintext_sha256_hex": hashlib.sha256(data).hexdigest(), "blob_size": len(blob), "blob_sha256_hex": digest,
        "chunks": a.chunk_count(size), "chunk_tags_hex": tags(blob),
        "first_chunk_aad_hex": a.chunk_aad(0, a.chunk_count(size) == 1).hex(),
        "first_chunk_nonce_hex": a.chunk_nonce(prefix, 0).hex(),
    }
    if len(blob) <= WHOLE_LIMIT:
        out["plaintext_hex"] = data.hex()
        out["blob_hex"] = blob.hex()
    return out


def negatives() -> dict[str, Any]:
    """Blobs made from ``two_chunks``'s key and file that must not decrypt."""
    key, prefix = fixed("attachment/negative/key"), fixed("attachment/negative/prefix", a.PREFIX_LEN)
    size = a.CHUNK_SIZE + 100
    blob, _ = a.encrypt_bytes(key, pattern(size), prefix=prefix)
    first, second = blob[a.PREFIX_LEN:a.PREFIX_LEN + a.SEALED_CHUNK], blob[a.PREFIX_LEN + a.SEALED_CHUNK:]
    # The same two chunks sealed in the other order (indices swapped), each with its own flag.
    swapped_plain = pattern(size)
    extra_final = c.aes256gcm_encrypt(key, a.chunk_nonce(prefix, 2), b"more", a.chunk_aad(2, True))
    second_not_final = c.aes256gcm_encrypt(key, a.chunk_nonce(prefix, 1), swapped_plain[a.CHUNK_SIZE:], a.chunk_aad(1, False))
    flipped = bytearray(blob)
    flipped[a.PREFIX_LEN + 5] ^= 1
    cases = {
        "truncated_to_first_chunk": prefix + first,  # the first chunk is not final
        "reordered_chunks": prefix + second + first,
        "extended_with_a_chunk": prefix + first + second_not_final + extra_final,
        "flipped_bit": bytes(flipped),
        "last_byte_cut": blob[:-1],
        "other_prefix": fixed("attachment/negative/other-prefix", a.PREFIX_LEN) + blob[a.PREFIX_LEN:],
        "prefix_only": prefix,
    }
    out = []
    for name, bad in cases.items():
        try:
            a.decrypt_bytes(key, bad)
        except c.CryptoError as exc:
            code = exc.code
        else:
            raise AssertionError(f"negative vector {name} decrypts")
        out.append({"name": name, "blob_size": len(bad), "blob_sha256_hex": hashlib.sha256(bad).hexdigest(), "error": code})
    return {"key_hex": key.hex(), "prefix_hex": prefix.hex(), "other_prefix_hex": fixed("attachment/negative/other-prefix", a.PREFIX_LEN).hex(),
            "size": size, "cases": out}


def build() -> dict[str, Any]:
    sizes = {
        "empty": 0, "short": 13, "one_full_chunk": a.CHUNK_SIZE, "two_chunks": a.CHUNK_SIZE + 1,
        "three_chunks": 2 * a.CHUNK_SIZE + 12345,
    }
    return {
        "description": (
            "Moot attachment encryption v1 (docs/crypto.md section 12). A file of `size` bytes is pattern(size): "
            "byte i is i % 251. blob = prefix || AES-256-GCM chunks; blob_sha256_hex is the blob id. Each negative "
            "case is built from the blob of negative.size bytes under negative.key_hex and prefix_hex as its name "
            "says (docs/crypto.md 12.4) and must fail with `error`; blob_sha256_hex checks the construction."
        ),
        "chunk_size": a.CHUNK_SIZE, "prefix_len": a.PREFIX_LEN, "label": a.LABEL.decode(),
        "vectors": [vector(name, size) for name, size in sizes.items()],
        "negative": negatives(),
    }


def main() -> int:
    text = json.dumps(build(), indent=1) + "\n"
    if "--check" in sys.argv:
        if OUTPUT.read_text(encoding="utf-8") != text:
            print(f"{OUTPUT} is stale: run tools/gen_attachment_vectors.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text, encoding="utf-8")
    print(f"wrote {OUTPUT}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
