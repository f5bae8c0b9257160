"""
Tier 2: the frame layer and the handshake under hostile input, in memory
(raw frames written under an Autobahn client, fake clock): fragment caps,
frames counted by the rate limit, nothing read after a peer is failed,
handshake size caps, counting from the first byte, safe logs.
"""

import json

import pytest
from fuzzing import frame
from memory import Harness
from twisted.internet.address import IPv4Address, IPv6Address
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure

from signaling.safetext import MAX_CHARS

pytestmark = pytest.mark.memory


def errors(client):
    return [(m["code"], m["ref"]) for m in client.take() if m["type"] == "error"]


def raw(h, client, *frames):
    """Write frames under the client library, as a hostile client would."""
    client.transport.write(b"".join(frames))
    h.flush()


def close_code(client):
    """The code of the close frame the server sent (at once; the TCP close follows at its close timeout)."""
    return client.remoteCloseCode


def test_message_in_too_many_fragments_is_closed_with_1009():
    """More frames in one message than --max-fragments closes with 1009; a message within it is delivered."""
    h = Harness(max_fragments=4, rate=0)
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    text = json.dumps({"type": "offer", "to": b.peer_id, "data": {"sdp": "v=0"}}).encode()
    parts = [text[:5], text[5:10], text[10:15], text[15:]]
    raw(h, a, frame(1, parts[0], fin=False), frame(0, parts[1], fin=False), frame(0, parts[2], fin=False),
        frame(0, parts[3]))
    assert b.take() == [{"type": "offer", "from": a.peer_id, "data": {"sdp": "v=0"}}]
    gone = a.peer_id
    with capturedLogs() as events:
        raw(h, a, frame(1, b"{", fin=False), *[frame(0, b" ", fin=False)] * 10_000)
    assert close_code(a) == 1009
    assert any("more than 4 fragments" in formatEvent(e) for e in events)
    assert b.take() == [{"type": "disconnect", "from": gone, "data": {"reason": "peer_left"}}]


def test_fragment_overhead_counts_against_the_size_limit():
    """Each continuation frame costs 64 bytes besides its payload: tiny fragments cannot buy memory."""
    h = Harness(max_message_size=65536, max_fragments=100_000, rate=0)
    a = h.connect()
    raw(h, a, frame(1, b"[", fin=False), *[frame(0, b" ", fin=False)] * 1100)  # 1100 * 65 > 65536
    assert close_code(a) == 1009
    c = h.connect()
    raw(h, c, frame(1, b"x" * 65536))  # one frame of exactly the limit is a message
    assert errors(c) == [("invalid-json", None)]


def test_continuation_and_control_frames_spend_the_rate_limit():
    """Empty continuation frames and pings spend tokens: a flood of either is closed with 1008 like a message flood."""
    for flood in ([frame(1, b"", fin=False)] + [frame(0, b"", fin=False)] * 300, [frame(9, b"")] * 300):
        h = Harness(rate=10, burst=20, flood_strikes=50, max_fragments=1000)
        a, b = h.connect(), h.connect()
        h.pair(a, b)
        gone = a.peer_id
        with capturedLogs() as events:
            raw(h, a, *flood)
        assert close_code(a) == 1008
        assert sum("closed for flooding" in formatEvent(e) for e in events) == 1
        assert b.take() == [{"type": "disconnect", "from": gone, "data": {"reason": "peer_left"}}]


def test_fragmented_message_over_the_rate_limit_is_dropped_whole():
    """A message whose frames found no token is dropped at its end with one rate-limited error."""
    h = Harness(rate=1, burst=3, flood_strikes=100)
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    text = json.dumps({"type": "offer", "to": b.peer_id}).encode()
    raw(h, a, frame(1, text[:4], fin=False), frame(0, text[4:8], fin=False), frame(0, text[8:12], fin=False),
        frame(0, text[12:]))
    assert b.take() == []
    assert errors(a) == [("rate-limited", None)]
    h.clock.advance(10)
    raw(h, a, frame(1, text))
    assert b.take() == [{"type": "offer", "from": a.peer_id, "data": {}}]


