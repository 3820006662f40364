// The page's composition root: find out who is signed in, set up this browser's
// device (keys made here, private halves kept in IndexedDB and never exported),
// then hand over to the chat.

import { DeviceKeys } from "./crypto.js";
import { api, ApiError } from "./api.js";
import { LocalStore, lastUser } from "./db.js";
import { Chat } from "./chat.js";
import { ChatView } from "./ui.js";
import { AwayWatcher } from "./activity.js";

const $ = (id) => document.getElementById(id);

let info = null;
let chat = null;
let view = null;
let watcher = null;

function show(screen) {
  $("app").dataset.screen = screen;
  $("loading").hidden = screen !== "loading";
  $("auth").hidden = screen !== "auth";
  $("main").hidden = screen !== "main";
}

function deviceName() {
  const ua = navigator.userAgent;
  const browser = /Firefox\//.test(ua) ? "Firefox" : /Edg\//.test(ua) ? "Edge" : /Chrom(e|ium)\//.test(ua) ? "Chromium"
    : /Safari\//.test(ua) ? "Safari" : "Browser";
  const os = /Android/.test(ua) ? "Android" : /iPhone|iPad/.test(ua) ? "iOS" : /Mac OS/.test(ua) ? "macOS"
    : /Windows/.test(ua) ? "Windows" : /Linux/.test(ua) ? "Linux" : "";
  return `${browser}${os ? ` on ${os}` : ""}`;
}

/** This browser's device for `address`: the stored one, or new keys published now. */
async function ensureDevice(store, session) {
  const saved = await store.get("meta", "device");
  if (saved && saved.deviceId && saved.deviceId === session.device) return saved;
  if (saved && saved.deviceId && session.device === null) {
    // A session not bound to our device cannot use it: sign in again (binds it).
    throw new ApiError(401, "rebind", "Please sign in again.");
  }
  // Keep the private keys before publishing the public ones: a crash in between
  // leaves an unused device on the node, never a published key without its secret.
  const keys = saved && !saved.deviceId ? new DeviceKeys(saved.keys) : await DeviceKeys.generate({ nOneTime: 20 });
  const plain = { identity: keys.identity, identityKey: keys.identityKey, dh: keys.dh, signedPrekeys: keys.signedPrekeys,
    currentSpkId: keys.currentSpkId, oneTimePrekeys: keys.oneTimePrekeys };
  const name = deviceName();
  await store.put([["meta", { k: "device", deviceId: null, keys: plain, name }]]);
  const { device } = await api("POST", "/api/v1/devices", { name, ...(await keys.publicBundle()) });
  const record = { k: "device", deviceId: device, keys: plain, name };
  await store.put([["meta", record]]);
  return record;
}

async function enter(session) {
  const store = await LocalStore.open(session.user);
  let device;
  try {
    device = await ensureDevice(store, session);
  } catch (err) {
    store.close();
    throw err;
  }
  lastUser.set(session.user);
  chat = new Chat({ me: session.user, deviceId: device.deviceId, keys: new DeviceKeys(device.keys), store, node: info.node });
  chat.addEventListener("signedout", () => leave("Your session ended. Please sign in again."));
  view = new ChatView(chat);
  const current = chat;
  watcher = new AwayWatcher((away) => current.setAway(away));
  show("main");
  view.mount();
  watcher.start();
  await chat.start();
}

function leave(message = "") {
  if (watcher) watcher.stop();
  if (view) view.unmount();
  if (chat) chat.stop();
  chat = view = watcher = null;
  $("signout").hidden = true;
  $("me").textContent = "";
  $("conn-status").textContent = "";
  showAuth(message);
}

function showAuth(message = "") {
  show("auth");
  const invite = info.registration === "invite";
  $("invite-field").hidden = !invite;
  $("signup-form").hidden = info.registration === "closed";
  $("signup-closed").hidden = info.registration !== "closed";
  $("signin-form").querySelector(".form-error").textContent = message;
  const user = lastUser.get();
  if (user && !$("signin-form").username.value) $("signin-form").username.value = user.split("@")[0];
  ($("signin-form").username.value ? $("signin-form").password : $("signin-form").username).focus();
}

