"""
Tier 2: PeerJS clients on the core, in memory (Autobahn clients over iosim,
a fake clock): every message rule of docs/peerjs.rst, GET /<key>/id through
StubTreq, and a two-node cluster stand-in for the queue across nodes.
"""

import json
from contextlib import contextmanager
from urllib.parse import quote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from memory import Client, Harness
from treq.testing import StubTreq
from twisted.internet.defer import succeed
from twisted.logger import capturedLogs, formatEvent
from zope.interface import implementer

from signaling.peerjs_protocol import PeerJSProtocol, serve_peerjs
from signaling.registry import IClusterRegistry, Registry
from signaling.tokens import make_token

pytestmark = pytest.mark.memory

SECRET = b"a secret of at least 16 bytes"


def harness(**settings):
    settings.setdefault("rate", 1000)
    settings.setdefault("burst", 1000)
    h = Harness(**settings)
    serve_peerjs(h.factory)
    return h


@pytest.fixture
def h():
    return harness()


def url(peer, token="tok1", key="peerjs", extra=""):
    return f"ws://127.0.0.1:8080/peerjs?key={quote(key)}&id={quote(peer)}&token={quote(token)}&version=1.5.5{extra}"


def pj(h, peer, token="tok1", key="peerjs", open_=True, **kwargs):
    """A PeerJS client with ``peer`` as its id; with ``open_``, check that its first frame is OPEN."""
    client = h.connect(handshake=False, url=url(peer, token, key), **kwargs)
    if open_:
        assert client.take() == [{"type": "OPEN"}]
    return client


def send(h, client, obj):
    client.send_json(obj)
    h.flush()


def cut(h, client):
    """The client's socket is lost: no close frame either way."""
    client.transport.abortConnection()
    h.flush()


def offer(n, dst="b"):
    return {"type": "OFFER", "dst": dst, "payload": {"sdp": {"type": "offer", "sdp": f"v=0 {n}"},
                                                      "type": "data", "connectionId": f"dc_{n}"}}


def relayed(msg, src):
    return {"type": msg["type"], "src": src, "dst": msg["dst"], "payload": msg["payload"]}


def refused_with(client, frame_type):
    """The client got exactly one frame of ``frame_type`` and was closed with 1008."""
    frames = client.take()
    assert [f["type"] for f in frames] == [frame_type], frames
    assert client.closed_with is not None and client.closed_with[1] == 1008
    return frames[0]


def errors(client):
    return [m["payload"]["msg"] for m in client.take() if m["type"] == "ERROR"]


# -- admission and ids -----------------------------------------------------------------


def test_open_on_admission_and_ids_under_their_prefix(h):
    """An admitted client gets OPEN; its id is peerjs/<id> in the registry, next to native peers."""
    native = h.connect()
    a = pj(h, "alice")
    assert isinstance(a.server, PeerJSProtocol) and a.server.wire == "peerjs"
    assert {p.id for p in h.registry.peers()} == {native.peer_id, "peerjs/alice"}
    assert h.factory.connections["peerjs/alice"] is a.server
    assert h.factory.metrics.connects == 2


def test_ids_with_spaces_dashes_and_underscores(h):
    """PeerJS ids may have single spaces, - and _ inside (the browser sends a space as %20)."""
    a = pj(h, "my peer_1-x")
    b = pj(h, "b")
    send(h, b, offer(1, dst="my peer_1-x"))
    assert a.take() == [relayed(offer(1, dst="my peer_1-x"), "b")]


