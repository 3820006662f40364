// Attachments in the page: the file encryption of docs/crypto.md section 12 on
// WebCrypto, uploads with progress (XMLHttpRequest: fetch reports none), downloads
// with progress (a fetch stream reader), previews, players, and the composer's attach
// button, drag-and-drop and paste. chat.js only carries the resulting payload.
//
// A file is encrypted with a fresh key in 64 KiB chunks before it leaves the page;
// the node stores ciphertext and never sees the key, name or type, which travel inside
// the end-to-end encrypted message: {type: "attachment", blob, node, key, size, mime,
// name, thumb?, text?}.

import * as C from "./crypto.js";
import { ApiError, api, enc } from "./api.js";

export const CHUNK_SIZE = 64 * 1024;
export const TAG_LEN = 16;
export const SEALED_CHUNK = CHUNK_SIZE + TAG_LEN;
export const PREFIX_LEN = 8;
export const KEY_LEN = 32;
export const LABEL = C.utf8("moot/v1/attachment");
const READ_BYTES = 16 * CHUNK_SIZE; // read from a File this much at a time
const THUMB_PX = 160;
const THUMB_MAX_CHARS = 24 * 1024; // a data URL inside the message: keep it small
const DIGEST_CHECK_MAX = 64 * 1024 * 1024; // larger uploads trust the node's name for the blob

// -- the format ------------------------------------------------------------------------------

export function chunkNonce(prefix, index) {
  return C.concat(prefix, C.u32be(index));
}

export function chunkAad(index, final) {
  return C.concat(LABEL, C.u32be(index), C.u8(final ? 1 : 0));
}

export function chunkCount(size) {
  return Math.max(1, Math.ceil(size / CHUNK_SIZE));
}

/** The blob's size for a file of `size` bytes (what the node stores and limits). */
export function encryptedSize(size) {
  return PREFIX_LEN + size + TAG_LEN * chunkCount(size);
}

async function importKey(key, usage) {
  if (!(key instanceof Uint8Array) || key.length !== KEY_LEN) throw new C.InvalidKey("a file key is 32 bytes");
  return crypto.subtle.importKey("raw", key, "AES-GCM", false, [usage]);
}

/** Encrypts a file fed in pieces; `update` and `finish` return blob bytes (the first ones with the prefix). */
export class Encryptor {
  static async create(key, prefix = crypto.getRandomValues(new Uint8Array(PREFIX_LEN))) {
    if (prefix.length !== PREFIX_LEN) throw new Error("the nonce prefix is 8 bytes");
    return new Encryptor(await importKey(key, "encrypt"), prefix);
  }

  constructor(cryptoKey, prefix) {
    this.key = cryptoKey;
    this.prefix = prefix;
    this.pending = new Uint8Array(0);
    this.index = 0;
    this.started = false;
  }

  async seal(plain, final) {
    const sealed = new Uint8Array(await crypto.subtle.encrypt(
      { name: "AES-GCM", iv: chunkNonce(this.prefix, this.index), additionalData: chunkAad(this.index, final), tagLength: 128 },
      this.key, plain));
    this.index += 1;
    return sealed;
  }

  out(parts) {
    if (!this.started) {
      this.started = true;
      parts.unshift(this.prefix);
    }
    return C.concat(...parts);
  }

  async update(data) {
    let buf = this.pending.length ? C.concat(this.pending, data) : data;
    const parts = [];
    // A full chunk is sealed only once more follows: it may be the final one.
    while (buf.length > CHUNK_SIZE) {
      parts.push(await this.seal(buf.subarray(0, CHUNK_SIZE), false));
      buf = buf.subarray(CHUNK_SIZE);
    }
    this.pending = buf.slice();
    return this.out(parts);
  }

  async finish() {
    return this.out([await this.seal(this.pending, true)]);
  }
}

/** Decrypts a blob fed in pieces; `feed` returns the plaintext known not to be the end,
 * `finish` the rest, or throws DecryptionFailed (cut short, extended, reordered, altered). */
