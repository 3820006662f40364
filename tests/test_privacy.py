"""The node only ever holds ciphertext: no message text, token, password or private key
reaches its database files or its logs."""

from __future__ import annotations

import base64
import secrets
from pathlib import Path

from cli.client import IncomingMessage, MootClient, ReceiptEvent
from tests.nodes import PASSWORD, NodeProcess, free_port, new_user, next_of


def every_byte(data_dir: Path, log_path: Path) -> dict[str, bytes]:
    """Every file of the data directory (database, WAL, shared memory, key, config) and the log."""
    files = {str(p): p.read_bytes() for p in sorted(data_dir.rglob("*")) if p.is_file() and not p.is_socket()}
    files[str(log_path)] = log_path.read_bytes()
    return files


def leaks(files: dict[str, bytes], secrets_: dict[str, bytes]) -> list[str]:
    return [f"{what} in {path}" for path, data in files.items() for what, needle in secrets_.items() if needle in data]


def encodings(label: str, raw: bytes) -> dict[str, bytes]:
    """A secret as raw bytes, base64url, standard base64 and hex."""
    return {
        f"{label} (raw)": raw,
        f"{label} (b64url)": base64.urlsafe_b64encode(raw).rstrip(b"="),
        f"{label} (b64)": base64.b64encode(raw).rstrip(b"="),
        f"{label} (hex)": raw.hex().encode(),
    }


async def test_marker_text_tokens_and_keys_never_reach_disk_or_logs(tmp_path):
    node = NodeProcess(tmp_path / "node", free_port(), MOOT_LOG_LEVEL="debug")
    node.start()
    clients: list[MootClient] = []
    try:
        marker = "MOOT-MARKER-" + secrets.token_hex(8)
        alice, bob = await new_user(node.base_url, "alice"), await new_user(node.base_url, "bob")
        clients += [alice, bob]

        async with alice.connect() as la, bob.connect() as lb:
            sent = [await la.send_text("bob@riverside", f"{marker} number {i}") for i in range(20)]
            for mid in sent:
                assert marker in (await next_of(lb, IncomingMessage, id=mid)).text
            await lb.mark_read("alice@riverside", sent[-1])
            await next_of(la, ReceiptEvent, id=sent[-1], kind="read")
            reply = await lb.send_text("alice@riverside", f"re: {marker}")
            assert (await next_of(la, IncomingMessage, id=reply)).text == f"re: {marker}"
        history = await bob.history("alice@riverside")
        assert len(history["messages"]) == 21

        secret_values: dict[str, bytes] = {"marker": marker.encode(), "password": PASSWORD.encode()}
        for client, name in ((alice, "alice"), (bob, "bob")):
            assert client.token and client.keys
            secret_values[f"{name}'s token"] = client.token.encode()
            secret_values |= encodings(f"{name}'s identity key", client.keys.identity_seed)
            secret_values |= encodings(f"{name}'s DH key", client.keys.dh_private)
            for spk_id, key in client.keys.signed_prekeys.items():
                secret_values |= encodings(f"{name}'s signed prekey {spk_id}", key)

        # While the node runs (the WAL holds the newest pages) ...
        running = every_byte(node.data_dir, node.log_path)
        assert any(path.endswith("moot.db-wal") for path in running), "expected SQLite's WAL file"
        assert sum(len(b) for b in running.values()) > 50_000  # the messages are there, encrypted
        assert leaks(running, secret_values) == []
        # ... and after it checkpointed and stopped.
        assert node.stop() == 0
        stopped = every_byte(node.data_dir, node.log_path)
        assert leaks(stopped, secret_values) == []
        # The log did record the traffic (so the check above looked at real lines).
        log_text = stopped[str(node.log_path)].decode()
        assert "ws.open" in log_text and "alice" in log_text
    finally:
        node.stop()
        for client in clients:
            await client.aclose()
