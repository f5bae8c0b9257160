"""Tier 2: the WebSocket protocol in memory (Autobahn client <-> our server over iosim)."""

import json

import pytest
from memory import Client, Harness
from twisted.internet.defer import Deferred, fail
from twisted.logger import capturedLogs, formatEvent
from twisted.python.failure import Failure
from zope.interface import implementer

from signaling.errors import Unavailable
from signaling.registry import IClusterRegistry, SignalingError

pytestmark = pytest.mark.memory


@pytest.fixture
def h():
    return Harness(rate=1000, burst=1000)


def errors(client):
    return [(m["code"], m["ref"]) for m in client.take() if m["type"] == "error"]


def test_welcome_registers_peer(h):
    """Each connection is welcomed with its own id and appears idle in the registry with its address."""
    a, b = h.connect(), h.connect()
    assert a.peer_id != b.peer_id
    peer = h.registry.get(a.peer_id)
    assert (peer.state, peer.target, peer.ip) == ("idle", None, "127.0.0.1")
    assert peer.connected_at == h.clock.seconds()


def test_default_ids_are_uuid4():
    """Without an injected id maker, ids are fresh uuid4 strings."""
    import uuid

    from signaling.protocol import SignalingFactory
    from signaling.settings import Settings

    factory = SignalingFactory(None, Settings())
    ids = {factory.new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(uuid.UUID(i).version == 4 for i in ids)


def test_pairing_and_relays(h):
    """ping/pong pair two peers; offer, answer and ice-candidate are relayed with from and data untouched."""
    a, b = h.connect(), h.connect()
    h.send(a, {"type": "ping", "to": b.peer_id, "data": {"test": True}})
    assert b.take() == [{"type": "ping", "from": a.peer_id, "data": {"test": True}}]
    assert h.registry.get(a.peer_id).state == "connecting"
    h.send(b, {"type": "pong", "to": a.peer_id})
    assert a.take() == [{"type": "pong", "from": b.peer_id, "data": {}}]
    assert h.registry.get(a.peer_id).state == h.registry.get(b.peer_id).state == "connected"
    data = {
        "offer": {"type": "offer", "sdp": "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=ünï\r\n"},
        "answer": {"type": "answer", "sdp": "v=0\r\n", "nested": [1, 2.5, None, {"x": "漢"}]},
        "ice-candidate": {"candidate": "candidate:1 1 UDP 2113667326 127.0.0.1 5 typ host",
                          "sdpMLineIndex": 0, "sdpMid": "0"},
    }
    for kind, sender, receiver in [("offer", a, b), ("answer", b, a), ("ice-candidate", a, b)]:
        h.send(sender, {"type": kind, "to": receiver.peer_id, "data": data[kind], "x": 1})
        assert receiver.take() == [{"type": kind, "from": sender.peer_id, "data": data[kind]}]
    assert a.take() == [] and b.take() == []


def test_disconnect_message(h):
    """disconnect is relayed and returns both partners to idle."""
    a, b = h.connect(), h.connect()
    h.pair(a, b)
    h.send(b, {"type": "disconnect", "to": a.peer_id, "data": {"reason": "user_disconnect"}})
    assert a.take() == [
        {"type": "disconnect", "from": b.peer_id, "data": {"reason": "user_disconnect"}}
    ]
    assert h.registry.get(a.peer_id).state == h.registry.get(b.peer_id).state == "idle"
    h.send(a, {"type": "offer", "to": b.peer_id, "data": {}})
    assert errors(a) == [("invalid-state", "offer")]


def test_every_error_code_keeps_socket_usable(h):
    """Each malformed or disallowed message gets its error code and ref, and the socket keeps working."""
    a, b, c = h.connect(), h.connect(), h.connect()
    cases = [
        (b"{not json", "invalid-json", None),
        (b"[1,2]", "invalid-message", None),
        (json.dumps({"type": "ping"}).encode(), "invalid-message", "ping"),
        (json.dumps({"type": "ping", "to": b.peer_id, "data": 5}).encode(), "invalid-message", "ping"),
        (json.dumps({"type": "hello", "to": b.peer_id}).encode(), "unknown-type", "hello"),
        (json.dumps({"type": "ping", "to": "nobody"}).encode(), "peer-not-found", "ping"),
        (json.dumps({"type": "ping", "to": a.peer_id}).encode(), "peer-not-found", "ping"),
        (json.dumps({"type": "offer", "to": b.peer_id}).encode(), "invalid-state", "offer"),
        (json.dumps({"type": "pong", "to": b.peer_id}).encode(), "invalid-state", "pong"),
        (json.dumps({"type": "disconnect", "to": b.peer_id}).encode(), "invalid-state", "disconnect"),
    ]
    for payload, code, ref in cases:
        a.sendMessage(payload)
        h.flush()
        got = a.take()
        assert len(got) == 1, (payload, got)
        assert got[0]["type"] == "error"
        assert (got[0]["code"], got[0]["ref"]) == (code, ref), payload
        assert isinstance(got[0]["message"], str) and got[0]["message"]
    a.sendMessage(b"\x01\x02", isBinary=True)
    h.flush()
    [err] = a.take()
    assert (err["code"], err["ref"]) == ("invalid-message", None)
    assert "binary" in err["message"]
    h.pair(b, c)
    h.send(a, {"type": "ping", "to": b.peer_id})
    assert errors(a) == [("peer-busy", "ping")]
    # still usable: a normal ping goes through
    d = h.connect()
    h.send(a, {"type": "ping", "to": d.peer_id})
    assert d.take() == [{"type": "ping", "from": a.peer_id, "data": {}}]
    assert b.take() == [] and c.take() == []


def test_rate_limit_then_flood_close():
    """Over the rate a peer gets rate-limited errors; a peer that keeps flooding is closed with 1008."""
    h = Harness(rate=1, burst=3, flood_strikes=5)
    a, b = h.connect(), h.connect()
    for _ in range(3):
        h.send(a, {"type": "ping", "to": b.peer_id})
    assert len(b.take()) == 3
    h.send(a, {"type": "ping", "to": b.peer_id})
    [err] = a.take()
    assert (err["code"], err["ref"]) == ("rate-limited", None)
    h.clock.advance(1)
    h.send(a, {"type": "ping", "to": b.peer_id})
    assert a.take() == [] and len(b.take()) == 1
    a_id = a.peer_id
    for _ in range(5):
        a.sendMessage(b"{}")
    h.flush()
    assert [m["code"] for m in a.take()] == ["rate-limited"] * 4
    assert a.remoteCloseCode == 1008  # the close frame, at once
    assert a_id not in h.registry  # and its session ended with it
    h.clock.advance(h.factory.settings.close_timeout)  # its socket, unread, ends by the close timeout
    h.flush()
    assert a.closed_with is not None and b.closed_with is None


def test_oversized_message_closes_1009():
    """A message over the size limit closes the socket with 1009, and the peer leaves the registry."""
    h = Harness(max_message_size=65536)
    a, b = h.connect(), h.connect()
    a_id = a.peer_id
    h.pair(a, b)
    sdp = "a=x" * (60000 // 3)
    h.send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": sdp}})
    assert b.take()[0]["data"]["sdp"] == sdp
    h.send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": sdp + sdp}})
    assert a.remoteCloseCode == 1009
    assert b.take() == [{"type": "disconnect", "from": a_id, "data": {"reason": "peer_left"}}]
    assert a_id not in h.registry


def test_peer_left_on_close(h):
    """When a socket closes, its partner and everyone connecting to it go idle and get peer_left."""
    a, b, c, d = (h.connect() for _ in range(4))
    a_id = a.peer_id
    h.send(c, {"type": "ping", "to": a_id})
    h.send(d, {"type": "ping", "to": b.peer_id})
    h.pair(a, b)
    a.sendClose(1000)
    h.flush()
    left = {"type": "disconnect", "from": a_id, "data": {"reason": "peer_left"}}
    assert b.take() == [left]
    assert c.take() == [left]
    assert d.take() == []
    assert a_id not in h.registry
    assert h.registry.get(b.peer_id).state == "idle"
    assert h.registry.get(c.peer_id).state == "idle"
    assert h.registry.get(d.peer_id).state == "connecting"
    assert a_id not in h.factory.connections


def test_first_pings_are_spread_over_the_second_half_of_the_interval():
    """
    Peers that connect at the same instant are first pinged at their own
    point in the second half of the interval (the factory's ping_phase),
    and an interval after each pong from then on: the spread stays.
    """
    pinged = []

    class Counting(Client):
        def onPing(self, payload):
            pinged.append((self.index, h.clock.seconds() - start))
            super().onPing(payload)

    h = Harness(ping_interval=10, ping_timeout=5)
    phases = iter([0.0, 0.5, 1.0])
    h.factory.ping_phase = lambda: next(phases)
    start = h.clock.seconds()
    peers = []
    for i in range(3):
        c = h.connect()
        c.__class__, c.index = Counting, i
        peers.append(c)
    for _ in range(100):  # 25 s in quarter seconds
        h.clock.advance(0.25)
        h.flush()
    assert pinged == [(0, 5.0), (1, 7.5), (2, 10.0), (0, 15.0), (1, 17.5), (2, 20.0), (0, 25.0)]
    assert all(c.closed_with is None for c in peers)


def test_keepalive_timeout_drops_dead_peer():
    """
    A peer that stops answering WebSocket pings is dropped; as a lost socket
    it keeps its session for the grace period (the partner is not told),
    after which it is removed and its partner told peer_left.
    """

    class Deaf(Client):
        def onPing(self, payload):
            pass

    h = Harness(ping_interval=5, ping_timeout=2, resume_grace=10)
    a = h.connect()
    b = h.connect()
    h.pair(a, b)
    a.__class__ = Deaf
    a_id = a.peer_id
    for _ in range(8):
        h.clock.advance(1)
        h.flush()
    assert a.closed_with is not None
    assert b.take() == [] and h.registry.get(a_id).online is False  # in grace
    h.clock.advance(10)
    h.flush()
    assert b.closed_with is None
    assert b.take() == [{"type": "disconnect", "from": a_id, "data": {"reason": "peer_left"}}]
    assert a_id not in h.registry
    assert h.registry.get(b.peer_id).state == "idle"


def test_shutdown_closes_with_1001(h):
    """shutdown sends 1001 to every peer and fires once all have closed."""
    a, b = h.connect(), h.connect()
    d = h.factory.shutdown(5)
    assert not d.called
    h.flush()
    assert a.closed_with[1] == 1001 and b.closed_with[1] == 1001
    assert d.called and d.result == 2
    # the server went away: each may resume (on another node, or after a restart: docs/protocol.rst)
    assert [p.online for p in h.registry.peers()] == [False, False] and len(h.factory.sessions) == 2


def test_shutdown_drain_bound(h):
    """shutdown gives up on peers that do not answer within the drain bound and drops them."""
    h.connect()
    b = h.connect()
    stuck = h.pumps.pop(0)  # the first client's bytes no longer move
    d = h.factory.shutdown(3)
    h.flush()
    assert b.closed_with[1] == 1001
    assert not d.called
    h.clock.advance(3)
    assert d.called
    assert stuck.serverIO.disconnecting


def test_connection_during_shutdown_is_turned_away(h):
    """A handshake that arrives after shutdown began is refused and nothing is registered."""
    h.factory.shutdown(1)
    with capturedLogs() as events:
        a = h.connect(handshake=False)
    assert a.closed_with is not None and a.received == []
    assert len(h.registry) == 0 and h.factory.admitted == 0
    assert any(e.get("status") == 503 for e in events)


def test_handshake_completed_during_shutdown_is_closed_1001(h):
    """A connection whose handshake was admitted just before shutdown is closed with 1001 on open."""
    original = h.factory.join

    def join_then_shutdown(proto):
        h.factory.shutting_down = True
        return original(proto)

    h.factory.join = join_then_shutdown
    a = h.connect(handshake=False)
    assert a.received == []
    assert a.closed_with[1] == 1001


def test_logs_relay_metadata_never_bodies(h):
    """Relays are logged with type, from, to and size, never with the SDP or candidate text."""
    a, b = h.connect(), h.connect()
    with capturedLogs() as events:
        h.pair(a, b)
        h.send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "SECRET-SDP"}})
        h.send(a, {"type": "ice-candidate", "to": b.peer_id, "data": {"candidate": "SECRET-ICE"}})
        h.send(a, {"type": "nope", "to": b.peer_id})
    text = "\n".join(formatEvent(e) for e in events)
    assert "SECRET" not in text
    relays = [e for e in events if e.get("log_format", "").startswith("relay")]
    assert [(e["type"], e["sender"], e["to"]) for e in relays] == [
        ("ping", a.peer_id, b.peer_id),
        ("pong", b.peer_id, a.peer_id),
        ("offer", a.peer_id, b.peer_id),
        ("ice-candidate", a.peer_id, b.peer_id),
    ]
    assert all(e["size"] > 0 for e in relays)
    assert any(e.get("code") == "unknown-type" for e in events)
    assert f"peer {a.peer_id} connecting -> connected" in text


