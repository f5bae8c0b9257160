// signaling.js: browser client for the signaling server (an ES module, no
// dependencies, no build step).  Served by the server at /signaling.js.
//
//   import { SignalingClient } from "/signaling.js";
//   const client = new SignalingClient();          // ws(s)://<this host>/ws
//   const id = await client.connect();             // the welcome id
//   client.addEventListener("chat", (e) => console.log(e.detail.text));
//   await client.call(peerId);                     // ping, pong, offer, answer, ICE
//   client.sendChat("hello");
//   client.hangUp();
//
// Wire contract: docs/protocol.rst; this module: docs/client.rst.  Events
// (all CustomEvent, data in .detail):
//   "welcome", "message" (every frame received), "sent" (every frame sent or
//   queued), one per frame type ("ping", "pong", "offer", "answer",
//   "ice-candidate", "disconnect", "error");
//   calls: "ringing" (an incoming call waits for accept()/decline()),
//   "incoming" (a call was accepted), "callerror" (.code, .message: a call
//   could not be made or went wrong), "hangup" (.reason), "statechange"
//   (call, connection, ICE, data channel and socket states), "channelopen",
//   "channelclose", "chat", "localstream", "remotestream" (.stream, a
//   MediaStream or null), "icerestart";
//   the socket: "reconnecting" (.attempt, .delay in ms, .code), "resumed"
//   (.id, .resumed: whether the server kept the session; if not, a call in
//   progress is paired again by itself, then "repaired" (.peer)), "lost" (.reason: the id could not be
//   kept, or reconnecting gave up), "close" (.code, .reason, .reconnecting),
//   "iceservers" (fresh TURN credentials were fetched).

const TYPES = ["ping", "pong", "offer", "answer", "ice-candidate", "disconnect"];

// Close codes after which reconnecting cannot help: the server refused what
// this client sent (1002, 1003, 1007, 1008, 1009), or a newer connection
// took the session over (4409).
const FINAL_CLOSE_CODES = new Set([1002, 1003, 1007, 1008, 1009, 4409]);

export function defaultUrl(loc = globalThis.location) {
  const scheme = loc && loc.protocol === "https:" ? "wss:" : "ws:";
  return scheme + "//" + ((loc && loc.host) || "localhost:3000") + "/ws";
}

// ``url`` with the query parameters ``params`` set (null or "" removes one;
// undefined leaves it as it is).
export function withParams(url, params) {
  const u = new URL(url);
  for (const [key, value] of Object.entries(params)) {
    if (value === undefined) continue;
    if (value === null || value === "") u.searchParams.delete(key);
    else u.searchParams.set(key, value);
  }
  return u.href;
}

// Where fresh ICE servers come from for a WebSocket URL: /api/ice-servers on
// the same host and port when the WebSocket is /ws on the HTTP port (with
// the same access token), else nowhere (pass options.iceServersUrl).
export function iceServersUrlFor(wsUrl) {
  let u;
  try { u = new URL(wsUrl); } catch (e) { return null; }
  if (u.pathname !== "/ws") return null;
  const http = new URL(u.href);
  http.protocol = u.protocol === "wss:" ? "https:" : "http:";
  http.pathname = "/api/ice-servers";
  const token = u.searchParams.get("token");
  http.search = token ? "?token=" + encodeURIComponent(token) : "";
  return http.href;
}

