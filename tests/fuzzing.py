"""
Fuzzing a live server: random and mutated JSON messages over real
WebSockets, and raw garbage at the frame level over raw TCP.

Used by tests/test_fuzz.py (a short run) and bench/fuzz.py (the long one).
Everything is bounded in count and time and targets loopback only.
"""

import asyncio
import base64
import json
import os
import random
import struct

import websockets

#: error codes and close codes the contract allows
ERROR_CODES = {
    "invalid-json", "invalid-message", "unknown-type", "peer-not-found",
    "peer-busy", "invalid-state", "rate-limited",
}
SERVER_TYPES = {"welcome", "error", "ping", "pong", "offer", "answer", "ice-candidate", "disconnect"}
TYPES = ["ping", "pong", "offer", "answer", "ice-candidate", "disconnect"]


class Violation(AssertionError):
    pass


# -- JSON-level fuzzing ------------------------------------------------------------------


def random_value(rng, depth=0):
    kind = rng.randrange(8 if depth < 3 else 5)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**31, 2**63, 2**70, 1.5, -0.0, 1e308])
    if kind == 3:
        return "".join(rng.choice("aé漢🎉\\\"\n\t\x00\u2028 ") for _ in range(rng.randrange(12)))
    if kind == 4:
        return rng.choice(["", "v=0\r\n", "candidate:1 1 udp 1 127.0.0.1 9 typ host"])
    if kind == 5:
        return [random_value(rng, depth + 1) for _ in range(rng.randrange(4))]
    return {random_value(rng, 9) if rng.random() < 0.2 else rng.choice(["type", "to", "data", "sdp", "x"]):
            random_value(rng, depth + 1) for _ in range(rng.randrange(4))}


def fuzz_frame(rng, ids):
    """One text frame: valid, almost valid, or broken JSON."""
    msg = {"type": rng.choice(TYPES), "to": rng.choice(ids), "data": {"sdp": "v=0\r\n"}}
    roll = rng.random()
    if roll < 0.25:
        return json.dumps(msg)
    if roll < 0.5:
        key = rng.choice(["type", "to", "data", "extra"])
        msg[key] = random_value(rng)
        if rng.random() < 0.3:
            del msg[rng.choice(list(msg))]
        return json.dumps(msg, ensure_ascii=rng.random() < 0.5)
    if roll < 0.6:
        return json.dumps(random_value(rng))
    if roll < 0.65:
        depth = rng.choice([10, 1000, 30000])  # 60 KB at most: under the size limit
        return "[" * depth + "]" * depth
    text = json.dumps(msg)
    chars = list(text)
    for _ in range(rng.randrange(1, 4)):
        op = rng.randrange(3)
        pos = rng.randrange(len(chars) + 1)
        if op == 0 and chars:
            del chars[min(pos, len(chars) - 1)]
        elif op == 1:
            chars.insert(pos, rng.choice('{}[]",:\\ 0aé\u2028'))
        else:
            chars = chars[:pos]
    return "".join(chars)


def check_server_frame(frame):
    """Every frame from the server is a JSON object of a documented type."""
    if not isinstance(frame, str):
        raise Violation(f"server sent a binary frame: {frame!r:.80}")
    msg = json.loads(frame)
    if not isinstance(msg, dict) or msg.get("type") not in SERVER_TYPES:
        raise Violation(f"undocumented frame: {frame:.200}")
    if msg["type"] == "error":
        if msg.get("code") not in ERROR_CODES or not isinstance(msg.get("message"), str):
            raise Violation(f"undocumented error: {frame:.200}")
    return msg