class PendingRegistry:
    """Wraps a registry so that every operation answers later, when released."""

    def __init__(self, inner):
        self.inner = inner
        self.waiting = []

    def __getattr__(self, name):
        method = getattr(self.inner, name)
        if name not in ("add", "remove", "ping", "pong", "check_paired", "disconnect"):
            return method

        def call(*args):
            d = Deferred()
            self.waiting.append((d, method, args))
            return d

        return call

    def release(self):
        while self.waiting:
            self.release_one()

    def release_one(self):
        """Answer the oldest waiting operation (which may queue the next one)."""
        d, method, args = self.waiting.pop(0)
        try:
            result = method(*args)
        except SignalingError:
            d.errback(Failure())
        else:
            d.callback(result)


def test_asynchronous_registry_keeps_order():
    """With a registry that answers later, each connection's messages still apply in arrival order."""
    from signaling.registry import Registry

    h = Harness()
    pending = PendingRegistry(Registry(h.clock))
    h.factory.registry = pending
    a = h.connect(handshake=False)
    b = h.connect(handshake=False)
    assert a.received == []  # not welcomed until the registry has added it
    pending.release()
    h.flush()
    a.take(), b.take()
    a_id = a.peer_id
    h.send(a, {"type": "ping", "to": b.peer_id})
    h.send(a, {"type": "offer", "to": b.peer_id})  # queued behind the ping
    h.send(b, {"type": "pong", "to": a.peer_id})
    # a's offer waits for a's ping; b's pong is independent
    assert [args for _, _, args in pending.waiting] == [(a_id, b.peer_id), (b.peer_id, a_id)]
    assert b.take() == []
    pending.release_one()  # a's ping: relayed; a's offer now asks the registry
    h.flush()
    assert b.take() == [{"type": "ping", "from": a_id, "data": {}}]
    assert [args for _, _, args in pending.waiting] == [(b.peer_id, a_id), (a_id, b.peer_id)]
    pending.release_one()  # b's pong pairs them
    h.flush()
    assert a.take() == [{"type": "pong", "from": b.peer_id, "data": {}}]
    pending.release_one()  # a's offer, checked after the pairing
    h.flush()
    assert b.take() == [{"type": "offer", "from": a_id, "data": {}}]
    assert a.take() == []
    a.sendClose(1000)
    h.flush()
    pending.release()
    h.flush()
    assert b.take() == [{"type": "disconnect", "from": a_id, "data": {"reason": "peer_left"}}]
    assert a_id not in pending.inner


