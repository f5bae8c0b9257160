"""
Flood isolation: P pairs relay offers at a steady rate while the server is
flooded; compare the pairs' one-way latency with and without the flood.

One flooder (default): one peer floods as fast as it can; it is rate
limited, closed with 1008, and reconnects to flood again.

Many flooders (``--flooders N``): N connections are opened, then each writes
``--offers`` offers (300-byte SDP) at once, all together; each is rate
limited and closed.  The server runs with its default options.

Flooders run in their own process.

    python bench/flood.py                       # 100 pairs, 10 s per phase
    python bench/flood.py --pairs 50 --seconds 5
    python bench/flood.py --flooders 500 --pairs 1 --seconds 10
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


def many_flooders(port, n, offers, counts, ready, go):
    """Open ``n`` connections, then (on ``go``) write ``offers`` offers on each at once; count close codes."""
    import base64
    import struct

    def frame(payload):
        key = os.urandom(4)
        n = len(payload)
        head = struct.pack("!BB", 0x81, 0x80 | n) if n < 126 else struct.pack("!BBH", 0x81, 0x80 | 126, n)
        return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))

    async def open_one():
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(f"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
        await reader.readuntil(b"\r\n\r\n")
        return reader, writer

    async def read_close(reader):
        try:
            while True:
                head = await reader.readexactly(2)
                length = head[1] & 0x7F
                if length == 126:
                    length = struct.unpack("!H", await reader.readexactly(2))[0]
                payload = await reader.readexactly(length)
                if head[0] & 0x0F == 8:
                    return struct.unpack("!H", payload[:2])[0]
        except (asyncio.IncompleteReadError, ConnectionError):
            return None

    async def run():
        conns = [await open_one() for _ in range(n)]
        ready.set()
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        sdp = "v=0\r\n" + "a=x" * 100
        data = frame(json.dumps({"type": "offer", "to": "someone", "data": {"sdp": sdp}}).encode()) * offers
        for _, writer in conns:
            writer.write(data)
        codes = await asyncio.gather(*(read_close(reader) for reader, _ in conns))
        for code in codes:
            key = f"closed_with_{code}"
            counts[key] = counts.get(key, 0) + 1
        counts["connections"] = n
        counts["sent"] = n * offers

    asyncio.run(run())


async def main(args):
    many = args.flooders > 0
    server = Server()  # default options: what an installed server runs with
    try:
        pairs = [await make_pair(server.ws) for _ in range(args.pairs)]
        quiet, quiet_sent = await measure(pairs, args.seconds, args.rate)
        manager = multiprocessing.Manager()
        counts = manager.dict(connections=0, sent=0)
        log_lines = server.line_count
        if many:
            ready, go = multiprocessing.Event(), multiprocessing.Event()
            proc = multiprocessing.Process(
                target=many_flooders, args=(server.ports["ws"], args.flooders, args.offers, counts, ready, go)
            )
            proc.start()
            ready.wait(120)
            go.set()
        else:
            proc = multiprocessing.Process(target=flooder, args=(server.ws, args.seconds + 2, counts))
            proc.start()
            await asyncio.sleep(1)  # let the flood build up (a benchmark, not a test)
        loud, loud_sent = await measure(pairs, args.seconds, args.rate)
        proc.join(60)
        report = {"pairs": args.pairs, "rate_per_pair": args.rate, "seconds": args.seconds}
        for name, lat, sent in (("quiet", quiet, quiet_sent), ("flooded", loud, loud_sent)):
            report[name] = {
                "sent": sent, "received": len(lat),
                "p50_ms": round(pct(lat, 50) * 1000, 2), "p99_ms": round(pct(lat, 99) * 1000, 2),
                "max_ms": round(max(lat) * 1000, 2),
            }
        report["flooder"] = dict(counts)
        report["server_log_lines_during_flood"] = server.line_count - log_lines
        report["server_rss_mib"] = round(server.rss_kib() / 1024, 1)
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
    parser.add_argument("--flooders", type=int, default=0, help="many flooders at once (0: one that reconnects)")
    parser.add_argument("--offers", type=int, default=300, help="offers each of the many flooders writes at once")
    args = parser.parse_args()
    if not 0 < args.pairs <= 1000 or not 0 < args.seconds <= 120:
        parser.error("--pairs must be 1..1000 and --seconds 1..120")
    if not 0 <= args.flooders <= 900 or not 0 < args.offers <= 10000:
        parser.error("--flooders must be 0..900 and --offers 1..10000")
    asyncio.run(main(args))
