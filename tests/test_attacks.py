"""
Tier 3: the installed server, with its default options, under the attacks of
issue 10 (Hardening II), over raw sockets where a real client library would
refuse to misbehave: slowloris past the descriptor limit, request bodies,
pipelining without reading, oversized handshakes, fragment and frame
floods, many flooders at once, and control characters in every logged
field.  Each test checks the bound and that a well-behaved pair kept
relaying (and /api/health kept answering) meanwhile.
"""

import asyncio
import http.client
import json
import re

import pytest
from fuzzing import RawClient, frame
from live import ServerProcess, connect, pair, paired, recv, run, send, sync

pytestmark = pytest.mark.live

HOST = "127.0.0.1"
TIMEOUT = 30


class Collect(asyncio.Protocol):
    """A raw TCP client that keeps every byte it received, even when the connection ends in a reset."""

    def __init__(self, counter=None):
        self.data = bytearray()
        self.counter = counter
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        self.data += data

    def connection_lost(self, exc):
        if not self.done.done():
            self.done.set_result(exc)
            if self.counter is not None:
                self.counter.tick()

    @property
    def status(self):
        m = re.match(rb"HTTP/1\.1 (\d{3})", bytes(self.data))
        return int(m.group(1)) if m else None


class Counter:
    """Counts closed connections; ``reached(n)`` waits until n have closed."""

    def __init__(self):
        self.count = 0
        self.waiters = []

    def tick(self):
        self.count += 1
        for n, fut in list(self.waiters):
            if self.count >= n and not fut.done():
                fut.set_result(None)

    async def reached(self, n, timeout=TIMEOUT):
        if self.count < n:
            fut = asyncio.get_running_loop().create_future()
            self.waiters.append((n, fut))
            await asyncio.wait_for(fut, timeout)


async def open_raw(port, data=b"", local=HOST, counter=None):
    loop = asyncio.get_running_loop()
    _, proto = await loop.create_connection(lambda: Collect(counter), HOST, port, local_addr=(local, 0))
    if data:
        proto.transport.write(data)
    return proto


async def exchange(port, data, local=HOST):
    """Send ``data`` and collect what comes back until the server closes."""
    proto = await open_raw(port, data, local)
    await asyncio.wait_for(proto.done, TIMEOUT)
    return proto


def health(server, local="127.0.0.2"):
    """GET /api/health from another loopback address than the attackers' (127.0.0.1)."""
    conn = http.client.HTTPConnection(HOST, server.ports["http"], timeout=10, source_address=(local, 0))
    try:
        conn.request("GET", "/api/health")
        return conn.getresponse().status
    finally:
        conn.close()


async def still_relaying(a, b):
    await send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "v=0"}})
    assert await recv(b) == {"type": "offer", "from": a.peer_id, "data": {"sdp": "v=0"}}


@pytest.fixture(scope="module")
def server():
    """The installed server with its default options."""
    proc = ServerProcess().start()
    yield proc
    proc.stop()


def test_slowloris_past_the_descriptor_limit():
    """
    1,100 unfinished HTTP requests from one address, against a server whose
    descriptor limit is 512: it fits its caps to the limit, holds 64 from
    that address and answers the rest 429 at once; /api/health, new
    WebSockets and a pair keep working; the held ones get 408 at the head
    deadline even though they sent bytes meanwhile.
    """
    server = ServerProcess("--handshake-timeout=3", max_files=512).start()
    try:
        assert re.search(r"file descriptor limit \(512\).*using 336 and 112", server.output())

        async def go():
            counter = Counter()
            attackers = [await open_raw(server.ports["http"], b"GET /test.html HTTP/1.1\r\nHost: x\r\n",
                                        counter=counter) for _ in range(1100)]
            await counter.reached(1100 - 64)
            refused = [p for p in attackers if p.done.done()]
            assert len(refused) == 1036 and {p.status for p in refused} == {429}
            held = [p for p in attackers if not p.done.done()]
            for p in held:
                p.transport.write(b"X-Trickle: 1\r\n")  # trickling does not extend the deadline
            assert await asyncio.to_thread(health, server) == 200
            a, b = await paired(server.ws)
            await still_relaying(a, b)
            c = await connect(server.ws_on_http, local_addr=("127.0.0.3", 0))
            await counter.reached(1100, timeout=15)
            assert {p.status for p in held} == {408}
            await still_relaying(a, b)
            for ws in (a, b, c):
                await ws.close()

        run(go())
    finally:
        server.stop()