export class Decryptor {
  static async create(key) {
    return new Decryptor(await importKey(key, "decrypt"));
  }

  constructor(cryptoKey) {
    this.key = cryptoKey;
    this.prefix = null;
    this.pending = new Uint8Array(0);
    this.index = 0;
    this.size = 0;
  }

  async open(sealed, final) {
    let plain;
    try {
      plain = new Uint8Array(await crypto.subtle.decrypt(
        { name: "AES-GCM", iv: chunkNonce(this.prefix, this.index), additionalData: chunkAad(this.index, final), tagLength: 128 },
        this.key, sealed));
    } catch {
      throw new C.DecryptionFailed("the attachment does not decrypt");
    }
    this.index += 1;
    this.size += plain.length;
    return plain;
  }

  async feed(data) {
    let buf = this.pending.length ? C.concat(this.pending, data) : data;
    if (this.prefix === null) {
      if (buf.length < PREFIX_LEN) {
        this.pending = buf.slice();
        return new Uint8Array(0);
      }
      this.prefix = buf.slice(0, PREFIX_LEN);
      buf = buf.subarray(PREFIX_LEN);
    }
    const parts = [];
    while (buf.length > SEALED_CHUNK) {
      parts.push(await this.open(buf.subarray(0, SEALED_CHUNK), false));
      buf = buf.subarray(SEALED_CHUNK);
    }
    this.pending = buf.slice();
    return parts.length === 1 ? parts[0] : C.concat(...parts);
  }

  async finish() {
    if (this.prefix === null || this.pending.length < TAG_LEN) throw new C.DecryptionFailed("the attachment is cut short");
    if (this.pending.length === TAG_LEN && this.index > 0) throw new C.DecryptionFailed("an empty chunk after others");
    return this.open(this.pending, true);
  }
}

/** The whole blob of `data` (tests, small files). */
export async function encryptBytes(key, data, prefix = undefined) {
  const e = await Encryptor.create(key, prefix);
  return C.concat(await e.update(data), await e.finish());
}

export async function decryptBytes(key, blob) {
  const d = await Decryptor.create(key);
  return C.concat(await d.feed(blob), await d.finish());
}

export async function sha256Hex(data) {
  return C.bytesToHex(new Uint8Array(await crypto.subtle.digest("SHA-256", data)));
}

// -- sending -------------------------------------------------------------------------------

let limits = null;

async function maxAttachmentBytes() {
  if (!limits) limits = (await api("GET", "/api/v1/info")).limits || {};
  return limits.max_attachment_bytes || Infinity;
}

export function formatSize(n) {
  if (n < 1024) return `${n} B`;
  if (n < 1024 * 1024) return `${(n / 1024).toFixed(1)} KB`;
  if (n < 1024 * 1024 * 1024) return `${(n / 1024 / 1024).toFixed(1)} MB`;
  return `${(n / 1024 / 1024 / 1024).toFixed(1)} GB`;
}

/** A small JPEG of an image file as a data URL (null if the browser cannot draw it). */
export async function thumbnail(file) {
  try {
    const bitmap = await createImageBitmap(file);
    const scale = Math.min(1, THUMB_PX / Math.max(bitmap.width, bitmap.height));
    const canvas = document.createElement("canvas");
    canvas.width = Math.max(1, Math.round(bitmap.width * scale));
    canvas.height = Math.max(1, Math.round(bitmap.height * scale));
    canvas.getContext("2d").drawImage(bitmap, 0, 0, canvas.width, canvas.height);
    bitmap.close();
    for (const quality of [0.7, 0.5, 0.3]) {
      const url = canvas.toDataURL("image/jpeg", quality);
      if (url.length <= THUMB_MAX_CHARS) return url;
    }
  } catch {
    // not an image this browser can decode: no preview
  }
  return null;
}

