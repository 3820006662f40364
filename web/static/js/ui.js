// Drawing the chat: the conversation list, a conversation, the safety-number screen,
// the settings and the connection status. Text from anyone else is only ever set as text
// (textContent or text nodes), never parsed as HTML.

import { attachmentView, bindComposer, uploadsView } from "./attachments.js";
import { formatSafetyNumber } from "./crypto.js";
import { AVATAR_TYPES, MAX_AVATAR_BYTES, callSummary, formatDuration, undecryptableReason } from "./chat.js";
import { EndReason, State } from "./call.js";

const $ = (id) => document.getElementById(id);

/** Make an element; string children become text nodes. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") el.className = value;
    else if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else el.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(typeof child === "string" ? document.createTextNode(child) : child);
  }
  return el;
}

const timeFmt = new Intl.DateTimeFormat(undefined, { hour: "2-digit", minute: "2-digit" });
const dayFmt = new Intl.DateTimeFormat(undefined, { weekday: "long", day: "numeric", month: "long", year: "numeric" });
const shortDayFmt = new Intl.DateTimeFormat(undefined, { day: "numeric", month: "short" });

function startOfDay(ts) {
  const d = new Date(ts);
  d.setHours(0, 0, 0, 0);
  return d.getTime();
}

export function dayLabel(ts, now = Date.now()) {
  const day = startOfDay(ts);
  const today = startOfDay(now);
  if (day === today) return "Today";
  if (day === startOfDay(today - 12 * 3600 * 1000)) return "Yesterday";
  return dayFmt.format(new Date(ts));
}

function shortTime(ts, now = Date.now()) {
  return startOfDay(ts) === startOfDay(now) ? timeFmt.format(new Date(ts)) : shortDayFmt.format(new Date(ts));
}

export function ago(ts, now = Date.now()) {
  const s = Math.max(0, Math.round((now - ts) / 1000));
  if (s < 60) return "just now";
  const m = Math.round(s / 60);
  if (m < 60) return `${m} min ago`;
  const hours = Math.round(m / 60);
  if (hours < 24) return `${hours} h ago`;
  return `on ${shortDayFmt.format(new Date(ts))}`;
}

export function presenceText(p, now = Date.now()) {
  if (!p) return "";
  if (p.state === "online") return "online";
  if (p.state === "away") return "away";
  return p.last_seen ? `last seen ${ago(p.last_seen, now)}` : "offline";
}

function typingText(user) {
  return `${nameOf(user)} is typing…`;
}

const TICKS = {
  pending: ["…", "Waiting to be sent"],
  sent: ["✓", "Sent"],
  delivered: ["✓✓", "Delivered"],
  read: ["✓✓", "Read"],
  failed: ["!", "Not sent"],
};

function ticks(status) {
  const [symbol, label] = TICKS[status] || TICKS.pending;
  return h("span", { class: `ticks ${status}`, "data-status": status, title: label, "aria-label": label }, symbol);
}

function nameOf(address) {
  return address.split("@")[0];
}

function initial(name) {
  return [...name][0] ? [...name][0].toUpperCase() : "?";
}

/** The picture of `profile` if it has one (from the node, which checked it is an image), else an initial. */
function avatar(address, profile = null) {
  const name = (profile && profile.display_name) || nameOf(address);
  const letter = () => h("span", { class: "avatar", "aria-hidden": "true" }, initial(name));
  if (!profile || !profile.avatar) return letter();
  const img = h("img", { class: "avatar", alt: "", "aria-hidden": "true", "data-digest": profile.avatar.digest,
    src: `/api/v1/users/${encodeURIComponent(address)}/avatar?v=${encodeURIComponent(profile.avatar.digest)}` });
  img.addEventListener("error", () => {
    const fallback = letter();
    Object.assign(fallback.dataset, img.dataset); // still "this picture", so it is not asked for again
    img.replaceWith(fallback);
  }, { once: true });
  return img;
}

/** How long an ended call stays on screen before it closes by itself. */
const CALL_END_SHOWN_MS = 6000;

