// Load generator on Node and `ws` (its own process), the counterpart of
// bench/loadgen.py (picows): the same scenarios, one JSON report on stdout.
//
//   node bench/node/loadgen.mjs relay URL --pairs 50 --inflight 1 --seconds 5
//   node bench/node/loadgen.mjs rate URL --pairs 50 --rate 2000 --seconds 5
//   node bench/node/loadgen.mjs burst URL -n 5000 -c 100
//   node bench/node/loadgen.mjs idle URL -n 10000 --hold 5
//   ... --protocol peerjs     (URL: ws://HOST:PORT/peerjs, key "peerjs" unless --key)
//
// relay: P pairs bounce a 300-byte offer/answer with W messages in flight per
// pair; messages/s and one-way latency.  rate: the same pairs at a fixed
// total offered rate; latency.  burst: N connections, at most C opening at
// once; connections/s and time to open (welcome, or PeerJS's OPEN).  idle:
// open N connections, report when all are open, hold them (the caller reads
// the server's memory).
//
// Two protocols: "native" (docs/protocol.rst: welcome with an id, ping/pong
// pairing, offer/answer relayed with "from"), and "peerjs" (PeerJS server
// 1.0: the client picks its id and token, ?key=&id=&token=, waits for
// {"type":"OPEN"}; OFFER/ANSWER frames with "dst" are relayed with "src"
// stamped; a HEARTBEAT every 5 s as the PeerJS client sends).  Every run is
// bounded in time and ends by itself.

import { randomUUID } from "node:crypto";
import { performance } from "node:perf_hooks";
import process from "node:process";
import WebSocket from "ws";

const SDP = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n" + "a=x".repeat(70);
const HEARTBEAT = JSON.stringify({ type: "HEARTBEAT" });
const now = () => performance.now(); // milliseconds, monotonic
const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

function usage(message) {
  process.stderr.write(`loadgen.mjs: ${message}\n`);
  process.exit(2);
}

function parseArgs(argv) {
  const args = {
    scenario: argv[0], url: argv[1], protocol: "native", key: "peerjs", pairs: 50, inflight: 1,
    rate: 2000, seconds: 5, warmup: 1, n: 1000, c: 200, hold: 5, urlB: null, deflate: "off",
  };
  const names = {
    "--protocol": "protocol", "--key": "key", "--pairs": "pairs", "--inflight": "inflight", "--rate": "rate",
    "--seconds": "seconds", "--warmup": "warmup", "-n": "n", "-c": "c", "--hold": "hold", "--url-b": "urlB",
    "--deflate": "deflate",
  };
  for (let i = 2; i < argv.length; i += 2) {
    const name = names[argv[i]];
    if (name === undefined || i + 1 >= argv.length) usage(`unknown or incomplete option ${argv[i]}`);
    const value = argv[i + 1];
    args[name] = typeof args[name] === "number" ? Number(value) : value;
    if (typeof args[name] === "number" && !Number.isFinite(args[name])) usage(`${argv[i]} takes a number`);
  }
  if (!["relay", "rate", "burst", "idle"].includes(args.scenario) || !args.url) {
    usage("usage: loadgen.mjs {relay,rate,burst,idle} URL [options]");
  }
  if (!["native", "peerjs"].includes(args.protocol)) usage("--protocol is native or peerjs");
  if (!["on", "off"].includes(args.deflate)) usage("--deflate is on or off");
  if (args.n > 20000 || args.pairs > 2000 || args.seconds > 120 || args.hold > 900) {
    usage("bounded: -n <= 20000, --pairs <= 2000, --seconds <= 120, --hold <= 900");
  }
  return args;
}

function pct(sorted, p) {
  if (!sorted.length) return null;
  return sorted[Math.min(sorted.length - 1, Math.round((p / 100) * (sorted.length - 1)))];
}

function percentiles(values, keys) {
  const sorted = Float64Array.from(values).sort();
  const out = {};
  for (const [name, p] of keys) out[name] = Math.round(pct(sorted, p) * 1000) / 1000;
  return out;
}

/** Tell the caller (bench/perf.py reads the server's CPU time at each) where a run is. */
function phase(name) {
  process.stdout.write(JSON.stringify({ phase: name }) + "\n");
}

const LATENCY = [["p50", 50], ["p99", 99], ["p999", 99.9]];

/**
 * One connection.  `opened` resolves with its id once the server has
 * accepted it as a peer (native: the welcome's id; peerjs: OPEN, with the
 * id it chose).  Relayed messages go to `onMessage(msg)`, with `msg.sender`
 * set to the sender's id whatever the protocol calls it.
 */
