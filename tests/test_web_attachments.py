"""Attachments in the web page (Chromium): web/static/js/attachments.js against the shared
vectors, and two browsers on two federated node processes sending each other an
image (previewed at once, opened with a download progress bar) and a document."""

from __future__ import annotations

import hashlib
import json
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import expect

from tests.browser import chromium
from tests.nodes import NodeProcess, federated_pair
from tests.webchat import conversation_item, open_chat, person, screenshot, sign_up, write

ROOT = Path(__file__).resolve().parent.parent
VECTORS: dict[str, Any] = json.loads((ROOT / "docs" / "crypto_vectors_attachments_v1.json").read_text())


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


# Runs in the page: every vector and negative case, {name: null | "failure"}.
RUNNER_JS = r"""
async (V) => {
  const m = await import('/js/attachments.js');
  const C = await import('/js/crypto.js');
  const H = C.hexToBytes, X = C.bytesToHex;
  const pattern = (n) => { const b = new Uint8Array(n); for (let i = 0; i < n; i++) b[i] = i % 251; return b; };
  const results = {};
  const check = async (name, f) => {
    try { await f(); results[name] = null; } catch (e) { results[name] = `${e.name}: ${e.message}`; }
  };
  const eq = (what, got, want) => { if (got !== want) throw new Error(`${what}: got ${got}, want ${want}`); };
  for (const v of V.vectors) {
    await check(v.name, async () => {
      const key = H(v.key_hex), data = pattern(v.size);
      const e = await m.Encryptor.create(key, H(v.prefix_hex));
      const parts = [];
      for (let i = 0; i < data.length; i += 10007) parts.push(await e.update(data.subarray(i, i + 10007)));
      parts.push(await e.finish());
      const blob = C.concat(...parts);
      eq('blob size', blob.length, v.blob_size);
      eq('encryptedSize', m.encryptedSize(v.size), v.blob_size);
      eq('blob sha256', await m.sha256Hex(blob), v.blob_sha256_hex);
      if (v.blob_hex !== undefined) eq('blob', X(blob), v.blob_hex);
      const d = await m.Decryptor.create(key);
      const outs = [];
      for (let i = 0; i < blob.length; i += 7001) outs.push(await d.feed(blob.subarray(i, i + 7001)));
      outs.push(await d.finish());
      eq('plaintext sha256', await m.sha256Hex(C.concat(...outs)), v.plaintext_sha256_hex);
    });
  }
  const n = V.negative;
  const key = H(n.key_hex), prefix = H(n.prefix_hex), data = pattern(n.size);
  const good = await m.encryptBytes(key, data, prefix);
  const cut = m.PREFIX_LEN + m.SEALED_CHUNK;
  const first = good.subarray(m.PREFIX_LEN, cut), second = good.subarray(cut);
  const recipes = {
    truncated_to_first_chunk: async () => C.concat(prefix, first),
    reordered_chunks: async () => C.concat(prefix, second, first),
    extended_with_a_chunk: async () => C.concat(prefix, first,
      await C.aes256gcmEncrypt(key, m.chunkNonce(prefix, 1), data.subarray(m.CHUNK_SIZE), m.chunkAad(1, false)),
      await C.aes256gcmEncrypt(key, m.chunkNonce(prefix, 2), C.utf8('more'), m.chunkAad(2, true))),
    flipped_bit: async () => { const b = good.slice(); b[m.PREFIX_LEN + 5] ^= 1; return b; },
    last_byte_cut: async () => good.subarray(0, good.length - 1),
    other_prefix: async () => C.concat(H(n.other_prefix_hex), good.subarray(m.PREFIX_LEN)),
    prefix_only: async () => prefix,
  };
  for (const c of n.cases) {
    await check(`negative.${c.name}`, async () => {
      const bad = await recipes[c.name]();
      eq('built blob', await m.sha256Hex(bad), c.blob_sha256_hex);
      let code = 'no error';
      try { await m.decryptBytes(key, bad); } catch (e) { code = e instanceof C.CryptoError ? e.code : String(e); }
      eq('error', code, c.error);
    });
  }
  return results;
}
"""


def test_the_page_reproduces_every_attachment_vector(browser, tmp_path):
    node = NodeProcess(tmp_path / "node", _port())
    node.start()
    try:
        page = browser.new_page()
        try:
            page.goto(node.base_url + "/")
            results = page.evaluate(RUNNER_JS, VECTORS)
        finally:
            page.close()
    finally:
        node.stop()
    expected = {v["name"] for v in VECTORS["vectors"]} | {f"negative.{c['name']}" for c in VECTORS["negative"]["cases"]}
    assert set(results) == expected
    assert {k: v for k, v in results.items() if v is not None} == {}


def _port() -> int:
    from tests.nodes import free_port

    return free_port()