/** Encrypt a File into a Blob of ciphertext, reading it in slices. */
async function encryptFile(file, key, onProgress) {
  const e = await Encryptor.create(key);
  const parts = [];
  for (let at = 0; at < file.size; at += READ_BYTES) {
    const piece = new Uint8Array(await file.slice(at, at + READ_BYTES).arrayBuffer());
    parts.push(await e.update(piece));
    onProgress(Math.min(file.size, at + READ_BYTES) / Math.max(1, file.size));
  }
  parts.push(await e.finish());
  return new Blob(parts, { type: "application/octet-stream" });
}

/** POST the ciphertext with upload progress; resolves to the node's answer {blob, size, node}. */
function uploadBlob(peer, body, onProgress) {
  return new Promise((resolve, reject) => {
    const xhr = new XMLHttpRequest();
    xhr.open("POST", `/api/v1/attachments?conversation=${enc(peer)}`);
    xhr.withCredentials = true;
    xhr.setRequestHeader("Content-Type", "application/octet-stream");
    xhr.upload.onprogress = (e) => { if (e.lengthComputable) onProgress(e.loaded / e.total); };
    xhr.onerror = () => reject(new ApiError(0, "network", "The node cannot be reached. Check your connection."));
    xhr.onload = () => {
      let data = null;
      try {
        data = JSON.parse(xhr.responseText);
      } catch {
        data = null;
      }
      if (xhr.status >= 200 && xhr.status < 300 && data) resolve(data);
      else {
        const err = (data && data.error) || {};
        reject(new ApiError(xhr.status, err.code || `http_${xhr.status}`, err.message || "upload failed", err.details || {}));
      }
    };
    xhr.send(body);
  });
}

/** Uploads in progress, per conversation: {id, name, phase: "encrypting"|"uploading", progress, error}. */
export const uploads = new Map();
let uploadSeq = 0;

/**
 * Encrypt `file`, upload it for the conversation with `peer`, and send the message that
 * carries it (chat.sendAttachment). `changed()` is called as progress moves.
 */
export async function sendFile(chat, peer, file, changed, caption = "") {
  const entry = { id: ++uploadSeq, name: file.name || "file", size: file.size, phase: "encrypting", progress: 0, error: null };
  const list = uploads.get(peer) || [];
  list.push(entry);
  uploads.set(peer, list);
  const update = (fields) => { Object.assign(entry, fields); changed(); };
  try {
    const limit = await maxAttachmentBytes();
    if (encryptedSize(file.size) > limit) {
      throw new Error(`${entry.name} is too large: this node takes files up to ${formatSize(limit - 1024)}.`);
    }
    update({});
    const key = crypto.getRandomValues(new Uint8Array(KEY_LEN));
    const mime = file.type || "application/octet-stream";
    const thumb = mime.startsWith("image/") ? await thumbnail(file) : null;
    const body = await encryptFile(file, key, (p) => update({ progress: p }));
    update({ phase: "uploading", progress: 0 });
    const answer = await uploadBlob(peer, body, (p) => update({ progress: p }));
    if (body.size <= DIGEST_CHECK_MAX && answer.blob !== await sha256Hex(await body.arrayBuffer())) {
      throw new Error("the node named another file than the one uploaded");
    }
    const payload = { type: "attachment", blob: answer.blob, node: answer.node, key: C.b64encode(key), size: file.size,
      mime, name: entry.name, ts: Date.now() };
    if (thumb) payload.thumb = thumb;
    if (caption) payload.text = caption;
    await chat.sendAttachment(peer, payload);
    list.splice(list.indexOf(entry), 1);
    changed();
  } catch (err) {
    update({ error: err.message || String(err) });
  }
}

export function dismissUpload(peer, id) {
  const list = uploads.get(peer) || [];
  const at = list.findIndex((u) => u.id === id);
  if (at >= 0) list.splice(at, 1);
}

// -- receiving -------------------------------------------------------------------------------