@pytest.mark.parametrize("query, frame_type, status", [
    ("key=peerjs&id=a&token=t", None, None),
    ("key=nope&id=a&token=t", "INVALID-KEY", 401),
    ("key=&id=a&token=t", "ERROR", 400),
    ("key=peerjs&token=t", "ERROR", 400),
    ("key=peerjs&id=a", "ERROR", 400),
    ("key=peerjs&id=a%2Fb&token=t", "ERROR", 400),
    ("key=peerjs&id=-a&token=t", "ERROR", 400),
    ("key=peerjs&id=" + "a" * 129 + "&token=t", "ERROR", 400),
    ("key=peerjs&id=a&token=" + "t" * 257, "ERROR", 400),
    ("key=peerjs&id=%C3%A4&token=t", "ERROR", 400),
    ("key=peerjs&id=a%00&token=t", "ERROR", 400),
])
def test_handshake_refusals_in_peerjs_words(h, query, frame_type, status):
    """A wrong key gets INVALID-KEY, missing or bad parameters ERROR, then a close; nothing is registered."""
    with capturedLogs() as events:
        client = h.connect(handshake=False, url="ws://127.0.0.1:8080/peerjs?" + query)
    if frame_type is None:
        assert client.take() == [{"type": "OPEN"}]
        return
    frame = refused_with(client, frame_type)
    assert frame["payload"]["msg"]
    assert len(h.registry) == 0 and h.factory.connections == {} and h.factory.reserved == set()
    assert h.factory.metrics.handshake_refusals[status] == 1 and h.factory.metrics.connects == 0
    assert any(f"refused connection from 127.0.0.1: {status}" in formatEvent(e) for e in events)
    h.flush()
    assert h.factory.admitted == 0


class Eager(Client):
    """A client that sends at once on open, before it has read anything."""

    def onOpen(self):
        self.send_json(offer(1))
        self.sendMessage(b"\x00\x01", isBinary=True)
        self.sendMessage(b"nonsense")


@contextmanager
def client_class(cls):
    import memory

    memory.Client, saved = cls, memory.Client
    try:
        yield
    finally:
        memory.Client = saved


def test_admission_is_shared_with_native_peers():
    """Origins, per-address caps and a cluster node not ready refuse PeerJS handshakes as they refuse native ones."""
    from test_hardening import refusal

    h = harness(allowed_origins=("https://app.example",), max_connections_per_ip=2)
    assert refusal(h, url=url("a"), origin="https://evil.example") == 403
    pj(h, "a", origin="https://app.example")
    h.connect()
    assert refusal(h, url=url("b")) == 429
    h = harness()
    h.factory.registry = Node(h.registry, "n1", [])
    h.factory.registry.ready = False
    assert refusal(h, url=url("a")) == 503
    assert len(h.registry) == 0


def test_a_refused_client_that_keeps_sending_is_ignored(h):
    """Frames from a client refused in-band are read and dropped, and it is closed all the same."""
    with client_class(Eager):
        client = h.connect(handshake=False, url=url("a", key="wrong"))
    assert [f["type"] for f in client.take()] == ["INVALID-KEY"]
    assert client.closed_with[1] == 1008 and h.factory.admitted == 0
    assert sum(h.factory.metrics.errors.values()) == 0


def test_id_taken_by_another_token(h):
    """An id held by a client with another token: ID-TAKEN and a close; the holder is untouched."""
    a = pj(h, "a", token="first")
    b = pj(h, "b")
    taker = pj(h, "a", token="second", open_=False)
    refused_with(taker, "ID-TAKEN")
    assert h.factory.connections["peerjs/a"] is a.server and a.closed_with is None
    send(h, b, offer(1, dst="a"))
    assert a.take() == [relayed(offer(1, dst="a"), "b")]


def test_same_token_reattaches_and_moves_the_session(h):
    """The same id and token on a new socket (PeerJS's reconnect) gets OPEN; the older socket is closed (4409)."""
    a = pj(h, "a", token="mine")
    b = pj(h, "b")
    a2 = pj(h, "a", token="mine")
    assert a.closed_with is not None and a.closed_with[1] == 4409
    send(h, b, offer(1, dst="a"))
    assert a2.take() == [relayed(offer(1, dst="a"), "b")] and a.take() == []
    assert h.factory.connections["peerjs/a"] is a2.server and "peerjs/a" in h.registry
    claims = h.factory.peerjs._claims  # (the older connection's record went with it)
    assert claims.keys() == {"peerjs/a", "peerjs/b"} and claims["peerjs/a"].proto is a2.server


