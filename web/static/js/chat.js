// The chat client's state and logic, without any DOM: conversations, messages,
// the outbox, receipts, presence, typing, settings and contacts' keys. The page
// (ui.js) listens to its events and calls its methods.
//
// Everything a person wrote or received is kept in IndexedDB (db.js) before it
// counts: an incoming message is stored before it is acknowledged to the node, and
// an outgoing one is in the outbox before it is sent. The outbox keeps each
// message's encrypted envelope once made, so a resend after a lost connection is
// byte for byte the same and the node stores it once (docs/protocol.md 4.3).

import * as C from "./crypto.js";
import { api, ApiError, enc } from "./api.js";
import { Connection } from "./socket.js";
import { Calls } from "./call.js";
import { attachmentOf } from "./attachments.js";

const RANK = { failed: -1, pending: 0, sent: 1, delivered: 2, read: 3 };
const LAZY_ACK_MS = 1000;
const HISTORY_PAGE = 50;
const LOCAL_PAGE = 200;
const MAX_PAGES_PER_SCROLL = 20;
const MAX_RESENDS = 3;
const DEVICE_REFRESH_MS = 60_000;
const RETRY_SOON_MS = 3000;
/** Errors after which a message stays in the outbox to be sent again later. */
const TRANSIENT = new Set(["unavailable", "rate_limited", "internal", "network", "timeout", "unauthenticated",
  "token_expired"]);
const STREAM_FRAMES = new Set(["message", "receipt", "call_log"]);
/** While typing, `typing active: true` goes out at most this often (docs/protocol.md 4.6). */
export const TYPING_REPEAT_MS = 3000;
/** Someone else's indicator lapses this long after their last `active: true`. */
export const TYPING_SHOWN_MS = 6000;

function logFailure(what) {
  return (err) => console.error(`moot: ${what} failed`, err);
}

export const AVATAR_TYPES = ["image/png", "image/jpeg", "image/webp"];
export const MAX_AVATAR_BYTES = 256 * 1024;
const PROFILE_MAX_AGE_MS = 5 * 60 * 1000;

export function messageKey(sender, id) {
  return `${sender}/${id}`;
}

export function newMessageId() {
  return C.b64encode(crypto.getRandomValues(new Uint8Array(16)));
}

/** "2:31", or "1:02:05" from an hour on. */
export function formatDuration(seconds) {
  const total = Math.max(0, Math.round(seconds));
  const h = Math.floor(total / 3600);
  const m = Math.floor((total % 3600) / 60);
  const s = String(total % 60).padStart(2, "0");
  return h ? `${h}:${String(m).padStart(2, "0")}:${s}` : `${m}:${s}`;
}

/** A call-history entry (from a `call_log` frame) in words: "Missed video call", "Outgoing audio call, 2:31". */
export function callSummary(call) {
  const media = call.media === "video" ? "video" : "audio";
  const out = call.direction === "outgoing";
  const way = out ? "Outgoing" : "Incoming";
  const took = call.answered_at ? formatDuration((call.ended_at - call.answered_at) / 1000) : null;
  switch (call.reason) {
    case "completed": return `${way} ${media} call, ${took || "0:00"}`;
    case "failed": return took ? `${way} ${media} call, ${took} (connection lost)` : `${way} ${media} call failed`;
    case "missed": return out ? `Outgoing ${media} call, no answer` : `Missed ${media} call`;
    case "rejected": return out ? `Outgoing ${media} call, declined` : `Declined ${media} call`;
    case "busy": return out ? `Outgoing ${media} call, busy` : `Missed ${media} call (you were in another call)`;
    case "cancelled": return out ? `Cancelled ${media} call` : `Missed ${media} call`;
    default: return `${way} ${media} call`;
  }
}

function better(status, than) {
  return (RANK[status] ?? -2) > (RANK[than] ?? -2);
}

/** A reason why a message could not be shown, in words a person can act on. */
export function undecryptableReason(code) {
  switch (code) {
    case "not_for_this_device": return "This message was not encrypted for this browser (it was sent before this device was added).";
    case "own_copy_missing": return "Sent from this browser, but its copy here was lost.";
    case "bad_signature": return "This message could not be verified: it did not come from a known device of the sender.";
    case "unknown_prekey": return "This message was encrypted to a key this browser no longer has.";
    case "misplaced": return "A message that claimed to belong to another conversation was dropped.";
    default: return "This message could not be decrypted.";
  }
}

function identityKeys(contact) {
  return new Map(contact.devices.map((d) => [d.device, d.identity_key]));
}

/** What changed between two device lists, or null: {added, removed, rekeyed} as device names. */
export function deviceChange(before, after) {
  const old = identityKeys(before);
  const now = identityKeys(after);
  const name = (list, id) => (list.devices.find((d) => d.device === id) || {}).name || id;
  const added = [...now.keys()].filter((id) => !old.has(id)).map((id) => name(after, id));
  const removed = [...old.keys()].filter((id) => !now.has(id)).map((id) => name(before, id));
  const rekeyed = [...now.keys()].filter((id) => old.has(id) && old.get(id) !== now.get(id)).map((id) => name(after, id));
  return added.length || removed.length || rekeyed.length ? { added, removed, rekeyed } : null;
}

/**
 * When this device tells a conversation that its user is typing: `active: true` on the
 * first keystroke and then at most every `repeatMs` while typing goes on, one
 * `active: false` when it stops. Time is passed in; the methods return the frames to send.
 */
export class TypingAnnouncer {
  constructor(repeatMs = TYPING_REPEAT_MS) {
    this.repeatMs = repeatMs;
    this.peer = null; // the conversation last told "typing", until told it stopped
    this.sentAt = 0;
  }