/** What the call screen says about a call, in words. */
export function callStatusText(call) {
  const name = nameOf(call.peer);
  switch (call.state) {
    case State.STARTING: return call.media === "video" ? "Starting your camera…" : "Starting your microphone…";
    case State.CALLING: return "Calling…";
    case State.RINGING: return "Ringing…";
    case State.INCOMING: return `Incoming ${call.media} call`;
    case State.CONNECTING: return "Connecting…";
    case State.ACTIVE: return call.unstable ? "Reconnecting…" : "Connected";
    default: break;
  }
  const incoming = call.direction === "incoming";
  switch (call.endReason) {
    case EndReason.HUNG_UP: case EndReason.ENDED: return "Call ended";
    case EndReason.CANCELLED: return incoming ? "Missed call" : "Call cancelled";
    case EndReason.DECLINED: return "Call declined";
    case EndReason.REJECTED: return `${name} declined the call`;
    case EndReason.BUSY: return incoming ? "Missed call: you were in another call" : `Busy: ${name} is in another call`;
    case EndReason.MISSED: return incoming ? "Missed call" : "No answer";
    case EndReason.ANSWERED_ELSEWHERE: return "Answered on another device";
    case EndReason.MEDIA: return "Camera or microphone unavailable";
    case EndReason.REFUSED: return "Call refused";
    default: return "Call failed";
  }
}

function changeText(peer, change) {
  if (change.own) return `Your own devices changed, so your safety number with ${nameOf(peer)} changed too.`;
  const parts = [];
  if (change.added.length) parts.push(`a device was added (${change.added.join(", ")})`);
  if (change.removed.length) parts.push(`a device was removed (${change.removed.join(", ")})`);
  if (change.rekeyed.length) parts.push(`a device has new keys (${change.rekeyed.join(", ")})`);
  return `${nameOf(peer)}'s safety number changed: ${parts.join("; ")}.`;
}

export class ChatView {
  constructor(chat) {
    this.chat = chat;
    this.peer = null;
    this.searchSeq = 0;
    this.stickToBottom = true;
    this.ticker = null;
    this.dirty = new Set();
    this.listeners = new AbortController(); // removes this view's listeners from the page
  }

