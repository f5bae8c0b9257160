"""
Tier 2: the HTTP port's defences (signaling.httpguard) on a fake clock, with
bytes written to the channel as a hostile client would: connection caps,
the request-head deadline under trickling, head sizes, bodies, pipelining.
"""
import re

import pytest
from twisted.internet.address import IPv4Address
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.web.resource import Resource

from signaling.httpguard import MAX_PIPELINED, GuardedSite

pytestmark = pytest.mark.memory


class Page(Resource):
    isLeaf = True

    def __init__(self):
        super().__init__()
        self.rendered = 0

    def render_GET(self, request):
        self.rendered += 1
        return b"hello"

    render_POST = render_GET


def site(**kwargs):
    clock = Clock()
    page = Page()
    return GuardedSite(page, clock, **kwargs), clock, page


def connect(site, host="203.0.113.1", port=40000):
    transport = StringTransport(peerAddress=IPv4Address("TCP", host, port))
    channel = site.buildProtocol(transport.getPeer())
    channel.makeConnection(transport)
    return channel, transport


def status(transport):
    """The status codes of the responses written so far."""
    return [int(code) for code in re.findall(rb"HTTP/1\.1 (\d{3}) ", transport.value())]


def test_connections_are_capped_per_address_and_in_total():
    """Past the per-address cap a connection gets 429, past the total 503, at once and without being read."""
    s, _, _ = site(max_connections=3, max_per_address=2)
    kept = [connect(s) for _ in range(2)]
    refused, transport = connect(s)
    assert status(transport) == [429] and transport.disconnecting
    connect(s, host="203.0.113.2")
    _, transport = connect(s, host="203.0.113.3")
    assert status(transport) == [503] and transport.disconnecting
    assert (s.counts.total, s.counts.per_key) == (3, {"203.0.113.1": 2, "203.0.113.2": 1})
    kept[0][0].connectionLost(None)
    assert s.counts.per_key == {"203.0.113.1": 1, "203.0.113.2": 1}
    _, transport = connect(s, host="203.0.113.1")
    assert not transport.disconnecting


def test_trickled_head_gets_408_at_the_deadline():
    """One header byte a second does not extend the head deadline: 408 and closed at 10 s."""
    s, clock, page = site(head_timeout=10)
    channel, transport = connect(s)
    channel.dataReceived(b"GET / HTTP/1.1\r\n")
    for _ in range(9):
        clock.advance(1)
        channel.dataReceived(b"X")
        assert not transport.disconnecting
    clock.advance(1)
    assert status(transport) == [408] and transport.disconnecting
    assert page.rendered == 0 and s.counts.total == 1
    channel.connectionLost(None)
    assert s.counts.total == 0 and clock.getDelayedCalls() == []


def test_kept_alive_connection_idles_at_most_the_deadline():
    """After a response, the next request head must start and end within the deadline too."""
    s, clock, page = site(head_timeout=10)
    channel, transport = connect(s)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(transport) == [200] and page.rendered == 1
    clock.advance(9.9)
    channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(transport) == [200, 200]
    clock.advance(10)
    assert status(transport) == [200, 200, 408] and transport.disconnecting


def test_head_sizes_are_capped():
    """A request line over the cap gets 414, headers over it 431, before anything is routed."""
    s, _, page = site(max_head=1024)
    channel, long_line = connect(s)
    channel.dataReceived(b"GET /?" + b"q" * 2000)
    assert status(long_line) == [414] and long_line.disconnecting
    channel, transport = connect(s)
    channel.dataReceived(b"GET / HTTP/1.1\r\n" + b"".join(b"X-H%d: %s\r\n" % (i, b"v" * 50) for i in range(30)))
    assert status(transport) == [431] and transport.disconnecting
    channel, transport = connect(s)
    channel.dataReceived(b"GET / HTTP/1.1\r\nX-Big: " + b"v" * 2000 + b"\r\n")
    assert status(transport) == [431]
    assert page.rendered == 0