  /** The person typed in the composer of `peer` at `now`. */
  typed(peer, now) {
    const out = this.peer !== null && this.peer !== peer ? this.stopped() : [];
    if (this.peer !== peer || now - this.sentAt >= this.repeatMs) {
      this.peer = peer;
      this.sentAt = now;
      out.push({ type: "typing", conversation: peer, active: true });
    }
    return out;
  }

  /** Typing stopped (composer emptied, message sent, conversation left): nothing if it was never announced. */
  stopped() {
    if (this.peer === null) return [];
    const frame = { type: "typing", conversation: this.peer, active: false };
    this.peer = null;
    this.sentAt = 0;
    return [frame];
  }
}

/** Who is typing in which conversation, from others' `typing` frames; time is passed in. */
export class TypingIndicators {
  constructor(shownMs = TYPING_SHOWN_MS) {
    this.shownMs = shownMs;
    this.until = new Map(); // conversation -> {user, until}
  }

  /** A `typing` frame arrived at `now`; true if what is shown changed. */
  note(conversation, user, active, now) {
    if (!active) return this.clear(conversation);
    const shown = this.until.has(conversation);
    this.until.set(conversation, { user, until: now + this.shownMs });
    return !shown;
  }

  /** Stop showing it (a message from them arrived); true if it was shown. */
  clear(conversation) {
    return this.until.delete(conversation);
  }

  clearAll() {
    const any = this.until.size > 0;
    this.until.clear();
    return any;
  }

  /** The user typing in `conversation` at `now`, or null. */
  typist(conversation, now) {
    const entry = this.until.get(conversation);
    return entry && entry.until > now ? entry.user : null;
  }

  /** Forget the lapsed ones; true if any was shown. */
  expire(now) {
    let changed = false;
    for (const [conversation, entry] of this.until) {
      if (entry.until > now) continue;
      this.until.delete(conversation);
      changed = true;
    }
    return changed;
  }

  /** When the next one lapses, or null. */
  nextExpiry() {
    let next = null;
    for (const entry of this.until.values()) if (next === null || entry.until < next) next = entry.until;
    return next;
  }
}

/** Processing stops: the page is signing out. */
class SignedOut extends Error {}

export class Chat extends EventTarget {
  constructor({ me, deviceId, keys, store, node }) {
    super();
    Object.assign(this, { me, deviceId, keys, store, node });
    this.conversations = new Map(); // peer -> {peer, lastKey, lastText, lastTs, lastMine, lastStatus, unread}
    this.presence = new Map(); // address -> {state, last_seen}
    this.contacts = new Map(); // address -> {address, devices, verified, wasVerified, change, fetchedAt}
    this.views = new Map(); // peer -> {messages: Map(key -> message), before, done, loading, error}
    this.inflight = new Map(); // message id -> outbox item sent on this connection
    this.pendingReads = new Map(); // peer -> message id to report read once connected
    this.readReported = new Map(); // peer -> last message id reported read
    this.typing = new TypingIndicators();
    this.typingTimer = null;
    this.announcer = new TypingAnnouncer();
    this.away = false; // what this device last said about its user (presence frame)
    this.settings = null; // {read_receipts, show_presence} once loaded from the node
    this.profile = null; // this user's own profile, once loaded: {display_name, status_text, avatar, listed, ...}
    this.profiles = new Map(); // address -> {profile | null, fetchedAt}: others' public profiles
    this.profileFetches = new Set(); // addresses being fetched now
    this.ready = null;
    this.openPeer = null;
    this.ackedSeq = 0;
    this.receivedSeq = 0;
    this.ackTimer = null;
    this.retryTimer = null;
    this.lastOrder = 0;
    this.flushing = false;
    this.flushAgain = false;
    this.stopped = false;
    const url = `${location.protocol === "https:" ? "wss:" : "ws:"}//${location.host}/api/v1/ws`;
    this.conn = new Connection(url, {
      onFrames: (frames) => this.onFrames(frames),
      onState: (state) => this.onConnectionState(state),
      onFatal: (code, reason) => this.emit("signedout", { code, reason }),
    });
    this.calls = new Calls({
      me,
      send: (frame) => !!this.ready && this.conn.send(frame),
      seal: (peer, callId, n, body) => this.sealCallPayload(peer, callId, n, body),
      open: (frame, kind) => this.openCallPayload(frame, kind),
      iceServers: async () => (await api("GET", "/api/v1/ice")).ice_servers || [],
      prepare: async (peer) => {
        await this.refreshDevices(peer);
        const blocked = this.sendBlockedReason(peer);
        if (blocked) throw new Error(blocked);
      },
      rtc: {
        // Looked up when used, not now: a test may stand in for the browser's own.
        get RTCPeerConnection() { return window.RTCPeerConnection; },
        getUserMedia: (constraints) => navigator.mediaDevices.getUserMedia(constraints),
      },
      now: () => Date.now(),
    });
  }

  emit(type, detail = null) {
    this.dispatchEvent(new CustomEvent(type, { detail }));
  }

  // -- lifecycle -------------------------------------------------------------------

  async start() {
    for (const c of await this.store.all("contacts")) this.contacts.set(c.address, c);
    for (const c of await this.store.all("conversations")) this.conversations.set(c.peer, c);
    for (const item of await this.store.all("outbox")) this.lastOrder = Math.max(this.lastOrder, item.order);
    this.emit("conversations");
    this.conn.start();
    // Between batches of frames, so that no message is counted both by the node and here.
    this.conn.enqueue(() => this.syncConversations()).catch(logFailure("loading the conversation list"));
    this.refreshDevices(this.me).catch(logFailure("checking this account's devices"));
    this.loadSettings().catch(logFailure("loading the settings"));
    this.loadProfile().catch(logFailure("loading the profile"));
  }

  stop() {
    this.calls.stop();
    this.stopped = true;
    clearTimeout(this.ackTimer);
    clearTimeout(this.retryTimer);
    clearTimeout(this.typingTimer);
    this.ackTimer = null;
    this.conn.stop();
    this.store.close();
  }

