"""
Burst of WebSocket connections: how long each waits for its welcome.

Starts the installed server (``twistd -n signaling``) on free loopback ports,
opens N connections with at most C in flight, and reports connections per
second and time-to-welcome percentiles.  Bounded in count and time; loopback
only.

    python bench/burst.py                  # 500 at once, backlog 1024
    python bench/burst.py -n 2000 -c 200
    python bench/burst.py --backlog 50     # Twisted's default, for contrast
    python bench/burst.py --url ws://127.0.0.1:8080/   # a server already running
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import Server  # noqa: E402


async def one(url, results, limit):
    async with limit:
        t0 = time.perf_counter()
        ws = await websockets.connect(url, ping_interval=None, open_timeout=30)
        msg = json.loads(await asyncio.wait_for(ws.recv(), 30))
        results.append(time.perf_counter() - t0)
        assert msg["type"] == "welcome"
        return ws


def pct(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100.0 * (len(values) - 1))))]


async def main(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.n + 100)), hard))
    server = None
    url = args.url
    if url is None:
        # every connection comes from 127.0.0.1: the per-address limit is raised for the run
        server = Server(f"--ws=tcp:0:interface=127.0.0.1:backlog={args.backlog}",
                        f"--max-connections-per-ip={args.n + 100}", f"--max-connections={args.n + 100}")
        url = server.ws
    try:
        results = []
        limit = asyncio.Semaphore(args.c)
        t0 = time.perf_counter()
        clients = await asyncio.wait_for(
            asyncio.gather(*(one(url, results, limit) for _ in range(args.n))), 120
        )
        elapsed = time.perf_counter() - t0
        await asyncio.gather(*(c.close() for c in clients))
        report = {
            "connections": len(results),
            "concurrency": args.c,
            "backlog": args.backlog if args.url is None else None,
            "seconds": round(elapsed, 3),
            "connections_per_s": round(len(results) / elapsed, 1),
            "welcome_ms": {
                "p50": round(pct(results, 50) * 1000, 1),
                "p99": round(pct(results, 99) * 1000, 1),
                "max": round(max(results) * 1000, 1),
            },
            "waited_1s_or_more": sum(1 for r in results if r >= 1.0),
        }
        print(json.dumps(report, indent=2))
    finally:
        if server is not None:
            server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=500, help="connections (at most 10000)")
    parser.add_argument("-c", type=int, default=500, help="connections in flight at once")
    parser.add_argument("--backlog", type=int, default=1024, help="listen backlog of the started server")
    parser.add_argument("--url", help="use a running server instead of starting one")
    args = parser.parse_args()
    if not 0 < args.n <= 10000:
        parser.error("-n must be between 1 and 10000")
    asyncio.run(main(args))