def test_registry_bug_is_reported_not_fatal():
    """An unexpected registry failure is logged, the sender gets internal-error, and the connection lives."""
    h = Harness()
    a, b = h.connect(), h.connect()

    class Broken:
        def __getattr__(self, name):
            return getattr(h.registry, name)

        def ping(self, sender, to):
            return fail(RuntimeError("boom"))

    real = h.factory.registry
    h.factory.registry = Broken()
    with capturedLogs() as events:
        h.send(a, {"type": "ping", "to": b.peer_id})
    assert errors(a) == [("internal-error", "ping")]
    assert any(e.get("log_failure") for e in events)
    h.factory.registry = real
    h.send(a, {"type": "ping", "to": b.peer_id})
    assert b.take()[0]["type"] == "ping"


def test_open_connections_drop_handshake_state(h):
    """Once open, a connection keeps none of the handshake's data (idle connections stay small) and still works."""
    from signaling._compat import HANDSHAKE_ONLY as _HANDSHAKE_ONLY

    a, b = h.connect(), h.connect()
    assert not set(_HANDSHAKE_ONLY) & set(vars(a.server))
    assert a.server.send_queue == ()
    h.pair(a, b)
    h.send(a, {"type": "offer", "to": b.peer_id, "data": {"sdp": "v=0"}})
    assert b.take() == [{"type": "offer", "from": a.peer_id, "data": {"sdp": "v=0"}}]