def noise_png(width: int, height: int) -> bytes:
    """A real PNG of random pixels (it does not compress: a file of some megabytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + os.urandom(3 * width) for _ in range(height))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 0)) + chunk(b"IEND", b""))


DROP_JS = """
(f) => {
  const dt = new DataTransfer();
  dt.items.add(new File([new Uint8Array(f.bytes)], f.name, {type: f.type}));
  const target = document.getElementById('conversation');
  target.dispatchEvent(new DragEvent('dragover', {dataTransfer: dt, bubbles: true, cancelable: true}));
  target.dispatchEvent(new DragEvent('drop', {dataTransfer: dt, bubbles: true, cancelable: true}));
}
"""

PASTE_JS = """
(f) => {
  const dt = new DataTransfer();
  dt.items.add(new File([new Uint8Array(f.bytes)], f.name, {type: f.type}));
  document.getElementById('compose').dispatchEvent(new ClipboardEvent('paste', {clipboardData: dt, bubbles: true, cancelable: true}));
}
"""


def wav_beep(seconds: float = 0.5, rate: int = 8000) -> bytes:
    """A real WAV file: a 440 Hz tone, 8-bit mono."""
    import math

    samples = bytes(int(128 + 100 * math.sin(2 * math.pi * 440 * i / rate)) for i in range(int(seconds * rate)))
    fmt = struct.pack("<HHIIHH", 1, 1, rate, rate, 1, 8)
    return (b"RIFF" + struct.pack("<I", 36 + len(samples)) + b"WAVE" + b"fmt " + struct.pack("<I", 16) + fmt
            + b"data" + struct.pack("<I", len(samples)) + samples)


# Records every progress bar the page shows (they may last only a few frames).
PROGRESS_WATCH = """
window.__progress = [];
new MutationObserver((records) => {
  for (const r of records) for (const n of r.addedNodes) {
    if (!(n instanceof Element)) continue;
    for (const p of [n, ...n.querySelectorAll('progress')]) {
      if (p.tagName === 'PROGRESS') window.__progress.push(p.getAttribute('aria-label'));
    }
  }
}).observe(document, {subtree: true, childList: true});
"""


def test_an_image_and_a_document_cross_two_nodes_between_browsers(browser, tmp_path):
    picture = noise_png(1200, 900)
    document = os.urandom(300_000)
    with federated_pair(tmp_path) as (riverside, hilltop):
        with person(browser, riverside.base_url) as alice, person(browser, hilltop.base_url) as bob:
            for page in (alice, bob):
                page.evaluate(PROGRESS_WATCH)
            sign_up(alice, "alice")
            sign_up(bob, "bob")
            alice.locator("#search").fill("bob@hilltop")
            alice.locator("#search-results button[data-address='bob@hilltop']").click()
            write(alice, "Here is the photo")

            alice.locator("#attach-input").set_input_files(
                {"name": "river.png", "mimeType": "image/png", "buffer": picture})
            sent = alice.locator("#message-list li.message[data-mine='1'] figure.attachment[data-kind='image']")
            expect(sent.locator("img.thumb")).to_be_visible()
            expect(sent.locator("xpath=ancestor::li")).to_have_attribute("data-status", "delivered")
            expect(alice.locator("#uploads .upload")).to_have_count(0)
            seen = alice.evaluate("() => window.__progress")
            assert "Uploading river.png" in seen, seen

            # bob sees the preview at once (the thumbnail came inside the message) ...
            expect(conversation_item(bob, "alice@riverside").locator(".preview-text")).to_have_text("Attachment: river.png")
            open_chat(bob, "alice@riverside")
            got = bob.locator("#message-list li.message[data-mine='0'] figure.attachment[data-kind='image']")
            thumb = got.locator("img.thumb")
            expect(thumb).to_be_visible()
            assert thumb.get_attribute("src").startswith("data:image/jpeg;base64,")
            assert bob.evaluate("(img) => img.naturalWidth", thumb.element_handle()) == 160
            expect(got.locator("figcaption")).to_contain_text("river.png")
            screenshot(bob, "attachment-preview")
            # ... and opens it: fetched through hilltop from riverside, decrypted in the page.
            got.locator("button.thumb").click()
            full = got.locator("img.full")
            expect(full).to_be_visible()
            assert full.get_attribute("src").startswith("blob:")
            assert bob.evaluate("(img) => [img.naturalWidth, img.naturalHeight]", full.element_handle()) == [1200, 900]
            assert "Downloading river.png" in bob.evaluate("() => window.__progress")
            screenshot(bob, "attachment-opened")

            # A document the other way: name and size, then a download of the same bytes.
            bob.locator("#attach-input").set_input_files(
                {"name": "notes.bin", "mimeType": "application/octet-stream", "buffer": document})
            doc = alice.locator("#message-list li.message[data-mine='0'] figure.attachment[data-kind='file']")
            expect(doc.locator("figcaption")).to_contain_text("notes.bin (293.0 KB)")
            with alice.expect_download() as download:
                doc.locator("button.open").click()
            saved = Path(download.value.path())
            assert hashlib.sha256(saved.read_bytes()).digest() == hashlib.sha256(document).digest()
            expect(doc.locator("a.save")).to_have_text("Save notes.bin (293.0 KB)")
            # Audio dropped on the conversation: a player once fetched.
            bob.evaluate(DROP_JS, {"name": "beep.wav", "type": "audio/wav", "bytes": list(wav_beep())})
            audio = alice.locator("#message-list li.message[data-mine='0'] figure.attachment[data-kind='audio']")
            expect(audio.locator("figcaption")).to_contain_text("beep.wav")
            audio.locator("button.open").click()
            player = audio.locator("audio")
            expect(player).to_be_attached()
            alice.wait_for_function("(el) => el.readyState >= 1 && el.duration > 0.4", arg=player.element_handle())
            # A file pasted into the message box goes too.
            alice.evaluate(PASTE_JS, {"name": "pasted.txt", "type": "text/plain", "bytes": list(b"pasted text")})
            expect(bob.locator("#message-list figure.attachment[data-kind='file'] figcaption", has_text="pasted.txt")).to_contain_text("pasted.txt (11 B)")
            # Redrawing the conversation kept the same player, still loaded.
            assert alice.evaluate("(el) => el.isConnected && el.duration", player.element_handle()) > 0.4
            screenshot(alice, "attachment-audio")
            # The page kept the messages: after a reload the preview is still there.
            bob.reload()
            open_chat(bob, "alice@riverside")
            expect(bob.locator("#message-list figure.attachment[data-kind='image'] img.thumb")).to_be_visible()
