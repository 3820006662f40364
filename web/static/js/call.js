// One-to-one calls over WebRTC, without any DOM: the state of the call on this
// device, the RTCPeerConnection it drives, and the signals it sends and takes
// (docs/calls.md). The page (ui.js) listens to `Calls` and draws what it says.
//
// Signals travel through the node as `call` frames; what they carry (SDP, ICE
// candidates) is sealed end to end like a message (chat.js sealCallPayload and
// openCallPayload), so the node can neither read nor swap a DTLS fingerprint.
//
// ICE candidates are trickled: the offer goes out as soon as it is made, so the
// callee's devices ring at once, and candidates follow as `candidate` signals while
// gathering goes on. Waiting for gathering to finish would hold the ring back by the
// whole gathering time, which with a STUN or TURN server configured is seconds (and
// Chromium's gathering timeout when one is unreachable). A callee buffers the
// caller's candidates until it accepts; the Python peer (cli/rtc.py) does not
// trickle, its answer carries every candidate, and that works the same here.

/** How a call looks from this device. */
export const State = Object.freeze({
  STARTING: "starting", // outgoing: getting the camera or microphone, making the offer
  CALLING: "calling", // outgoing: the offer went out
  RINGING: "ringing", // outgoing: a callee device said it rings
  INCOMING: "incoming", // incoming: ringing here
  CONNECTING: "connecting", // accepted, media not flowing yet
  ACTIVE: "active", // connected
  ENDED: "ended",
});

/** Every legal transition: state -> event -> next state. Anything else is ignored. */
const TRANSITIONS = Object.freeze({
  starting: { offered: State.CALLING, end: State.ENDED },
  calling: { ringing: State.RINGING, accepted: State.CONNECTING, end: State.ENDED },
  ringing: { accepted: State.CONNECTING, end: State.ENDED },
  incoming: { accepted: State.CONNECTING, end: State.ENDED },
  connecting: { connected: State.ACTIVE, end: State.ENDED },
  active: { end: State.ENDED },
  ended: {},
});

/**
 * Why a call ended, from this device's side:
 * hung_up (this device hung up a connected call), cancelled (this device cancelled
 * before an answer, or the caller did while it rang here), declined (rejected
 * here), rejected (the callee declined), busy, missed (nobody answered in time),
 * answered_elsewhere (another device of this user took it), ended (the other side
 * hung up), failed (no connection, or a device gave up), media (no camera or
 * microphone), refused (the node refused a signal; `detail` says why).
 */
export const EndReason = Object.freeze({
  HUNG_UP: "hung_up", CANCELLED: "cancelled", DECLINED: "declined", REJECTED: "rejected", BUSY: "busy",
  MISSED: "missed", ANSWERED_ELSEWHERE: "answered_elsewhere", ENDED: "ended", FAILED: "failed", MEDIA: "media",
  REFUSED: "refused",
});