def test_reattach_after_a_lost_socket_takes_the_session_back_with_what_was_sent_meanwhile(h):
    """A client whose socket was lost comes back with its token within the grace period: OPEN, then the queue."""
    a = pj(h, "a", token="mine")
    b = pj(h, "b")
    cut(h, a)
    assert "peerjs/a" in h.registry and "peerjs/a" not in h.factory.connections
    send(h, b, offer(1, dst="a"))
    send(h, b, {"type": "CANDIDATE", "dst": "a", "payload": {"candidate": "c", "connectionId": "dc_1"}})
    assert b.take() == []
    refused_with(pj(h, "a", token="thief", open_=False), "ID-TAKEN")  # not for another token
    h.clock.advance(14)
    a2 = h.connect(handshake=False, url=url("a", token="mine"))
    assert [f["type"] for f in a2.take()] == ["OPEN", "OFFER", "CANDIDATE"]
    assert h.factory.metrics.resumes["resumed"] == 1
    h.clock.advance(5)  # (past the first grace period: it ended with the resume)
    h.flush()
    assert a2.closed_with is None and "peerjs/a" in h.registry


def test_after_the_grace_period_the_id_is_free_for_anyone(h):
    """A lost client that does not come back in time: its id is free again, for another token too."""
    a = pj(h, "a", token="mine")
    cut(h, a)
    h.clock.advance(15)
    h.flush()
    assert "peerjs/a" not in h.registry
    other = pj(h, "a", token="other")
    assert h.factory.connections["peerjs/a"] is other.server
    refused_with(pj(h, "a", token="mine", open_=False), "ID-TAKEN")  # the old token is nobody's now


def test_a_clean_close_frees_the_id_at_once(h):
    """A client that closes (peer.destroy()): its id is free at once, for another token too."""
    a = pj(h, "a", token="mine")
    a.sendClose(1000)
    h.flush()
    assert "peerjs/a" not in h.registry
    pj(h, "a", token="other")
    assert set(h.factory.peerjs._claims) == {"peerjs/a"}


def test_without_grace_a_lost_socket_frees_the_id():
    """With --resume-grace=0 a lost socket ends the session at once; the id is free for another token."""
    h = harness(resume_grace=0)
    a = pj(h, "a", token="mine")
    cut(h, a)
    assert "peerjs/a" not in h.registry
    pj(h, "a", token="other")


def test_sessions_in_grace_hold_their_token_only_while_in_grace(h):
    """The server forgets a client's token when its session ends (no state left behind)."""
    for n in range(5):
        c = pj(h, f"p{n}")
        cut(h, c) if n % 2 else c.sendClose(1000)
        h.flush()
    h.clock.advance(15)
    h.flush()
    assert h.factory.peerjs.claim("peerjs/p1") is None
    pj(h, "late")
    assert set(h.factory.peerjs._claims) == {"peerjs/late"} and len(h.factory.peerjs._lost) == 0


# -- messages ---------------------------------------------------------------------------


def test_relays_stamp_src_and_keep_the_payload(h):
    """OFFER, ANSWER, CANDIDATE and LEAVE reach dst with src stamped and the payload as sent (extra keys dropped)."""
    a, b = pj(h, "a"), pj(h, "b")
    payloads = {
        "OFFER": {"sdp": {"type": "offer", "sdp": "v=0\r\ns=ünï\r\n"}, "type": "media", "connectionId": "mc_1",
                  "metadata": {"x": [1, 2.5, None]}, "browser": "chrome"},
        "ANSWER": {"sdp": {"type": "answer", "sdp": "v=0\r\n"}, "type": "media", "connectionId": "mc_1"},
        "CANDIDATE": {"candidate": {"candidate": "candidate:1 1 udp 1 127.0.0.1 5 typ host", "sdpMid": "0"},
                      "type": "media", "connectionId": "mc_1"},
        "LEAVE": {"connectionId": "mc_1"},
    }
    for kind, payload in payloads.items():
        send(h, a, {"type": kind, "dst": "b", "payload": payload, "src": "forged", "extra": True})
        assert b.take() == [{"type": kind, "src": "a", "dst": "b", "payload": payload}]
        send(h, b, {"type": kind, "dst": "a", "payload": payload})
        assert a.take() == [{"type": kind, "src": "b", "dst": "a", "payload": payload}]
    relays = h.factory.metrics.relays
    assert (relays["offer"], relays["answer"], relays["ice-candidate"], relays["disconnect"]) == (2, 2, 2, 2)


