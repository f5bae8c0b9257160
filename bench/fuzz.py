"""
The long fuzz run: at least 100,000 random and mutated JSON messages plus
raw garbage at the WebSocket frame level against the installed server, then
checks that it is alive, answers as documented, and holds only live peers.

    python bench/fuzz.py                      # 100,000 messages, 20 frame rounds
    python bench/fuzz.py --messages 300000 --seed 7
"""

import argparse
import asyncio
import json
import os
import sys
import time
import urllib.request

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from _server import Server  # noqa: E402
from fuzzing import frame_fuzz, json_fuzz  # noqa: E402


def stats(server):
    with urllib.request.urlopen(server.http + "/api/stats", timeout=10) as r:
        return json.loads(r.read())


async def main(args):
    server = Server("--rate=0", *args.server_args)
    try:
        t0 = time.perf_counter()
        counts = await json_fuzz(server.ws, args.messages, connections=args.connections, seed=args.seed)
        t1 = time.perf_counter()
        frames = await frame_fuzz("127.0.0.1", server.ports["ws"], rounds=args.rounds,
                                  garbage=args.garbage, seed=args.seed)
        t2 = time.perf_counter()
        left = stats(server)["connectedUsers"]
        tracebacks = sum("Traceback" in line for line in server.lines)
        report = {
            "json_messages": counts["sent"], "error_replies": counts["errors"], "relayed": counts["relayed"],
            "json_seconds": round(t1 - t0, 1),
            "frame_cases": {k: sorted(v, key=str) for k, v in frames.items()},
            "frame_rounds": args.rounds, "garbage_streams": args.garbage,
            "frame_seconds": round(t2 - t1, 1),
            "server_alive": server.alive(), "users_left": left, "tracebacks_in_log": tracebacks,
            "server_rss_mib": round(server.rss_kib() / 1024, 1),
        }
        print(json.dumps(report, indent=2))
        ok = server.alive() and left == 0 and tracebacks == 0 and counts["sent"] >= args.messages
        return 0 if ok else 1
    finally:
        server.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=20, help="rounds of every frame-level case")
    parser.add_argument("--garbage", type=int, default=500, help="random-garbage connections")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("server_args", nargs="*", help="extra server options (after --)")
    args = parser.parse_args()
    if not 0 < args.messages <= 10_000_000:
        parser.error("--messages must be between 1 and 10,000,000")
    sys.exit(asyncio.run(main(args)))