def test_relay_to_a_peer_elsewhere_checks_and_routes_in_one_call():
    """
    A registry shared with other nodes offers relay_across: offers,
    answers and candidates for a peer not connected here use it (one round
    trip) instead of check_paired then route; local peers keep the local path.
    """
    from twisted.internet.defer import succeed

    h = Harness()
    calls = []

    @implementer(IClusterRegistry)
    class Cluster:
        ready = True
        resume_secret = None

        def __getattr__(self, name):
            return getattr(h.registry, name)

        def route(self, to, frame):
            calls.append(("route", to, json.loads(frame)))
            return succeed(True)

        def relay_across(self, sender, to, frame, answer, *args):
            calls.append(("relay_across", to, json.loads(frame)))
            try:
                h.registry.check_paired(sender, to)
            except SignalingError as e:
                answer(e, *args)
            else:
                answer(True, *args)

    h.factory.registry = Cluster()
    a, b, c = h.connect(), h.connect(), h.connect()
    h.registry.add("remote", "10.0.0.2")
    h.send(a, {"type": "ping", "to": "remote"})
    h.registry.pong("remote", a.peer_id)
    h.send(a, {"type": "offer", "to": "remote", "data": {"sdp": "v=0"}})
    assert calls == [
        ("route", "remote", {"type": "ping", "from": a.peer_id, "data": {}}),
        ("relay_across", "remote", {"type": "offer", "from": a.peer_id, "data": {"sdp": "v=0"}}),
    ]
    assert a.take() == []
    h.send(b, {"type": "answer", "to": "remote"})  # not paired with it: refused as check_paired would
    assert errors(b) == [("invalid-state", "answer")]
    h.pair(b, c)
    calls.clear()
    h.send(b, {"type": "offer", "to": c.peer_id})  # a local peer: no round trip
    assert calls == [] and c.take() == [{"type": "offer", "from": b.peer_id, "data": {}}]