class Peer {
  constructor(url, protocol, key, deflate) {
    this.protocol = protocol;
    this.errors = 0;
    this.onMessage = null;
    this.id = null;
    let target = url;
    if (protocol === "peerjs") {
      this.id = randomUUID();
      const u = new URL(url);
      u.searchParams.set("key", key);
      u.searchParams.set("id", this.id);
      u.searchParams.set("token", randomUUID().slice(0, 8));
      target = u.toString();
    }
    this.opened = new Promise((resolve, reject) => {
      this._resolve = resolve;
      this._reject = reject;
    });
    this.opened.catch(() => {}); // (awaited by the caller; never an unhandled rejection)
    this.ws = new WebSocket(target, { perMessageDeflate: deflate, handshakeTimeout: 60000 });
    this.ws.on("message", (data, isBinary) => this._received(data, isBinary));
    this.ws.on("error", (err) => this._reject(err));
    this.ws.on("close", () => {
      clearInterval(this._heartbeat);
      this._reject(new Error("closed before it was open"));
    });
  }

  _received(data, isBinary) {
    if (isBinary) return;
    const msg = JSON.parse(data.toString());
    const type = msg.type;
    if (this.protocol === "native") {
      if (type === "welcome") {
        this.id = msg.id;
        this._resolve(msg.id);
        return;
      }
      if (type === "error") {
        this.errors += 1;
        return;
      }
      msg.sender = msg.from;
    } else {
      if (type === "OPEN") {
        this._heartbeat = setInterval(() => this.ws.send(HEARTBEAT), 5000);
        this._heartbeat.unref();
        this._resolve(this.id);
        return;
      }
      if (type === "ERROR" || type === "ID-TAKEN" || type === "INVALID-KEY" || type === "EXPIRE") {
        this.errors += 1;
        this._reject(new Error(type));
        return;
      }
      msg.sender = msg.src;
      msg.data = msg.payload;
    }
    if (this.onMessage !== null) this.onMessage(msg);
  }

  /** Send a message of `kind` (offer, answer, ping, pong) to the peer `to`. */
  send(kind, to, data) {
    if (this.protocol === "native") {
      this.ws.send(JSON.stringify({ type: kind, to, data }));
    } else {
      this.ws.send(JSON.stringify({ type: kind.toUpperCase(), dst: to, payload: data }));
    }
  }

  close() {
    clearInterval(this._heartbeat);
    if (this.ws.readyState === WebSocket.OPEN || this.ws.readyState === WebSocket.CONNECTING) {
      this.ws.close(1000);
    }
  }
}

async function openPeer(args, url) {
  const peer = new Peer(url || args.url, args.protocol, args.key, args.deflate === "on");
  await withTimeout(peer.opened, 60000, "open");
  return peer;
}

