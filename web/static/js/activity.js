// Whether the person is at this page: it is visible and was used in the last five
// minutes. When that changes the chat tells the node (`presence` away / online,
// docs/protocol.md 4.6). The document, the window and the clock are passed in, so a
// test can drive it with stand-ins and a short idle time.

export const IDLE_AWAY_MS = 5 * 60_000;

/** What counts as the person using the page; each is cheap to handle. */
const INPUT_EVENTS = ["pointerdown", "pointermove", "keydown", "wheel", "touchstart", "focus"];

export class AwayWatcher {
  /**
   * onChange(away) is called with the state at start() and at every change after it.
   * Nothing is listened to or scheduled before start(); stop() removes it all.
   */
  constructor(onChange, { doc = document, win = window, idleMs = IDLE_AWAY_MS, now = () => Date.now() } = {}) {
    Object.assign(this, { onChange, doc, win, idleMs, now });
    this.idle = false;
    this.lastInput = 0;
    this.timer = null;
    this.reported = null;
    this.listeners = null;
  }

  get away() {
    return this.doc.visibilityState !== "visible" || this.idle;
  }

  start() {
    this.listeners = new AbortController();
    const on = { signal: this.listeners.signal, passive: true, capture: true };
    this.doc.addEventListener("visibilitychange", () => this.onVisibility(), on);
    for (const type of INPUT_EVENTS) this.win.addEventListener(type, () => this.onInput(), on);
    this.lastInput = this.now();
    this.schedule(this.idleMs);
    this.report();
  }

  stop() {
    if (this.listeners) this.listeners.abort();
    this.listeners = null;
    clearTimeout(this.timer);
    this.timer = null;
  }

  onVisibility() {
    // Coming back to the page is using it.
    if (this.doc.visibilityState === "visible") this.onInput();
    this.report();
  }

  onInput() {
    this.lastInput = this.now();
    if (!this.idle) return; // the common case: pointermove, many times a second
    this.idle = false;
    this.schedule(this.idleMs);
    this.report();
  }

  schedule(delay) {
    clearTimeout(this.timer);
    this.timer = setTimeout(() => this.check(), delay);
  }

  /** The timer is not moved on every input: it looks at the time of the last one when it fires. */
  check() {
    this.timer = null;
    const quiet = this.now() - this.lastInput;
    if (quiet < this.idleMs) {
      this.schedule(this.idleMs - quiet);
      return;
    }
    this.idle = true;
    this.report();
  }

  report() {
    const away = this.away;
    if (away === this.reported) return;
    this.reported = away;
    this.onChange(away);
  }
}
