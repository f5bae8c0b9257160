"""
One host, many cores: 1 versus 2 server processes sharing one listening port
(--reuse-port) and joined through Redis, under the same relay load; and, for
reference, one process without Redis.

    python bench/reuseport.py              # 50 pairs, 8 in flight, 5 s each
"""

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from _server import MEASURED, MEASURED_TWISTD, Server, run_loadgen  # noqa: E402
from redis_server import RedisServer, free_port  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    report = {"pairs": args.pairs, "inflight": args.inflight, "cores": os.cpu_count()}
    solo = Server(*MEASURED, twistd=MEASURED_TWISTD)  # the reference: one process, no Redis
    try:
        report["1_process_no_redis"] = run_loadgen("relay", solo.ws, "--pairs", str(args.pairs),
                                                   "--inflight", str(args.inflight), "--seconds", str(args.seconds))
    finally:
        solo.stop()
    for count in (1, 2):
        redis = RedisServer().start()
        port = free_port()
        nodes = []
        try:
            for i in range(count):
                nodes.append(Server(f"--redis={redis.url}", f"--node-id=p{i}", "--reuse-port",
                                    f"--ws=tcp:{port}:interface=127.0.0.1", *MEASURED, twistd=MEASURED_TWISTD))
            report[f"{count}_process"] = run_loadgen("relay", f"ws://127.0.0.1:{port}/", "--pairs", str(args.pairs),
                                                     "--inflight", str(args.inflight), "--seconds", str(args.seconds))
        finally:
            for node in nodes:
                node.stop()
            redis.cleanup()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