  onConnectionState(state) {
    if (state !== "online") {
      this.ready = null;
      this.inflight.clear();
      clearTimeout(this.ackTimer);
      this.ackTimer = null;
      if (this.presence.size) {
        this.presence.clear(); // what we knew is no longer live
        this.emit("presence", null);
      }
      if (this.typing.clearAll()) this.emit("typing", null);
      this.announcer.stopped(); // the node forgets it with the connection
      this.calls.onDisconnected();
    }
    this.emit("connection", state);
  }

  // -- presence, typing and settings -------------------------------------------------------

  /**
   * Whether the person is at this device (the page is visible and used). Sent now if
   * connected, and again after every reconnect: a new connection starts out online.
   */
  setAway(away) {
    if (this.away === away) return;
    this.away = away;
    if (away) this.stoppedTyping(); // whoever left the page is not typing
    this.sendPresence();
  }

  sendPresence() {
    if (this.ready) this.conn.send({ type: "presence", state: this.away ? "away" : "online" });
  }

  /** The person typed in `peer`'s composer; `empty` when the composer is now empty. */
  composing(peer, empty, now = Date.now()) {
    this.sendTyping(empty ? this.announcer.stopped() : this.announcer.typed(peer, now));
  }

  /** The person stopped typing: sent the message, or left the conversation. */
  stoppedTyping() {
    this.sendTyping(this.announcer.stopped());
  }

  sendTyping(frames) {
    for (const frame of frames) {
      // Unsent, it is not announced: the next keystroke tries again.
      if (!(this.ready && this.conn.send(frame)) && frame.active) this.announcer.stopped();
    }
  }

  /** Who is typing in the conversation with `peer` (the peer), or null. */
  typist(peer, now = Date.now()) {
    return this.typing.typist(peer, now);
  }

  onTyping(frame, now = Date.now()) {
    if (typeof frame.conversation !== "string" || typeof frame.user !== "string") return;
    if (this.typing.note(frame.conversation, frame.user, frame.active === true, now)) this.emit("typing", frame.conversation);
    this.scheduleTypingExpiry(now);
  }

  scheduleTypingExpiry(now = Date.now()) {
    clearTimeout(this.typingTimer);
    const next = this.typing.nextExpiry();
    if (next === null || this.stopped) return;
    this.typingTimer = setTimeout(() => {
      const later = Date.now();
      if (this.typing.expire(later)) this.emit("typing", null);
      this.scheduleTypingExpiry(later);
    }, Math.max(0, next - now) + 50);
  }

  /** This user's settings from the node: {read_receipts, show_presence}. */
  async loadSettings() {
    const { settings } = await api("GET", "/api/v1/me");
    this.settings = settings;
    this.emit("settings");
    return settings;
  }

  /** Change some settings on the node; resolves to all of them as the node now has them. */
  async saveSettings(changes) {
    const { settings } = await api("PATCH", "/api/v1/me/settings", changes);
    this.settings = settings;
    this.emit("settings");
    return settings;
  }

  // -- profiles (public metadata: not end-to-end encrypted) -------------------------------

  /** This user's own profile from the node. */
  async loadProfile() {
    const { profile } = await api("GET", "/api/v1/me/profile");
    this.setOwnProfile(profile);
    return profile;
  }

  /** Change some of {display_name, status_text, listed}; resolves to the profile as saved. */
  async saveProfile(changes) {
    const { profile } = await api("PATCH", "/api/v1/me/profile", changes);
    this.setOwnProfile(profile);
    return profile;
  }

  /** Upload a picture (a File or Blob: PNG, JPEG or WebP, at most MAX_AVATAR_BYTES), or remove it with null. */
  async saveAvatar(blob) {
    if (blob && !AVATAR_TYPES.includes(blob.type)) throw new ApiError(400, "bad_request", "Choose a PNG, JPEG or WebP picture.");
    if (blob && blob.size > MAX_AVATAR_BYTES) throw new ApiError(413, "too_large", `The picture is larger than ${MAX_AVATAR_BYTES / 1024} KB.`);
    const { profile } = blob ? await api("PUT", "/api/v1/me/avatar", blob) : await api("DELETE", "/api/v1/me/avatar");
    this.setOwnProfile(profile);
    return profile;
  }

  setOwnProfile(profile) {
    this.profile = profile;
    this.profiles.set(this.me, { profile, fetchedAt: Date.now() });
    this.emit("profile", this.me);
  }

  /**
   * What is known of `address`'s profile (null if nothing yet). Asks the node, once
   * at a time, when it has none or an old one; a "profile" event says when it came.
   */
  profileOf(address, now = Date.now()) {
    const known = this.profiles.get(address);
    if ((!known || now - known.fetchedAt > PROFILE_MAX_AGE_MS) && !this.profileFetches.has(address) && !this.stopped) {
      this.profileFetches.add(address);
      api("GET", `/api/v1/users/${enc(address)}/profile`)
        .then(({ profile }) => this.profiles.set(address, { profile, fetchedAt: Date.now() }))
        // Unknown, or its node away: shown by address; asked again after a while.
        .catch(() => this.profiles.set(address, { profile: known ? known.profile : null, fetchedAt: Date.now() }))
        .finally(() => {
          this.profileFetches.delete(address);
          this.emit("profile", address);
        });
    }
    return known ? known.profile : null;
  }

  /** The name to show for `address`: its display name, or the address's user part. */
  displayName(address) {
    const profile = this.profileOf(address);
    return (profile && profile.display_name) || address.split("@")[0];
  }

  /** Listed people on this node whose name or display name contains `query`: profiles. */
  async directory(query) {
    const { users } = await api("GET", `/api/v1/directory?q=${enc(query)}&limit=20`);
    for (const profile of users) this.profiles.set(profile.user, { profile, fetchedAt: Date.now() });
    return users.filter((u) => u.user !== this.me);
  }