def test_unfinished_handshakes_count_per_address(server):
    """Handshakes that never finish count toward --max-connections-per-ip from their first byte (1000 by default)."""

    async def go():
        counter = Counter()
        opening = [await open_raw(server.ports["ws"], b"GET / HTTP/1.1\r\nHost: x\r\n", counter=counter)
                   for _ in range(1010)]
        await counter.reached(10)
        assert sorted(p.status for p in opening if p.done.done()) == [429] * 10
        a = await connect(server.ws, local_addr=("127.0.0.2", 0))  # another address is not affected
        b = await connect(server.ws, local_addr=("127.0.0.2", 0))
        await pair(a, b)
        await still_relaying(a, b)
        for p in opening:
            p.transport.abort()
        await a.close()
        await b.close()

    run(go())


def test_request_bodies_are_refused_before_reading(server):
    """A 2 GiB POST and a GET /ws with a 300 MiB body get 413 as soon as their headers are in; memory stays put."""

    async def go():
        rss = server.rss_kib()
        port = server.ports["http"]
        post = await exchange(port, b"POST /api/stats HTTP/1.1\r\nHost: x\r\nContent-Length: 2147483648\r\n\r\n")
        assert post.status == 413
        upgrade = await open_raw(port, (
            b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
            b"Content-Length: 314572800\r\n\r\n"))
        upgrade.transport.write(b"\0" * (8 * 2**20))  # the body starts coming
        await asyncio.wait_for(upgrade.done, TIMEOUT)
        assert upgrade.status == 413
        chunked = await exchange(port, b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n")
        assert chunked.status == 413
        assert server.rss_kib() - rss < 20 * 1024
        assert health(server) == 200

    run(go())


def test_pipelining_without_reading(server):
    """
    30 connections each pipelining 2,000 GET /test.html without reading:
    each is closed after at most 17 answers; memory stays bounded; a pair
    relays and /api/health answers meanwhile.
    """

    async def go():
        rss = server.rss_kib()
        a, b = await paired(server.ws)
        request = b"GET /test.html HTTP/1.1\r\nHost: x\r\n\r\n"
        readers = []
        for _ in range(30):
            proto = await open_raw(server.ports["http"])
            proto.transport.pause_reading()  # not reading: the server's answers pile up
            proto.transport.write(request * 2000)
            readers.append(proto)
        await still_relaying(a, b)
        assert await asyncio.to_thread(health, server) == 200
        grown = server.rss_kib() - rss
        for proto in readers:  # (a paused reader cannot see the close: read what was sent, then the end)
            proto.transport.resume_reading()
        await asyncio.wait_for(asyncio.gather(*(p.done for p in readers)), TIMEOUT)
        answers = [bytes(p.data).count(b"HTTP/1.1 200 OK") for p in readers]
        assert max(answers) <= 17, answers
        assert grown < 60 * 1024, grown
        await still_relaying(a, b)
        await a.close()
        await b.close()

    run(go())


@pytest.mark.parametrize("port_name", ["ws", "http"])
def test_oversized_handshakes_are_cut_short(server, port_name):
    """A 16 MiB query string gets 414 and a 16 MiB header 431, after at most the cap is read."""

    async def go():
        a, b = await paired(server.ws)
        port = server.ports[port_name]
        path = b"/" if port_name == "ws" else b"/ws"
        big = b"q" * (16 * 2**20)
        long_line = await exchange(port, b"GET " + path + b"?" + big + b" HTTP/1.1\r\n")
        assert long_line.status == 414
        big_header = await exchange(port, b"GET " + path + b" HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                                    b"Sec-WebSocket-Extensions: " + big + b"\r\n\r\n")
        assert big_header.status == 431
        await still_relaying(a, b)
        await a.close()
        await b.close()

    run(go())


def test_fragment_floods(server):
    """262,000 one-byte fragments are closed with 1009 at the fragment cap; empty continuations and pings with 1008."""

    async def go():
        rss = server.rss_kib()
        a, b = await paired(server.ws)
        port = server.ports["ws"]
        one_byte = await RawClient.open(HOST, port)
        one_byte.send(frame(1, b"[", fin=False) + frame(0, b" ", fin=False) * 262_000)
        assert await asyncio.wait_for(one_byte.close_code(), TIMEOUT) == 1009
        pings = await RawClient.open(HOST, port)
        pings.send(frame(9, b"") * 50_000)
        assert await asyncio.wait_for(pings_close(pings), TIMEOUT) == 1008
        floods = [await RawClient.open(HOST, port) for _ in range(24)]
        for client in floods:
            client.send(frame(1, b"", fin=False) + frame(0, b"", fin=False) * 20_000)
        codes = await asyncio.gather(*(asyncio.wait_for(c.close_code(), TIMEOUT) for c in floods))
        assert set(codes) == {1009}
        for client in (one_byte, pings, *floods):
            client.abort()
        await still_relaying(a, b)
        assert server.rss_kib() - rss < 20 * 1024
        await a.close()
        await b.close()

    run(go())


async def pings_close(client):
    """Read until the close frame (pongs come first), return its code."""
    import struct

    while True:
        opcode, payload = await client.read_frame()
        if opcode == 8:
            return struct.unpack("!H", payload[:2])[0]


def test_many_flooders_at_once(server):
    """
    100 connections each writing 300 offers at once are each closed with
    1008; the log holds a bounded number of lines per flooder; a pair
    relays meanwhile and afterwards.
    """

    async def go():
        a, b = await paired(server.ws)
        since = len(server.lines)
        flooders = [await RawClient.open(HOST, server.ports["ws"]) for _ in range(100)]
        offer = frame(1, json.dumps({"type": "offer", "to": b.peer_id, "data": {"sdp": "x" * 200}}).encode())
        for client in flooders:
            client.send(offer * 300)
        await still_relaying(a, b)
        codes = await asyncio.gather(*(asyncio.wait_for(c.close_code(), TIMEOUT) for c in flooders))
        assert set(codes) == {1008}
        await still_relaying(a, b)
        assert await sync(a) == [] and await sync(b) == []
        for client in flooders:
            client.abort()
        server.wait_for_line(r"errors to \S+ \(127\.0\.0\.1\) not logged", since=since)
        for client in flooders:
            about = [line for line in server.lines[since:] if client.peer_id in line]
            # connect, 5 errors, the flooding close and its close code, the held-back count, disconnect
            assert len(about) <= 10, about
        await a.close()
        await b.close()

    run(go())


CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u061c\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


@pytest.mark.parametrize("json_logs", [False, True])
def test_nothing_an_attacker_sends_reaches_the_log_raw(json_logs):
    """
    Control characters, CR/LF, ESC and BiDi controls in the message type,
    the Origin, extension headers and a trusted proxy's X-Forwarded-For are
    escaped and cut in the text log and in the JSON log.
    """
    evil = "a\rb\nc\x1b[2Jd\u202ee\u2066f\x85g" + "z" * 5000
    in_header = evil.replace("\r", "").replace("\n", "")  # (CR and LF would end the header itself)
    server = ServerProcess("--trusted-proxy=127.0.0.1", "--origin=https://ok.example",
                           command="twist" if json_logs else "twistd", json_logs=json_logs).start()
    try:

        async def go():
            a = await connect(server.ws)
            await send(a, {"type": evil, "to": "x"})
            reply = await recv(a)
            assert reply["code"] == "unknown-type" and not CONTROL.search(reply["ref"])
            assert len(reply["ref"]) < 200
            # ("[": not a URL, 400.  ASCII control characters in a header:
            # refused by Autobahn 26.11 and later itself, 400, and passed on
            # by earlier releases, 403 for the origin; the others reach us
            # with every release, and are refused for the origin, 403)
            url_like = in_header.replace("[", "")
            no_ascii_controls = re.sub(r"[\x00-\x1f\x7f]", "", url_like)
            assert CONTROL.search(no_ascii_controls)  # (still BiDi controls and NEL)
            for origin, statuses in ((in_header, {400}), (url_like, {400, 403}), (no_ascii_controls, {403})):
                head = (
                    "GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                    f"Origin: https://{origin}.example\r\nX-Forwarded-For: fe80::1%{origin}\r\n"
                    f"Sec-WebSocket-Extensions: {origin}\r\n\r\n"
                ).encode("utf-8")
                refused = await exchange(server.ports["ws"], head)
                assert refused.status in statuses, bytes(refused.data)
                status_line = bytes(refused.data).split(b"\r\n", 1)[0].decode("utf-8", "replace")
                assert not CONTROL.search(status_line) and len(status_line) < 200
            access = await exchange(server.ports["http"], (
                f"GET /api/health?{'q' * 300} HTTP/1.1\r\nHost: x\r\nUser-Agent: {in_header}\r\n"
                f"Referer: {in_header}\r\nConnection: close\r\n\r\n").encode("utf-8"))
            assert access.status == 200
            await a.close()

        run(go())
        server.wait_for_line(r"refused connection from fe80::1: 403" if not json_logs else "fe80::1")
        server.wait_for_line(r"GET /api/health\?")  # the access log line
        logged = server.output()
        assert "\x1b" not in logged and "\u202e" not in logged and "\u2066" not in logged
        assert "\\x1b" in logged and "zzzz...(+" in logged and "qqqq...(+" in logged
        for line in server.lines:
            if json_logs:
                event = json.loads(line.lstrip("\x1e"))
                for value in event.values():
                    if isinstance(value, str):
                        assert not CONTROL.search(value), (line, value)
            else:
                assert not CONTROL.search(line), line
    finally:
        server.stop()


def test_defaults_expose_less(server):
    """By default /api/stats sends no CORS header, and no response names a library version."""
    status, headers, _ = server.get("/api/stats")
    assert status == 200 and "Access-Control-Allow-Origin" not in headers
    assert headers["Server"] == "signaling" and headers["X-Content-Type-Options"] == "nosniff"

    async def go():
        upgrade = await exchange(server.ports["ws"], b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")  # not an upgrade
        assert b"Autobahn" not in upgrade.data and b"Twisted" not in upgrade.data
        ws = await connect(server.ws)
        assert ws.response.headers["Server"] == "signaling"
        await ws.close()

    run(go())


def test_head_deadline_live():
    """An unfinished request head is answered 408 and closed at --handshake-timeout, on both ports."""
    server = ServerProcess("--handshake-timeout=1").start()
    try:

        async def go():
            http = await open_raw(server.ports["http"], b"GET / HTTP/1.1\r\n")
            ws = await open_raw(server.ports["ws"], b"GET / HTTP/1.1\r\n")
            a, b = await paired(server.ws)
            await asyncio.wait_for(asyncio.gather(http.done, ws.done), TIMEOUT)
            assert http.status == 408 and ws.status is None  # (Autobahn drops it without a response)
            await still_relaying(a, b)
            await a.close()
            await b.close()

        run(go())
    finally:
        server.stop()