// The expiry (unix seconds) of TURN credentials made as coturn checks them
// ("<expiry>:<user>"), or Infinity when there are none.
function iceExpiry(servers) {
  let expiry = Infinity;
  for (const s of servers) {
    const m = typeof s.username === "string" && /^(\d+):/.exec(s.username);
    if (m) expiry = Math.min(expiry, Number(m[1]));
  }
  return expiry;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

export class SignalingClient extends EventTarget {
  /**
   * @param {string} url  WebSocket URL of the server (default: /ws on this host).
   * @param {object} options
   *   token: an access token, sent as ?token= (servers with --token-secret-file).
   *   iceServers: RTCIceServer entries of your own, used besides the ones the
   *     server sends in its welcome (default: []).
   *   iceTransportPolicy: "all" (default) or "relay" (only TURN relays).
   *   iceServersUrl: where to get fresh TURN credentials when the welcome's
   *     have expired by the time a call starts (default: /api/ice-servers
   *     beside a /ws URL; null: never refresh).
   *   media: getUserMedia constraints for calls with audio/video, e.g.
   *     {audio: true, video: true} (default: null, a data channel only).
   *   autoAnswer: accept incoming calls by itself (default: true); when false,
   *     an incoming call fires "ringing" and waits for accept() or decline().
   *   confirmCall: optional (from) => boolean or Promise<boolean>, asked before
   *     an incoming call is accepted automatically.
   *   channelLabel: label of the data channel the caller opens (default: "chat").
   *   pongTimeout: ms to wait for the callee to answer in call(), and for the
   *     user to accept or decline a ringing call (default: 15000).
   *   reconnect: reconnect and resume after a close this client did not ask
   *     for (default: true).
   *   reconnectDelay, maxReconnectDelay: the first wait before reconnecting
   *     and the most it grows to, doubling with each failed attempt, with
   *     jitter (default: 500 and 10000 ms).
   *   reconnectFor: ms to keep trying before giving up ("lost"; default 120000).
   *   iceRestartDelay: ms ICE may stay "disconnected" before the caller
   *     restarts it (default: 2000; "failed" restarts at once).
   */
  constructor(url = defaultUrl(), options = {}) {
    super();
    this.url = url;
    this.token = options.token || null;
    this.iceServers = options.iceServers || [];
    this.iceTransportPolicy = options.iceTransportPolicy || "all";
    this.iceServersUrl = options.iceServersUrl !== undefined ? options.iceServersUrl
      : iceServersUrlFor(this.token ? withParams(url, { token: this.token }) : url);
    this.serverIceServers = [];  // from the welcome, or /api/ice-servers
    this.media = options.media || null;
    this.autoAnswer = options.autoAnswer !== undefined ? options.autoAnswer : true;
    this.confirmCall = options.confirmCall || null;
    this.channelLabel = options.channelLabel || "chat";
    this.pongTimeout = options.pongTimeout || 15000;
    this.reconnect = options.reconnect !== undefined ? options.reconnect : true;
    this.reconnectDelay = options.reconnectDelay || 500;
    this.maxReconnectDelay = options.maxReconnectDelay || 10000;
    this.reconnectFor = options.reconnectFor || 120000;
    this.iceRestartDelay = options.iceRestartDelay || 2000;
    this.id = null;
    this.resumeToken = null;  // from the last welcome
    this.ws = null;
    this.socketState = "new";  // new | connecting | open | reconnecting | closed
    this.peerId = null;   // who we call or talk to
    this.callState = "idle";  // idle | calling | ringing | in-call
    this.role = null;  // "caller" | "callee" during a call
    this.pc = null;
    this.channel = null;
    this.localStream = null;
    this.remoteStream = null;
    this._remoteCandidates = [];
    this._waiters = [];
    this._outbox = [];  // frames sent while the socket is down, sent on resume
    this._closing = false;  // close() was called: no reconnecting
    this._attempt = 0;
    this._lostSince = null;
    this._timer = null;
    this._ringTimer = null;
    this._iceTimer = null;
    this._repairing = false;  // waiting to be paired again with our partner
  }

  // -- the WebSocket ---------------------------------------------------------

  /** Open the WebSocket; resolves with our id once the server welcomes us. */
  connect() {
    this._closing = false;
    this._setSocketState("connecting");
    return this._open(false);
  }

  _open(resuming) {
    const url = withParams(this.url, { token: this.token || undefined, resume: resuming ? this.resumeToken : null });
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(url);
      this.ws = ws;
      let welcomed = false;
      ws.onmessage = (ev) => {
        if (ws !== this.ws) return;
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch (e) {
          this._emit("error", { type: "error", code: "client", message: "server sent non-JSON: " + ev.data });
          return;
        }
        if (msg.type === "welcome" && !welcomed) {
          welcomed = true;
          this._welcomed(msg, resuming);
          resolve(msg.id);
        }
        this._onMessage(msg);
        if (msg.type === "welcome") this._afterWelcome(msg, resuming);
      };
      ws.onclose = (ev) => {
        if (ws !== this.ws) return;
        if (!welcomed) reject(new Error("WebSocket closed before the welcome (code " + ev.code + ")"));
        this._socketClosed(ev, welcomed, resuming);
      };
    });
  }

  /** Close the WebSocket for good (hanging up first if in a call). */
  close() {
    this._closing = true;
    clearTimeout(this._timer);
    if (this.peerId) this.hangUp();
    if (this.ws && this.ws.readyState <= WebSocket.OPEN) this.ws.close(1000, "bye");
    else this._closedForGood(null);
  }

  /**
   * Send one message of the wire contract.  While the socket is being
   * reconnected, the message is queued and sent once the session is back.
   */
  send(type, to, data = {}) {
    const frame = JSON.stringify({ type: type, to: to, data: data });
    if (this.socketState === "open" && this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.ws.send(frame);
      this._emit("sent", { type: type, to: to, data: data, frame: frame });
    } else if (this.socketState === "reconnecting") {
      this._outbox.push({ type: type, to: to, data: data });
      this._emit("sent", { type: type, to: to, data: data, frame: frame, queued: true });
    } else {
      throw new Error("not connected");
    }
  }

  ping(to, data = {}) { this.send("ping", to, data); }
  pong(to, data = {}) { this.send("pong", to, data); }
  offer(to, data) { this.send("offer", to, data); }
  answer(to, data) { this.send("answer", to, data); }
  iceCandidate(to, data) { this.send("ice-candidate", to, data); }
  disconnect(to, data = { reason: "user_disconnect" }) { this.send("disconnect", to, data); }

  _welcomed(msg, resuming) {
    this._previousId = this.id;
    this.id = msg.id;
    this.resumeToken = typeof msg.resume === "string" ? msg.resume : null;
    this.serverIceServers = Array.isArray(msg.iceServers) ? msg.iceServers : [];
    this._attempt = 0;
    this._lostSince = null;
    this._setSocketState("open");
  }

  // After the welcome's own events: what a reconnection means for the call.
  _afterWelcome(msg, resuming) {
    if (!resuming) return;
    if (msg.id !== this._previousId) {
      // the server did not give our id back: nobody can reach us by the old one
      this._outbox = [];
      this._emit("lost", { reason: "new-id", previous: this._previousId, id: msg.id });
      this._closeCall("session_lost", true);
      return;
    }
    this._emit("resumed", { id: msg.id, resumed: msg.resumed === true });
    if (msg.resumed === true || !this.peerId) {
      this._flushOutbox();
      this._checkIce();
      return;
    }
    // Our id came back but not the session (the server restarted): we are
    // idle there.  A call in progress is paired again with ping/pong (its
    // media never stopped); the rest waits until then.
    if (this.callState !== "in-call") {
      this._outbox = [];
      this._closeCall("session_lost", true);
      return;
    }
    this._repair();
  }

  _socketClosed(ev, welcomed, resuming) {
    const final = this._closing || !this.reconnect || FINAL_CLOSE_CODES.has(ev.code) || !this.resumeToken;
    if (welcomed) this._emit("close", { code: ev.code, reason: ev.reason, reconnecting: !final });
    if (final) {
      if (resuming || (welcomed && !this._closing && this.resumeToken)) {
        this._emit("lost", { reason: "closed", code: ev.code });
      }
      this._closedForGood(ev);
      return;
    }
    this._scheduleReconnect(ev.code);
  }

  _scheduleReconnect(code) {
    if (this._lostSince === null) this._lostSince = Date.now();
    if (Date.now() - this._lostSince > this.reconnectFor) {
      this._emit("lost", { reason: "gave-up", code: code });
      this._closedForGood(null);
      return;
    }
    // exponential backoff with jitter: between half and all of the step
    const step = Math.min(this.maxReconnectDelay, this.reconnectDelay * 2 ** this._attempt);
    const delay = Math.round(step / 2 + Math.random() * step / 2);
    this._attempt += 1;
    this._setSocketState("reconnecting");
    this._emit("reconnecting", { attempt: this._attempt, delay: delay, code: code });
    clearTimeout(this._timer);
    this._timer = setTimeout(() => {
      if (!this._closing) this._open(true).catch(() => {});  // (a failure closes, and schedules the next try)
    }, delay);
  }

  _closedForGood(ev) {
    clearTimeout(this._timer);
    this._outbox = [];
    this._closeCall("socket_closed", false);
    this._fail(new Error("WebSocket closed"));
    this._setSocketState("closed");
  }

  _flushOutbox() {
    const pending = this._outbox;
    this._outbox = [];
    for (const m of pending) {
      try { this.send(m.type, m.to, m.data); } catch (e) { this._outbox.push(m); }
    }
  }

  // -- calls -----------------------------------------------------------------

  /**
   * Call a peer: ping it, wait for its pong, open an RTCPeerConnection (with
   * camera and microphone if options.media), a data channel, send the offer
   * and trickle ICE candidates.  Resolves with the RTCPeerConnection once the
   * offer is sent; "channelopen" follows.  Rejects (and fires "callerror")
   * if the peer is busy, not found, declines or does not answer in time;
   * the server is then told (disconnect) so both sides are idle again.
   */
  async call(peerId) {
    if (this.callState !== "idle") throw new Error("already in a call (" + this.callState + ")");
    if (this.socketState !== "open") throw new Error("not connected (" + this.socketState + ")");
    this.peerId = peerId;
    this.role = "caller";
    this._setCallState("calling");
    const reply = this._pongOrRefusal(peerId);
    let msg;
    try {
      this.ping(peerId, { call: true });
      msg = await reply;
    } catch (e) {
      if (this.peerId === peerId && this.callState === "calling") {
        // no answer: the server still has us waiting for this peer; end that
        this._sendQuietly("disconnect", peerId, { reason: "no_answer" });
        this._closeCall("no_answer", false);
        this._callError("timeout", "no answer from " + peerId + " within " + this.pongTimeout / 1000 + " s");
      }
      throw e;
    }
    if (msg.type === "error") {
      this._closeCall(msg.code, false);
      this._callError(msg.code, msg.message);
      throw new Error(msg.code + ": " + msg.message);
    }
    if (msg.data && msg.data.declined) {
      // (the callee also sends disconnect, which returns both sides to idle)
      this._closeCall("declined", false);
      this._callError("declined", peerId + " declined the call");
      throw new Error("declined");
    }
    if (this.peerId !== peerId || this.callState !== "calling") throw new Error("the call ended");
    this._setCallState("in-call");
    await this._prepareMedia();
    await this._freshIceServers();
    const pc = this._newPeerConnection(peerId);
    this._addLocalTracks(pc, true);
    this._useChannel(pc.createDataChannel(this.channelLabel));
    await this._sendOffer(pc, false);
    return pc;
  }

  /** Accept a ringing call (autoAnswer off). */
  accept() {
    if (this.callState !== "ringing") throw new Error("no call is ringing");
    clearTimeout(this._ringTimer);
    this.pong(this.peerId, { received: true });
    this._setCallState("in-call");
    this._emit("incoming", { from: this.peerId });
  }

  /** Decline a ringing call: the caller is told (pong {declined}, then disconnect) and both are idle. */
  decline() {
    if (this.callState !== "ringing") throw new Error("no call is ringing");
    const peer = this.peerId;
    this.pong(peer, { declined: true });
    this.disconnect(peer, { reason: "declined" });
    this._closeCall("declined", true);
  }

  /** Hang up: tell the partner (disconnect) and close the peer connection. */
  hangUp(reason = "user_disconnect") {
    const peer = this.peerId;
    if (this.callState === "ringing") {
      this.decline();
      return;
    }
    if (peer) this._sendQuietly("disconnect", peer, { reason: reason });
    this._fail(new Error("hung up"));
    this._closeCall(reason, true);
  }

  /** Mute or unmute our audio or video ("audio" | "video"); returns the new state. */
  setMuted(kind, muted) {
    if (!this.localStream) return false;
    for (const track of this.localStream.getTracks()) {
      if (track.kind === kind) track.enabled = !muted;
    }
    this._emitStates();
    return muted;
  }

  /** Whether our audio or video is muted. */
  isMuted(kind) {
    const tracks = this.localStream ? this.localStream.getTracks().filter((t) => t.kind === kind) : [];
    return tracks.length > 0 && tracks.every((t) => !t.enabled);
  }

  /**
   * Use other devices (getUserMedia constraints, e.g. {audio: {deviceId},
   * video: {deviceId}}): from the next call on, and at once in a call in
   * progress (the tracks are replaced without renegotiation).
   */
  async useMedia(constraints) {
    this.media = constraints;
    if (!this.localStream && !this.pc) return;
    const old = this.localStream;
    const stream = await navigator.mediaDevices.getUserMedia(constraints);
    if (this.pc) {
      for (const track of stream.getTracks()) {
        const sender = this.pc.getSenders().find((s) => s.track && s.track.kind === track.kind);
        if (sender) await sender.replaceTrack(track);
      }
    }
    if (old) for (const t of old.getTracks()) t.stop();
    this.localStream = stream;
    this._emit("localstream", { stream: stream });
  }

  /**
   * The candidate pair the call's ICE selected, from getStats(): {local,
   * remote}, each {type: "host"|"srflx"|"prflx"|"relay", protocol, address,
   * port}; null before one is selected.
   */
  async selectedPair() {
    if (!this.pc) return null;
    const stats = await this.pc.getStats();
    let pair = null;
    stats.forEach((s) => {
      if (s.type === "transport" && s.selectedCandidatePairId) pair = stats.get(s.selectedCandidatePairId);
    });
    if (!pair) {
      stats.forEach((s) => {
        if (s.type === "candidate-pair" && s.state === "succeeded" && (s.nominated || s.selected)) pair = s;
      });
    }
    if (!pair) return null;
    const side = (id) => {
      const c = stats.get(id) || {};
      return { type: c.candidateType, protocol: c.protocol, address: c.address || c.ip, port: c.port };
    };
    return { local: side(pair.localCandidateId), remote: side(pair.remoteCandidateId) };
  }

  /** Send text over the data channel. */
  sendChat(text) {
    if (!this.channel || this.channel.readyState !== "open") throw new Error("the data channel is not open");
    this.channel.send(text);
  }

  // -- internals -------------------------------------------------------------

  _emit(name, detail) {
    this.dispatchEvent(new CustomEvent(name, { detail: detail }));
  }

  _setCallState(state) {
    this.callState = state;
    this._emitStates();
  }

  _setSocketState(state) {
    this.socketState = state;
    this._emitStates();
  }

  _emitStates() {
    this._emit("statechange", {
      call: this.callState,
      peer: this.peerId,
      role: this.role,
      socket: this.socketState,
      connection: this.pc ? this.pc.connectionState : "none",
      ice: this.pc ? this.pc.iceConnectionState : "none",
      signaling: this.pc ? this.pc.signalingState : "none",
      channel: this.channel ? this.channel.readyState : "none",
      audioMuted: this.isMuted("audio"),
      videoMuted: this.isMuted("video"),
    });
  }

  _callError(code, message) {
    this._emit("callerror", { code: code, message: message });
  }

  // send() for messages that may be moot (the socket closed for good): never throws
  _sendQuietly(type, to, data) {
    try { this.send(type, to, data); } catch (e) { /* nothing to tell: no socket */ }
  }

  _waitFor(predicate, timeout) {
    return new Promise((resolve, reject) => {
      const waiter = { predicate: predicate, resolve: resolve, reject: reject };
      waiter.timer = setTimeout(() => {
        this._waiters = this._waiters.filter((w) => w !== waiter);
        reject(new Error("timed out waiting for the peer"));
      }, timeout);
      this._waiters.push(waiter);
    });
  }

  // The answer to a ping of ours: ``peer``'s pong, or the server's refusal of the ping.
  _pongOrRefusal(peer) {
    return this._waitFor(
      (m) => (m.type === "pong" && m.from === peer) || (m.type === "error" && m.ref === "ping"),
      this.pongTimeout
    );
  }

  _fail(error) {
    for (const w of this._waiters) {
      clearTimeout(w.timer);
      w.reject(error);
    }
    this._waiters = [];
  }

  _onMessage(msg) {
    this._emit("message", msg);
    if (msg.type === "welcome" || msg.type === "error" || TYPES.includes(msg.type)) {
      this._emit(msg.type, msg);
    }
    for (const w of this._waiters.slice()) {
      if (w.predicate(msg)) {
        clearTimeout(w.timer);
        this._waiters = this._waiters.filter((x) => x !== w);
        w.resolve(msg);
      }
    }
    if (msg.type === "error" && msg.ref !== "ping" && this.peerId &&
        ["offer", "answer", "ice-candidate"].includes(msg.ref)) {
      this._callError(msg.code, msg.message);  // (a ping's error is call()'s to report)
    }
    const handler = {
      "ping": this._onPing,
      "offer": this._onOffer,
      "answer": this._onAnswer,
      "ice-candidate": this._onCandidate,
      "disconnect": this._onDisconnect,
    }[msg.type];
    if (handler) {
      handler.call(this, msg).catch((e) => this._emit("error", { type: "error", code: "client", message: String(e) }));
    }
  }

  async _onPing(msg) {
    if (msg.from === this.peerId && this.callState === "in-call") {
      this.pong(msg.from, { alive: true });  // our partner: a liveness check, or pairing again after a restart
      if (this._repairing) this._repaired();
      return;
    }
    if (this.callState !== "idle") return;  // busy: the caller's call() times out
    this.peerId = msg.from;
    this.role = "callee";
    this._setCallState("ringing");
    this._emit("ringing", { from: msg.from });
    // unanswered: forget it after the caller has stopped waiting
    this._ringTimer = setTimeout(() => {
      if (this.callState === "ringing" && this.peerId === msg.from) this._closeCall("missed", true);
    }, this.pongTimeout);
    if (!this.autoAnswer) return;  // accept() or decline(), from the app
    const ok = this.confirmCall ? await this.confirmCall(msg.from) : true;
    if (this.callState !== "ringing" || this.peerId !== msg.from) return;  // it ended while we asked
    if (ok) this.accept();
    else this.decline();
  }

  async _onOffer(msg) {
    if (msg.from !== this.peerId || this.callState !== "in-call") return;
    if (this.pc) {
      // a new offer in the same call: an ICE restart (or renegotiation)
      await this.pc.setRemoteDescription({ type: "offer", sdp: msg.data.sdp });
      await this._flushCandidates();
      await this.pc.setLocalDescription(await this.pc.createAnswer());
      this.answer(msg.from, { type: this.pc.localDescription.type, sdp: this.pc.localDescription.sdp });
      return;
    }
    await this._prepareMedia();
    await this._freshIceServers();
    const pc = this._newPeerConnection(msg.from);
    await pc.setRemoteDescription({ type: "offer", sdp: msg.data.sdp });
    this._addLocalTracks(pc, false);  // (after the offer: they take the transceivers it made)
    await this._flushCandidates();
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    this.answer(msg.from, { type: pc.localDescription.type, sdp: pc.localDescription.sdp });
  }

  async _onAnswer(msg) {
    if (msg.from !== this.peerId || !this.pc || this.pc.signalingState !== "have-local-offer") return;
    await this.pc.setRemoteDescription({ type: "answer", sdp: msg.data.sdp });
    await this._flushCandidates();
  }

  async _onCandidate(msg) {
    if (msg.from !== this.peerId) return;
    this._remoteCandidates.push(msg.data);
    if (this.pc && this.pc.remoteDescription) await this._flushCandidates();
  }

  async _flushCandidates() {
    const pending = this._remoteCandidates;
    this._remoteCandidates = [];
    for (const c of pending) {
      if (!c || !c.candidate) continue;
      try {
        await this.pc.addIceCandidate(c);
      } catch (e) {
        // (a candidate of an ICE generation that has since been restarted)
        this._emit("error", { type: "error", code: "client", message: "ICE candidate not added: " + e.message });
      }
    }
  }

  async _onDisconnect(msg) {
    if (msg.from !== this.peerId) return;
    const reason = (msg.data && msg.data.reason) || "remote_hangup";
    this._fail(new Error("the peer disconnected"));
    this._closeCall(reason, true);
  }

  // -- after a reconnection ----------------------------------------------------

  // Pair again with our call partner after the server lost our session (it
  // restarted): the caller pings until the callee (once it is back itself)
  // pongs; the callee pongs its partner's ping (in _onPing).  Then what was
  // queued is sent, and ICE restarted if the path changed.
  async _repair() {
    this._repairing = true;
    if (this.role !== "caller") return;  // the callee waits for the ping
    const peer = this.peerId;
    const until = Date.now() + this.reconnectFor;
    while (this._repairing && this.peerId === peer && Date.now() < until) {
      const reply = this._pongOrRefusal(peer);
      let msg = null;
      try {
        this.ping(peer, { call: true, again: true });
        msg = await reply;
      } catch (e) {
        if (this.socketState === "closed") return;
      }
      if (msg && msg.type === "pong") {
        this._repaired();
        return;
      }
      if (msg && msg.type === "error" && msg.code !== "peer-not-found") {
        // something else holds it now (busy, or connected elsewhere): the call is over
        this._closeCall(msg.code, true);
        this._callError(msg.code, msg.message);
        return;
      }
      await sleep(1000);  // not back yet: try again
    }
    if (this._repairing && this.peerId === peer) {
      this._emit("lost", { reason: "partner-gone" });
      this._closeCall("partner_gone", true);
    }
  }

  _repaired() {
    this._repairing = false;
    this._emit("repaired", { peer: this.peerId });
    this._flushOutbox();
    this._checkIce();
  }

  // ICE restart where the path broke: the caller makes a new offer with new
  // ICE credentials (the callee answers it on the same RTCPeerConnection).
  _checkIce() {
    if (!this.pc) return;
    const state = this.pc.iceConnectionState;
    if (state === "failed" || state === "disconnected") this._restartIce(state);
  }

  async _restartIce(why) {
    const pc = this.pc;
    if (!pc || this.role !== "caller" || this._repairing || pc.signalingState !== "stable") return;
    if (this.socketState === "reconnecting") return;  // once the socket is back (_checkIce)
    this._emit("icerestart", { reason: why });
    try {
      await this._sendOffer(pc, true);
    } catch (e) {
      this._emit("error", { type: "error", code: "client", message: "ICE restart failed: " + e.message });
    }
  }

  async _sendOffer(pc, iceRestart) {
    const offer = await pc.createOffer(iceRestart ? { iceRestart: true } : undefined);
    await pc.setLocalDescription(offer);
    this.offer(this.peerId, { type: pc.localDescription.type, sdp: pc.localDescription.sdp });
  }

  // -- media and the peer connection ---------------------------------------------

  async _prepareMedia() {
    if (!this.media || this.localStream) return;
    try {
      this.localStream = await navigator.mediaDevices.getUserMedia(this.media);
      this._emit("localstream", { stream: this.localStream });
    } catch (e) {
      this.localStream = null;
      this._emit("error", { type: "error", code: "media", message: "camera/microphone: " + e.message });
    }
  }

  _addLocalTracks(pc, offering) {
    const kinds = new Set();
    if (this.localStream) {
      for (const track of this.localStream.getTracks()) {
        pc.addTrack(track, this.localStream);
        kinds.add(track.kind);
      }
    }
    if (offering && this.media) {  // receive what we asked for even if we could not send it
      for (const kind of ["audio", "video"]) {
        if (this.media[kind] && !kinds.has(kind)) pc.addTransceiver(kind, { direction: "recvonly" });
      }
    }
  }

  // Fresh TURN credentials for a call starting after the welcome's expired
  // (with a margin of a minute).  Keeps the old ones if the refresh fails.
  async _freshIceServers() {
    if (!this.iceServersUrl || iceExpiry(this.serverIceServers) > Date.now() / 1000 + 60) return;
    try {
      const response = await fetch(this.iceServersUrl, { cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const doc = await response.json();
      this.serverIceServers = doc.iceServers || [];
      this._emit("iceservers", { iceServers: this.serverIceServers, ttl: doc.ttl });
    } catch (e) {
      this._emit("error", { type: "error", code: "ice-servers", message: "refreshing ICE servers failed: " + e.message });
    }
  }

  _newPeerConnection(peerId) {
    const pc = new RTCPeerConnection({
      iceServers: this.iceServers.concat(this.serverIceServers),
      iceTransportPolicy: this.iceTransportPolicy,
    });
    this.pc = pc;
    pc.onicecandidate = (ev) => {
      if (ev.candidate && this.pc === pc && this.peerId === peerId) {
        const c = ev.candidate.toJSON ? ev.candidate.toJSON() : ev.candidate;
        this._sendQuietly("ice-candidate", peerId, {
          candidate: c.candidate,
          sdpMid: c.sdpMid,
          sdpMLineIndex: c.sdpMLineIndex,
          usernameFragment: c.usernameFragment,
        });
      }
    };
    pc.ontrack = (ev) => {
      if (this.pc !== pc) return;
      const stream = ev.streams && ev.streams[0];
      if (stream) {
        this.remoteStream = stream;
      } else {
        if (!this.remoteStream) this.remoteStream = new MediaStream();
        this.remoteStream.addTrack(ev.track);
      }
      this._emit("remotestream", { stream: this.remoteStream });
    };
    pc.ondatachannel = (ev) => this._useChannel(ev.channel);
    pc.onconnectionstatechange = () => this._emitStates();
    pc.oniceconnectionstatechange = () => {
      this._emitStates();
      if (this.pc !== pc) return;
      clearTimeout(this._iceTimer);
      if (pc.iceConnectionState === "failed") {
        this._restartIce("failed");
      } else if (pc.iceConnectionState === "disconnected") {
        // (it often recovers by itself: restart only if it does not)
        this._iceTimer = setTimeout(() => {
          if (this.pc === pc && pc.iceConnectionState === "disconnected") this._restartIce("disconnected");
        }, this.iceRestartDelay);
      }
    };
    pc.onsignalingstatechange = () => this._emitStates();
    this._emitStates();
    return pc;
  }

  _useChannel(channel) {
    this.channel = channel;
    channel.onopen = () => {
      this._emitStates();
      this._emit("channelopen", { label: channel.label });
    };
    channel.onclose = () => {
      this._emitStates();
      this._emit("channelclose", { label: channel.label });
    };
    channel.onmessage = (ev) => this._emit("chat", { from: this.peerId, text: ev.data });
  }

  _closePeerConnection() {
    if (this.channel) {
      this.channel.onclose = null;
      this.channel.close();
      this.channel = null;
    }
    if (this.pc) {
      this.pc.close();
      this.pc = null;
    }
    if (this.localStream) {
      for (const t of this.localStream.getTracks()) t.stop();  // the camera's light goes off
      this.localStream = null;
      this._emit("localstream", { stream: null });
    }
    if (this.remoteStream) {
      this.remoteStream = null;
      this._emit("remotestream", { stream: null });
    }
    this._remoteCandidates = [];
  }

  _closeCall(reason, announce) {
    const peer = this.peerId;
    const wasActive = this.callState !== "idle" || this.pc;
    clearTimeout(this._ringTimer);
    clearTimeout(this._iceTimer);
    this._repairing = false;
    this._closePeerConnection();
    this.peerId = null;
    this.role = null;
    this.callState = "idle";
    this._emitStates();
    if (announce && wasActive) this._emit("hangup", { peer: peer, reason: reason });
  }
}