async def json_fuzz(url, messages, connections=20, seed=0):
    """
    Send ``messages`` fuzzed frames over ``connections`` WebSockets, all
    aimed at each other's ids.  Returns counts; raises Violation on any
    undocumented answer.
    """
    sockets = []
    for _ in range(connections):
        ws = await websockets.connect(url, max_size=None, ping_interval=None)
        welcome = check_server_frame(await ws.recv())
        ws.peer_id = welcome["id"]
        sockets.append(ws)
    ids = [ws.peer_id for ws in sockets] + ["nobody", "", sockets[0].peer_id.upper()]
    counts = {"sent": 0, "errors": 0, "relayed": 0}

    async def reader(ws):
        try:
            async for frame in ws:
                msg = check_server_frame(frame)
                counts["errors" if msg["type"] == "error" else "relayed"] += 1
        except websockets.ConnectionClosed:
            pass
        if ws.close_code not in (1000, None):
            raise Violation(f"server closed a fuzzing socket with {ws.close_code} {ws.close_reason!r}")

    readers = [asyncio.ensure_future(reader(ws)) for ws in sockets]
    per_socket = messages // connections

    async def writer(ws, n, rng):
        for i in range(n):
            await ws.send(fuzz_frame(rng, ids))
            counts["sent"] += 1
            if i % 200 == 199:
                # a WebSocket ping round trip: the server's answers so far
                # have reached the reader, so they cannot pile up unread
                await (await ws.ping())

    await asyncio.gather(*(writer(ws, per_socket, random.Random(seed * 1000 + k)) for k, ws in enumerate(sockets)))
    # a round trip on each socket: everything sent before it has been answered
    for ws in sockets:
        await ws.send(json.dumps({"type": "ping", "to": "sync"}))
    for ws in sockets:
        await ws.close()
    await asyncio.gather(*readers)
    return counts


# -- frame-level fuzzing ------------------------------------------------------------------


def frame(opcode, payload=b"", fin=True, rsv=0, mask=True, length=None, key=None):
    """Build a client frame; ``length`` overrides the declared payload length; ``key`` is the mask."""
    first = (0x80 if fin else 0) | (rsv << 4) | opcode
    n = len(payload) if length is None else length
    if n < 126:
        header = struct.pack("!BB", first, (0x80 if mask else 0) | n)
    elif n < 65536:
        header = struct.pack("!BBH", first, (0x80 if mask else 0) | 126, n)
    else:
        header = struct.pack("!BBQ", first, (0x80 if mask else 0) | 127, n)
    if not mask:
        return header + payload
    key = os.urandom(4) if key is None else key
    return header + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class RawClient:
    """A WebSocket client written from RFC 6455, to send what real libraries refuse to."""

    def __init__(self, reader, writer):
        self.reader = reader
        self.writer = writer

    @classmethod
    async def open(cls, host, port, handshake=True):
        reader, writer = await asyncio.open_connection(host, port)
        client = cls(reader, writer)
        if handshake:
            key = base64.b64encode(os.urandom(16)).decode()
            writer.write(
                f"GET / HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\n"
                "Sec-WebSocket-Version: 13\r\n\r\n".encode()
            )
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 101"):
                raise Violation(f"handshake refused: {head[:80]!r}")
            opcode, payload = await client.read_frame()
            if opcode != 1 or json.loads(payload)["type"] != "welcome":
                raise Violation("no welcome")
            client.peer_id = json.loads(payload)["id"]
        return client

    async def read_frame(self):
        head = await self.reader.readexactly(2)
        opcode, n = head[0] & 0x0F, head[1] & 0x7F
        if n == 126:
            n = struct.unpack("!H", await self.reader.readexactly(2))[0]
        elif n == 127:
            n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
        return opcode, await self.reader.readexactly(n)

    async def close_code(self):
        """Read until the server's close frame (its code) or EOF (None)."""
        try:
            while True:
                opcode, payload = await self.read_frame()
                if opcode == 8:
                    return struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else 1005
                if opcode == 1:
                    check_server_frame(payload.decode("utf-8"))
        except (asyncio.IncompleteReadError, ConnectionResetError):
            return None

    def send(self, data):
        self.writer.write(data)

    def abort(self):
        self.writer.transport.abort()


