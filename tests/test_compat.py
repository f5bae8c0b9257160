"""
Tier 2: every assumption signaling._compat and signaling._tcp make about
Autobahn's and Twisted's internals, checked against the installed versions.
Each test fails loudly when a library changes underneath, instead of a limit
or an optimisation quietly ceasing to work.
"""
import json

import autobahn.websocket.protocol as autobahn_protocol
import pytest
from autobahn.twisted.websocket import WebSocketServerProtocol
from fuzzing import frame
from memory import Harness
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.testing import StringTransport
from twisted.trial import unittest
from twisted.web.http import HTTPChannel

from signaling import _compat, _tcp
from signaling.protocol import SignalingServerProtocol

pytestmark = pytest.mark.memory


def test_connection_made_quietly_skips_the_option_dump(monkeypatch):
    """
    Autobahn copies CONFIG_ATTRS from the factory in _connectionMade and
    pretty-prints them for every connection; with the options copied first,
    its loop runs over nothing (no pformat of the options), and every option
    is still on the connection.
    """
    dumps = []
    monkeypatch.setattr(autobahn_protocol, "pformat", lambda value: dumps.append(value) or "")
    h = Harness()
    a = h.connect()
    server_dumps = [d for d in dumps if isinstance(d, list) and not any(
        isinstance(entry, tuple) and str(entry[-1]).endswith("ClientFactory") for entry in d
    )]
    assert server_dumps == [[]]  # Autobahn's log of the options it copied for the server side: empty
    for name in set(WebSocketServerProtocol.CONFIG_ATTRS) - set(_compat.HANDSHAKE_ONLY):  # (those are dropped)
        assert getattr(a.server, name) == getattr(h.factory, name), name
    # a new connection has them all, as the factory has them (a function unbound: it is not a method)
    fresh = h.factory.buildProtocol(None)
    for name in WebSocketServerProtocol.CONFIG_ATTRS:
        assert getattr(fresh, name) is getattr(h.factory, name), name
    assert not set(vars(fresh)) & set(WebSocketServerProtocol.CONFIG_ATTRS)  # (the options are its class's)


def test_a_compression_offer_is_declined_and_the_peer_welcomed():
    """
    Browsers offer permessage-deflate; Autobahn calls the option
    perMessageCompressionAccept with the offers, which this server declines
    (the fast frame path needs uncompressed frames).
    """
    h = Harness()
    a = h.connect(headers={"Sec-WebSocket-Extensions": "permessage-deflate; client_max_window_bits"})
    assert a.server._perMessageCompress is None and a.websocket_extensions_in_use == []


def test_timer_is_ours():
    """Autobahn schedules its handshake timeout through the factory's timer: our clock, exactly."""
    h = Harness(handshake_timeout=7.5)
    proto = h.factory.buildProtocol(None)
    proto.makeConnection(StringTransport())
    [call] = h.clock.getDelayedCalls()
    assert call.getTime() == h.clock.seconds() + 7.5


def test_handshake_only_attributes_exist_at_open(monkeypatch):
    """Every attribute dropped as handshake-only is there when the connection opens (a rename would keep it)."""
    seen = []
    real = _compat.drop_handshake_state

    def spy(proto):
        # (the options among them are the class's: SignalingFactory.concrete)
        seen.append(set(_compat.HANDSHAKE_ONLY) - set(vars(proto)) - set(vars(type(proto))))
        real(proto)

    monkeypatch.setattr(_compat, "drop_handshake_state", spy)
    h = Harness()
    a = h.connect()
    assert seen == [set()]
    assert not set(_compat.HANDSHAKE_ONLY) & set(vars(a.server)) and a.server.send_queue == ()


def test_fast_path_is_taken(monkeypatch):
    """Small text frames never reach Autobahn's frame parser: its processData is not called for them."""
    calls = []
    real = WebSocketServerProtocol.processData
    monkeypatch.setattr(WebSocketServerProtocol, "processData", lambda self: calls.append(1) or real(self))
    h = Harness(rate=0)
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    calls.clear()
    for _ in range(20):
        h.send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "v=0"}})
    assert len(b.take()) == 20 and calls == []
    a.transport.write(frame(1, b"[", fin=False) + frame(0, b"]"))  # fragments: Autobahn's
    h.flush()
    assert calls != []


def test_autobahn_calls_our_frame_hooks_for_every_frame(monkeypatch):
    """Autobahn calls onFrameBegin for each frame it parses (continuations and control frames too)."""
    begun = []
    real = SignalingServerProtocol.onFrameBegin
    monkeypatch.setattr(SignalingServerProtocol, "onFrameBegin", lambda self: begun.append(1) or real(self))
    h = Harness(rate=0)
    a = h.connect()
    text = json.dumps({"type": "ping", "to": "x"}).encode()
    a.transport.write(frame(1, text[:3], fin=False) + frame(9, b"") + frame(0, text[3:]))
    h.flush()
    assert len(begun) == 3
    assert a.take()[0]["code"] == "peer-not-found"