@implementer(IClusterRegistry)
class ClusterNode:
    """A cluster registry stand-in over the in-memory one: not ready until told, and able to fail adds."""

    def __init__(self, inner):
        self.inner = inner
        self.ready = False
        self.state = "starting"
        self.failing = False
        self.resume_secret = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def health(self):
        return {"registry": "test", "redis": self.state}

    def add(self, peer_id, ip, conn=""):
        if self.failing:
            return fail(Unavailable("the signaling cluster's state (Redis) is unreachable; try again"))
        return self.inner.add(peer_id, ip)


def test_cluster_node_admits_no_peer_until_registered():
    """While a cluster registry is not ready, handshakes are refused with 503 naming why, and nothing is registered."""
    from test_hardening import refusal

    h = Harness()
    node = ClusterNode(h.registry)
    h.factory.registry = node
    with capturedLogs() as events:
        assert refusal(h) == 503
    assert any("cluster state unavailable (starting)" in formatEvent(e) for e in events)
    assert len(h.registry) == 0 and h.factory.admitted == 0
    node.state = "disconnected"
    assert refusal(h) == 503
    node.ready, node.state = True, "connected"
    a, b = h.connect(), h.connect()
    h.pair(a, b)


def test_peer_that_cannot_be_registered_is_never_welcomed():
    """If adding the peer to the shared state fails, the socket is closed with 1013 and no welcome is sent."""
    h = Harness()
    node = ClusterNode(h.registry)
    node.ready = True
    node.failing = True
    h.factory.registry = node
    c = h.connect(handshake=False)
    assert c.take() == []
    assert c.closed_with is not None and c.closed_with[1] == 1013
    assert h.factory.connections == {} and h.factory.admitted == 0


