"""
Load generator (picows, its own process): speaks the wire contract to any
server that does (ours, or the naive baseline), and prints one JSON report.

    python bench/loadgen.py relay URL --pairs 50 --inflight 1 --seconds 5
    python bench/loadgen.py relay URL --url-b URL2     # pairs split over two nodes
    python bench/loadgen.py rate URL --pairs 50 --rate 2000 --seconds 5
    python bench/loadgen.py burst URL -n 10000 -c 200
    python bench/loadgen.py idle URL -n 10000 --hold 5
    python bench/loadgen.py churn URL --rate 20 --seconds 10
    python bench/loadgen.py relay ws://HOST:PORT/peerjs --protocol peerjs   # PeerJS server 1.0's protocol

relay: P pairs bounce a 300-byte offer/answer with W messages in flight per
pair; messages/s and one-way latency.  rate: the same pairs at a fixed total
offered rate; latency.  burst: N connections, at most C opening at once;
connections/s and time to welcome.  idle: open N connections, hold them,
report when all are welcomed (the caller reads the server's memory).
churn: open and close connections at a fixed rate (users come and go).

``--protocol peerjs`` speaks PeerJS server 1.0's protocol instead: each
connection picks its id and token (``?key=&id=&token=``) and is open at
``{"type": "OPEN"}``; OFFER/ANSWER frames name the target in ``dst`` and
arrive with ``src`` stamped; there is no pairing.  ``bench/node/loadgen.mjs``
is the same generator on Node and ``ws``.  Both print ``{"phase": ...}``
lines when the measured part of a relay or a burst starts and ends (the
caller reads the server's CPU time there).
"""

import argparse
import asyncio
import gc
import json
import resource
import sys
import time
import uuid
from urllib.parse import urlencode

from picows import WSListener, WSMsgType, ws_connect

try:  # the generator must not be the bottleneck: a compiled JSON library if there is one
    from orjson import dumps as _dumps
    from orjson import loads
except ImportError:  # pragma: no cover
    loads = json.loads

    def _dumps(obj):
        return json.dumps(obj).encode()

SDP = "v=0\r\no=- 4611731400430051336 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n" + "a=x" * 70


def pct(values, p):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


def phase(name):
    """Tell the caller where a run is (it reads the server's CPU time at each)."""
    print(json.dumps({"phase": name}), flush=True)


class Peer(WSListener):
    """One connection: resolves ``welcome`` with its id, hands frames to ``on_message``."""

    peerjs = False

    def __init__(self):
        self.welcome = asyncio.get_running_loop().create_future()
        self.id = None
        self.on_message = None
        self.errors = 0

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == WSMsgType.PING:
            transport.send_pong(frame.get_payload_as_bytes())
            return
        if frame.msg_type != WSMsgType.TEXT:
            return
        msg = loads(frame.get_payload_as_bytes())
        if self.peerjs:
            self._peerjs(msg)
            return
        if msg["type"] == "welcome":
            self.id = msg["id"]
            if not self.welcome.done():
                self.welcome.set_result(msg["id"])
        elif msg["type"] == "error":
            self.errors += 1
        elif self.on_message is not None:
            self.on_message(msg)

    def _peerjs(self, msg):
        kind = msg["type"]
        if kind == "OPEN":
            if not self.welcome.done():
                self.welcome.set_result(self.id)
        elif kind in ("ERROR", "ID-TAKEN", "INVALID-KEY", "EXPIRE"):
            self.errors += 1
            if not self.welcome.done():
                self.welcome.set_exception(ConnectionError(kind))
        elif self.on_message is not None and kind != "HEARTBEAT":
            msg["from"], msg["data"] = msg.get("src"), msg.get("payload")
            self.on_message(msg)

    def on_ws_disconnected(self, transport):
        if not self.welcome.done():
            self.welcome.set_exception(ConnectionError("closed before welcome"))


PEERJS_KEY = "peerjs"


async def open_peer(url):
    peer_id = None
    if Peer.peerjs:  # the client names itself
        peer_id = str(uuid.uuid4())
        query = urlencode({"key": PEERJS_KEY, "id": peer_id, "token": uuid.uuid4().hex[:8]})
        url = url + ("&" if "?" in url else "?") + query
    transport, peer = await ws_connect(Peer, url, websocket_handshake_timeout=60)
    peer.transport = transport
    peer.id = peer_id or peer.id
    await asyncio.wait_for(peer.welcome, 60)
    if Peer.peerjs:
        peer.heartbeat = asyncio.get_running_loop().create_task(heartbeat(peer))
    return peer


