"""
One host, many cores: 1 versus 2 server processes sharing one listening port
(--reuse-port) and joined through Redis, under the same relay load.

    python bench/reuseport.py              # 50 pairs, 8 in flight, 5 s each
"""

import argparse
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
from _server import Server  # noqa: E402
from redis_server import RedisServer, free_port  # noqa: E402


def loadgen(url, args):
    out = subprocess.run([sys.executable, os.path.join(HERE, "loadgen.py"), "relay", url, "--pairs", str(args.pairs),
                          "--inflight", str(args.inflight), "--seconds", str(args.seconds)],
                         capture_output=True, text=True, timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5)
    args = parser.parse_args()
    report = {"pairs": args.pairs, "inflight": args.inflight, "cores": os.cpu_count()}
    common = ["--rate=5000", "--burst=10000", "--max-connections-per-ip=30000", "--no-relay-log"]
    for count in (1, 2):
        redis = RedisServer().start()
        port = free_port()
        nodes = []
        try:
            for i in range(count):
                nodes.append(Server(f"--redis={redis.url}", f"--node-id=p{i}", "--reuse-port",
                                    f"--ws=tcp:{port}:interface=127.0.0.1", *common))
            report[f"{count}_process"] = loadgen(f"ws://127.0.0.1:{port}/", args)
        finally:
            for node in nodes:
                node.stop()
            redis.cleanup()
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