def test_relays_are_logged_by_type_and_ids(h):
    """A relay is logged like a native one: type, both registry ids, size (never the payload)."""
    a, b = pj(h, "a"), pj(h, "b")
    with capturedLogs() as events:
        send(h, a, offer(1))
    assert b.take() == [relayed(offer(1), "a")]
    lines = [formatEvent(e) for e in events]
    assert any(line.startswith("relay OFFER peerjs/a -> peerjs/b (") for line in lines), lines
    assert not any("v=0" in line for line in lines)


def test_heartbeat_gets_no_reply(h):
    """HEARTBEAT is accepted with no reply."""
    a = pj(h, "a")
    for _ in range(3):
        send(h, a, {"type": "HEARTBEAT"})
    assert a.take() == [] and a.closed_with is None


class Deaf(Client):
    """A client that answers no WebSocket ping (as a frozen tab would not)."""

    def onPing(self, payload):
        pass


def test_heartbeat_counts_as_liveness():
    """A client that answers no WebSocket ping but sends HEARTBEATs stays; one that sends nothing is dropped."""
    h = harness(ping_interval=5, ping_timeout=3)
    with client_class(Deaf):
        quiet = pj(h, "quiet")
        beating = pj(h, "beating")
    for _ in range(4):  # 22 s: the server pings 5 s after the last frame and waits 3 s for any frame
        h.clock.advance(5.5)
        h.flush()
        send(h, beating, {"type": "HEARTBEAT"})
    assert beating.closed_with is None and h.factory.connections.get("peerjs/beating") is beating.server
    assert quiet.closed_with is not None and "peerjs/quiet" not in h.factory.connections


def test_leave_without_dst_and_leave_for_nobody_are_dropped(h):
    """A LEAVE with no dst, or for an id not connected, is dropped without a reply (as PeerJS server)."""
    a = pj(h, "a")
    send(h, a, {"type": "LEAVE"})
    send(h, a, {"type": "LEAVE", "dst": "nobody", "payload": {"connectionId": "x"}})
    h.clock.advance(10)
    h.flush()
    assert a.take() == [] and len(h.factory.peerjs.pending) == 0


@pytest.mark.parametrize("frame, text", [
    (b"nonsense", "not valid JSON"),
    (b"[]", "must be a JSON object"),
    (b'{"type":"OFFER","payload":{}}', '"dst"'),
    (b'{"type":"OFFER","dst":7}', '"dst"'),
    (b'{"type":"HELLO"}', "unknown message type"),
    (b'{"type":"EXPIRE","dst":"b"}', "unknown message type"),
    (b'{"type":"OFFER","dst":"b","payload":1e400}', "not valid JSON"),
])
def test_malformed_input_gets_an_error_and_the_socket_stays(h, frame, text):
    """Malformed input: ERROR with a message; the client stays connected and its next message goes through."""
    a, b = pj(h, "a"), pj(h, "b")
    a.sendMessage(frame)
    h.flush()
    msgs = errors(a)
    assert len(msgs) == 1 and text in msgs[0], msgs
    send(h, a, offer(1))
    assert b.take() == [relayed(offer(1), "a")] and a.closed_with is None
    assert sum(h.factory.metrics.errors.values()) == 1


def test_binary_frames_get_an_error(h):
    """A binary frame: ERROR (PeerJS messages are JSON text)."""
    a = pj(h, "a")
    a.sendMessage(b'{"type":"HEARTBEAT"}', isBinary=True)
    h.flush()
    assert errors(a) == ["binary frames are not accepted; PeerJS messages are JSON text"]


def test_rate_limit_answers_in_peerjs_words():
    """Over the rate limit, the client is told with an ERROR (not a native error frame)."""
    h = harness(rate=1, burst=2)
    a, b = pj(h, "a"), pj(h, "b")
    for n in range(3):
        a.send_json(offer(n))
    h.flush()
    assert len(b.take()) == 2
    assert [m["type"] for m in a.take()] == ["ERROR"]


def test_oversized_message_closes_with_1009():
    """A message over --max-message-size closes the socket with 1009, as for native peers."""
    h = harness(max_message_size=1000)
    a = pj(h, "a")
    a.send_json({"type": "OFFER", "dst": "b", "payload": "x" * 2000})
    h.flush()
    assert a.remoteCloseCode == 1009 and "peerjs/a" not in h.registry