def test_parser_state_names():
    """The parser state the fast path checks exists, and traffic seen cancels the pending keepalive timeout."""
    h = Harness(ping_interval=5, ping_timeout=2)
    a = h.connect()
    proto = a.server
    assert _compat.between_frames(proto) and not _compat.between_frames_with_data(proto)
    assert _compat.sending_idle(proto)
    for name in ("autoPingTimeoutCall", "autoPingRestartOnAnyTraffic", "_cancelAutoPingTimeoutCall"):
        assert hasattr(proto, name), name
    h.clock.advance(5)  # the server pings: its timeout is pending until traffic comes
    assert proto.autoPingTimeoutCall is not None and proto.autoPingRestartOnAnyTraffic
    _compat.traffic_seen(proto)  # what the fast path does for each frame it takes
    assert proto.autoPingTimeoutCall is None


def test_closed_deferred_would_tie_a_cycle():
    """Autobahn resolves is_closed with the protocol itself (the cycle forget_closed_deferred cuts)."""
    h = Harness()
    a = h.connect()
    proto = a.server
    results = []
    proto.is_closed.addCallback(results.append)
    a.sendClose(1000)
    h.flush()
    assert results == [proto] and proto.is_closed is None


def test_http_channel_internals():
    """HTTPChannel counts head bytes in _receivedHeaderSize and sets length from the headers, as relied on."""
    channel = HTTPChannel()
    channel.makeConnection(StringTransport())
    assert _compat.head_size_so_far(channel) == 0
    channel.dataReceived(b"GET / HTTP/1.1\r\nX-A: 12345\r\n")
    assert _compat.head_size_so_far(channel) == len(b"GET / HTTP/1.1") + len(b"X-A: 12345")
    bodies = []
    channel.allHeadersReceived = lambda: bodies.append(_compat.declared_body(channel))
    channel.dataReceived(b"Content-Length: 42\r\n\r\n")
    assert bodies == [42]
    assert isinstance(HTTPChannel().requests, list)


@pytest.mark.live
class SocketLevel(unittest.TestCase):
    """_tcp's reading of Twisted's TCP transport, on real loopback sockets."""

    timeout = 30

    @inlineCallbacks
    def test_unsent_bytes_and_direct_writes(self):
        """
        A direct write to an idle connection is taken whole by the socket;
        what a peer does not read piles up where unsent_bytes sees it (what
        --max-outbound-buffer measures); half_close is there for TCP.
        """
        accepted = Deferred()

        class Server(protocol.Protocol):
            def connectionMade(self):
                accepted.callback(self)

        factory = protocol.Factory.forProtocol(Server)
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), protocol.Protocol()
        )
        client.transport.pauseProducing()  # a peer that does not read
        server = yield accepted
        transport = server.transport
        self.assertTrue(_tcp.write(transport, b"x" * 1000))
        self.assertEqual(_tcp.unsent_bytes(transport), 0)
        chunk = b"y" * 65536
        for _ in range(200):  # 12.5 MiB: far more than both kernels' buffers
            _tcp.write(transport, chunk)
        self.assertGreater(_tcp.unsent_bytes(transport), 1024 * 1024)
        self.assertTrue(hasattr(transport, "loseWriteConnection"))
        transport.abortConnection()
        client.transport.abortConnection()


def _closing_harness():
    h = Harness(max_message_size=65536)
    return h, h.connect()


@pytest.mark.parametrize("how", ["peer", "server", "failed", "lost"])
def test_who_closed(how):
    """
    closed_by_peer, failed_by_us, closed_by_us and local_close_code read
    Autobahn's remoteCloseCode, closedByMe, failedByMe and localCloseCode:
    which of them is set for each way a connection ends (resume and the
    disconnect metrics depend on it).
    """
    h, client = _closing_harness()
    server = client.server
    if how == "peer":
        client.sendClose(1000)
    elif how == "server":
        server.close(4409, "replaced")
    elif how == "failed":
        client.transport.write(frame(0x3, b"x"))  # a reserved opcode: Autobahn fails it with 1002
    else:
        client.transport.abortConnection()
    h.flush()
    seen = (
        _compat.closed_by_peer(server), _compat.failed_by_us(server), _compat.closed_by_us(server),
        _compat.local_close_code(server),
    )
    assert seen == {
        "peer": (True, False, False, 1000),  # (the server's reply echoes the code)
        "server": (False, False, True, 4409),
        "failed": (False, True, True, 1002),
        "lost": (False, False, False, None),
    }[how]