async def heartbeat(peer):
    """What the PeerJS client sends every 5 s."""
    while True:
        await asyncio.sleep(5)
        try:
            peer.transport.send(WSMsgType.TEXT, b'{"type":"HEARTBEAT"}')
        except Exception:  # (closed meanwhile)
            return


def send(peer, kind, to, data):
    if Peer.peerjs:
        peer.transport.send(WSMsgType.TEXT, _dumps({"type": kind.upper(), "dst": to, "payload": data}))
    else:
        peer.transport.send(WSMsgType.TEXT, _dumps({"type": kind, "to": to, "data": data}))


async def make_pairs(url, count, url_b=None):
    """``count`` pairs, paired with ping/pong; the second peer of each on ``url_b`` if given (another node)."""
    pairs = []
    for _ in range(count):
        a, b = await open_peer(url), await open_peer(url_b or url)
        if Peer.peerjs:  # (no pairing in PeerJS)
            pairs.append((a, b))
            continue
        got = asyncio.get_running_loop().create_future()
        b.on_message = lambda m, f=got: f.done() or f.set_result(m)
        send(a, "ping", b.id, {})
        await asyncio.wait_for(got, 30)
        got = asyncio.get_running_loop().create_future()
        a.on_message = lambda m, f=got: f.done() or f.set_result(m)
        send(b, "pong", a.id, {})
        await asyncio.wait_for(got, 30)
        pairs.append((a, b))
    return pairs


async def relay(args):
    pairs = await make_pairs(args.url, args.pairs, args.url_b)
    latencies, counted = [], [0]
    stop_at = [None]
    measuring = [False]

    def wire(a, b):
        def at_b(msg):  # offer arrived: record, answer
            now = time.perf_counter()
            if measuring[0]:
                latencies.append(now - msg["data"]["t"])
                counted[0] += 1
            send(b, "answer", a.id, {"type": "answer", "sdp": SDP, "t": time.perf_counter()})

        def at_a(msg):  # answer arrived: record, offer again
            now = time.perf_counter()
            if measuring[0]:
                latencies.append(now - msg["data"]["t"])
                counted[0] += 1
            if stop_at[0] is None or now < stop_at[0]:
                send(a, "offer", b.id, {"type": "offer", "sdp": SDP, "t": time.perf_counter()})

        b.on_message, a.on_message = at_b, at_a

    for a, b in pairs:
        wire(a, b)
    for a, b in pairs:
        for _ in range(args.inflight):
            send(a, "offer", b.id, {"type": "offer", "sdp": SDP, "t": time.perf_counter()})
    await asyncio.sleep(args.warmup)  # a benchmark: let the JIT and caches settle
    phase("measuring")
    measuring[0] = True
    t0 = time.perf_counter()
    await asyncio.sleep(args.seconds)
    measuring[0] = False
    elapsed = time.perf_counter() - t0
    phase("measured")
    stop_at[0] = time.perf_counter()
    await asyncio.sleep(0.5)
    return {
        "scenario": "relay", "protocol": args.protocol, "generator": "picows",
        "pairs": args.pairs, "inflight": args.inflight, "split": bool(args.url_b),
        "messages_per_s": round(counted[0] / elapsed),
        "latency_ms": {k: round(pct(latencies, p) * 1000, 3) for k, p in (("p50", 50), ("p99", 99), ("p999", 99.9))},
        "errors": sum(a.errors + b.errors for a, b in pairs),
    }