  mount() {
    const chat = this.chat;
    $("me").textContent = chat.me;
    $("signout").hidden = false;
    chat.addEventListener("conversations", () => this.later("list"));
    chat.addEventListener("presence", () => this.later("list", "header"));
    chat.addEventListener("typing", () => this.later("list", "header"));
    chat.addEventListener("settings", () => this.later("settings"));
    chat.addEventListener("profile", (e) => this.later("list", e.detail === this.peer ? "header" : null, e.detail === chat.me ? "settings" : null));
    chat.addEventListener("contact", (e) => this.later("list", "own", e.detail === this.peer ? "header" : null));
    chat.addEventListener("messages", (e) => { if (e.detail === this.peer) this.later("messages"); });
    chat.addEventListener("connection", () => this.later("connection", "header"));
    chat.calls.addEventListener("call", () => { this.renderCall(); this.later("header"); });

    const on = { signal: this.listeners.signal };
    bindComposer(this, this.listeners.signal);
    $("search").addEventListener("input", () => this.search(), on);
    $("search-form").addEventListener("submit", (e) => { e.preventDefault(); this.search(); }, on);
    $("conversation-list").addEventListener("keydown", (e) => this.listKeys(e), on);
    $("back").addEventListener("click", () => this.close(), on);
    $("composer").addEventListener("submit", (e) => { e.preventDefault(); this.send(); }, on);
    $("compose").addEventListener("keydown", (e) => {
      if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
        e.preventDefault();
        this.send();
      }
    }, on);
    $("compose").addEventListener("input", () => {
      this.autosize();
      if (this.peer) this.chat.composing(this.peer, $("compose").value === "");
    }, on);
    $("messages").addEventListener("scroll", () => this.onScroll(), on);
    $("safety-button").addEventListener("click", () => this.showSafety(), on);
    $("audio-call-button").addEventListener("click", () => this.placeCall("audio"), on);
    $("video-call-button").addEventListener("click", () => this.placeCall("video"), on);
    $("call-accept").addEventListener("click", () => this.chat.calls.accept(), on);
    $("call-decline").addEventListener("click", () => this.chat.calls.current && this.chat.calls.current.decline(), on);
    $("call-hangup").addEventListener("click", () => this.chat.calls.current && this.chat.calls.current.hangUp(), on);
    $("call-close").addEventListener("click", () => this.chat.calls.dismiss(), on);
    $("call-mute").addEventListener("click", () => {
      const call = this.chat.calls.current;
      if (call) call.setMuted(!call.muted);
    }, on);
    $("call-camera").addEventListener("click", () => {
      const call = this.chat.calls.current;
      if (call) call.setCameraOff(!call.cameraOff);
    }, on);
    $("call-dialog").addEventListener("cancel", (e) => {
      // Escape never ends a live call by accident; it closes one that has ended.
      e.preventDefault();
      if (!this.chat.calls.busy) this.chat.calls.dismiss();
    }, on);
    $("key-warning").querySelector(".review").addEventListener("click", () => this.showSafety(), on);
    $("safety-close").addEventListener("click", () => $("safety-dialog").close(), on);
    $("safety-dialog").addEventListener("close", () => this.afterSafety(), on);
    $("settings-button").addEventListener("click", () => this.showSettings(), on);
    $("settings-close").addEventListener("click", () => $("settings-dialog").close(), on);
    for (const [id, name] of [["setting-read-receipts", "read_receipts"], ["setting-show-presence", "show_presence"]]) {
      $(id).addEventListener("change", (e) => this.changeSetting(name, e.target), on);
    }
    $("setting-listed").addEventListener("change", (e) => this.changeListed(e.target), on);
    $("profile-form").addEventListener("submit", (e) => { e.preventDefault(); this.saveProfile(); }, on);
    $("profile-form").addEventListener("input", () => { $("profile-form").dataset.dirty = "1"; $("profile-note").textContent = ""; }, on);
    $("profile-avatar-input").addEventListener("change", (e) => this.chooseAvatar(e.target.files[0] || null), on);
    $("profile-avatar-remove").addEventListener("click", () => this.removeAvatar(), on);
    $("safety-verified").addEventListener("change", (e) => {
      this.chat.setVerified(this.safetyPeer, e.target.checked).catch((err) => { e.target.checked = !e.target.checked; console.error(err); });
    }, on);
    document.addEventListener("visibilitychange", () => { if (this.peer) this.chat.markRead(this.peer); }, on);
    document.addEventListener("keydown", (e) => {
      if (e.key === "Escape" && this.peer && !$("safety-dialog").open && !$("settings-dialog").open && !$("call-dialog").open && window.matchMedia("(max-width: 720px)").matches) this.close();
    }, on);
    this.ticker = setInterval(() => { this.renderCountdown(); this.renderHeader(); this.renderCallDuration(); }, 1000);
    $("settings-button").hidden = false;
    this.renderList();
    this.renderConnection(chat.conn.state);
    this.renderOwnWarning();
  }

  unmount() {
    clearInterval(this.ticker);
    this.dirty.clear();
    this.listeners.abort();
    clearTimeout(this.callCloseTimer);
    $("safety-dialog").close();
    $("settings-dialog").close();
    $("call-dialog").close();
    for (const id of ["remote-video", "local-video"]) $(id).srcObject = null;
    $("settings-button").hidden = true;
    $("peer-typing").textContent = "";
    this.chooseAvatar(null);
  }

  /**
   * Redraw parts once for a burst of events (the node sends a presence frame per
   * contact on connect: drawing the list for each would cost O(contacts²)).
   */
  later(...parts) {
    const first = this.dirty.size === 0;
    for (const part of parts) if (part) this.dirty.add(part);
    if (!first || this.dirty.size === 0) return;
    const draw = () => {
      if (this.listeners.signal.aborted) return;
      const dirty = new Set(this.dirty);
      this.dirty.clear();
      if (dirty.has("connection")) this.renderConnection(this.chat.conn.state);
      if (dirty.has("list")) this.renderList();
      if (dirty.has("own")) this.renderOwnWarning();
      if (dirty.has("header")) this.renderHeader();
      if (dirty.has("messages")) this.renderMessages();
      else if (dirty.has("uploads")) this.renderUploads();
      if (dirty.has("settings")) this.renderSettings();
    };
    // Animation frames stop in a hidden tab; a timer still draws there, more slowly.
    if (document.visibilityState === "visible") requestAnimationFrame(draw);
    else setTimeout(draw, 100);
  }

  // -- connection ---------------------------------------------------------------------

  renderConnection(state) {
    const el = $("conn-status");
    el.dataset.state = state === "online" && !this.chat.ready ? "connecting" : state;
    el.dataset.attempt = String(this.chat.conn.failures);
    el.replaceChildren();
    if (state === "online") {
      el.append(this.chat.ready ? "Connected" : "Connecting…");
    } else if (state === "connecting") {
      el.append("Connecting…");
    } else if (state === "offline") {
      el.append("Offline: messages you write will be sent when you are back online.");
    } else if (state === "waiting") {
      // The countdown is not announced every second; the rest is, once.
      el.append("Connection lost. Reconnecting", h("span", { class: "countdown", "aria-hidden": "true" }), " ",
        h("button", { type: "button", class: "link", onclick: () => this.chat.conn.retryNow() }, "Retry now"));
      this.renderCountdown();
    } else {
      el.append("Disconnected");
    }
  }

  renderCountdown() {
    const countdown = $("conn-status").querySelector(".countdown");
    if (!countdown) return;
    const s = Math.max(1, Math.ceil(((this.chat.conn.retryAt || Date.now()) - Date.now()) / 1000));
    countdown.textContent = ` in ${s} s`;
  }

  // -- conversation list ----------------------------------------------------------------

  renderList() {
    const list = $("conversation-list");
    const focused = document.activeElement && document.activeElement.dataset ? document.activeElement.dataset.peer : null;
    const items = this.chat.conversationList().map((c) => this.listItem(c));
    list.replaceChildren(...items);
    $("list-empty").hidden = items.length > 0;
    if (focused) {
      const again = list.querySelector(`button[data-peer="${CSS.escape(focused)}"]`);
      if (again) again.focus();
    }
  }

  listItem(c) {
    const presence = this.chat.presence.get(c.peer);
    const contact = this.chat.contacts.get(c.peer);
    const typist = this.chat.typist(c.peer);
    let preview;
    if (c.lastCall) preview = callSummary(c.lastCall);
    else if (c.lastText !== null && c.lastText !== undefined) preview = c.lastText;
    else if (c.lastError) preview = c.lastError === "unsupported" ? "(a message this page cannot show)" : "(encrypted message)";
    else preview = "No messages yet";
    const profile = this.chat.profileOf(c.peer);
    const shown = this.chat.displayName(c.peer);
    const label = `${shown !== nameOf(c.peer) ? `${shown}, ` : ""}${c.peer}${c.unread ? `, ${c.unread} unread` : ""}${presence ? `, ${presenceText(presence)}` : ""}`
      + `${typist ? ", typing" : ""}`;
    return h("li", { "data-peer": c.peer, class: c.peer === this.peer ? "current" : null },
      h("button", { type: "button", "data-peer": c.peer, "aria-label": label, "aria-current": c.peer === this.peer ? "true" : null,
        onclick: () => this.open(c.peer) },
      h("span", { class: "avatar-wrap" }, avatar(c.peer, profile),
        h("span", { class: "presence-dot", "data-state": presence ? presence.state : "unknown", "aria-hidden": "true",
          title: presence ? presenceText(presence) : null })),
      h("span", { class: "summary" },
        h("span", { class: "line" },
          h("span", { class: "name", dir: "auto", title: c.peer }, shown),
          contact && contact.change ? h("span", { class: "key-flag", title: "Safety number changed" }, "⚠") : null,
          h("span", { class: "time muted" }, c.lastTs ? shortTime(c.lastTs) : "")),
        h("span", { class: "line" },
          typist ? h("span", { class: "preview typing" }, typingText(typist))
            : h("span", { class: "preview" }, c.lastMine ? ticks(c.lastStatus || "sent") : null,
              h("span", { class: "preview-text" }, preview)),
          c.unread ? h("span", { class: "unread", "aria-hidden": "true" }, String(c.unread)) : null))));
  }

  listKeys(e) {
    if (e.key !== "ArrowDown" && e.key !== "ArrowUp") return;
    const buttons = [...$("conversation-list").querySelectorAll("button")];
    const i = buttons.indexOf(document.activeElement);
    if (i < 0) return;
    e.preventDefault();
    const next = buttons[Math.min(buttons.length - 1, Math.max(0, i + (e.key === "ArrowDown" ? 1 : -1)))];
    next.focus();
  }

  async search() {
    const q = $("search").value.trim().toLowerCase();
    const results = $("search-results");
    const seq = ++this.searchSeq;
    if (!q) {
      results.replaceChildren();
      return;
    }
    let users;
    try {
      users = await this.chat.search(q);
    } catch (err) {
      if (seq === this.searchSeq) results.replaceChildren(h("li", { class: "muted" }, err.message));
      return;
    }
    if (seq !== this.searchSeq) return;
    results.replaceChildren(...(users.length ? users.map((p) => h("li", { class: "found" },
      h("button", { type: "button", "data-address": p.user, onclick: () => { $("search").value = ""; results.replaceChildren(); this.open(p.user); } },
        avatar(p.user, p),
        h("span", { class: "summary" },
          h("span", { class: "line" }, h("span", { class: "name", dir: "auto" }, p.display_name || nameOf(p.user))),
          h("span", { class: "line" }, h("span", { class: "address muted" }, p.user)),
          p.status_text ? h("span", { class: "line" }, h("span", { class: "preview status", dir: "auto" }, p.status_text)) : null))))
      : [h("li", { class: "muted" }, "Nobody by that name on this node. Someone on another node? Type name@node.")]));
  }

  // -- one conversation -----------------------------------------------------------------

  async open(peer) {
    if (this.peer !== peer) this.chat.stoppedTyping(); // left the other conversation
    this.peer = peer;
    this.stickToBottom = true;
    $("main").dataset.view = "conversation";
    $("empty-state").hidden = true;
    $("conversation-body").hidden = false;
    $("message-list").replaceChildren();
    $("composer-note").textContent = "";
    this.renderHeader();
    this.renderList();
    await this.chat.openConversation(peer);
    this.renderMessages();
    $("compose").focus();
  }

  close() {
    this.chat.stoppedTyping();
    this.peer = null;
    this.chat.closeConversation();
    $("main").dataset.view = "list";
    $("empty-state").hidden = false;
    $("conversation-body").hidden = true;
    this.renderList();
    const item = $("conversation-list").querySelector("button");
    if (item) item.focus();
  }

  renderHeader() {
    if (!this.peer) return;
    const profile = this.chat.profileOf(this.peer);
    const named = profile && profile.display_name;
    if ($("peer-name").textContent !== (named || this.peer)) $("peer-name").textContent = named || this.peer;
    $("peer-address").textContent = named ? this.peer : "";
    $("peer-status").textContent = profile && profile.status_text ? profile.status_text : "";
    const digest = profile && profile.avatar ? profile.avatar.digest : "";
    const shownAvatar = $("peer-avatar").firstElementChild;
    if (!shownAvatar || shownAvatar.dataset.peer !== this.peer || (shownAvatar.dataset.digest || "") !== digest
        || (!digest && shownAvatar.textContent !== initial(named || nameOf(this.peer)))) {
      const pic = avatar(this.peer, profile);
      pic.dataset.peer = this.peer;
      $("peer-avatar").replaceChildren(pic);
    }
    const presence = this.chat.presence.get(this.peer);
    $("peer-presence").textContent = presenceText(presence);
    $("peer-presence").dataset.state = presence ? presence.state : "unknown";
    // A live region: its text changes only when typing starts or stops, so it is read once.
    const typist = this.chat.typist(this.peer);
    const typing = typist ? typingText(typist) : "";
    if ($("peer-typing").textContent !== typing) $("peer-typing").textContent = typing;
    const contact = this.chat.contacts.get(this.peer);
    const warning = $("key-warning");
    warning.hidden = !(contact && contact.change);
    if (contact && contact.change) warning.querySelector(".text").textContent = changeText(this.peer, contact.change);
    $("safety-button").textContent = contact && contact.verified ? "Verified ✓" : "Safety number";
    const blocked = this.chat.sendBlockedReason(this.peer);
    for (const id of ["audio-call-button", "video-call-button"]) {
      $(id).disabled = !!blocked || !this.chat.ready || this.chat.calls.busy;
    }
    $("send").disabled = !!blocked;
    $("compose").disabled = !!blocked;
    if (blocked) $("composer-note").textContent = blocked;
    else if ($("composer-note").dataset.blocked) $("composer-note").textContent = "";
    $("composer-note").dataset.blocked = blocked ? "1" : "";
  }

  renderMessages() {
    if (!this.peer) return;
    const box = $("messages");
    const fromBottom = box.scrollHeight - box.scrollTop;
    const view = this.chat.view(this.peer);
    const items = [];
    let day = null;
    for (const m of this.chat.messagesOf(this.peer)) {
      const d = startOfDay(m.ts);
      if (d !== day) {
        day = d;
        items.push(h("li", { class: "day", role: "separator" }, h("span", {}, dayLabel(m.ts))));
      }
      items.push(this.messageItem(m));
    }
    $("message-list").replaceChildren(...items);
    this.renderUploads();
    const state = $("history-state");
    if (view.loading) state.textContent = "Loading earlier messages…";
    else if (view.error) {
      state.replaceChildren(`Could not load earlier messages: ${view.error} `,
        h("button", { type: "button", class: "link", onclick: () => this.chat.loadOlder(this.peer) }, "Try again"));
    } else if (view.done) state.textContent = items.length ? "This is the start of the conversation." : "No messages yet. Say hello!";
    else state.textContent = "";
    if (this.stickToBottom) box.scrollTop = box.scrollHeight;
    else box.scrollTop = box.scrollHeight - fromBottom; // older messages came in above: stay put
    this.chat.markRead(this.peer);
    // A short conversation cannot be scrolled: fetch more until it can, or until the start.
    if (!view.loading && !view.done && !view.error && box.scrollHeight <= box.clientHeight + 8) this.chat.loadOlder(this.peer);
  }

  renderUploads() {
    $("uploads").replaceChildren(...(this.peer ? uploadsView(this.peer, () => this.later("uploads")) : []));
  }

  messageItem(m) {
    if (m.call) {
      return h("li", { class: "message call-entry", "data-id": m.id, "data-call": m.call.direction, "data-reason": m.call.reason,
        "data-media": m.call.media },
      h("p", { class: "text" }, callSummary(m.call)),
      h("span", { class: "meta" }, h("time", { datetime: new Date(m.ts).toISOString() }, timeFmt.format(new Date(m.ts)))));
    }
    const body = m.attachment
      ? h("div", { class: "body" }, attachmentView(m.attachment, this.peer, () => this.later("messages")),
        m.attachment.caption ? h("p", { class: "text", dir: "auto" }, m.attachment.caption) : null)
      : m.text !== null && m.text !== undefined
      ? h("p", { class: "text", dir: "auto" }, m.text)
      : h("p", { class: "text undecryptable" }, undecryptableReason(m.error));
    const meta = h("span", { class: "meta" }, h("time", { datetime: new Date(m.ts).toISOString() }, timeFmt.format(new Date(m.ts))),
      m.mine ? ticks(m.status || "sent") : null);
    const li = h("li", { class: `message ${m.mine ? "mine" : "theirs"}`, "data-id": m.id, "data-mine": m.mine ? "1" : "0",
      "data-status": m.mine ? m.status || "sent" : null }, body, meta);
    if (m.mine && m.held && m.status === "pending") {
      li.append(h("p", { class: "held-note" }, "Waiting until you review the safety number."));
    }
    if (m.mine && m.status === "failed") {
      li.append(h("p", { class: "failed-note" }, `Not sent: ${m.error || "refused"} `,
        h("button", { type: "button", class: "link", onclick: () => this.chat.retry(this.peer, m.id) }, "Try again")));
    }
    return li;
  }

  onScroll() {
    const box = $("messages");
    this.stickToBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
    if (box.scrollTop < 80 && this.peer && !this.chat.view(this.peer).error) this.chat.loadOlder(this.peer);
  }

  autosize() {
    const t = $("compose");
    t.style.height = "auto";
    t.style.height = `${Math.min(t.scrollHeight, 160)}px`;
  }

  async send() {
    const box = $("compose");
    const text = box.value;
    if (!text.trim() || !this.peer) return;
    try {
      this.stickToBottom = true;
      box.value = "";
      this.chat.stoppedTyping();
      this.autosize();
      await this.chat.sendText(this.peer, text);
      $("composer-note").textContent = "";
    } catch (err) {
      box.value = text;
      $("composer-note").textContent = err.message;
    }
  }

  // -- calls --------------------------------------------------------------------------------

  async placeCall(media) {
    if (!this.peer) return;
    try {
      await this.chat.calls.place(this.peer, media);
    } catch (err) {
      $("composer-note").textContent = err.message;
    }
  }

  /** Show the current call (or close its screen when there is none). */
  renderCall() {
    const call = this.chat.calls.current;
    const dialog = $("call-dialog");
    clearTimeout(this.callCloseTimer);
    if (!call) {
      for (const id of ["remote-video", "local-video"]) $(id).srcObject = null;
      if (dialog.open) {
        dialog.close();
        const back = this.callReturnFocus;
        if (back && back.isConnected && !back.disabled) back.focus();
      }
      return;
    }
    Object.assign(dialog.dataset, { state: call.state, reason: call.endReason || "", direction: call.direction, media: call.media,
      callId: call.id });
    $("call-kind").textContent = `${call.media === "video" ? "Video" : "Audio"} call with`;
    $("call-peer").textContent = call.peer;
    $("call-avatar").textContent = nameOf(call.peer).slice(0, 1).toUpperCase();
    const status = callStatusText(call);
    if ($("call-status").textContent !== status) $("call-status").textContent = status; // read once per change
    $("call-detail").textContent = call.detail || "";
    this.renderCallDuration();

    const live = call.live;
    const video = call.media === "video";
    const setting = call.state === State.STARTING || call.state === State.CALLING || call.state === State.RINGING;
    $("call-accept").hidden = $("call-decline").hidden = call.state !== State.INCOMING;
    $("call-hangup").hidden = !live || call.state === State.INCOMING;
    $("call-hangup").textContent = setting ? "Cancel" : "Hang up";
    $("call-mute").hidden = !live || !call.localStream;
    $("call-mute").setAttribute("aria-pressed", String(call.muted));
    $("call-camera").hidden = !live || !video || !call.localStream;
    $("call-camera").setAttribute("aria-pressed", String(call.cameraOff));
    $("call-close").hidden = live;

    const local = live && video && call.localStream ? call.localStream : null;
    const remote = live && call.remoteStream ? call.remoteStream : null;
    if ($("local-video").srcObject !== local) $("local-video").srcObject = local;
    if ($("remote-video").srcObject !== remote) $("remote-video").srcObject = remote; // audio plays through it too
    $("local-video").hidden = !local || call.cameraOff;
    $("remote-video").hidden = !(remote && video);
    $("call-avatar").hidden = !!(remote && video);

    if (!dialog.open) {
      this.callReturnFocus = document.activeElement;
      dialog.showModal();
    }
    // Keep the keyboard on what can be done now: accept an incoming call, hang up, close.
    const primary = call.state === State.INCOMING ? $("call-accept") : live ? $("call-hangup") : $("call-close");
    const focused = document.activeElement;
    if (this.callFocusFor !== `${call.id}/${call.state === State.INCOMING ? "in" : live ? "live" : "end"}`
        || !dialog.contains(focused) || focused.hidden) {
      primary.focus();
      this.callFocusFor = `${call.id}/${call.state === State.INCOMING ? "in" : live ? "live" : "end"}`;
    }
    if (!live) this.callCloseTimer = setTimeout(() => this.chat.calls.dismiss(), CALL_END_SHOWN_MS);
  }

  renderCallDuration() {
    const call = this.chat.calls.current;
    const seconds = call && call.live ? call.duration() : null;
    const text = seconds === null ? "" : formatDuration(seconds);
    if ($("call-duration").textContent !== text) $("call-duration").textContent = text;
  }

  // -- settings -----------------------------------------------------------------------------

  async showSettings() {
    const dialog = $("settings-dialog");
    $("settings-error").textContent = "";
    this.renderSettings();
    if (!dialog.open) dialog.showModal();
    $("profile-form").dataset.dirty = "";
    $("profile-error").textContent = "";
    $("profile-note").textContent = "";
    this.renderProfileForm();
    try {
      // another device may have changed them
      await Promise.all([this.chat.loadSettings(), this.chat.loadProfile()]);
    } catch (err) {
      $("settings-error").textContent = `Could not load your settings: ${err.message}`;
    }
  }

  /** The profile editor as the node has it; what the person is typing is left alone. */
  renderProfileForm() {
    const profile = this.chat.profile;
    $("profile-save").disabled = !profile;
    if (!profile) return;
    if ($("profile-form").dataset.dirty !== "1") {
      $("profile-display-name").value = profile.display_name;
      $("profile-status").value = profile.status_text;
    }
    if (this.avatarBlobUrl) return; // a chosen picture is shown until saved or dropped
    const preview = $("profile-avatar-preview");
    const src = profile.avatar ? `/api/v1/users/${encodeURIComponent(this.chat.me)}/avatar?v=${encodeURIComponent(profile.avatar.digest)}` : "";
    if (preview.getAttribute("src") !== src) {
      if (src) preview.setAttribute("src", src);
      else preview.removeAttribute("src");
    }
    preview.hidden = !profile.avatar;
    $("profile-avatar-none").hidden = !!profile.avatar;
    $("profile-avatar-none").textContent = initial(profile.display_name || nameOf(this.chat.me));
    $("profile-avatar-remove").hidden = !profile.avatar;
  }

  /** A picture was chosen (or dropped, with null): checked and previewed here, uploaded on save. */
  chooseAvatar(file) {
    if (this.avatarBlobUrl) URL.revokeObjectURL(this.avatarBlobUrl);
    this.avatarBlobUrl = null;
    this.avatarFile = null;
    $("profile-error").textContent = "";
    if (file && !AVATAR_TYPES.includes(file.type)) {
      $("profile-error").textContent = "Choose a PNG, JPEG or WebP picture.";
    } else if (file && file.size > MAX_AVATAR_BYTES) {
      $("profile-error").textContent = `The picture is larger than ${MAX_AVATAR_BYTES / 1024} KB. Choose a smaller one.`;
    } else if (file) {
      this.avatarFile = file;
      this.avatarBlobUrl = URL.createObjectURL(file);
      $("profile-avatar-preview").src = this.avatarBlobUrl;
      $("profile-avatar-preview").hidden = false;
      $("profile-avatar-none").hidden = true;
      $("profile-note").textContent = "Save the profile to use this picture.";
      return;
    }
    if (!file) $("profile-avatar-input").value = "";
    if (this.chat.profile) this.renderProfileForm();
  }

  async saveProfile() {
    const button = $("profile-save");
    button.disabled = true;
    $("profile-error").textContent = "";
    $("profile-note").textContent = "Saving…";
    try {
      await this.chat.saveProfile({ display_name: $("profile-display-name").value, status_text: $("profile-status").value });
      $("profile-form").dataset.dirty = "";
      if (this.avatarFile) {
        await this.chat.saveAvatar(this.avatarFile);
        $("profile-avatar-input").value = "";
        this.chooseAvatar(null);
      }
      $("profile-note").textContent = "Saved.";
    } catch (err) {
      $("profile-note").textContent = "";
      $("profile-error").textContent = `Not saved: ${err.message}`;
    } finally {
      button.disabled = false;
      this.renderProfileForm();
    }
  }

  async removeAvatar() {
    $("profile-error").textContent = "";
    try {
      this.chooseAvatar(null);
      await this.chat.saveAvatar(null);
      $("profile-note").textContent = "Picture removed.";
    } catch (err) {
      $("profile-error").textContent = `Not removed: ${err.message}`;
    }
  }

  async changeListed(box) {
    const wanted = box.checked;
    box.dataset.saving = "1";
    $("settings-error").textContent = "";
    try {
      await this.chat.saveProfile({ listed: wanted });
    } catch (err) {
      $("settings-error").textContent = `Not saved: ${err.message}`;
    } finally {
      box.dataset.saving = "";
      this.renderSettings();
    }
  }

  renderSettings() {
    const settings = this.chat.settings;
    for (const [id, name] of [["setting-read-receipts", "read_receipts"], ["setting-show-presence", "show_presence"]]) {
      const box = $(id);
      box.disabled = !settings;
      if (settings && box.dataset.saving !== "1") box.checked = settings[name];
    }
    const listed = $("setting-listed");
    listed.disabled = !this.chat.profile;
    if (this.chat.profile && listed.dataset.saving !== "1") listed.checked = this.chat.profile.listed;
    if ($("settings-dialog").open) this.renderProfileForm();
  }

  async changeSetting(name, box) {
    const wanted = box.checked;
    box.dataset.saving = "1"; // stays enabled (and focused) meanwhile: a keyboard user is on it
    $("settings-error").textContent = "";
    try {
      await this.chat.saveSettings({ [name]: wanted });
    } catch (err) {
      $("settings-error").textContent = `Not saved: ${err.message}`;
    } finally {
      box.dataset.saving = "";
      this.renderSettings(); // shows what the node has, whether the change was saved or not
    }
  }

  // -- keys ---------------------------------------------------------------------------------

  renderOwnWarning() {
    const own = this.chat.contacts.get(this.chat.me);
    const el = $("own-warning");
    el.hidden = !(own && own.change);
    if (!own || !own.change) return;
    el.replaceChildren(
      `Your account's devices changed: ${[...own.change.added.map((n) => `added ${n}`), ...own.change.removed.map((n) => `removed ${n}`),
        ...own.change.rekeyed.map((n) => `new keys for ${n}`)].join(", ")}. If that was not you, change your password and tell your node's operator. `,
      h("button", { type: "button", class: "link", onclick: () => this.chat.acceptKeyChange(this.chat.me) }, "Dismiss"));
  }

  async showSafety() {
    const peer = this.peer;
    if (!peer) return;
    this.safetyPeer = peer;
    this.safetySeen = null;
    const dialog = $("safety-dialog");
    $("safety-peer").textContent = peer;
    $("safety-digits").textContent = "Computing…";
    delete $("safety-digits").dataset.number;
    $("safety-change").hidden = true;
    $("safety-verified").disabled = true;
    if (!dialog.open) dialog.showModal();
    try {
      // This fetches both users' devices again: show the change as it is after that.
      const number = await this.chat.safetyNumber(peer);
      if (this.safetyPeer !== peer || !dialog.open) return;
      const contact = this.chat.contacts.get(peer);
      $("safety-change").hidden = !(contact && contact.change);
      if (contact && contact.change) $("safety-change").textContent = changeText(peer, contact.change);
      $("safety-digits").replaceChildren(...formatSafetyNumber(number).split(" ").map((g) => h("span", {}, g)));
      $("safety-digits").dataset.number = number;
      $("safety-verified").checked = !!(contact && contact.verified);
      $("safety-verified").disabled = false;
      this.safetySeen = contact && contact.change ? contact.change.at : null;
    } catch (err) {
      $("safety-digits").textContent = `Could not compute it: ${err.message}`;
    }
  }

  afterSafety() {
    const peer = this.safetyPeer;
    // Only a change that was on screen next to the number counts as reviewed.
    if (peer && this.safetySeen) this.chat.acceptKeyChange(peer, this.safetySeen).catch(console.error);
    this.safetySeen = null;
    if (!$("compose").disabled) $("compose").focus();
  }
}
