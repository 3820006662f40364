"""Regenerate docs/federation_vectors_v1.json, byte vectors of ``/moot/federation/1``.

    python tools/gen_federation_vectors.py          # rewrite the file
    python tools/gen_federation_vectors.py --check  # exit 1 if the file is stale

The node key is SHA-256 of a label and Ed25519 signatures are deterministic, so
the output is byte-identical on rerun. ``frame_hex`` is a whole frame as written
on the stream: the 4-byte big-endian length, then the JSON body.
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

import msgspec  # noqa: E402
import nacl.signing  # noqa: E402

from federation import events as ev  # noqa: E402
from federation import wire  # noqa: E402

OUTPUT = ROOT / "docs" / "federation_vectors_v1.json"


def node_key(name: str) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"moot/v1/test-vector/node/" + name.encode()).digest())


def build() -> dict[str, Any]:
    riverside = node_key("riverside")
    envelope = b'{"v":1,"id":"m1","sender":"alice@riverside","sender_device":"d1","conversation":"bob@hilltop","keys":[]}'
    message = ev.MessageEvent(
        v=1, origin="riverside", id=ev.message_event_id("alice@riverside", "m1"), ts=1767225600000,
        sender="alice@riverside", sender_device="d1", to="bob@hilltop", message_id="m1",
        envelope=msgspec.Raw(envelope),
    )
    receipt = ev.ReceiptEvent(
        v=1, origin="hilltop", id=ev.receipt_event_id("delivered", "bob@hilltop", "m1", "alice@riverside"),
        ts=1767225601000, kind="delivered", by="bob@hilltop", to="alice@riverside", message_id="m1",
    )
    hilltop = node_key("hilltop")
    events = []
    for name, event, key in (("message", message, riverside), ("receipt", receipt, hilltop)):
        raw, sig = ev.sign_event(event, key)
        events.append({
            "name": name, "origin": event.origin, "origin_public_hex": key.verify_key.encode().hex(),
            "event": raw.decode(), "signature_input_hex": (ev.LABEL + raw).hex(), "sig": sig,
        })
    first = ev.signed(1, message, riverside)
    frames = [
        ("hello", wire.Hello(v=1, node="riverside")),
        ("batch", wire.Batch(events=[first])),
        ("ack", wire.Ack(upto=1)),
        ("reject", wire.Reject(oid=1, code="bad_signature", message="event 1 is not signed by riverside")),
        ("ping", wire.Ping(n=7)),
        ("pong", wire.Pong(n=7)),
        ("error", wire.Error(code="too_large", message="a frame of 2000000 bytes exceeds the limit of 1048576")),
    ]
    return {
        "protocol": wire.PROTOCOL_ID,
        "node_keys": {
            name: {"seed_hex": bytes(node_key(name)).hex(), "public_hex": node_key(name).verify_key.encode().hex()}
            for name in ("riverside", "hilltop")
        },
        "events": events,
        "frames": [{"name": name, "frame_hex": wire.encode(frame).hex()} for name, frame in frames],
    }


def render() -> str:
    return json.dumps(build(), indent=2, ensure_ascii=False) + "\n"


def main() -> int:
    text = render()
    if "--check" in sys.argv[1:]:
        if OUTPUT.read_text() != text:
            print(f"{OUTPUT} is stale: run python tools/gen_federation_vectors.py", file=sys.stderr)
            return 1
        return 0
    OUTPUT.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