def test_native_and_peerjs_peers_cannot_address_each_other(h):
    """A PeerJS dst is always a PeerJS id; native messages to peerjs/... ids are refused."""
    native = h.connect()
    a = pj(h, "a")
    send(h, a, offer(1, dst=native.peer_id))
    assert native.take() == []
    h.send(native, {"type": "ping", "to": "peerjs/a"})
    assert [(m["type"], m["code"]) for m in native.take()] == [("error", "peer-not-found")]
    h.send(native, {"type": "ping", "to": "a"})
    assert [(m["type"], m["code"]) for m in native.take()] == [("error", "peer-not-found")]
    assert a.take() == []
    h.clock.advance(5)
    h.flush()
    assert a.take() == [{"type": "EXPIRE", "src": native.peer_id, "dst": "a"}]


# -- the queue and EXPIRE ----------------------------------------------------------------------


def test_messages_for_an_id_not_connected_wait_and_follow_its_open(h):
    """Messages for an id that connects later (within the expire timeout) follow its OPEN, in order."""
    a = pj(h, "a")
    c = pj(h, "c")
    sent = [offer(1), {"type": "CANDIDATE", "dst": "b", "payload": {"n": 1}}, offer(2)]
    for msg in sent[:2]:
        send(h, a, msg)
    send(h, c, sent[2])
    assert a.take() == [] and c.take() == []
    h.clock.advance(4.9)
    h.flush()
    b = h.connect(handshake=False, url=url("b"))
    assert b.take() == [{"type": "OPEN"}, relayed(sent[0], "a"), relayed(sent[1], "a"), relayed(sent[2], "c")]
    send(h, a, offer(3))  # and straight on from now
    assert b.take() == [relayed(offer(3), "a")]
    h.clock.advance(10)
    h.flush()
    assert a.take() == [] and c.take() == [] and len(h.factory.peerjs.pending) == 0
    assert h.factory.peerjs.counts["flushed"] == 3


def test_an_id_that_never_connects_gets_each_sender_one_expire(h):
    """After the expire timeout the messages are dropped and each sender gets one EXPIRE (src: the id)."""
    a, c = pj(h, "a"), pj(h, "c")
    send(h, a, offer(1))
    send(h, a, {"type": "CANDIDATE", "dst": "b", "payload": {}})
    send(h, c, offer(2))
    h.clock.advance(4.99)
    h.flush()
    assert a.take() == [] and c.take() == []
    with capturedLogs() as events:
        h.clock.advance(0.01)
        h.flush()
    assert a.take() == [{"type": "EXPIRE", "src": "b", "dst": "a"}]
    assert c.take() == [{"type": "EXPIRE", "src": "b", "dst": "c"}]
    assert any("peerjs/b did not connect within 5.0s: EXPIRE to peerjs/a, peerjs/c" in formatEvent(e) for e in events)
    b = pj(h, "b")  # late: nothing waits for it any more
    assert b.take() == []


def test_expire_timeout_is_the_option():
    """--peerjs-expire-timeout sets how long messages wait."""
    h = Harness()
    serve_peerjs(h.factory, expire_timeout=2)
    a = pj(h, "a")
    send(h, a, offer(1))
    h.clock.advance(2)
    h.flush()
    assert a.take() == [{"type": "EXPIRE", "src": "b", "dst": "a"}]


def test_a_sender_past_the_queue_bounds_gets_expire_at_once(h):
    """Past a bound of the queue, the message is dropped and its sender gets EXPIRE at once."""
    realm = h.factory.peerjs
    realm.pending.per_destination = 2
    a = pj(h, "a")
    for n in range(3):
        send(h, a, offer(n))
    assert a.take() == [{"type": "EXPIRE", "src": "b", "dst": "a"}]
    assert len(realm.pending) == 2 and realm.counts["refused"] == 1


def test_a_dst_longer_than_any_id_gets_expire_at_once(h):
    """A dst no client can connect with is not held: EXPIRE at once."""
    a = pj(h, "a")
    send(h, a, offer(1, dst="x" * 200))
    assert a.take() == [{"type": "EXPIRE", "src": "x" * 200, "dst": "a"}]
    assert len(h.factory.peerjs.pending) == 0