function formError(form, err) {
  const text = err.code === "rate_limited" ? "Too many attempts. Wait a little and try again." : err.message;
  form.querySelector(".form-error").textContent = text;
}

async function signIn(username, password) {
  const address = `${username}@${info.node}`;
  const store = await LocalStore.open(address);
  const saved = await store.get("meta", "device");
  store.close();
  const body = { username, password, cookie: true };
  if (saved && saved.deviceId) body.device = saved.deviceId;
  let answer;
  try {
    answer = await api("POST", "/api/v1/login", body);
  } catch (err) {
    if (!(body.device && err.code === "bad_request" && err.details.field === "device")) throw err;
    // This browser's device was removed from the account: set its keys aside (what
    // they decrypted stays in the history here) and start a new device.
    const local = await LocalStore.open(address);
    try {
      await local.put([["meta", { ...saved, k: `retired:${saved.deviceId}` }]]);
      await local.delete("meta", "device");
      await local.delete("contacts", address); // my device list starts afresh: no false alarm
    } finally {
      local.close();
    }
    delete body.device;
    answer = await api("POST", "/api/v1/login", body);
  }
  await enter({ user: answer.user, device: answer.device });
}

function busy(form, on) {
  for (const el of form.elements) el.disabled = on;
}

function wireForms() {
  $("signin-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    const username = form.username.value.trim().toLowerCase();
    if (!username || !form.password.value) {
      formError(form, { message: "Enter your user name and password." });
      return;
    }
    busy(form, true);
    try {
      await signIn(username, form.password.value);
      form.reset();
    } catch (err) {
      formError(form, err);
    } finally {
      busy(form, false);
    }
  });
  $("signup-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    const username = form.username.value.trim().toLowerCase();
    if (!/^[a-z0-9_.-]{1,32}$/.test(username)) {
      formError(form, { message: "A user name is 1 to 32 lower-case letters, digits, or _ . -" });
      return;
    }
    if (form.password.value.length < 8) {
      formError(form, { message: "The password needs at least 8 characters." });
      return;
    }
    busy(form, true);
    try {
      const body = { username, password: form.password.value };
      if (info.registration === "invite") body.invite = form.invite.value.trim();
      await api("POST", "/api/v1/register", body);
      await signIn(username, form.password.value);
      form.reset();
    } catch (err) {
      formError(form, err);
    } finally {
      busy(form, false);
    }
  });
  $("signout").addEventListener("click", async () => {
    const current = chat;
    try {
      if (current) await current.signOut();
    } catch {
      // the session may be gone already; the page forgets it either way
    }
    chat = null;
    leave();
  });
}

async function boot(attempt = 0) {
  // Both questions at once: the answers do not depend on each other.
  const [infoAnswer, meAnswer] = await Promise.allSettled([api("GET", "/api/v1/info"), api("GET", "/api/v1/me")]);
  if (infoAnswer.status === "rejected") {
    const delay = Math.min(30, 2 ** attempt);
    $("loading").textContent = `This node cannot be reached (${infoAnswer.reason.message}). Trying again in ${delay} s.`;
    setTimeout(() => boot(attempt + 1), delay * 1000);
    return;
  }
  info = infoAnswer.value;
  $("node-name").textContent = info.node;
  document.title = `Moot · ${info.node}`;
  let session = null;
  if (meAnswer.status === "fulfilled") {
    session = meAnswer.value;
  } else if (!(meAnswer.reason instanceof ApiError) || meAnswer.reason.status !== 401) {
    const delay = Math.min(30, 2 ** attempt);
    $("loading").textContent = `Could not load (${meAnswer.reason.message}). Trying again in ${delay} s.`;
    setTimeout(() => boot(attempt + 1), delay * 1000);
    return;
  }
  if (!session) {
    showAuth();
    return;
  }
  try {
    await enter(session);
  } catch (err) {
    showAuth(err.message);
  }
}

wireForms();
boot();