  // -- conversations ------------------------------------------------------------------

  conversation(peer) {
    let conv = this.conversations.get(peer);
    if (!conv) {
      conv = { peer, lastKey: null, lastText: null, lastTs: 0, lastMine: false, lastStatus: null, unread: 0 };
      this.conversations.set(peer, conv);
    }
    return conv;
  }

  /** Conversations, most recent first. */
  conversationList() {
    return [...this.conversations.values()].sort((a, b) => (b.lastTs || 0) - (a.lastTs || 0) || a.peer.localeCompare(b.peer));
  }

  noteLast(conv, msg) {
    if (conv.lastKey === msg.key || !conv.lastTs || msg.ts >= conv.lastTs) {
      Object.assign(conv, { lastKey: msg.key, lastText: msg.text, lastTs: msg.ts, lastMine: msg.mine && !msg.call,
        lastStatus: msg.mine ? msg.status : null, lastError: msg.text === null ? msg.error : null, lastCall: msg.call || null });
    }
  }

  /** Bring the list up to date with the node: last messages and unread counts. */
  async syncConversations() {
    const { conversations } = await api("GET", "/api/v1/conversations");
    const writes = [];
    for (const summary of conversations) {
      const conv = this.conversation(summary.peer);
      let unread = summary.unread;
      if (summary.last) {
        const last = summary.last;
        const key = messageKey(last.sender, last.id);
        let msg = await this.store.get("messages", key);
        if (!msg) {
          msg = await this.openEnvelope(last, summary.peer);
          if (last.status) msg.status = last.status;
          writes.push(["messages", msg]);
        } else if (last.status && better(last.status, msg.status)) {
          msg = { ...msg, status: last.status };
          writes.push(["messages", msg]);
        }
        this.noteLast(conv, msg);
        // Messages that reached this page after the node counted: not in its number yet.
        const newer = await this.store.messagesOf(summary.peer, { limit: 50 });
        unread += newer.filter((m) => !m.mine && !m.call && m.ts > last.ts).length;
      }
      conv.countedTs = summary.last ? summary.last.ts : 0; // the node counted everything up to here
      conv.unread = this.isViewing(summary.peer) ? 0 : unread;
      writes.push(["conversations", conv]);
    }
    await this.store.put(writes);
    this.emit("conversations");
  }

  isViewing(peer) {
    return this.openPeer === peer && document.visibilityState === "visible";
  }

  // -- contacts and their keys ----------------------------------------------------------

  /** A contact's devices: from the local store, fetched from the node when unknown or stale. */
  async devicesOf(address, { maxAgeMs = Infinity } = {}) {
    const known = this.contacts.get(address);
    if (known && Date.now() - known.fetchedAt < maxAgeMs) return known;
    return this.refreshDevices(address);
  }

  /** Fetch a user's devices, keep those whose prekey signature verifies, and notice key changes. */
  async refreshDevices(address) {
    const { devices } = await api("GET", `/api/v1/users/${enc(address)}/devices`);
    const good = [];
    for (const d of devices) {
      try {
        await C.parsePublicBundle(d);
        good.push({ device: d.device, name: d.name, identity_key: d.identity_key, signed_prekey: d.signed_prekey,
          created_at: d.created_at });
      } catch (err) {
        console.warn(`moot: ignoring a device of ${address} with a bad key bundle`, err.code);
      }
    }
    const old = this.contacts.get(address);
    const contact = { address, devices: good, verified: false, wasVerified: false, change: null, fetchedAt: Date.now() };
    if (old) {
      const change = deviceChange(old, contact);
      contact.verified = old.verified && !change;
      contact.wasVerified = old.wasVerified || (old.verified && !!change);
      contact.change = change ? { ...change, at: Date.now() } : old.change;
    }
    this.contacts.set(address, contact);
    const writes = [["contacts", contact]];
    if (address === this.me && old && deviceChange(old, contact)) {
      // My own devices are half of every safety number: a device I did not add could
      // read everything I send, so no contact stays verified without a new look.
      for (const other of this.contacts.values()) {
        if (other.address === this.me || !(other.verified || other.wasVerified)) continue;
        other.verified = false;
        other.wasVerified = true;
        other.change = { ...deviceChange(old, contact), own: true, at: Date.now() };
        writes.push(["contacts", other]);
        this.emit("contact", other.address);
      }
    }
    await this.store.put(writes);
    this.emit("contact", address);
    return contact;
  }

  async identityKeyOf(address, device) {
    const find = (c) => c.devices.find((d) => d.device === device);
    let entry = find(await this.devicesOf(address));
    if (!entry) entry = find(await this.refreshDevices(address));
    if (!entry) throw new C.BadSignature(`unknown device ${device} of ${address}`);
    return C.b64decode(entry.identity_key, { length: 32, what: "identity_key" });
  }

  /** Why sending to `peer` must wait for the person, or null. */
  sendBlockedReason(peer) {
    const contact = this.contacts.get(peer);
    if (contact && contact.change && contact.wasVerified) {
      return "You verified this contact and the keys changed since: messages wait until you review the safety number.";
    }
    return null;
  }

  /**
   * The person has seen this key change on the safety-number screen. Only the change
   * they saw is accepted: one that arrived since stays (compared by its time).
   */
  async acceptKeyChange(address, seenAt) {
    const contact = this.contacts.get(address);
    if (!contact || !contact.change || contact.change.at !== seenAt) return;
    contact.change = null;
    contact.wasVerified = false;
    await this.store.put([["contacts", contact]]);
    this.emit("contact", address);
    this.flushOutbox(); // messages held for this review may go now
  }