def test_a_sender_that_left_is_not_told(h):
    """A sender gone before its messages expire: the expiry tells nobody, and breaks nothing."""
    a = pj(h, "a")
    send(h, a, offer(1))
    a.sendClose(1000)
    h.flush()
    h.clock.advance(5)
    h.flush()
    assert len(h.factory.peerjs.pending) == 0 and h.factory.connections == {}


def test_messages_to_a_peer_in_grace_wait_in_its_resume_queue_not_for_expire(h):
    """A PeerJS client in its grace period is connected: messages to it wait for its resume, no EXPIRE."""
    a, b = pj(h, "a", token="mine"), pj(h, "b")
    cut(h, a)
    send(h, b, offer(1, dst="a"))
    h.clock.advance(5)
    h.flush()
    assert b.take() == [] and len(h.factory.peerjs.pending) == 0


# -- GET /<key>/id ---------------------------------------------------------------------------


def get(web_or_resource, path, headers=None):
    from signaling.web import SignalingWeb

    resource = web_or_resource.resource() if isinstance(web_or_resource, SignalingWeb) else web_or_resource
    treq = StubTreq(resource)
    results = []

    async def go():
        response = await treq.get("http://localhost" + path, headers=headers)
        results.append((response, await response.content()))

    from twisted.internet.defer import ensureDeferred

    ensureDeferred(go())
    treq.flush()
    assert results
    return results[0]


def web_for(h):
    from signaling.web import SignalingWeb

    return SignalingWeb(h.registry, admission=h.factory.settings, clock=h.clock, peerjs=h.factory.peerjs)


def test_get_id_answers_a_fresh_id_as_text_for_any_origin(h):
    """GET /<key>/id (ts and version ignored): a fresh id as plain text, readable cross-origin, never cached."""
    web = web_for(h)
    ids = set()
    for path in ("/peerjs/id", "/peerjs/id?ts=17000000000.123&version=1.5.5", "/otherkey/id"):
        response, body = get(web, path, headers={"Origin": "https://app.example"})
        assert response.code == 200
        assert response.headers.getRawHeaders("content-type") == ["text/plain; charset=utf-8"]
        assert response.headers.getRawHeaders("access-control-allow-origin") == ["*"]
        assert response.headers.getRawHeaders("cache-control") == ["no-store"]
        ids.add(body.decode())
    assert len(ids) == 3 and all(i.startswith("peer-") for i in ids)  # (the factory's id maker)


def test_get_id_with_allowed_origins():
    """With --origin, the id is for the listed origins (named in the CORS header); others get 403."""
    h = harness(allowed_origins=("https://app.example",))
    web = web_for(h)
    response, body = get(web, "/peerjs/id", headers={"Origin": "https://app.example"})
    assert response.code == 200 and response.headers.getRawHeaders("access-control-allow-origin") == [
        "https://app.example"]
    response, _ = get(web, "/peerjs/id", headers={"Origin": "https://evil.example"})
    assert response.code == 403


def test_get_id_never_answers_an_id_in_use(h):
    """A fresh id is not one a client is connected with."""
    ids = iter(["taken", "taken", "free"])
    h.factory.new_id = lambda: next(ids)
    pj(h, "taken")
    _, body = get(web_for(h), "/peerjs/id")
    assert body == b"free"


def test_get_id_with_access_tokens():
    """With a token secret, the key is the access token: 401 without a valid one; a token's fixed id is the id."""
    h = harness(token_secret=SECRET)
    web = web_for(h)
    assert get(web, "/peerjs/id")[0].code == 401
    assert get(web, "/not.atoken/id")[0].code == 401
    expired = make_token(SECRET, -10, now=h.clock.seconds())
    assert get(web, f"/{expired}/id")[0].code == 401
    response, body = get(web, f"/{make_token(SECRET, 600, now=h.clock.seconds())}/id")
    assert response.code == 200 and body.startswith(b"peer-")
    _, body = get(web, f"/{make_token(SECRET, 600, peer_id='alice', now=h.clock.seconds())}/id")
    assert body == b"alice"


def test_peers_discovery_is_never_allowed(h):
    """GET /<key>/peers (listAllPeers): 401, as PeerJS server without allow_discovery."""
    pj(h, "a")
    response, body = get(web_for(h), "/peerjs/peers")
    assert response.code == 401 and body == b""