def test_nothing_is_processed_after_a_flooder_is_closed():
    """Frames a flooding peer sent after the one that closed it are dropped unread: one close, no more errors."""
    h = Harness(rate=1, burst=5, flood_strikes=10)
    a, b = h.connect(), h.connect()
    msg = frame(1, json.dumps({"type": "ping", "to": "nobody"}).encode())
    with capturedLogs() as events:
        raw(h, a, msg * 5000)
    assert close_code(a) == 1008
    replies = [m["code"] for m in a.take()]
    assert replies == ["peer-not-found"] * 5 + ["rate-limited"] * 9  # the 10th strike closes
    assert sum("closed for flooding" in formatEvent(e) for e in events) == 1
    assert h.factory.connections.keys() == {b.peer_id}


def test_error_lines_of_one_peer_are_aggregated():
    """A peer's errors are logged a few per interval; the rest are reported as one line with counts."""
    h = Harness(rate=0)
    a = h.connect()
    with capturedLogs() as events:
        for _ in range(200):
            h.send(a, {"type": "nonsense"})
        raw(h, a, frame(1, b"{"))
        h.clock.advance(10)
    lines = [formatEvent(e) for e in events]
    assert len(a.take()) == 201  # every one answered
    assert sum(line.startswith("error unknown-type") for line in lines) == 3
    assert f"errors to {a.peer_id} (127.0.0.1) not logged in the last 10.0s: 197 unknown-type, 1 invalid-json" in lines


def test_client_text_in_errors_and_logs_is_safe():
    """An unknown type is echoed and logged escaped and cut to the documented length, never raw."""
    h = Harness(rate=0)
    a = h.connect()
    evil = "x\r\n[signaling#critical] forged\x1b[2J\u202eevil" + "y" * 200_000
    with capturedLogs() as events:
        h.send(a, {"type": evil, "to": "z"})
    [reply] = a.take()
    ref = reply["ref"]
    assert ref.startswith("x\\x0d\\x0a[signaling#critical] forged\\x1b[2J\\u202eevil")
    assert ref.endswith(f"...(+{len(evil) - MAX_CHARS} chars)") and len(ref) < 200
    [event] = [e for e in events if "error unknown-type" in formatEvent(e)]
    assert event["ref"] == ref
    assert not any(c in formatEvent(event) for c in "\r\n\x1b\u202e")


def test_handshake_size_is_capped_before_it_is_parsed():
    """A request line or headers over --max-request-head are refused with 414/431 as soon as the cap is crossed."""
    from test_hardening import refusal

    h = Harness(max_handshake=4096)
    assert refusal(h, url="ws://127.0.0.1:8080/?" + "q" * 5000) == 414
    assert refusal(h, headers={"Sec-WebSocket-Extensions": "x" * 5000}) == 431
    assert refusal(h, headers={f"X-H{i}": "v" * 60 for i in range(80)}) == 431
    h.connect(headers={"X-Fits": "v" * 3000})
    assert h.factory.admitted == 1


class Socketish(StringTransport):
    """A transport that, like a socket's, lets one unregister no producer."""

    def unregisterProducer(self):
        if self.producer is not None:
            super().unregisterProducer()


def opening(h, address):
    """A connection that has sent nothing yet (no handshake byte): its server protocol and transport."""
    proto = h.factory.buildProtocol(address)
    transport = Socketish(peerAddress=address)
    proto.makeConnection(transport)
    return proto, transport


def test_opening_handshakes_count_from_their_first_byte():
    """Connections that have not finished their handshake already count toward the per-address and total caps."""
    from test_hardening import refusal

    h = Harness(max_connections=4, max_connections_per_ip=2)
    silent = [opening(h, IPv4Address("TCP", "127.0.0.1", 5000 + i))[0] for i in range(2)]
    assert h.factory.admitted == 2 and h.factory.per_ip == {"127.0.0.1": 2}
    assert refusal(h, host="127.0.0.1") == 429
    h.connect(host="127.0.0.2")
    silent[0].connectionLost(Failure(ConnectionDone()))
    assert h.factory.per_ip == {"127.0.0.1": 1, "127.0.0.2": 1}
    h.connect(host="127.0.0.1")
    opening(h, IPv4Address("TCP", "127.0.0.4", 5000))
    assert h.factory.admitted == 4
    _, refused = opening(h, IPv4Address("TCP", "127.0.0.3", 5000))  # the total is reached
    assert refused.value().startswith(b"HTTP/1.1 503 server full") and refused.disconnecting