  async setVerified(address, verified) {
    const contact = await this.devicesOf(address);
    contact.verified = verified;
    if (verified) {
      contact.change = null;
      contact.wasVerified = false;
    }
    await this.store.put([["contacts", contact]]);
    this.emit("contact", address);
    if (verified) this.flushOutbox();
  }

  async safetyNumber(peer) {
    const [mine, theirs] = await Promise.all([this.refreshDevices(this.me), this.refreshDevices(peer)]);
    const keys = (c) => c.devices.map((d) => C.b64decode(d.identity_key, { length: 32, what: "identity_key" }));
    return C.safetyNumber(this.me, keys(mine), peer, keys(theirs));
  }

  /**
   * People to talk to, as profiles: listed people on this node whose name or display
   * name contains `query`; a full address (bob@hilltop) is looked up on its node.
   */
  async search(query) {
    if (query.includes("@")) {
      if (!/^[a-z0-9_.-]{1,32}@[a-z0-9][a-z0-9-]{0,62}$/.test(query) || query === this.me) return [];
      await this.refreshDevices(query); // throws ApiError: unknown_user, unknown_node
      let profile = { user: query, display_name: "", status_text: "", avatar: null };
      try {
        ({ profile } = await api("GET", `/api/v1/users/${enc(query)}/profile`));
        this.profiles.set(query, { profile, fetchedAt: Date.now() });
      } catch {
        // the address works; its profile is only a nicety
      }
      return [profile];
    }
    return this.directory(query);
  }

  // -- messages --------------------------------------------------------------------------

  /** Verify and decrypt a message from the node into what the page stores and shows. */
  async openEnvelope(m, conversationHint) {
    const mine = m.sender === this.me;
    const msg = { key: messageKey(m.sender, m.id), id: m.id, sender: m.sender, sender_device: m.sender_device,
      conversation: conversationHint, ts: m.ts, mine, text: null, error: null, status: mine ? "sent" : undefined };
    if (mine && m.sender_device === this.deviceId) {
      msg.error = "own_copy_missing";
      return msg;
    }
    try {
      const env = m.envelope;
      if (!env || env.id !== m.id || env.sender !== m.sender || env.sender_device !== m.sender_device) {
        throw new C.MalformedEnvelope("the node's header does not match the envelope");
      }
      const ident = await this.identityKeyOf(m.sender, m.sender_device);
      const payload = await C.decryptMessage(this.keys, this.me, this.deviceId, env, ident);
      // Place it by what the sender signed, never by what the node says (docs/crypto.md 6.4).
      const conversation = mine ? env.conversation : env.sender;
      if ((!mine && env.conversation !== this.me) || conversation !== conversationHint) {
        msg.error = "misplaced";
        return msg;
      }
      if (payload.type === "text" && typeof payload.text === "string") msg.text = payload.text;
      else if (payload.type === "attachment" && (msg.attachment = attachmentOf(payload))) {
        msg.text = msg.attachment.caption || `Attachment: ${msg.attachment.name}`;
      } else msg.error = "unsupported";
    } catch (err) {
      if (err instanceof ApiError) throw err; // the network failed, not the message
      msg.error = err.code || "decryption_failed";
    }
    return msg;
  }

  view(peer) {
    let view = this.views.get(peer);
    if (!view) {
      view = { messages: new Map(), before: undefined, done: false, loading: false, error: null, loaded: false };
      this.views.set(peer, view);
    }
    return view;
  }

  /** Messages of a conversation as loaded so far, oldest first. */
  messagesOf(peer) {
    return [...this.view(peer).messages.values()].sort((a, b) => a.ts - b.ts || (a.key < b.key ? -1 : 1));
  }

  async openConversation(peer) {
    this.openPeer = peer;
    const conv = this.conversation(peer);
    const view = this.view(peer);
    if (!view.loaded) {
      view.loaded = true;
      for (const m of await this.store.messagesOf(peer, { limit: LOCAL_PAGE })) {
        if (!view.messages.has(m.key)) view.messages.set(m.key, m);
      }
      this.emit("messages", peer);
      this.loadOlder(peer, { untilOlder: false });
    }
    if (!conv.lastTs) {
      await this.store.put([["conversations", conv]]);
      this.emit("conversations");
    }
    this.devicesOf(peer, { maxAgeMs: DEVICE_REFRESH_MS }).catch(() => {});
  }

  closeConversation() {
    this.openPeer = null;
  }

  /**
   * The next page of history from the node (it also fills gaps in what this browser
   * has). With `untilOlder`, pages on until one holds a message older than the view's
   * oldest, so that scrolling up always shows something new.
   */
  async loadOlder(peer, { untilOlder = true } = {}) {
    const view = this.view(peer);
    if (view.loading || view.done) return;
    view.loading = true;
    view.error = null;
    this.emit("messages", peer);
    try {
      // Pages the view already holds (from this browser's store) show nothing new:
      // go on until something older than what is shown arrives, within a bound.
      const oldest = Math.min(...[...view.messages.values()].map((m) => m.ts));
      for (let pages = 0; pages < MAX_PAGES_PER_SCROLL && !view.done; pages++) {
        const before = view.before ? `&before=${view.before}` : "";
        const page = await api("GET", `/api/v1/conversations/${enc(peer)}/messages?limit=${HISTORY_PAGE}${before}`);
        const writes = [];
        let older = false;
        for (const item of page.messages) {
          const key = messageKey(item.sender, item.id);
          let msg = view.messages.get(key) || await this.store.get("messages", key);
          if (!msg) {
            msg = await this.openEnvelope(item, peer);
            if (item.status) msg.status = item.status;
            writes.push(["messages", msg]);
          } else if (item.status && better(item.status, msg.status)) {
            msg = { ...msg, status: item.status };
            writes.push(["messages", msg]);
          }
          older ||= !view.messages.has(key) && msg.ts <= oldest;
          view.messages.set(key, msg);
        }
        await this.store.put(writes);
        view.before = page.before;
        view.done = page.before === null || page.messages.length < HISTORY_PAGE;
        if (older || !untilOlder) break;
      }
    } catch (err) {
      view.error = err.message;
    } finally {
      view.loading = false;
      this.emit("messages", peer);
    }
  }