#: (name, frames to send, close codes the server may answer with; None: it just drops)
FRAME_CASES = [
    ("bad opcode 3", [frame(3, b"x")], {1002}),
    ("bad opcode 0xB", [frame(0xB, b"x")], {1002}),
    ("reserved bit 1", [frame(1, b"{}", rsv=4)], {1002}),
    ("reserved bits 2+3", [frame(1, b"{}", rsv=3)], {1002}),
    ("unmasked frame", [frame(1, b"{}", mask=False)], {1002}),
    ("bad UTF-8", [frame(1, b'{"type":"\xff\xfe"}')], {1007}),
    ("truncated UTF-8", [frame(1, "é".encode()[:1])], {1007}),
    ("overlong UTF-8", [frame(1, b"\xc0\xaf")], {1007}),
    ("surrogate in UTF-8", [frame(1, b"\xed\xa0\x80")], {1007}),
    ("continuation first", [frame(0, b"{}")], {1002}),
    ("new message inside a fragmented one", [frame(1, b"{", fin=False), frame(1, b"}")], {1002}),
    ("fragmented ping", [frame(9, b"x", fin=False)], {1002}),
    ("ping payload over 125", [frame(9, b"x" * 126)], {1002}),
    ("huge declared length", [frame(1, b"", length=2**63 - 1)], {1009, 1002}),
    ("declared length over the limit", [frame(1, b"", length=10 * 2**20)], {1009}),
    ("fragments over the limit", [frame(1, b"x" * 60000, fin=False)] + [frame(0, b"x" * 60000, fin=False)] * 5,
     {1009}),
    # floods below the message layer (the fuzz server runs without a rate limit:
    # the fragment cap and the size cap must stop them)
    ("one-byte fragments of an unfinished message", [frame(1, b"[", fin=False)] + [frame(0, b" ", fin=False)] * 5000,
     {1009}),
    ("empty continuation frames", [frame(1, b"", fin=False)] + [frame(0, b"", fin=False)] * 5000, {1009}),
    ("empty fragments ending a message late", [frame(1, b"", fin=False)] + [frame(0, b"", fin=False)] * 500
     + [frame(0, b"{}")], {1009}),
    # a malformed close frame ends the connection: with a close frame, or by dropping TCP
    ("close with bad code", [frame(8, struct.pack("!H", 999))], {1002, None}),
    ("close with bad UTF-8 reason", [frame(8, struct.pack("!H", 1000) + b"\xff")], {1007, 1002, None}),
]


async def frame_case(host, port, frames, allowed):
    client = await RawClient.open(host, port)
    for data in frames:
        client.send(data)
    code = await asyncio.wait_for(client.close_code(), 30)
    client.abort()
    if code not in allowed:
        raise Violation(f"expected close code in {sorted(allowed)}, got {code}")
    return code


async def truncated_frame(host, port):
    """Half a frame, then the client goes away: the server must forget it."""
    client = await RawClient.open(host, port)
    client.send(frame(1, b'{"type":"ping","to":"x"}')[:9])
    await client.writer.drain()
    client.abort()


async def half_open(host, port):
    """Half a handshake, then the write side shuts: the server must not keep it."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n")
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 30)  # the server closes: EOF
    writer.transport.abort()
    return data


async def garbage_stream(host, port, rng, size):
    """
    Random bytes after a good handshake, then the client half-closes: the
    server answers with a documented close code, or (for an incomplete
    frame) simply closes.
    """
    client = await RawClient.open(host, port)
    client.send(bytes(rng.randrange(256) for _ in range(size)))
    client.writer.write_eof()
    code = await asyncio.wait_for(client.close_code(), 30)
    client.abort()
    if code not in (None, 1002, 1007, 1009):
        raise Violation(f"garbage answered with close code {code}")
    return code


async def frame_fuzz(host, port, rounds=1, garbage=50, seed=0):
    """Every frame case ``rounds`` times, plus truncations, half-open sockets and garbage streams."""
    rng = random.Random(seed)
    results = {}
    for _ in range(rounds):
        for name, frames, allowed in FRAME_CASES:
            results.setdefault(name, set()).add(await frame_case(host, port, frames, allowed))
        await truncated_frame(host, port)
        await half_open(host, port)
    for _ in range(garbage):
        await garbage_stream(host, port, rng, rng.choice([1, 2, 7, 64, 1000]))
    return results
