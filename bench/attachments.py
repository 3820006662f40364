"""Attachments across two nodes: upload to one node, download through the other.

    python bench/attachments.py [--quick] [--size-mb N] [--small-mb N]

Two ``moot run`` processes federate over loopback (riverside, and hilltop with
riverside as its static peer), SQLite, mDNS off. alice (riverside) encrypts a file
of random bytes once (cli/attachments.py; not timed), then for a small file and for
the large one (default 1 MB and 50 MB; quick 1 MB and 10 MB):

1. **upload**: the encrypted file is streamed from disk to riverside
   (``POST /api/v1/attachments``, Content-Length) until riverside answers with the
   blob id (the file is fsynced and recorded);
2. alice sends bob (hilltop) the message that carries it (not timed);
3. **download**: bob fetches it from hilltop (``GET /api/v1/attachments/<id>``),
   which fetches it from riverside over ``/moot/blobs/1`` and streams it through;
   the bytes are hashed and checked against the id, not kept.

``upload_mb_per_s`` / ``download_mb_per_s``: megabytes (10^6) of ciphertext per
second of wall time for the large file. ``peak_rss_mb``: the larger of the two
nodes' peak RSS (sampled every 50 ms) while the large file moved;
``peak_rss_mb_small``: the same for the small file. Streaming means the two stay
close: ``rss_growth_mb`` is their difference. ``node_cpu_s``: both nodes' CPU over
the large file's upload and download; ``other_cpu_s``: the rest of the machine's
busy CPU meanwhile (this process included; the machine may be shared).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench._common import NodeMonitor, client_user, emit, free_port, log, rounded  # noqa: E402
from bench.federation import _system_busy, federating_node, peer_address  # noqa: E402

MB = 1_000_000
READ = 1024 * 1024


def make_blob(path: Path, size: int) -> tuple[dict[str, Any], Path]:
    """Encrypt ``size`` random bytes into ``path``; (the payload fields, the blob's path)."""
    from cli import attachments as a
    from cli import crypto

    key = a.new_file_key()
    enc = a.AttachmentEncryptor(key)
    left = size
    with open(path, "wb") as out:
        while left > 0:
            piece = os.urandom(min(READ, left))
            left -= len(piece)
            out.write(enc.update(piece))
        out.write(enc.finish())
    assert enc.digest is not None
    return {"type": "attachment", "blob": enc.digest, "key": crypto.b64encode(key), "size": size,
            "mime": "application/octet-stream", "name": path.name}, path


async def move(alice: Any, bob: Any, blob: Path, payload: dict[str, Any], monitors: list[NodeMonitor]) -> dict[str, Any]:
    import httpx
    import trio

    for m in monitors:
        m.reset_peak()
    cpu0, busy0 = sum(m.cpu_seconds() for m in monitors), _system_busy()
    blob_size = blob.stat().st_size

    async def body() -> Any:
        async with await trio.open_file(blob, "rb") as fh:
            while chunk := await fh.read(READ):
                yield chunk

    async with httpx.AsyncClient(base_url=alice.base_url, timeout=300) as http:
        t0 = time.monotonic()
        r = await http.post(
            "/api/v1/attachments", params={"conversation": "bob@hilltop"}, content=body(),
            headers={"authorization": f"Bearer {alice.token}", "content-type": "application/octet-stream",
                     "content-length": str(blob_size)},
        )
        upload_s = time.monotonic() - t0
    r.raise_for_status()
    answer = r.json()
    assert answer["blob"] == payload["blob"], answer
    payload = {**payload, "node": answer["node"]}
    async with alice.connect() as live:
        await live.send_payload("bob@hilltop", payload, attachments=[payload["blob"]])
    digest = hashlib.sha256()
    received = 0
    async with httpx.AsyncClient(base_url=bob.base_url, timeout=300) as http:
        t0 = time.monotonic()
        async with http.stream(
            "GET", f"/api/v1/attachments/{payload['blob']}", params={"conversation": "alice@riverside", "node": "riverside"},
            headers={"authorization": f"Bearer {bob.token}"},
        ) as response:
            response.raise_for_status()
            async for chunk in response.aiter_raw(READ):
                digest.update(chunk)
                received += len(chunk)
        download_s = time.monotonic() - t0
    if digest.hexdigest() != payload["blob"] or received != blob_size:
        raise RuntimeError(f"downloaded {received} bytes that are not the blob")
    node_cpu = sum(m.cpu_seconds() for m in monitors) - cpu0
    return {
        "blob_bytes": blob_size, "upload_s": rounded(upload_s, 3), "download_s": rounded(download_s, 3),
        "upload_mb_per_s": rounded(blob_size / MB / upload_s), "download_mb_per_s": rounded(blob_size / MB / download_s),
        "peak_rss_mb": rounded(max(m.peak_rss for m in monitors) / 2**20, 1),
        "node_cpu_s": rounded(node_cpu), "other_cpu_s": rounded(_system_busy() - busy0 - node_cpu),
    }


async def run(riverside: Any, hilltop: Any, monitors: list[NodeMonitor], args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    import trio

    alice = await client_user(riverside.base_url, "alice")
    bob = await client_user(hilltop.base_url, "bob")
    with trio.fail_after(60):  # the nodes meet
        while True:
            try:
                await alice.user_devices("bob@hilltop")
                break
            except Exception:
                await trio.sleep(0.2)
    small_payload, small = make_blob(tmp / "small.bin", int(args.small_mb * MB))
    large_payload, large = make_blob(tmp / "large.bin", int(args.size_mb * MB))
    log("files encrypted; moving the small one")
    small_result = await move(alice, bob, small, small_payload, monitors)
    log(f"small: {small_result}; moving the large one")
    large_result = await move(alice, bob, large, large_payload, monitors)
    log(f"large: {large_result}")
    for client in (alice, bob):
        await client.aclose()
    return {
        "size_mb": args.size_mb, "small_mb": args.small_mb,
        "upload_mb_per_s": large_result["upload_mb_per_s"], "download_mb_per_s": large_result["download_mb_per_s"],
        "upload_s": large_result["upload_s"], "download_s": large_result["download_s"],
        "node_cpu_s": large_result["node_cpu_s"], "other_cpu_s": large_result["other_cpu_s"],
        "peak_rss_mb_small": small_result["peak_rss_mb"],
        "rss_growth_mb": rounded(large_result["peak_rss_mb"] - small_result["peak_rss_mb"], 1),
        "small": small_result,
        "peak_rss_mb": large_result["peak_rss_mb"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--size-mb", type=float, default=None, help="the large file, MB (default 50; quick 10)")
    ap.add_argument("--small-mb", type=float, default=1.0, help="the small file, MB")
    args = ap.parse_args()
    if args.size_mb is None:
        args.size_mb = 10.0 if args.quick else 50.0
    if not 0 < args.small_mb <= args.size_mb <= 1000:
        ap.error("need 0 < --small-mb <= --size-mb <= 1000")

    import trio

    with tempfile.TemporaryDirectory(prefix="moot-bench-attachments-") as tmp:
        root = Path(tmp)
        r_port, h_port = free_port(), free_port()
        limit = {"MOOT_MAX_ATTACHMENT_BYTES": str(int(args.size_mb * MB * 1.01) + 1024 * 1024)}
        riverside = federating_node(root, "riverside", r_port, **limit)
        riverside.data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        hilltop = federating_node(root, "hilltop", h_port, peers=[peer_address(riverside, r_port)], **limit)
        try:
            riverside.start()
            hilltop.start()
            monitors = [NodeMonitor(riverside.pid, interval=0.05), NodeMonitor(hilltop.pid, interval=0.05)]
            for m in monitors:
                m.__enter__()
            try:
                result = trio.run(run, riverside, hilltop, monitors, args, root)
            finally:
                for m in monitors:
                    m.__exit__()
        finally:
            hilltop.stop()
            riverside.stop()
    log(f"{args.size_mb} MB: upload {result['upload_mb_per_s']} MB/s, download {result['download_mb_per_s']} MB/s, "
        f"peak RSS {result['peak_rss_mb']} MB (small file: {result['peak_rss_mb_small']} MB)")
    emit("attachments-quick" if args.quick else "attachments", {"bench": "attachments", "quick": args.quick, **result})


if __name__ == "__main__":
    main()