  /** Keep a message in the view (if loaded) and the list; no storage. */
  showMessage(msg) {
    const view = this.views.get(msg.conversation);
    if (view && view.loaded) view.messages.set(msg.key, msg);
    this.noteLast(this.conversation(msg.conversation), msg);
  }

  /** Write a text message: stored in the outbox first, then sent when connected. */
  async sendText(peer, text) {
    return this.queueMessage(peer, { type: "text", text, ts: Date.now() }, { text });
  }

  /** Send a message carrying an uploaded attachment (attachments.js made `payload`). */
  async sendAttachment(peer, payload) {
    const attachment = attachmentOf(payload);
    return this.queueMessage(peer, payload, { text: attachment.caption || `Attachment: ${attachment.name}`, attachment },
      [payload.blob]);
  }

  async queueMessage(peer, payload, shown, attachments = undefined) {
    const blocked = this.sendBlockedReason(peer);
    if (blocked) throw new Error(blocked);
    const id = newMessageId();
    const now = payload.ts;
    this.lastOrder = Math.max(now, this.lastOrder + 1);
    const msg = { key: messageKey(this.me, id), id, sender: this.me, sender_device: this.deviceId, conversation: peer,
      ts: now, mine: true, error: null, status: "pending", ...shown, ...(attachments ? { payload } : {}) };
    const item = { id, peer, order: this.lastOrder, payload, envelope: null, resends: 0, attachments };
    this.showMessage(msg);
    const conv = this.conversation(peer);
    await this.store.put([["messages", msg], ["outbox", item], ["conversations", conv]]);
    this.emit("messages", peer);
    this.emit("conversations");
    this.flushOutbox();
    return id;
  }

  /** Queue a failed message again, with its original id. */
  async retry(peer, id) {
    const msg = await this.store.get("messages", messageKey(this.me, id));
    if (!msg || msg.status !== "failed") return;
    msg.status = "pending";
    msg.error = null;
    this.lastOrder = Math.max(Date.now(), this.lastOrder + 1);
    const item = { id, peer, order: this.lastOrder, payload: msg.payload || { type: "text", text: msg.text, ts: msg.ts },
      envelope: null, resends: 0, attachments: msg.payload ? [msg.payload.blob] : undefined };
    this.showMessage(msg);
    await this.store.put([["messages", msg], ["outbox", item]]);
    this.emit("messages", peer);
    this.flushOutbox();
  }

  async encrypt(peer, id, payload) {
    const [theirs, mine] = await Promise.all([this.devicesOf(peer), this.devicesOf(this.me)]);
    if (!theirs.devices.length) {
      throw Object.assign(new Error(`${peer} has not set up a device yet, so nothing can be encrypted for them.`),
        { code: "no_devices" });
    }
    const recipients = [];
    for (const [address, list] of [[peer, theirs.devices], [this.me, mine.devices]]) {
      for (const d of list) {
        if (address === this.me && d.device === this.deviceId) continue;
        const spk = C.b64decode(d.signed_prekey.key, { length: 32, what: "signed_prekey" });
        recipients.push(C.recipientDevice(address, d.device, d.signed_prekey.id, spk));
      }
    }
    return C.encryptMessage(this.keys, this.me, this.deviceId, peer, id, payload, recipients);
  }

  /** Send everything in the outbox, in the order it was written. One run at a time; never rejects. */
  async flushOutbox() {
    if (this.flushing) {
      this.flushAgain = true;
      return;
    }
    this.flushing = true;
    try {
      do {
        this.flushAgain = false;
        if (!this.ready || this.stopped) return;
        const items = (await this.store.all("outbox")).sort((a, b) => a.order - b.order);
        for (const item of items) {
          if (!this.ready || this.stopped) return;
          if (!this.inflight.has(item.id)) await this.transmit(item);
        }
      } while (this.flushAgain);
    } catch (err) {
      if (!this.stopped) console.error("moot: sending the outbox failed", err);
    } finally {
      this.flushing = false;
    }
  }

  async transmit(item, { reencrypt = false } = {}) {
    if (this.sendBlockedReason(item.peer)) {
      // A verified contact's keys changed: nothing goes out until the person has looked.
      this.inflight.delete(item.id);
      await this.markHeld(item.id, true);
      return;
    }
    if (!item.envelope || reencrypt) {
      let envelope;
      try {
        envelope = await this.encrypt(item.peer, item.id, item.payload);
      } catch (err) {
        this.inflight.delete(item.id);
        if (err instanceof ApiError && TRANSIENT.has(err.code)) this.retrySoon();
        else if (!(err instanceof ApiError && err.code === "network")) await this.fail(item, err.message);
        return;
      }
      // Another tab may have encrypted it meanwhile: then its bytes are the ones to send.
      item = await this.store.saveEnvelope(item.id, envelope, { replace: reencrypt });
      if (!item) return; // sent and removed meanwhile
    }
    await this.markHeld(item.id, false);
    const frame = { type: "send", envelope: item.envelope };
    if (item.attachments) frame.attachments = item.attachments;
    if (this.conn.send(frame)) this.inflight.set(item.id, item);
    else this.inflight.delete(item.id);
  }

  async markHeld(id, held) {
    const msg = await this.store.get("messages", messageKey(this.me, id));
    if (!msg || !!msg.held === held) return;
    msg.held = held;
    this.showMessage(msg);
    await this.store.put([["messages", msg]]);
    this.emit("messages", msg.conversation);
  }

  retrySoon() {
    clearTimeout(this.retryTimer);
    this.retryTimer = setTimeout(() => this.flushOutbox(), RETRY_SOON_MS);
  }