def _echo_protocol():
    """A toy wire format for the seam tests: its id from ?id=, "hello" on open, each frame to its "to"."""
    from signaling.protocol import SignalingServerProtocol

    class Echo(SignalingServerProtocol):
        wire = "echo"
        id_prefix = "echo/"

        def _identity(self, request, claims):
            return self.id_prefix + request.params["id"][0], None

        def _greeting(self, peer_id, resumed):
            return json.dumps({"type": "hello", "id": peer_id}).encode()

        def _handle(self, payload, isBinary):
            self.factory.deliver(self.id_prefix + json.loads(payload)["to"], payload)

    return Echo


def test_other_wire_formats_share_the_core_at_their_own_path(h):
    """
    A protocol served at a path (SignalingFactory.serve) takes the connections
    whose handshake asks for that path; its ids live in the same registry and
    delivery as native ids, under its prefix, and native peers cannot address them.
    """
    echo = _echo_protocol()
    h.factory.serve("/echo", echo)
    native = h.connect()
    x = h.connect(handshake=False, url="ws://127.0.0.1:8080/echo?id=x")
    y = h.connect(handshake=False, url="ws://127.0.0.1:8080/echo?id=y")
    assert x.take() == [{"type": "hello", "id": "echo/x"}] and y.take() == [{"type": "hello", "id": "echo/y"}]
    assert isinstance(x.server, echo) and not isinstance(native.server, echo)
    assert {"echo/x", "echo/y", native.peer_id} <= {p.id for p in h.registry.peers()}
    h.send(x, {"to": "y", "n": 1})
    assert y.take() == [{"to": "y", "n": 1}]
    for kind in ("ping", "offer"):
        h.send(native, {"type": kind, "to": "echo/x"})
        assert errors(native) == [("peer-not-found", kind)]
    assert x.take() == []
    x.sendClose(1000)
    h.flush()
    assert "echo/x" not in h.registry and "echo/x" not in h.factory.connections


def test_serve_refuses_a_format_that_would_share_native_ids(h):
    from signaling.protocol import SignalingServerProtocol

    with pytest.raises(TypeError):
        h.factory.serve("/x", object)
    with pytest.raises(ValueError):
        h.factory.serve("/x", type("Bad", (SignalingServerProtocol,), {"wire": "bad", "id_prefix": ""}))
    with pytest.raises(ValueError):
        h.factory.serve("/x", type("Bad", (SignalingServerProtocol,), {"id_prefix": "bad/"}))