async def rate(args):
    pairs = await make_pairs(args.url, args.pairs, args.url_b)
    latencies = []
    for _, b in pairs:
        b.on_message = lambda m: latencies.append(time.perf_counter() - m["data"]["t"])
    interval = args.pairs / args.rate  # each pair sends every `interval` seconds
    stop = time.perf_counter() + args.warmup + args.seconds

    sent = [0]

    async def pace(a, b, offset):
        await asyncio.sleep(offset)
        next_at = time.perf_counter()
        while next_at < stop:
            send(a, "offer", b.id, {"type": "offer", "sdp": SDP, "t": time.perf_counter()})
            sent[0] += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    await asyncio.gather(*(pace(a, b, i * interval / len(pairs)) for i, (a, b) in enumerate(pairs)))
    await asyncio.sleep(0.5)
    n_warm = int(len(latencies) * args.warmup / (args.warmup + args.seconds))
    lat = latencies[n_warm:]
    return {
        "scenario": "rate", "protocol": args.protocol, "generator": "picows",
        "pairs": args.pairs, "offered_per_s": args.rate, "sent": sent[0], "received": len(latencies),
        "latency_ms": {k: round(pct(lat, p) * 1000, 3)
                       for k, p in (("p50", 50), ("p99", 99), ("p999", 99.9), ("max", 100))},
        "errors": sum(a.errors + b.errors for a, b in pairs),
    }


async def burst(args):
    times, failures = [], [0]
    limit = asyncio.Semaphore(args.c)
    peers = []

    async def one():
        async with limit:
            t0 = time.perf_counter()
            try:
                peers.append(await open_peer(args.url))
                times.append(time.perf_counter() - t0)
            except Exception:
                failures[0] += 1

    phase("measuring")
    t0 = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(args.n)))
    elapsed = time.perf_counter() - t0
    phase("measured")
    for p in peers:
        p.transport.disconnect()
    return {
        "scenario": "burst", "protocol": args.protocol, "generator": "picows",
        "connections": args.n, "concurrency": args.c, "welcomed": len(times),
        "failed": failures[0], "connections_per_s": round(len(times) / elapsed),
        "welcome_ms": {k: round(pct(times, p) * 1000, 2) for k, p in (("p50", 50), ("p99", 99), ("max", 100))},
        "waited_1s_or_more": sum(1 for t in times if t >= 1.0),
    }


async def idle(args):
    limit = asyncio.Semaphore(200)

    async def one():
        async with limit:
            return await open_peer(args.url)

    peers = await asyncio.gather(*(one() for _ in range(args.n)))
    print(json.dumps({"scenario": "idle", "open": len(peers)}), flush=True)
    await asyncio.sleep(args.hold)  # held open while the caller measures
    for p in peers:
        p.transport.disconnect()
    return {"scenario": "idle", "closed": len(peers)}


async def churn(args):
    """Open and close connections: ``--rate`` of each per second for ``--seconds`` (the registry keeps changing)."""
    interval = 1.0 / args.rate
    stop = time.perf_counter() + args.seconds
    opened, failed = 0, 0
    next_at = time.perf_counter()
    while next_at < stop:
        try:
            peer = await open_peer(args.url)
            peer.transport.disconnect()
            opened += 1
        except Exception:
            failed += 1
        next_at += interval
        await asyncio.sleep(max(0.0, next_at - time.perf_counter()))
    return {"scenario": "churn", "opened_and_closed": opened, "failed": failed}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=["relay", "rate", "burst", "idle", "churn"])
    parser.add_argument("url")
    parser.add_argument("--url-b", help="relay/rate: the second peer of each pair connects here (another node)")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="total offered messages/s (rate); connections opened and closed per second (churn)")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("-n", type=int, default=1000)
    parser.add_argument("-c", type=int, default=200)
    parser.add_argument("--hold", type=float, default=5.0)
    parser.add_argument("--protocol", choices=["native", "peerjs"], default="native",
                        help="peerjs: PeerJS server 1.0's protocol (URL: ws://HOST:PORT/peerjs)")
    args = parser.parse_args()
    Peer.peerjs = args.protocol == "peerjs"
    if args.n > 20000 or args.pairs > 2000 or args.seconds > 120 or args.hold > 3600:
        parser.error("bounded: -n <= 20000, --pairs <= 2000, --seconds <= 120, --hold <= 3600")
    # A bounded run: no cycle collector.  Its full collections walk every
    # object of every open connection (over 100 ms with 10,000 open), and
    # each pause would be measured as the server's latency.
    gc.disable()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    # (idle holds its connections for --hold on top: the bound must not close them early)
    limit = 300 + (args.hold if args.scenario == "idle" else 0)
    result = asyncio.run(asyncio.wait_for(globals()[args.scenario](args), limit))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    sys.exit(main())