def test_without_peerjs_there_is_no_id_route_and_peerjs_is_native():
    """Without serve_peerjs (--no-peerjs): GET /<key>/id is 404, and /peerjs on the WebSocket port is native."""
    from signaling.web import SignalingWeb

    h = Harness()
    response, _ = get(SignalingWeb(h.registry, clock=h.clock), "/peerjs/id")
    assert response.code == 404
    h.connect(url=url("a"))  # (the native welcome, checked by connect)


def test_the_http_port_routes_peerjs_to_the_websocket(h):
    """On the HTTP port, /peerjs is the WebSocket resource, /peerjs/id the id route."""
    from signaling.web import Root, SignalingWeb, WebSocketTakeover

    ws = WebSocketTakeover(h.factory)
    web = SignalingWeb(h.registry, ws, admission=h.factory.settings, clock=h.clock, peerjs=h.factory.peerjs)
    root = web.resource()
    assert isinstance(root, Root) and b"/peerjs" in root._ws_paths()
    # (Autobahn's resource answers a plain GET, not an upgrade, with 426, as at /ws)
    assert get(root, "/peerjs?key=peerjs&id=a&token=t")[0].code == get(root, "/ws")[0].code == 426
    assert get(root, "/peerjs/id")[0].code == 200
    assert get(root, "/peerjs/")[0].code == get(root, "/peerjsx")[0].code == 404


# -- with a token secret -----------------------------------------------------------------------


def test_access_token_as_the_key():
    """With a token secret, ?key= is the access token: 401 without a valid one; a fixed id must be the client's."""
    from test_hardening import refusal

    h = harness(token_secret=SECRET)
    token = make_token(SECRET, 600, now=h.clock.seconds())
    assert refusal(h, url=url("a", key="peerjs")) == 401
    pj(h, "a", key=token)
    fixed = make_token(SECRET, 600, peer_id="alice", now=h.clock.seconds())
    pj(h, "alice", key=fixed)
    refused_with(pj(h, "bob", key=fixed, open_=False), "ERROR")
    assert {p.id for p in h.registry.peers()} == {"peerjs/a", "peerjs/alice"}


# -- a cluster: the destination connects to another node -------------------------------------------


@implementer(IClusterRegistry)
class Node:
    """One node of an in-memory cluster over one shared Registry: route() reaches the other nodes' peers."""

    def __init__(self, shared, name, nodes):
        self.shared, self.node, self.nodes = shared, name, nodes
        self.ready, self.resume_secret, self.routes = True, b"s" * 32, 0

    def __getattr__(self, name):
        return getattr(self.shared, name)

    def add(self, peer_id, ip, conn=""):
        return succeed(None).addCallback(lambda _: self.shared.add(peer_id, ip, conn))

    def remove(self, peer_id, conn=""):
        return succeed(self.shared.remove(peer_id, conn))

    def route(self, to, frame):
        self.routes += 1
        for other in self.nodes:
            if other is not self and other.factory.deliver_local(to, frame):
                return succeed(True)
        return succeed(False)

    def health(self):
        return {"registry": "test", "redis": "connected"}


def cluster():
    from signaling.protocol import SignalingFactory
    from signaling.settings import Settings

    h = harness()
    shared = Registry(h.clock)
    nodes = []
    for name in ("n1", "n2"):
        node = Node(shared, name, nodes)
        node.factory = SignalingFactory(node, Settings(rate=1000, burst=1000, ping_interval=0, handshake_timeout=0),
                                        h.clock)
        serve_peerjs(node.factory)
        nodes.append(node)
    return h, nodes


def on(h, node, peer, open_=True):
    h.factory = node.factory
    return pj(h, peer, open_=open_)


def test_cluster_relays_across_nodes_and_id_taken_elsewhere():
    """Across nodes: relays through the cluster; an id held on the other node is ID-TAKEN."""
    h, (n1, n2) = cluster()
    a, b = on(h, n1, "a"), on(h, n2, "b")
    send(h, a, offer(1))
    assert b.take() == [relayed(offer(1), "a")]
    refused_with(on(h, n1, "b", open_=False), "ID-TAKEN")
    assert n1.factory.connections.keys() == {"peerjs/a"} and "peerjs/b" in n2.factory.connections


