"""
Soak: open N WebSocket connections, close them all, three times over;
check the registry is back to 0 and report the server's memory each round.

    python bench/soak.py            # 10,000 connections x 3 rounds
    python bench/soak.py -n 2000 --rounds 5
"""

import argparse
import asyncio
import json
import os
import resource
import sys
import time
import urllib.request

import websockets

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _server import Server  # noqa: E402


def users(server):
    with urllib.request.urlopen(server.http + "/api/stats", timeout=30) as r:
        return json.loads(r.read())["connectedUsers"]


async def open_one(url, limit):
    async with limit:
        ws = await websockets.connect(url, ping_interval=None, open_timeout=60, close_timeout=30)
        await asyncio.wait_for(ws.recv(), 60)
        return ws


async def main(args):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = Server(f"--max-connections-per-ip={args.n + 100}", f"--max-connections={args.n + 100}")
    rounds = []
    try:
        start_rss = server.rss_kib()
        for r in range(args.rounds):
            limit = asyncio.Semaphore(args.c)
            t0 = time.perf_counter()
            clients = await asyncio.gather(*(open_one(server.ws, limit) for _ in range(args.n)))
            t1 = time.perf_counter()
            open_users, open_rss = users(server), server.rss_kib()
            await asyncio.gather(*(c.close() for c in clients))
            t2 = time.perf_counter()
            del clients
            rounds.append({
                "round": r + 1, "opened": args.n, "users_while_open": open_users,
                "rss_open_mib": round(open_rss / 1024, 1),
                "open_s": round(t1 - t0, 1), "close_s": round(t2 - t1, 1),
                "users_after_close": users(server), "rss_after_close_mib": round(server.rss_kib() / 1024, 1),
            })
            print(json.dumps(rounds[-1]), flush=True)
        report = {
            "rss_start_mib": round(start_rss / 1024, 1),
            "rss_end_mib": round(server.rss_kib() / 1024, 1),
            "rss_per_open_connection_kib": round((rounds[0]["rss_open_mib"] * 1024 - start_rss) / args.n, 2),
            "registry_clean": all(r["users_after_close"] == 0 for r in rounds),
        }
        print(json.dumps(report, indent=2))
        return 0 if report["registry_clean"] else 1
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=10_000, help="connections per round (at most 15,000)")
    parser.add_argument("-c", type=int, default=500, help="connections opening at once")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    if not 0 < args.n <= 15_000 or not 0 < args.rounds <= 10:
        parser.error("-n must be 1..15000 and --rounds 1..10")
    sys.exit(asyncio.run(main(args)))