function withTimeout(promise, ms, what) {
  let timer;
  const timeout = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no answer in ${ms} ms`)), ms);
  });
  return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
}

function nextMessage(peer) {
  return withTimeout(new Promise((resolve) => {
    peer.onMessage = (msg) => {
      peer.onMessage = null;
      resolve(msg);
    };
  }), 30000, "pairing");
}

/** `count` pairs; native ones paired with ping/pong (PeerJS has no pairing). */
async function makePairs(args) {
  const pairs = [];
  for (let i = 0; i < args.pairs; i++) {
    const a = await openPeer(args);
    const b = await openPeer(args, args.urlB);
    if (args.protocol === "native") {
      let got = nextMessage(b);
      a.send("ping", b.id, {});
      await got;
      got = nextMessage(a);
      b.send("pong", a.id, {});
      await got;
    }
    pairs.push([a, b]);
  }
  return pairs;
}

async function closeAll(peers, ms = 3000) {
  const closed = peers.map((p) => new Promise((resolve) => {
    if (p.ws.readyState === WebSocket.CLOSED) resolve();
    else p.ws.once("close", resolve);
  }));
  for (const p of peers) p.close();
  await Promise.race([Promise.all(closed), sleep(ms)]);
}

function errorsOf(pairs) {
  return pairs.reduce((sum, [a, b]) => sum + a.errors + b.errors, 0);
}

async function relay(args) {
  const pairs = await makePairs(args);
  const latencies = [];
  let counted = 0;
  let measuring = false;
  let stopped = false;
  for (const [a, b] of pairs) {
    b.onMessage = (msg) => { // an offer arrived: record it, answer
      if (measuring) {
        latencies.push(now() - msg.data.t);
        counted += 1;
      }
      b.send("answer", a.id, { type: "answer", sdp: SDP, t: now() });
    };
    a.onMessage = (msg) => { // an answer arrived: record it, offer again
      if (measuring) {
        latencies.push(now() - msg.data.t);
        counted += 1;
      }
      if (!stopped) a.send("offer", b.id, { type: "offer", sdp: SDP, t: now() });
    };
  }
  for (const [a, b] of pairs) {
    for (let i = 0; i < args.inflight; i++) a.send("offer", b.id, { type: "offer", sdp: SDP, t: now() });
  }
  await sleep(args.warmup * 1000);
  const cpu0 = process.cpuUsage();
  phase("measuring");
  measuring = true;
  const t0 = now();
  await sleep(args.seconds * 1000);
  measuring = false;
  const elapsed = now() - t0;
  const cpu = process.cpuUsage(cpu0);
  phase("measured");
  stopped = true;
  await sleep(500);
  const errors = errorsOf(pairs);
  await closeAll(pairs.flat());
  return {
    scenario: "relay", protocol: args.protocol, generator: "node-ws", pairs: args.pairs,
    inflight: args.inflight, split: Boolean(args.urlB),
    messages_per_s: Math.round(counted / (elapsed / 1000)),
    latency_ms: percentiles(latencies, LATENCY),
    errors,
    generator_busy: Math.round(((cpu.user + cpu.system) / 1000 / elapsed) * 100) / 100,
  };
}

async function rate(args) {
  const pairs = await makePairs(args);
  const latencies = [];
  for (const [, b] of pairs) b.onMessage = (msg) => latencies.push(now() - msg.data.t);
  const interval = (args.pairs / args.rate) * 1000; // each pair sends every `interval` ms
  const stop = now() + (args.warmup + args.seconds) * 1000;
  const pace = (a, b, offset) => new Promise((resolve) => {
    let nextAt = now() + offset;
    const tick = () => {
      if (nextAt >= stop) {
        resolve();
        return;
      }
      a.send("offer", b.id, { type: "offer", sdp: SDP, t: now() });
      nextAt += interval;
      setTimeout(tick, Math.max(0, nextAt - now()));
    };
    setTimeout(tick, offset);
  });
  await Promise.all(pairs.map(([a, b], i) => pace(a, b, (i * interval) / pairs.length)));
  await sleep(500);
  const warm = Math.floor((latencies.length * args.warmup) / (args.warmup + args.seconds));
  const errors = errorsOf(pairs);
  await closeAll(pairs.flat());
  return {
    scenario: "rate", protocol: args.protocol, generator: "node-ws", pairs: args.pairs,
    offered_per_s: args.rate, received: latencies.length,
    latency_ms: percentiles(latencies.slice(warm), LATENCY), errors,
  };
}

async function burst(args) {
  const times = [];
  const peers = [];
  let failed = 0;
  let next = 0;
  phase("measuring");
  const t0 = now();
  const worker = async () => {
    while (next < args.n) {
      next += 1;
      const started = now();
      try {
        peers.push(await openPeer(args));
        times.push(now() - started);
      } catch {
        failed += 1;
      }
    }
  };
  await Promise.all(Array.from({ length: Math.min(args.c, args.n) }, worker));
  const elapsed = now() - t0;
  phase("measured");
  await closeAll(peers, 5000);
  const ms = percentiles(times, [["p50", 50], ["p99", 99], ["max", 100]]);
  for (const k of Object.keys(ms)) ms[k] = Math.round(ms[k] * 100) / 100;
  return {
    scenario: "burst", protocol: args.protocol, generator: "node-ws", connections: args.n,
    concurrency: args.c, welcomed: times.length, failed,
    connections_per_s: Math.round(times.length / (elapsed / 1000)),
    welcome_ms: ms, waited_1s_or_more: times.filter((t) => t >= 1000).length,
  };
}

async function idle(args) {
  const peers = [];
  let next = 0;
  const worker = async () => {
    while (next < args.n) {
      next += 1;
      peers.push(await openPeer(args));
    }
  };
  await Promise.all(Array.from({ length: Math.min(200, args.n) }, worker));
  process.stdout.write(JSON.stringify({ scenario: "idle", open: peers.length }) + "\n");
  await sleep(args.hold * 1000); // held open while the caller measures
  await closeAll(peers, 5000);
  return { scenario: "idle", closed: peers.length };
}

async function main() {
  const args = parseArgs(process.argv.slice(2));
  const scenarios = { relay, rate, burst, idle };
  const limit = (args.seconds + args.warmup + args.hold) * 1000 + 300000;
  const result = await withTimeout(scenarios[args.scenario](args), limit, args.scenario);
  process.stdout.write(JSON.stringify(result) + "\n");
  process.exit(0); // (whatever sockets are still closing)
}

main().catch((err) => {
  process.stderr.write(`loadgen.mjs: ${err.stack || err}\n`);
  process.exit(1);
});