def test_cluster_queue_is_flushed_when_the_id_connects_to_another_node():
    """The sending node keeps the queue and retries: the id connecting to another node gets it, in order."""
    h, (n1, n2) = cluster()
    a = on(h, n1, "a")
    send(h, a, offer(1))
    send(h, a, {"type": "CANDIDATE", "dst": "b", "payload": {"n": 1}})
    h.clock.advance(2)
    h.flush()
    b = on(h, n2, "b", open_=False)
    assert b.take() == [{"type": "OPEN"}]
    h.clock.advance(0.5)  # the retry
    h.flush()
    assert b.take() == [relayed(offer(1), "a"), {"type": "CANDIDATE", "src": "a", "dst": "b", "payload": {"n": 1}}]
    send(h, a, offer(2))
    assert b.take() == [relayed(offer(2), "a")]
    h.clock.advance(10)
    h.flush()
    assert a.take() == [] and len(n1.factory.peerjs.pending) == 0
    assert n1.factory.peerjs._retry is None  # (no timer left once nothing waits)


def test_cluster_queue_expires_when_the_id_never_connects():
    """In a cluster too, an id that never connects: EXPIRE after the timeout; the retries stop."""
    h, (n1, _) = cluster()
    a = on(h, n1, "a")
    send(h, a, offer(1))
    for _ in range(10):
        h.clock.advance(0.5)
        h.flush()
    assert a.take() == [{"type": "EXPIRE", "src": "b", "dst": "a"}]
    assert n1.routes >= 9  # (a try every 0.5 s)
    assert n1.factory.peerjs._retry is None and len(n1.factory.peerjs.pending) == 0


def test_json_of_every_frame_is_compact_utf8(h):
    """Frames are compact JSON with non-ASCII kept as UTF-8 (as the browser's JSON.stringify would)."""
    a, b = pj(h, "a"), pj(h, "b")
    raw = []
    b.onMessage = lambda payload, isBinary: raw.append(payload)
    send(h, a, {"type": "OFFER", "dst": "b", "payload": {"s": "ü"}})
    assert raw == ['{"type":"OFFER","src":"a","dst":"b","payload":{"s":"ü"}}'.encode()]
    assert json.loads(raw[0])["payload"] == {"s": "ü"}


# -- whatever a client sends --------------------------------------------------------------------

_json = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
    max_leaves=8,
)
_messages = st.fixed_dictionaries(
    {"type": st.sampled_from(["OFFER", "ANSWER", "CANDIDATE", "LEAVE", "HEARTBEAT", "EXPIRE", "OPEN", "x"])
     | _json},
    optional={"dst": st.sampled_from(["a", "b", "nobody", "", "peerjs/a", "x" * 200]) | _json,
              "payload": _json, "src": _json},
).map(lambda m: json.dumps(m).encode()) | st.binary(max_size=40).map(lambda b: b.decode("latin-1").encode())


@settings(max_examples=60, deadline=None)
@given(st.lists(_messages, max_size=25))
def test_whatever_a_client_sends_gets_documented_answers_only(frames):
    """Random messages: every frame back is a PeerJS frame, nothing fails, a healthy pair goes on, no state leaks."""
    from signaling import peerjs

    h = harness()
    fuzzer, a, b = pj(h, "fuzzer"), pj(h, "a"), pj(h, "b")
    with capturedLogs() as events:
        for payload in frames:
            fuzzer.sendMessage(payload)
        h.flush()
        h.clock.advance(5)
        h.flush()
    assert not [e for e in events if e.get("log_failure") is not None]
    assert fuzzer.closed_with is None
    for client in (fuzzer, a, b):
        for msg in client.take():
            assert msg["type"] in ("ERROR", "EXPIRE") or msg["type"] in peerjs.RELAYED, msg
            if msg["type"] == "ERROR":
                assert isinstance(msg["payload"]["msg"], str)
            else:
                assert set(msg) <= {"type", "src", "dst", "payload"}
                assert msg["type"] == "EXPIRE" or msg["src"] == "fuzzer"
    send(h, a, offer(1))
    assert b.take() == [relayed(offer(1), "a")]
    assert len(h.factory.peerjs.pending) == 0 and h.factory.peerjs._flushing == {}
    assert set(h.factory.connections) == {"peerjs/fuzzer", "peerjs/a", "peerjs/b"}