/** The attachment of a decrypted payload, checked (null if it is not a valid one). */
export function attachmentOf(payload) {
  const ok = payload && payload.type === "attachment" && /^[0-9a-f]{64}$/.test(payload.blob)
    && typeof payload.node === "string" && /^[a-z0-9][a-z0-9-]{0,62}$/.test(payload.node)
    && typeof payload.key === "string" && Number.isSafeInteger(payload.size) && payload.size >= 0
    && typeof payload.mime === "string" && typeof payload.name === "string";
  if (!ok) return null;
  try {
    C.b64decode(payload.key, { length: KEY_LEN, what: "key" });
  } catch {
    return null;
  }
  // Only a JPEG data URL made by a thumbnailer is shown inline; anything else is dropped.
  const thumb = typeof payload.thumb === "string" && payload.thumb.startsWith("data:image/jpeg;base64,")
    && payload.thumb.length <= 64 * 1024 ? payload.thumb : null;
  return { blob: payload.blob, node: payload.node, key: payload.key, size: payload.size, mime: payload.mime.slice(0, 100),
    name: payload.name.slice(0, 255) || "file", thumb, caption: typeof payload.text === "string" ? payload.text : "" };
}

/** Downloads by blob: {state: "loading"|"done"|"failed", progress, url, error}. Object URLs live for the page's life. */
export const downloads = new Map();

/** Fetch (through this node), decrypt and keep an attachment; `changed()` on progress. */
export async function download(att, conversation, changed) {
  const known = downloads.get(att.blob);
  if (known && known.state !== "failed") return known;
  const entry = { state: "loading", progress: 0, url: null, error: null };
  downloads.set(att.blob, entry);
  changed();
  try {
    const response = await fetch(`/api/v1/attachments/${att.blob}?conversation=${enc(conversation)}&node=${enc(att.node)}`,
      { credentials: "same-origin" });
    if (!response.ok) {
      let err = {};
      try {
        err = (await response.json()).error || {};
      } catch {
        err = {};
      }
      throw new ApiError(response.status, err.code || `http_${response.status}`, err.message || "download failed");
    }
    const total = Number(response.headers.get("content-length")) || encryptedSize(att.size);
    const d = await Decryptor.create(C.b64decode(att.key, { length: KEY_LEN, what: "key" }));
    const parts = [];
    const reader = response.body.getReader();
    let received = 0;
    for (;;) {
      const { done, value } = await reader.read();
      if (done) break;
      received += value.length;
      const plain = await d.feed(value);
      if (plain.length) parts.push(plain);
      entry.progress = received / total;
      changed();
    }
    parts.push(await d.finish());
    if (d.size !== att.size) throw new C.DecryptionFailed("the attachment is not the size its message says");
    entry.url = URL.createObjectURL(new Blob(parts, { type: att.mime }));
    entry.state = "done";
  } catch (err) {
    entry.state = "failed";
    entry.error = err.message || String(err);
  }
  changed();
  return entry;
}

// -- the page's parts ----------------------------------------------------------------------

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined || v === false) continue;
    if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : v);
  }
  node.append(...children.filter((c) => c !== null && c !== undefined));
  return node;
}

export function kindOf(mime) {
  if (/^image\/(png|jpeg|gif|webp|avif|bmp)$/.test(mime)) return "image";
  if (mime.startsWith("audio/")) return "audio";
  if (mime.startsWith("video/")) return "video";
  return "file";
}

const doneViews = new Map();