def test_bodies_are_refused_before_they_are_read():
    """A declared body (any length, or chunked) gets 413 as soon as the headers are in; nothing is routed."""
    s, _, page = site()
    for head in (b"POST / HTTP/1.1\r\nContent-Length: 2147483648\r\n\r\n",
                 b"GET /ws HTTP/1.1\r\nContent-Length: 314572800\r\n\r\n",
                 b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"):
        channel, transport = connect(s)
        channel.dataReceived(head + b"x" * 1000)
        assert status(transport) == [413] and transport.disconnecting
    channel, transport = connect(s)
    channel.dataReceived(b"GET / HTTP/1.1\r\nContent-Length: 0\r\n\r\n")
    assert status(transport) == [200]
    assert page.rendered == 1


def test_pipelining_is_bounded():
    """More than 16 requests answered from one read close the connection: the rest are never handled."""
    s, _, page = site()
    channel, transport = connect(s)
    with capturedLogs() as events:
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n" * 1000)
    assert page.rendered == MAX_PIPELINED + 1
    assert transport.disconnecting
    assert any("pipelining without reading" in formatEvent(e) for e in events)
    channel, transport = connect(s)
    for _ in range(50):  # one at a time, as clients that read do: no limit
        channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert status(transport) == [200] * 50 and not transport.disconnecting


def test_refusals_are_logged_within_a_budget():
    """A flood of refused connections logs a few lines, then one line with the count of the rest."""
    s, clock, _ = site(max_per_address=1, head_timeout=0)
    connect(s)
    with capturedLogs() as events:
        for i in range(500):
            connect(s, port=50000 + i)
        clock.advance(10)
    lines = [formatEvent(e) for e in events]
    assert len(lines) == 6, lines
    assert lines[-1] == "HTTP: refusals not logged in the last 10.0s: 495 429"


def test_websocket_upgrade_moves_the_connection_to_the_websocket_counts():
    """A WebSocket at /ws stops counting as an HTTP connection once it has taken the connection over."""
    from memory import Harness

    from signaling.registry import Registry
    from signaling.web import SignalingWeb, WebSocketTakeover

    h = Harness()
    web = SignalingWeb(Registry(h.clock), WebSocketTakeover(h.factory))
    s = GuardedSite(web.resource(), h.clock, max_per_address=1)
    channel, transport = connect(s)
    transport.protocol = channel  # as a socket's transport has (the takeover replaces it)
    channel.dataReceived(
        b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
    h.flush()
    assert transport.value().startswith(b"HTTP/1.1 101")
    assert s.counts.total == 0 and h.factory.admitted == 1
    _, another = connect(s)  # the address's one HTTP slot is free again
    assert not another.disconnecting


def test_access_log_lines_are_safe_and_budgeted():
    """
    The access log line escapes and cuts what the client chose (URI, user
    agent, referrer); past 100 lines per 10 s the rest are counted in one line.
    """
    s, clock, _ = site(head_timeout=0)
    s.doStart()  # (opens the access log: the global log, as twistd runs it)
    channel, _ = connect(s)
    with capturedLogs() as events:
        channel.dataReceived(
            b"GET /?" + b"q" * 5000 + b" HTTP/1.1\r\nHost: x\r\nUser-Agent: a\x1b[2J\xe2\x80\xae\"b\r\n"
            b"Referer: " + b"r" * 300 + b"\r\n\r\n"
        )
        for _ in range(150):
            channel.dataReceived(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        clock.advance(10)
    lines = [formatEvent(e) for e in events]
    first = lines[0]
    assert '"GET /?' + "q" * 98 + "...(+" in first
    assert '"a\\x1b[2J\\u202e\\"b"' in first and "r" * 101 not in first
    assert all("\x1b" not in line and "\u202e" not in line for line in lines)
    assert sum(line.startswith('"203.0.113.1" - - ') for line in lines) == 100
    assert lines[-1] == "HTTP: access log lines not written in the last 10.0s: 51 requests"
    s.doStop()
