// The WebSocket to the node (docs/protocol.md section 4): one connection at a time,
// reopened with exponential backoff and jitter when it drops.
//
// Frames arriving in one WebSocket message are handed to `onFrames` as one batch;
// batches are processed strictly one after another (the handler may be async), so
// everything stays in stream order and an ack is only sent after what it covers
// has been stored.

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;

/** Close codes after which reconnecting cannot help: the session is gone. */
const FATAL_CODES = new Set([4401, 4403]);

export class Connection {
  /**
   * handlers: onFrames(frames) -> Promise, onState(state), onFatal(code, reason).
   * States: "connecting", "online", "waiting" (backoff; see retryAt), "offline"
   * (the browser says it has no network), "stopped".
   */
  constructor(url, handlers, { WebSocketImpl = WebSocket } = {}) {
    this.url = url;
    this.handlers = handlers;
    this.WebSocketImpl = WebSocketImpl;
    this.ws = null;
    this.state = "stopped";
    this.failures = 0;
    this.retryAt = null;
    this.timer = null;
    this.queue = Promise.resolve();
    this.onOnline = () => this.retryNow();
    this.onOffline = () => this.dropForOffline();
  }

  start() {
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOffline);
    if (navigator.onLine === false) this.setState("offline");
    else this.open();
  }

  stop() {
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOffline);
    clearTimeout(this.timer);
    this.setState("stopped");
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, "bye");
    }
  }

  get isOpen() {
    return this.state === "online" && this.ws && this.ws.readyState === WebSocket.OPEN;
  }

  /** Send one frame; false if the connection is not open (the caller keeps it for later). */
  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  retryNow() {
    if (this.state === "stopped" || this.state === "online" || this.state === "connecting") return;
    clearTimeout(this.timer);
    this.open();
  }

  dropForOffline() {
    if (this.state === "stopped") return;
    clearTimeout(this.timer);
    this.setState("offline");
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      ws.close(1000, "offline");
    }
  }

  setState(state) {
    this.state = state;
    if (state !== "waiting") this.retryAt = null;
    this.handlers.onState(state);
  }

  open() {
    this.setState("connecting");
    let ws;
    try {
      ws = new this.WebSocketImpl(this.url);
    } catch {
      this.scheduleRetry();
      return;
    }
    this.ws = ws;
    let opened = false;
    ws.onopen = () => {
      if (this.ws !== ws) return;
      opened = true;
      this.setState("online");
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      let parsed;
      try {
        parsed = JSON.parse(event.data);
      } catch {
        console.warn("moot: the node sent something that is not JSON");
        return;
      }
      const batch = Array.isArray(parsed) ? parsed : [parsed];
      this.queue = this.queue.then(() => this.handlers.onFrames(batch)).catch((err) => {
        console.error("moot: handling frames failed", err);
      });
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      if (FATAL_CODES.has(event.code)) {
        this.setState("stopped");
        this.handlers.onFatal(event.code, event.reason);
        return;
      }
      if (opened) this.failures = 0;
      if (this.state === "offline" || this.state === "stopped") return;
      if (navigator.onLine === false) this.setState("offline");
      else this.scheduleRetry();
    };
  }

  scheduleRetry() {
    this.failures += 1;
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (this.failures - 1));
    const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
    this.retryAt = Date.now() + delay;
    this.state = "waiting";
    this.handlers.onState("waiting");
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
  }

  /** Wait until every batch received so far has been handled. */
  idle() {
    return this.queue;
  }
}