def test_ipv6_clients_count_by_their_prefix():
    """Per-address limits count an IPv6 client by its /64 (--ipv6-prefix), so one subscriber cannot take them all."""
    h = Harness(max_connections_per_ip=2)
    for suffix in ("::1", "::2"):
        opening(h, IPv6Address("TCP", "2001:db8:1:2" + suffix, 5000))
    assert h.factory.per_ip == {"2001:db8:1:2::/64": 2}
    _, refused = opening(h, IPv6Address("TCP", "2001:db8:1:2:ffff::9", 5000))
    assert refused.value().startswith(b"HTTP/1.1 429")
    opening(h, IPv6Address("TCP", "2001:db8:1:3::1", 5000))  # the next /64 is someone else
    assert h.factory.per_ip == {"2001:db8:1:2::/64": 2, "2001:db8:1:3::/64": 1}


def test_missing_origin_is_let_through_with_an_allow_list():
    """With --origin set, a client that sends no Origin (not a browser) is admitted, as documented."""
    h = Harness(allowed_origins=("https://app.example",))
    h.connect()  # Autobahn's client sends no Origin header unless given one
    h.connect(origin="https://app.example")


@pytest.mark.parametrize("header", ["fe80::1%eth0", "fe80::1%evil-zone", "::ffff:198.51.100.7"])
def test_forwarded_address_is_normalized_before_counting(header):
    """Behind a trusted proxy, the forwarded address is normalized: the same client cannot count apart twice."""
    import ipaddress

    from test_hardening import refusal

    h = Harness(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),), max_connections_per_ip=1)
    a = h.connect(headers={"X-Forwarded-For": header})
    ip = h.registry.get(a.peer_id).ip
    assert ip in ("fe80::1", "198.51.100.7")
    assert refusal(h, headers={"X-Forwarded-For": ip}) == 429


def test_forwarded_address_with_a_control_character_is_never_counted_or_logged_raw():
    """
    A forwarded address with a terminal escape in it is either refused by
    the HTTP layer (Autobahn 26.11 and later refuse control characters in
    header values: 400) or normalized to the address before the zone; never
    counted or logged as sent.
    """
    import ipaddress

    from test_hardening import refusal

    header = "fe80::1%\x1b[31mevil"
    h = Harness(trusted_proxies=(ipaddress.ip_network("127.0.0.1/32"),), max_connections_per_ip=1)
    with capturedLogs() as events:
        a = h.connect(handshake=False, headers={"X-Forwarded-For": header})
    assert not any("\x1b" in formatEvent(e) for e in events)
    if a.received:  # admitted: normalized
        assert a.received[0]["type"] == "welcome"
        assert {p.ip for p in h.factory.connections.values()} == {"fe80::1"}
        assert refusal(h, headers={"X-Forwarded-For": "fe80::1"}) == 429
    else:  # refused by the HTTP layer: nothing counted
        assert int(a.http_status_line.split()[1]) == 400
        assert h.factory.admitted == 0 and h.factory.per_ip == {}


def test_trickled_handshake_is_closed_at_the_deadline():
    """Handshake bytes trickled one a second do not extend --handshake-timeout; the connection is dropped at it."""
    h = Harness(handshake_timeout=10)
    proto, transport = opening(h, IPv4Address("TCP", "127.0.0.1", 5000))
    proto.dataReceived(b"GET / HTTP/1.1\r\n")
    for _ in range(9):
        h.clock.advance(1)
        proto.dataReceived(b"X")
        assert not transport.disconnecting
    h.clock.advance(1)
    assert transport.disconnecting
    proto.connectionLost(Failure(ConnectionDone()))
    assert h.factory.admitted == 0