  async fail(item, reason) {
    this.inflight.delete(item.id);
    if (this.stopped) return;
    const msg = await this.store.get("messages", messageKey(this.me, item.id));
    await this.store.delete("outbox", item.id);
    if (msg && !(RANK[msg.status] >= RANK.sent)) {
      msg.status = "failed";
      msg.error = reason;
      this.showMessage(msg);
      await this.store.put([["messages", msg]]);
      this.emit("messages", msg.conversation);
      this.emit("conversations");
    }
  }

  async onSent(frame) {
    const item = this.inflight.get(frame.id);
    this.inflight.delete(frame.id);
    const key = messageKey(this.me, frame.id);
    const msg = await this.store.get("messages", key);
    await this.store.delete("outbox", frame.id);
    if (!msg) return;
    msg.ts = frame.ts;
    if (better("sent", msg.status)) msg.status = "sent";
    msg.error = null;
    msg.held = false;
    this.showMessage(msg);
    const conv = this.conversation(msg.conversation);
    await this.store.put([["messages", msg], ["conversations", conv]]);
    this.emit("messages", msg.conversation);
    this.emit("conversations");
    return item;
  }

  async onSendError(frame) {
    const item = this.inflight.get(frame.ref);
    if (!item) return;
    const details = frame.details || {};
    if (details.reason === "devices_changed" && item.resends < MAX_RESENDS) {
      // Someone added or removed a device: fetch the lists again and re-encrypt with the
      // same id (the node stored nothing under it). The id stays in flight meanwhile, so
      // no flush resends the old envelope.
      item.resends += 1;
      try {
        await Promise.all([this.refreshDevices(item.peer), this.refreshDevices(this.me)]);
      } catch {
        this.inflight.delete(item.id);
        this.retrySoon();
        return;
      }
      await this.transmit(item, { reencrypt: true });
      return;
    }
    this.inflight.delete(frame.ref);
    if (TRANSIENT.has(frame.code)) {
      this.retrySoon();
      return;
    }
    await this.fail(item, frame.message || frame.code);
  }

  // -- frames from the node ----------------------------------------------------------------

  async onFrames(batch) {
    let goodSeq = 0; // the highest stream seq handled, with nothing failed before it
    let hasMessage = false;
    let failed = false;
    let ready = false;
    for (const frame of batch) {
      if (!frame || typeof frame !== "object") continue;
      const inStream = STREAM_FRAMES.has(frame.type);
      if (inStream && failed) continue; // never acknowledge past a frame that was not stored
      try {
        await this.onFrame(frame);
        if (frame.type === "ready") ready = true;
        if (inStream) {
          goodSeq = Math.max(goodSeq, frame.seq);
          hasMessage ||= frame.type === "message";
        }
      } catch (err) {
        if (this.stopped || err instanceof SignedOut) return;
        console.error(`moot: handling a ${frame.type} frame failed`, err);
        failed ||= inStream;
      }
    }
    if (goodSeq) {
      this.receivedSeq = Math.max(this.receivedSeq, goodSeq);
      if (hasMessage) this.sendAck(); // the sender's "delivered" waits for this
      else if (!this.ackTimer) this.ackTimer = setTimeout(() => this.sendAck(), LAZY_ACK_MS);
    }
    if (failed) {
      // What failed comes again from the cursor on a new connection.
      this.sendAck();
      this.conn.restart();
      return;
    }
    if (ready) {
      this.sendPresence();
      for (const [peer, id] of this.pendingReads) this.reportRead(peer, id);
      this.flushOutbox();
    }
  }

  async onFrame(frame) {
    switch (frame.type) {
      case "ready":
        if (frame.user !== this.me || frame.device !== this.deviceId) {
          // The cookie now belongs to another session (signed in elsewhere in this browser).
          this.emit("signedout", { code: 4401, reason: "signed in as someone else" });
          throw new SignedOut();
        }
        this.ready = frame;
        this.ackedSeq = this.receivedSeq = frame.cursor || 0;
        this.conn.healthy();
        this.emit("connection", "online");
        break;
      case "message":
        await this.onMessage(frame);
        break;
      case "receipt":
        await this.onReceipt(frame);
        break;
      case "presence":
        this.presence.set(frame.user, { state: frame.state, last_seen: frame.last_seen ?? null });
        this.emit("presence", frame.user);
        break;
      case "typing":
        this.onTyping(frame);
        break;
      case "call":
        this.calls.onFrame(frame); // not awaited: a call's WebRTC work never holds messages back
        break;
      case "call_log":
        await this.onCallLog(frame);
        break;
      case "sent":
        await this.onSent(frame);
        break;
      case "error":
        if (frame.ref && this.inflight.has(frame.ref)) await this.onSendError(frame);
        else if (frame.ref && this.calls.onError(frame)) break;
        else console.warn(`moot: the node said ${frame.code}: ${frame.message}`);
        break;
      default:
        break; // pong, and frame types a later version may add
    }
  }

  sendAck() {
    clearTimeout(this.ackTimer);
    this.ackTimer = null;
    if (this.receivedSeq > this.ackedSeq && this.conn.send({ type: "ack", seq: this.receivedSeq })) {
      this.ackedSeq = this.receivedSeq;
    }
  }

  async onMessage(frame) {
    const key = messageKey(frame.sender, frame.id);
    const view = this.views.get(frame.conversation);
    const existing = (view && view.messages.get(key)) || await this.store.get("messages", key);
    if (existing && existing.error !== "own_copy_missing") return; // replayed: already have it
    const msg = await this.openEnvelope(frame, frame.conversation);
    const conv = this.conversation(msg.conversation);
    this.showMessage(msg);
    // Counted here unless the node's count (syncConversations) already included it.
    if (!msg.mine && !this.isViewing(msg.conversation) && !(msg.ts <= conv.countedTs)) conv.unread += 1;
    await this.store.put([["messages", msg], ["conversations", conv]]);
    this.emit("messages", msg.conversation);
    this.emit("conversations");
    if (!msg.mine) {
      // What they were typing has arrived.
      if (this.typing.clear(msg.conversation)) this.emit("typing", msg.conversation);
      this.emit("incoming", msg);
    }
  }

