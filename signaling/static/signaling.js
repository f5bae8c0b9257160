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
// Wire contract: docs/protocol.rst.  Events (all CustomEvent, data in
// .detail): "welcome", "message" (every frame), one per frame type ("ping",
// "pong", "offer", "answer", "ice-candidate", "disconnect", "error"),
// "incoming" (a peer's ping was accepted), "statechange" (call, connection,
// ICE and data channel states), "channelopen", "channelclose", "chat",
// "hangup" (with .reason), "close" (the WebSocket closed, with .code),
// "iceservers" (fresh TURN credentials were fetched).

const TYPES = ["ping", "pong", "offer", "answer", "ice-candidate", "disconnect"];

export function defaultUrl(loc = globalThis.location) {
  const scheme = loc && loc.protocol === "https:" ? "wss:" : "ws:";
  return scheme + "//" + ((loc && loc.host) || "localhost:3000") + "/ws";
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

export class SignalingClient extends EventTarget {
  /**
   * @param {string} url  WebSocket URL of the server (default: /ws on this host).
   * @param {object} options
   *   iceServers: RTCIceServer entries of your own, used besides the ones the
   *     server sends in its welcome (default: []).
   *   iceTransportPolicy: "all" (default) or "relay" (only TURN relays).
   *   iceServersUrl: where to get fresh TURN credentials when the welcome's
   *     have expired by the time a call starts (default: /api/ice-servers
   *     beside a /ws URL; null: never refresh).
   *   autoAnswer: accept pings and answer offers by itself (default: true).
   *   confirmCall: optional (from) => boolean or Promise<boolean>, asked before
   *     an incoming call is accepted (e.g. a prompt for the user).
   *   channelLabel: label of the data channel the caller opens (default: "chat").
   *   pongTimeout: ms to wait for the pong in call() (default: 15000).
   */
  constructor(url = defaultUrl(), options = {}) {
    super();
    this.url = url;
    this.iceServers = options.iceServers || [];
    this.iceTransportPolicy = options.iceTransportPolicy || "all";
    this.iceServersUrl = options.iceServersUrl !== undefined ? options.iceServersUrl : iceServersUrlFor(url);
    this.serverIceServers = [];  // from the welcome, or /api/ice-servers
    this.autoAnswer = options.autoAnswer !== undefined ? options.autoAnswer : true;
    this.confirmCall = options.confirmCall || null;
    this.channelLabel = options.channelLabel || "chat";
    this.pongTimeout = options.pongTimeout || 15000;
    this.id = null;
    this.ws = null;
    this.peerId = null;   // who we call or talk to
    this.callState = "idle";  // idle | calling | ringing | in-call
    this.pc = null;
    this.channel = null;
    this._remoteCandidates = [];
    this._waiters = [];
  }

  // -- the WebSocket ---------------------------------------------------------

  /** Open the WebSocket; resolves with our id once the server welcomes us. */
  connect() {
    return new Promise((resolve, reject) => {
      const ws = new WebSocket(this.url);
      this.ws = ws;
      let welcomed = false;
      ws.onmessage = (ev) => {
        let msg;
        try {
          msg = JSON.parse(ev.data);
        } catch (e) {
          this._emit("error", { type: "error", code: "client", message: "server sent non-JSON: " + ev.data });
          return;
        }
        if (msg.type === "welcome" && !welcomed) {
          welcomed = true;
          this.id = msg.id;
          this.serverIceServers = Array.isArray(msg.iceServers) ? msg.iceServers : [];
          resolve(msg.id);
        }
        this._onMessage(msg);
      };
      ws.onclose = (ev) => {
        if (!welcomed) reject(new Error("WebSocket closed before the welcome (code " + ev.code + ")"));
        this._closeCall("socket_closed", false);
        this._fail(new Error("WebSocket closed"));
        this._emit("close", { code: ev.code, reason: ev.reason });
      };
      ws.onerror = () => {
        if (!welcomed) reject(new Error("cannot connect to " + this.url));
      };
    });
  }

  /** Close the WebSocket (hanging up first if in a call). */
  close() {
    if (this.peerId) this.hangUp();
    if (this.ws) this.ws.close(1000, "bye");
  }

  /** Send one message of the wire contract. */
  send(type, to, data = {}) {
    if (!this.ws || this.ws.readyState !== WebSocket.OPEN) throw new Error("not connected");
    const frame = JSON.stringify({ type: type, to: to, data: data });
    this.ws.send(frame);
    this._emit("sent", { type: type, to: to, data: data, frame: frame });
  }

  ping(to, data = {}) { this.send("ping", to, data); }
  pong(to, data = {}) { this.send("pong", to, data); }
  offer(to, data) { this.send("offer", to, data); }
  answer(to, data) { this.send("answer", to, data); }
  iceCandidate(to, data) { this.send("ice-candidate", to, data); }
  disconnect(to, data = { reason: "user_disconnect" }) { this.send("disconnect", to, data); }

  // -- calls -----------------------------------------------------------------

  /**
   * Call a peer: ping it, wait for its pong, open an RTCPeerConnection with a
   * data channel, send the offer and trickle ICE candidates.  Resolves with
   * the RTCPeerConnection once the offer is sent; "channelopen" follows.
   */
  async call(peerId) {
    if (this.callState !== "idle") throw new Error("already in a call (" + this.callState + ")");
    this.peerId = peerId;
    this._setCallState("calling");
    const reply = this._waitFor(
      (m) => (m.type === "pong" && m.from === peerId) || (m.type === "error" && m.ref === "ping"),
      this.pongTimeout
    );
    this.ping(peerId, { call: true });
    let msg;
    try {
      msg = await reply;
    } catch (e) {
      this._closeCall("no_answer", false);
      throw e;
    }
    if (msg.type === "error") {
      this._closeCall(msg.code, false);
      throw new Error(msg.code + ": " + msg.message);
    }
    this._setCallState("in-call");
    await this._freshIceServers();
    const pc = this._newPeerConnection(peerId);
    this._useChannel(pc.createDataChannel(this.channelLabel));
    const offer = await pc.createOffer();
    await pc.setLocalDescription(offer);
    this.offer(peerId, { type: pc.localDescription.type, sdp: pc.localDescription.sdp });
    return pc;
  }

  /** Hang up: tell the partner (disconnect) and close the peer connection. */
  hangUp(reason = "user_disconnect") {
    const peer = this.peerId;
    if (peer && this.ws && this.ws.readyState === WebSocket.OPEN) {
      this.disconnect(peer, { reason: reason });
    }
    this._closeCall(reason, true);
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

  _emitStates() {
    this._emit("statechange", {
      call: this.callState,
      peer: this.peerId,
      connection: this.pc ? this.pc.connectionState : "none",
      ice: this.pc ? this.pc.iceConnectionState : "none",
      signaling: this.pc ? this.pc.signalingState : "none",
      channel: this.channel ? this.channel.readyState : "none",
    });
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
      this.pong(msg.from, { alive: true });  // liveness check from our partner
      return;
    }
    if (!this.autoAnswer || this.callState !== "idle") return;
    if (this.confirmCall && !(await this.confirmCall(msg.from))) return;
    if (this.callState !== "idle") return;  // something else happened while we asked
    this.peerId = msg.from;
    this.pong(msg.from, { received: true });
    this._setCallState("in-call");
    this._emit("incoming", { from: msg.from });
  }

  async _onOffer(msg) {
    if (msg.from !== this.peerId || !this.autoAnswer) return;
    if (this.pc) this._closePeerConnection();
    await this._freshIceServers();
    const pc = this._newPeerConnection(msg.from);
    await pc.setRemoteDescription({ type: "offer", sdp: msg.data.sdp });
    await this._flushCandidates();
    const answer = await pc.createAnswer();
    await pc.setLocalDescription(answer);
    this.answer(msg.from, { type: pc.localDescription.type, sdp: pc.localDescription.sdp });
  }

  async _onAnswer(msg) {
    if (msg.from !== this.peerId || !this.pc) return;
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
      if (c && c.candidate) await this.pc.addIceCandidate(c);
    }
  }

  async _onDisconnect(msg) {
    if (msg.from !== this.peerId) return;
    const reason = (msg.data && msg.data.reason) || "remote_hangup";
    this._closeCall(reason, true);
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
      if (ev.candidate && this.pc === pc && this.ws && this.ws.readyState === WebSocket.OPEN) {
        const c = ev.candidate.toJSON ? ev.candidate.toJSON() : ev.candidate;
        this.iceCandidate(peerId, {
          candidate: c.candidate,
          sdpMid: c.sdpMid,
          sdpMLineIndex: c.sdpMLineIndex,
          usernameFragment: c.usernameFragment,
        });
      }
    };
    pc.ondatachannel = (ev) => this._useChannel(ev.channel);
    pc.onconnectionstatechange = () => this._emitStates();
    pc.oniceconnectionstatechange = () => this._emitStates();
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
    this._remoteCandidates = [];
  }

  _closeCall(reason, announce) {
    const peer = this.peerId;
    const wasActive = this.callState !== "idle" || this.pc;
    this._closePeerConnection();
    this.peerId = null;
    this.callState = "idle";
    this._emitStates();
    if (announce && wasActive) this._emit("hangup", { peer: peer, reason: reason });
  }
}
