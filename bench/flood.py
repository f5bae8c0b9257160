"""
Flood isolation: P pairs relay offers at a steady rate while one peer floods
the server as fast as it can; compare the pairs' one-way latency with and
without the flooder.  The flooder runs in its own process; it is rate
limited, then closed with 1008, and reconnects to flood again.

    python bench/flood.py                       # 100 pairs, 10 s per phase
    python bench/flood.py --pairs 50 --seconds 5
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import sys
import time

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import Server  # noqa: E402


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))] if values else None


async def connect(url):
    ws = await websockets.connect(url, ping_interval=None, max_size=None)
    ws.peer_id = json.loads(await ws.recv())["id"]
    return ws


async def make_pair(url):
    a, b = await connect(url), await connect(url)
    await a.send(json.dumps({"type": "ping", "to": b.peer_id}))
    await b.recv()
    await b.send(json.dumps({"type": "pong", "to": a.peer_id}))
    await a.recv()
    return a, b


async def measure(pairs, seconds, rate):
    """Each pair: a sends offers to b at ``rate``/s; b records one-way latency."""
    latencies, sent = [], [0]
    stop = time.perf_counter() + seconds
    sdp = "v=0\r\n" + "a=x" * 100  # about 300 bytes

    async def sender(a, b):
        interval = 1.0 / rate
        next_at = time.perf_counter()
        while next_at < stop:
            await a.send(json.dumps({"type": "offer", "to": b.peer_id, "data": {"t": time.perf_counter(), "sdp": sdp}}))
            sent[0] += 1
            next_at += interval
            await asyncio.sleep(max(0.0, next_at - time.perf_counter()))

    async def receiver(b, expected):
        for _ in range(expected):
            msg = json.loads(await asyncio.wait_for(b.recv(), 30))
            latencies.append(time.perf_counter() - msg["data"]["t"])

    expected = int(seconds * rate)
    await asyncio.gather(*(sender(a, b) for a, b in pairs), *(receiver(b, expected) for _, b in pairs))
    return latencies, sent[0]


def flooder(url, seconds, counts):
    async def run():
        stop = time.perf_counter() + seconds
        frame = json.dumps({"type": "ping", "to": "nobody", "data": {"x": "y" * 200}})
        while time.perf_counter() < stop:
            try:
                ws = await connect(url)
                counts["connections"] += 1
                while time.perf_counter() < stop:
                    await ws.send(frame)
                    counts["sent"] += 1
            except websockets.ConnectionClosed:
                key = f"closed_with_{ws.close_code}"
                counts[key] = counts.get(key, 0) + 1
    asyncio.run(run())


async def main(args):
    server = Server()
    try:
        pairs = [await make_pair(server.ws) for _ in range(args.pairs)]
        quiet, quiet_sent = await measure(pairs, args.seconds, args.rate)
        manager = multiprocessing.Manager()
        counts = manager.dict(connections=0, sent=0)
        proc = multiprocessing.Process(target=flooder, args=(server.ws, args.seconds + 2, counts))
        proc.start()
        await asyncio.sleep(1)  # let the flood build up (a benchmark, not a test)
        loud, loud_sent = await measure(pairs, args.seconds, args.rate)
        proc.join(30)
        report = {"pairs": args.pairs, "rate_per_pair": args.rate, "seconds": args.seconds}
        for name, lat, sent in (("quiet", quiet, quiet_sent), ("flooded", loud, loud_sent)):
            report[name] = {
                "sent": sent, "received": len(lat),
                "p50_ms": round(pct(lat, 50) * 1000, 2), "p99_ms": round(pct(lat, 99) * 1000, 2),
                "max_ms": round(max(lat) * 1000, 2),
            }
        report["flooder"] = dict(counts)
        print(json.dumps(report, indent=2))
        for a, b in pairs:
            await a.close()
            await b.close()
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--rate", type=float, default=10.0, help="messages per second per pair")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    if not 0 < args.pairs <= 1000 or not 0 < args.seconds <= 120:
        parser.error("--pairs must be 1..1000 and --seconds 1..120")
    asyncio.run(main(args))
