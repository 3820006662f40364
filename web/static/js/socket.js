// The WebSocket to the node (docs/protocol.md section 4): one connection at a time,
// reopened with exponential backoff and jitter when it drops.
//
// Frames arriving in one WebSocket message are handed to `onFrames` as one batch;
// batches are processed strictly one after another (the handler may be async), so
// everything stays in stream order and an ack is only sent after what it covers
// has been stored. Batches still queued from a connection that has since closed
// are dropped: what they held is replayed from the cursor on the next one.
//
// A connection that says nothing for a while is probed with `ping`; one that stays
// silent, or never finishes opening, is treated as lost (a half-open TCP
// connection otherwise looks "connected" for ever).

const BACKOFF_MIN_MS = 500;
const BACKOFF_MAX_MS = 30_000;
const OPEN_TIMEOUT_MS = 10_000;
const PROBE_AFTER_MS = 25_000;
const DEAD_AFTER_MS = 40_000;
const HEARTBEAT_MS = 5_000;

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
    this.generation = 0;
    this.state = "stopped";
    this.failures = 0;
    this.retryAt = null;
    this.timer = null;
    this.openTimer = null;
    this.heartbeat = null;
    this.lastHeard = 0;
    this.queue = Promise.resolve();
    this.onOnline = () => this.retryNow();
    this.onOffline = () => this.drop("offline");
  }

  start() {
    window.addEventListener("online", this.onOnline);
    window.addEventListener("offline", this.onOffline);
    this.heartbeat = setInterval(() => this.checkAlive(), HEARTBEAT_MS);
    if (navigator.onLine === false) this.setState("offline");
    else this.open();
  }

  stop() {
    window.removeEventListener("online", this.onOnline);
    window.removeEventListener("offline", this.onOffline);
    clearInterval(this.heartbeat);
    this.drop("stopped");
  }

  get isOpen() {
    return this.state === "online" && this.ws !== null && this.ws.readyState === WebSocket.OPEN;
  }

  /** Send one frame; false if the connection is not open (the caller keeps it for later). */
  send(frame) {
    if (!this.isOpen) return false;
    this.ws.send(JSON.stringify(frame));
    return true;
  }

  /** The session works: later failures start the backoff from the beginning again. */
  healthy() {
    this.failures = 0;
  }

  retryNow() {
    if (this.state === "stopped" || this.state === "online" || this.state === "connecting") return;
    clearTimeout(this.timer);
    this.open();
  }

  /** Give up on the current connection and open another after the backoff (e.g. after a local failure). */
  restart() {
    if (this.state === "stopped" || this.state === "offline") return;
    this.closeSocket("restart");
    this.scheduleRetry();
  }

  drop(state) {
    clearTimeout(this.timer);
    this.closeSocket(state);
    this.setState(state);
  }

  closeSocket(reason) {
    clearTimeout(this.openTimer);
    if (this.ws) {
      const ws = this.ws;
      this.ws = null;
      this.generation += 1;
      try {
        ws.close(1000, reason);
      } catch {
        // already closing
      }
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
    this.generation += 1;
    const generation = this.generation;
    this.openTimer = setTimeout(() => { if (this.ws === ws) this.lost(ws); }, OPEN_TIMEOUT_MS);
    ws.onopen = () => {
      if (this.ws !== ws) return;
      clearTimeout(this.openTimer);
      this.lastHeard = Date.now();
      this.setState("online");
    };
    ws.onmessage = (event) => {
      if (this.ws !== ws) return;
      this.lastHeard = Date.now();
      let parsed;
      try {
        parsed = JSON.parse(event.data);
      } catch {
        console.warn("moot: the node sent something that is not JSON");
        return;
      }
      const batch = Array.isArray(parsed) ? parsed : [parsed];
      this.queue = this.queue
        .then(() => (generation === this.generation ? this.handlers.onFrames(batch) : undefined))
        .catch((err) => {
          console.error("moot: handling frames failed", err);
          if (generation === this.generation) this.restart();
        });
    };
    ws.onclose = (event) => {
      if (this.ws !== ws) return;
      this.ws = null;
      this.generation += 1;
      clearTimeout(this.openTimer);
      if (FATAL_CODES.has(event.code)) {
        this.setState("stopped");
        this.handlers.onFatal(event.code, event.reason);
        return;
      }
      if (this.state === "offline" || this.state === "stopped") return;
      if (navigator.onLine === false) this.setState("offline");
      else this.scheduleRetry();
    };
  }

  /** The connection stopped answering: treat it as closed. */
  lost(ws) {
    if (this.ws !== ws) return;
    this.closeSocket("no answer");
    if (navigator.onLine === false) this.setState("offline");
    else this.scheduleRetry();
  }

  checkAlive() {
    if (!this.isOpen) return;
    const quiet = Date.now() - this.lastHeard;
    if (quiet > DEAD_AFTER_MS) this.lost(this.ws);
    else if (quiet > PROBE_AFTER_MS) this.send({ type: "ping", nonce: "alive" });
  }

  scheduleRetry() {
    this.failures += 1;
    const ceiling = Math.min(BACKOFF_MAX_MS, BACKOFF_MIN_MS * 2 ** (this.failures - 1));
    const delay = Math.round(ceiling / 2 + Math.random() * ceiling / 2);
    this.retryAt = Date.now() + delay;
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.open(), delay);
    this.setState("waiting");
  }

  /** Run `task` between batches of frames, never while one is being handled. */
  enqueue(task) {
    const run = this.queue.then(task);
    this.queue = run.catch(() => {});
    return run;
  }
}