/** The element showing an attachment in a message; `changed()` asks the page to redraw. */
export function attachmentView(att, conversation, changed) {
  const kind = kindOf(att.mime);
  const got = downloads.get(att.blob);
  const fetchIt = () => download(att, conversation, changed).then((d) => {
    if (d.state === "done" && kind === "file") saveAs(d.url, att.name);
  });
  const label = `${att.name} (${formatSize(att.size)})`;
  const box = el("figure", { class: `attachment ${kind}`, "data-kind": kind, "data-blob": att.blob,
    "data-state": got ? got.state : "remote" });
  if (got && got.state === "done") {
    // The same element each time: redrawing the conversation must not restart a player.
    const shown = doneViews.get(att.blob);
    if (shown) return shown;
    doneViews.set(att.blob, box);
    if (kind === "image") box.append(el("img", { class: "full", src: got.url, alt: att.name }));
    else if (kind === "audio") box.append(el("audio", { controls: true, src: got.url, preload: "metadata" }));
    else if (kind === "video") box.append(el("video", { controls: true, src: got.url, preload: "metadata", playsinline: true }));
    box.append(el("figcaption", {}, el("a", { href: got.url, download: att.name, class: "save" }, `Save ${label}`)));
    return box;
  }
  if (kind === "image" && att.thumb) {
    box.append(el("button", { type: "button", class: "thumb", "aria-label": `Open ${att.name}`, onclick: fetchIt },
      el("img", { class: "thumb", src: att.thumb, alt: att.name })));
  }
  if (got && got.state === "loading") {
    box.append(el("progress", { class: "download", max: "1", value: String(got.progress), "aria-label": `Downloading ${att.name}` }));
  }
  const verb = kind === "image" ? "Open" : kind === "file" ? "Download" : "Play";
  box.append(el("figcaption", {}, el("span", { class: "name" }, label), " ",
    got && got.state === "loading" ? null : el("button", { type: "button", class: "link open", onclick: fetchIt }, verb)));
  if (got && got.state === "failed") box.append(el("p", { class: "failed-note" }, `Could not open it: ${got.error}`));
  return box;
}

function saveAs(url, name) {
  const a = el("a", { href: url, download: name, hidden: true });
  document.body.append(a);
  a.click();
  a.remove();
}

/** The uploads of a conversation in progress, for the composer. */
export function uploadsView(peer, changed) {
  return (uploads.get(peer) || []).map((u) => el("div", { class: "upload", "data-phase": u.error ? "failed" : u.phase },
    el("span", { class: "name" }, `${u.name} (${formatSize(u.size)})`), " ",
    u.error ? el("span", { class: "failed-note" }, u.error)
      : el("progress", { max: "1", value: String(u.progress), "aria-label": `${u.phase === "encrypting" ? "Encrypting" : "Uploading"} ${u.name}` }),
    u.error ? el("button", { type: "button", class: "link", onclick: () => { dismissUpload(peer, u.id); changed(); } }, "Dismiss") : null));
}

/**
 * Wire the composer: the attach button's file input, files dropped on the conversation,
 * files pasted into the message box. `view` is the ChatView (its `peer`, `later`).
 */
export function bindComposer(view, signal) {
  const chat = view.chat;
  const changed = () => view.later("uploads");
  const send = (files) => {
    if (!view.peer) return;
    const blocked = chat.sendBlockedReason(view.peer);
    if (blocked) {
      document.getElementById("composer-note").textContent = blocked;
      return;
    }
    for (const file of files) sendFile(chat, view.peer, file, changed);
  };
  const input = document.getElementById("attach-input");
  input.addEventListener("change", () => {
    send([...input.files]);
    input.value = "";
  }, { signal });
  const area = document.getElementById("conversation");
  area.addEventListener("dragover", (e) => {
    if (e.dataTransfer && [...e.dataTransfer.types].includes("Files")) {
      e.preventDefault();
      area.classList.add("dropping");
    }
  }, { signal });
  area.addEventListener("dragleave", () => area.classList.remove("dropping"), { signal });
  area.addEventListener("drop", (e) => {
    area.classList.remove("dropping");
    if (e.dataTransfer && e.dataTransfer.files.length) {
      e.preventDefault();
      send([...e.dataTransfer.files]);
    }
  }, { signal });
  document.getElementById("compose").addEventListener("paste", (e) => {
    const files = e.clipboardData ? [...e.clipboardData.files] : [];
    if (files.length) {
      e.preventDefault();
      send(files);
    }
  }, { signal });
}