  /** A call ended (docs/protocol.md 4.2 `call_log`): kept with the conversation, shown in it. */
  async onCallLog(frame) {
    if (typeof frame.peer !== "string" || typeof frame.call_id !== "string" || typeof frame.started_at !== "number") return;
    const outgoing = frame.direction === "outgoing";
    const entry = { key: `call/${frame.call_id}`, id: frame.call_id, sender: outgoing ? this.me : frame.peer, sender_device: "",
      conversation: frame.peer, ts: frame.started_at, mine: outgoing, text: null, error: null,
      call: { direction: outgoing ? "outgoing" : "incoming", media: frame.media, reason: frame.reason,
        started_at: frame.started_at, answered_at: frame.answered_at ?? null, ended_at: frame.ended_at } };
    const conv = this.conversation(frame.peer);
    this.showMessage(entry);
    await this.store.put([["messages", entry], ["conversations", conv]]);
    this.emit("messages", frame.peer);
    this.emit("conversations");
  }

  // -- call payloads, sealed end to end ------------------------------------------------------

  /** A call signal's payload for every device of `peer`, signed by this device (envelope id `<call id>-<n>`). */
  async sealCallPayload(peer, callId, n, body) {
    const theirs = await this.devicesOf(peer);
    if (!theirs.devices.length) throw new Error(`${peer} has not set up a device yet, so they cannot take calls.`);
    const recipients = theirs.devices.map((d) => C.recipientDevice(peer, d.device, d.signed_prekey.id,
      C.b64decode(d.signed_prekey.key, { length: 32, what: "signed_prekey" })));
    return C.encryptMessage(this.keys, this.me, this.deviceId, peer, `${callId}-${n}`, body, recipients);
  }

  /**
   * Open a call signal's payload: signed by the very device the node says sent it, to
   * this user, made for this call and this kind of signal (`offer`, `answer`,
   * `candidate`), so a node can neither forge one nor move one between calls.
   * Throws a CryptoError otherwise.
   */
  async openCallPayload(frame, kind) {
    let env;
    try {
      env = JSON.parse(frame.payload);
    } catch {
      throw new C.MalformedEnvelope("the call payload is not JSON");
    }
    if (!env || env.sender !== frame.sender || env.sender_device !== frame.sender_device || env.conversation !== this.me
        || typeof env.id !== "string" || !env.id.startsWith(`${frame.call_id}-`)) {
      throw new C.MalformedEnvelope("the call payload does not belong to this signal");
    }
    const ident = await this.identityKeyOf(frame.sender, frame.sender_device);
    const body = await C.decryptMessage(this.keys, this.me, this.deviceId, env, ident);
    const wellFormed = kind === "candidate"
      ? body.candidate && typeof body.candidate === "object" && typeof body.candidate.candidate === "string"
      : typeof body.sdp === "string";
    if (body.type !== "call" || body.call_id !== frame.call_id || body.kind !== kind || !wellFormed) {
      throw new C.MalformedEnvelope(`the call payload is not this call's ${kind}`);
    }
    return body;
  }

  async onReceipt(frame) {
    if (frame.kind === "read_sync") {
      // Another of my devices read this conversation up to message `id` of the peer.
      const conv = this.conversation(frame.conversation);
      const upto = await this.store.get("messages", messageKey(frame.conversation, frame.id));
      const recent = await this.store.messagesOf(frame.conversation, { limit: 100 });
      conv.unread = upto ? recent.filter((m) => !m.mine && !m.call && m.ts > upto.ts).length : 0;
      this.readReported.set(frame.conversation, frame.id);
      await this.store.put([["conversations", conv]]);
      this.emit("conversations");
      return;
    }
    const key = messageKey(this.me, frame.id);
    const view = this.views.get(frame.conversation);
    const msg = (view && view.messages.get(key)) || await this.store.get("messages", key);
    if (!msg || !better(frame.kind, msg.status)) return;
    const updated = { ...msg, status: frame.kind };
    this.showMessage(updated);
    const conv = this.conversation(frame.conversation);
    await this.store.put([["messages", updated], ["conversations", conv]]);
    // "read up to": earlier messages of mine in the view are read too.
    if (frame.kind === "read" && view) {
      for (const m of view.messages.values()) {
        if (m.mine && m.ts <= updated.ts && better("read", m.status) && RANK[m.status] >= RANK.sent) {
          view.messages.set(m.key, { ...m, status: "read" });
        }
      }
    }
    this.emit("messages", frame.conversation);
    this.emit("conversations");
  }

  /** The person is looking at this conversation: report it read up to the newest message. */
  markRead(peer) {
    if (!this.isViewing(peer)) return;
    const newest = this.messagesOf(peer).filter((m) => !m.mine && !m.call).pop();
    const conv = this.conversation(peer);
    if (conv.unread) {
      conv.unread = 0;
      this.store.put([["conversations", conv]]).catch(logFailure("saving the unread count"));
      this.emit("conversations");
    }
    if (!newest || this.readReported.get(peer) === newest.id) return;
    this.reportRead(peer, newest.id);
  }

  reportRead(peer, id) {
    if (this.ready && this.conn.send({ type: "read", conversation: peer, id })) {
      this.readReported.set(peer, id);
      this.pendingReads.delete(peer);
    } else {
      this.pendingReads.set(peer, id);
    }
  }

  async signOut() {
    try {
      await api("POST", "/api/v1/logout", {});
    } finally {
      this.stop();
    }
  }
}