export function newCallId() {
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

const CALL_ID = /^[A-Za-z0-9_-]{8,64}$/;

/**
 * One call on this device. `out(kind, {body?, media?, reason?})` sends a signal
 * (`body` is sealed on the way); `rtc` is {RTCPeerConnection, getUserMedia(constraints)}.
 * Emits "change" whenever what a page shows of it changes.
 */
export class Call extends EventTarget {
  constructor({ id, peer, media, direction, out, rtc, now = () => Date.now() }) {
    super();
    Object.assign(this, { id, peer, media, direction, out, rtc, now });
    this.state = direction === "outgoing" ? State.STARTING : State.INCOMING;
    this.endReason = null;
    this.detail = null; // words for a person about why it failed
    this.remoteOffer = null; // incoming: the SDP offer, until accepted
    this.pc = null;
    this.localStream = null;
    this.remoteStream = null;
    this.remoteReady = false; // remote description set: candidates may be added
    this.pendingCandidates = [];
    this.muted = false;
    this.cameraOff = false;
    this.connectedAt = null;
    this.unstable = false; // ICE lost the path for now (it may come back)
  }

  get live() {
    return this.state !== State.ENDED;
  }

  /** Seconds since media started flowing, or null. */
  duration(now = this.now()) {
    return this.connectedAt === null ? null : Math.max(0, Math.floor((now - this.connectedAt) / 1000));
  }

  changed() {
    this.dispatchEvent(new CustomEvent("change"));
  }

  move(event) {
    const next = TRANSITIONS[this.state][event];
    if (!next) return false;
    this.state = next;
    this.changed();
    return true;
  }

  // -- setting up ------------------------------------------------------------------------

  async openMedia() {
    try {
      this.localStream = await this.rtc.getUserMedia({ audio: true, video: this.media === "video" });
    } catch (err) {
      const what = this.media === "video" ? "camera and microphone" : "microphone";
      throw Object.assign(new Error(`Your ${what} could not be used (${err.name || err.message}).`), { reason: EndReason.MEDIA });
    }
    if (!this.live) this.stopLocal(); // hung up meanwhile
  }

  makePeerConnection(iceServers) {
    const pc = new this.rtc.RTCPeerConnection({ iceServers, bundlePolicy: "max-bundle" });
    this.pc = pc;
    pc.addEventListener("icecandidate", (e) => {
      // null: gathering finished. Nothing to say: the other side does without end-of-candidates.
      if (!e.candidate || !e.candidate.candidate || !this.live) return;
      const { candidate, sdpMid, sdpMLineIndex } = e.candidate;
      this.out("candidate", { body: { kind: "candidate", candidate: { candidate, sdpMid, sdpMLineIndex } } });
    });
    pc.addEventListener("track", (e) => {
      if (!this.remoteStream) this.remoteStream = e.streams[0] || new MediaStream();
      if (!this.remoteStream.getTracks().includes(e.track)) this.remoteStream.addTrack(e.track);
      this.changed();
    });
    pc.addEventListener("connectionstatechange", () => this.onConnectionState(pc.connectionState));
    for (const track of this.localStream.getTracks()) pc.addTrack(track, this.localStream);
    return pc;
  }

  onConnectionState(state) {
    if (!this.live) return;
    if (state === "connected") {
      this.unstable = false;
      if (this.connectedAt === null) this.connectedAt = this.now();
      if (!this.move("connected")) this.changed();
    } else if (state === "disconnected") {
      this.unstable = true; // ICE may find the path again; "failed" if not
      this.changed();
    } else if (state === "failed") {
      this.out("hangup", { reason: "failed" });
      this.finish(EndReason.FAILED, "The connection could not be made, or it was lost.");
    }
  }

  async setRemote(type, sdp) {
    await this.pc.setRemoteDescription({ type, sdp });
    this.remoteReady = true;
    for (const candidate of this.pendingCandidates.splice(0)) await this.addCandidate(candidate);
  }

  async addCandidate(candidate) {
    try {
      await this.pc.addIceCandidate(candidate);
    } catch (err) {
      console.warn("moot: an ICE candidate from the other side was refused", err);
    }
  }

  /** Outgoing: get the media, make the offer and send it. */
  async place(iceServers) {
    try {
      await this.openMedia();
      if (!this.live) return;
      const pc = this.makePeerConnection(iceServers);
      await pc.setLocalDescription(await pc.createOffer());
      if (!this.live) return;
      // Sent before any candidate: the out queue keeps the order.
      this.out("offer", { media: this.media, body: { kind: "offer", sdp: pc.localDescription.sdp } });
      this.move("offered");
    } catch (err) {
      this.finish(err.reason || EndReason.FAILED, err.reason ? err.message : `The call could not start: ${err.message}`);
    }
  }

  /** Incoming: the person accepted. Get the media, answer, and say so. */
  async accept(iceServers) {
    if (this.state !== State.INCOMING) return;
    this.move("accepted");
    try {
      await this.openMedia();
      if (!this.live) return;
      const pc = this.makePeerConnection(iceServers);
      await this.setRemote("offer", this.remoteOffer);
      await pc.setLocalDescription(await pc.createAnswer());
      if (!this.live) return;
      this.out("accept", { body: { kind: "answer", sdp: pc.localDescription.sdp } });
    } catch (err) {
      if (!this.live) return;
      // The caller is waiting for this device: tell it, or it rings on until the timeout.
      this.out("hangup", { reason: "failed" });
      this.finish(err.reason || EndReason.FAILED, err.reason ? err.message : `The call could not be answered: ${err.message}`);
    }
  }

  // -- what the person does -----------------------------------------------------------------

  decline() {
    if (this.state !== State.INCOMING) return;
    this.out("reject", {});
    this.finish(EndReason.DECLINED);
  }

  hangUp() {
    if (!this.live) return;
    if (this.state === State.INCOMING) return this.decline();
    const connected = this.connectedAt !== null;
    // Before `offered` nothing was sent: nobody needs telling.
    if (this.state !== State.STARTING) this.out("hangup", {});
    this.finish(connected ? EndReason.HUNG_UP : EndReason.CANCELLED);
  }

  setMuted(muted) {
    this.muted = muted;
    for (const t of this.localStream ? this.localStream.getAudioTracks() : []) t.enabled = !muted;
    this.changed();
  }

  setCameraOff(off) {
    this.cameraOff = off;
    for (const t of this.localStream ? this.localStream.getVideoTracks() : []) t.enabled = !off;
    this.changed();
  }

  // -- signals from the other side ------------------------------------------------------------

  /** A signal for this call; `body` is its opened payload (null when it has none). */
  async onSignal(frame, body) {
    if (!this.live) return;
    const fromNode = frame.sender_device === "";
    switch (frame.kind) {
      case "ringing":
        this.move("ringing");
        break;
      case "accept":
        if (this.direction !== "outgoing" || !this.pc || !this.move("accepted")) return;
        try {
          await this.setRemote("answer", body.sdp);
        } catch (err) {
          this.out("hangup", { reason: "failed" });
          this.finish(EndReason.FAILED, `The answer could not be used: ${err.message}`);
        }
        break;
      case "answer":
        break; // renegotiation is not supported (docs/calls.md section 4)
      case "candidate":
        if (this.remoteReady) await this.addCandidate(body.candidate);
        else this.pendingCandidates.push(body.candidate);
        break;
      case "reject":
        this.finish(EndReason.REJECTED);
        break;
      case "busy":
        this.finish(EndReason.BUSY);
        break;
      case "missed":
        this.finish(EndReason.MISSED);
        break;
      case "hangup":
        this.finish(this.hangupReason(frame.reason, fromNode));
        break;
      default:
        break;
    }
  }

  hangupReason(reason, fromNode) {
    if (reason === "answered_elsewhere") return EndReason.ANSWERED_ELSEWHERE;
    if (reason === "rejected") return EndReason.DECLINED; // declined on another of my devices
    if (reason === "busy") return EndReason.BUSY;
    if (reason === "failed") return EndReason.FAILED;
    if (this.connectedAt !== null) return EndReason.ENDED;
    return this.direction === "incoming" ? EndReason.CANCELLED : fromNode ? EndReason.FAILED : EndReason.ENDED;
  }

  /** The node refused a signal of this call (an `error` frame with this call's id). */
  onRefused(code, message) {
    if (!this.live) return;
    const reason = code === "answered_elsewhere" ? EndReason.ANSWERED_ELSEWHERE : EndReason.REFUSED;
    this.finish(reason, refusalText(code, message));
  }

  // -- the end ----------------------------------------------------------------------------------

  stopLocal() {
    for (const t of this.localStream ? this.localStream.getTracks() : []) t.stop();
  }

  finish(reason, detail = null) {
    if (!this.live) return;
    this.endReason = reason;
    this.detail = detail;
    this.stopLocal();
    if (this.pc) this.pc.close();
    this.move("end");
  }
}

function refusalText(code, message) {
  switch (code) {
    case "already_in_call": return "You are already in a call on another device.";
    case "unknown_user": return "There is nobody by that name.";
    case "unknown_node": return "Their node is not known to yours.";
    case "call_ended": case "unknown_call": return "The call had already ended.";
    default: return `Your node refused the call: ${message || code}.`;
  }
}

/**
 * This device's calls: at most one live call, `current`, and the signals in and out.
 * deps: {me (this user's address), send(frame) -> bool, seal(peer, callId, n, body) -> Promise<envelope>,
 * open(frame) -> Promise<body> (verified, see chat.js openCallPayload),
 * iceServers() -> Promise<list>, prepare(peer) -> Promise (fetch the peer's devices),
 * rtc: {RTCPeerConnection, getUserMedia}, now()}.
 * Emits "call" whenever the current call appears or changes.
 */
export class Calls extends EventTarget {
  constructor(deps) {
    super();
    this.deps = deps;
    this.current = null;
    this.outQueue = Promise.resolve(); // signals leave in the order they were made
    this.inQueue = Promise.resolve(); // and are handled in the order they came
    this.sealed = new Map(); // call id -> payloads sealed so far (the envelope ids' counter)
  }

  get busy() {
    return this.current !== null && this.current.live;
  }

  emit() {
    this.dispatchEvent(new CustomEvent("call", { detail: this.current }));
  }

  adopt(call) {
    this.current = call;
    call.addEventListener("change", () => { if (this.current === call) this.emit(); });
    this.emit();
  }

  /** Send one signal of `call`, after every one before it; the body is sealed on the way. */
  signal(call, kind, { body = null, media = null, reason = null } = {}) {
    this.outQueue = this.outQueue.then(async () => {
      const frame = { type: "call", call_id: call.id, kind, to: call.peer };
      if (media) frame.media = media;
      if (reason) frame.reason = reason;
      if (body) {
        const n = (this.sealed.get(call.id) || 0) + 1;
        this.sealed.set(call.id, n);
        frame.payload = JSON.stringify(await this.deps.seal(call.peer, call.id, n, { type: "call", call_id: call.id, ...body }));
      }
      if (!this.deps.send(frame) && call.live && kind !== "hangup" && kind !== "reject") {
        call.finish(EndReason.FAILED, "The connection to your node was lost.");
      }
    }).catch((err) => {
      console.error(`moot: sending a call ${kind} failed`, err);
      if (call.live) {
        call.finish(EndReason.FAILED, `The call could not be set up: ${err.message}`);
        if (kind !== "hangup") this.signal(call, "hangup", { reason: "failed" });
      }
    });
    return this.outQueue;
  }

  make(options) {
    let call = null;
    call = new Call({ ...options, out: (kind, fields) => this.signal(call, kind, fields), rtc: this.deps.rtc, now: this.deps.now });
    return call;
  }

  /** Call `peer` ("audio" or "video"). Returns the call (watch it for how it goes). */
  async place(peer, media) {
    if (this.busy) throw new Error("You are already in a call.");
    const call = this.make({ id: newCallId(), peer, media, direction: "outgoing" });
    this.adopt(call);
    let iceServers;
    try {
      // Every device of theirs must be able to open the offer: the list is fetched afresh.
      [iceServers] = await Promise.all([this.deps.iceServers(), this.deps.prepare(peer)]);
    } catch (err) {
      call.finish(EndReason.FAILED, `The call could not start: ${err.message}`);
      return call;
    }
    await call.place(iceServers);
    return call;
  }

  /** The person accepted the incoming call. */
  async accept() {
    const call = this.current;
    if (!call || call.state !== State.INCOMING) return;
    let iceServers;
    try {
      iceServers = await this.deps.iceServers(); // fresh TURN credentials, if any
    } catch (err) {
      call.out("hangup", { reason: "failed" });
      call.finish(EndReason.FAILED, `The call could not be answered: ${err.message}`);
      return;
    }
    await call.accept(iceServers);
  }

  /** A `call` frame from the node. Handled in order, never blocking the chat's frames. */
  onFrame(frame) {
    this.inQueue = this.inQueue.then(() => this.handle(frame)).catch((err) => console.error("moot: a call signal failed", err));
    return this.inQueue;
  }

  async handle(frame) {
    if (typeof frame.call_id !== "string" || !CALL_ID.test(frame.call_id) || typeof frame.sender !== "string") return;
    if (frame.kind === "offer") return this.onOffer(frame);
    const call = this.current;
    if (!call || call.id !== frame.call_id || !call.live) return; // late, or not this device's call
    // From the other party, or made by my node for my devices (missed, answered elsewhere).
    const fromMyNode = frame.sender === this.deps.me && frame.sender_device === "";
    if (frame.sender !== call.peer && !fromMyNode) return;
    let body = null;
    if (["accept", "answer", "candidate"].includes(frame.kind)) {
      if (frame.sender !== call.peer) return;
      const expected = frame.kind === "candidate" ? "candidate" : "answer";
      try {
        body = await this.deps.open(frame, expected);
      } catch (err) {
        console.warn(`moot: a call ${frame.kind} could not be verified`, err);
        if (frame.kind === "accept") {
          // An answer nobody can vouch for must not be used: end it for both sides.
          this.signal(call, "hangup", { reason: "failed" });
          call.finish(EndReason.FAILED, "The answer to the call could not be verified.");
        }
        return;
      }
    }
    await call.onSignal(frame, body);
  }

  async onOffer(frame) {
    if (this.busy) {
      if (this.current.id === frame.call_id) return; // replayed
      // The node says busy for a user in a call; this covers a race with our own offer.
      this.deps.send({ type: "call", call_id: frame.call_id, kind: "busy", to: frame.sender, reason: "in_call" });
      return;
    }
    if (frame.media !== "audio" && frame.media !== "video") return;
    let body;
    try {
      body = await this.deps.open(frame, "offer");
    } catch (err) {
      // Not this device's to answer (or not genuine): the caller's other devices ring on.
      console.warn("moot: an incoming call could not be verified", err);
      return;
    }
    if (this.busy) return; // a call started while this one was being opened
    const call = this.make({ id: frame.call_id, peer: frame.sender, media: frame.media, direction: "incoming" });
    call.remoteOffer = body.sdp;
    this.adopt(call);
    this.signal(call, "ringing");
  }

  /** The node refused a signal (an `error` frame whose ref is a call id); true if it was ours. */
  onError(frame) {
    const call = this.current;
    if (!call || call.id !== frame.ref) return false;
    call.onRefused(frame.code, frame.message);
    return true;
  }

  /** The WebSocket closed: a call still being set up cannot go on (its signals are lost). */
  onDisconnected() {
    const call = this.current;
    if (call && call.live && call.state !== State.ACTIVE) call.finish(EndReason.FAILED, "The connection to your node was lost.");
  }

  /** Forget the call that ended (the page stopped showing it). */
  dismiss() {
    if (this.current && !this.current.live) {
      this.current = null;
      this.emit();
    }
  }

  /** Signing out: end whatever is going on. */
  stop() {
    if (this.current) this.current.hangUp();
  }
}
