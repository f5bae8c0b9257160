"""Tier 2: y-webrtc's protocol at /yjs, in memory (Autobahn clients over iosim, a fake clock)."""

import json

import pytest
from memory import Harness

from signaling.tokens import make_token
from signaling.yjs_protocol import INVALID_FRAMES_LIMIT, YjsProtocol, finish, frame_with_clients, install

pytestmark = pytest.mark.memory

URL = "ws://127.0.0.1:8080/yjs"
SECRET = b"0123456789abcdef0123456789abcdef"


@pytest.fixture
def h():
    h = Harness(rate=1000, burst=1000)
    install(h.factory)
    return h


def join(h, *topics, url=URL, headers=None):
    """A y-webrtc connection at /yjs, subscribed to ``topics``."""
    c = h.connect(handshake=False, url=url, headers=headers)
    assert c.take() == []  # y-webrtc expects nothing on open
    if topics:
        h.send(c, {"type": "subscribe", "topics": list(topics)})
    return c


def errors(c):
    return [(m["code"], m["ref"]) for m in c.take() if m["type"] == "error"]


def test_publish_reaches_every_subscriber_with_clients(h):
    """A publish goes whole to every subscriber of its topic, the sender included, with clients = subscribers."""
    a, b = join(h, "r"), join(h, "r", "s")
    other = join(h, "s")
    publish = {"type": "publish", "topic": "r", "data": {"type": "announce", "from": "p1", "ü": [1, 2.5, None]}}
    h.send(a, publish)
    assert a.take() == b.take() == [dict(publish, clients=2)]
    assert other.take() == []
    outsider = join(h)  # (bin/server.js delivers a publish from a non-subscriber too)
    h.send(outsider, dict(publish, topic="s"))
    assert b.take() == other.take() == [dict(publish, topic="s", clients=2)] and outsider.take() == []
    h.send(outsider, dict(publish, topic="nobody-here"))
    assert [x.take() for x in (a, b, other, outsider)] == [[], [], [], []]
    assert h.factory.yjs.counters()["publishes"] == 3 and h.factory.yjs.counters()["delivered"] == 4


def test_a_clients_key_from_the_sender_is_replaced(h):
    """The server's count replaces whatever "clients" the sender put in."""
    a = join(h, "r")
    h.send(a, {"type": "publish", "clients": 999, "topic": "r", "data": "x"})
    assert a.take() == [{"type": "publish", "topic": "r", "data": "x", "clients": 1}]


def test_the_frame_is_the_senders_bytes_with_clients_added():
    """What subscribers get is the sender's own bytes (whitespace and escapes kept), with ,"clients":N} at the end."""
    raw = b'{"type": "publish", "topic":"r", "data": "caf\\u00e9 \xc3\xa9" }\r\n'
    head = frame_with_clients(raw, json.loads(raw))
    assert finish(head, 3) == b'{"type": "publish", "topic":"r", "data": "caf\\u00e9 \xc3\xa9" ,"clients":3}'
    assert json.loads(finish(head, 3))["clients"] == 3


def test_ping_pong_and_nothing_on_open(h):
    """A ping is answered with a pong; a connection is registered as yjs/<id>, idle, and told nothing on open."""
    a = join(h)
    assert isinstance(a.server, YjsProtocol) and a.server.wire == "yjs"
    peer_id = a.server.peer_id
    assert peer_id.startswith("yjs/") and len(peer_id) > len("yjs/")
    assert h.registry.get(peer_id).state == "idle"
    h.send(a, {"type": "ping"})
    assert a.take() == [{"type": "pong"}]


def test_unsubscribe_stops_delivery_and_frees_empty_topics(h):
    """After unsubscribe a connection gets no more publishes; a topic nobody subscribes to is freed."""
    a, b = join(h, "r"), join(h, "r")
    h.send(b, {"type": "unsubscribe", "topics": ["r", "never-joined", 3]})
    h.send(a, {"type": "publish", "topic": "r", "n": 1})
    assert a.take() == [{"type": "publish", "topic": "r", "n": 1, "clients": 1}] and b.take() == []
    h.send(a, {"type": "unsubscribe", "topics": ["r"]})
    assert "r" not in h.factory.yjs.topics and h.factory.yjs.summary() == {"topics": 0, "subscriptions": 0}


@pytest.mark.parametrize("how", ["close", "lost"])
def test_every_subscription_goes_with_the_socket(h, how):
    """A closed or lost socket leaves all its topics at once (no grace period on this wire) and the registry."""
    a, b = join(h, "r", "s", "t"), join(h, "r")
    peer_id = a.server.peer_id
    if how == "close":
        a.sendClose(1000)
    else:
        a.transport.loseConnection()  # no close frame: a native peer would get a grace period
    h.flush()
    assert h.factory.yjs.summary() == {"topics": 1, "subscriptions": 1}
    assert peer_id not in h.registry and peer_id not in h.factory.connections
    h.send(b, {"type": "publish", "topic": "r"})
    assert b.take() == [{"type": "publish", "topic": "r", "clients": 1}]


def test_invalid_frames_are_answered_and_others_unharmed(h):
    """Bad JSON and bad shapes get an error frame (y-webrtc ignores it) and change nothing; others go on."""
    a, b = join(h, "r"), join(h, "r")
    for raw in [b"{", b"[1]", b'"x"', b"{}", b'{"type": 5}', b'{"type":"subscribe","topics":"r"}',
                b'{"type":"publish","topic":""}', b'{"type":"publish"}', b'{"type":"publish","topic":["r"]}',
                b"\xff\xfe", b'{"type":"nope"}', b"1" * 30 + b"{"]:
        a.sendMessage(raw, isBinary=raw.startswith(b"\xff"))  # (as text, Autobahn would close with 1007)
        h.flush()
        got = a.take()
        assert len(got) == 1 and got[0]["type"] == "error", (raw, got)
    h.send(a, {"type": "publish", "topic": "r", "ok": True})
    assert b.take() == [{"type": "publish", "topic": "r", "ok": True, "clients": 2}]
    assert a.take() == [{"type": "publish", "topic": "r", "ok": True, "clients": 2}]


def test_binary_frames_are_read_as_json_too(h):
    """As bin/server.js does, a binary frame holding JSON is a message; the answer is text."""
    a = join(h)
    a.sendMessage(b'{"type":"subscribe","topics":["r"]}', isBinary=True)
    a.sendMessage(b'{"type":"publish","topic":"r"}', isBinary=True)
    h.flush()
    assert a.take() == [{"type": "publish", "topic": "r", "clients": 1}]


def test_repeated_invalid_frames_close_with_1008_and_spare_the_others(h):
    """A connection that keeps sending invalid frames is closed with 1008; every other connection stays."""
    a, b, c = join(h, "r"), join(h, "r"), join(h, "r")
    for _ in range(INVALID_FRAMES_LIMIT):
        a.sendMessage(b"not json")
        h.flush()
    assert a.remoteCloseCode == 1008  # the close frame, at once
    errors_sent = [m["code"] for m in a.take()]
    assert errors_sent == ["invalid-json"] * INVALID_FRAMES_LIMIT
    h.send(b, {"type": "publish", "topic": "r"})
    assert b.take() == c.take() == [{"type": "publish", "topic": "r", "clients": 2}]
    assert h.factory.yjs.summary() == {"topics": 1, "subscriptions": 2}


def test_valid_frames_forgive_earlier_invalid_ones(h):
    """Occasional invalid frames between valid ones never add up to a close; unknown types never count."""
    a = join(h, "r")
    for _ in range(3 * INVALID_FRAMES_LIMIT):
        a.sendMessage(b"not json")
        a.sendMessage(b'{"type":"ping"}')
        a.sendMessage(b'{"type":"future-type"}')
        h.flush()
    assert a.remoteCloseCode is None and a.closed_with is None


def test_topic_caps_answer_errors(h):
    """Topics past the per-connection cap or the server's cap are refused (errors), the rest subscribed."""
    h.factory.yjs.topics.max_per_subscriber = 4
    h.factory.yjs.topics.max_topics = 3
    a = join(h)
    h.send(a, {"type": "subscribe", "topics": ["1", "2", "", "x" * 257, "3"]})
    assert sorted(errors(a)) == [("invalid-topic", "subscribe"), ("too-many-topics", "subscribe")]
    b = join(h, "3")
    c = join(h)
    h.send(c, {"type": "subscribe", "topics": ["1", "4"]})
    assert errors(c) == [("server-topics-full", "subscribe")]
    assert h.factory.yjs.topics.topics_of(c.server) == {"1"} and h.factory.yjs.topics_of(c.server.peer_id) == 1
    assert b.take() == []
    assert h.factory.yjs.counters()["refused"] == {"too-many-topics": 1, "invalid-topic": 2,
                                                   "server-topics-full": 1}


def test_long_topic_lists_cost_no_more_than_the_cap(h):
    """Names past the per-connection cap are refused without being looked at, in one error."""
    h.factory.yjs.topics.max_per_subscriber = 3
    a = join(h)
    a.sendMessage(json.dumps({"type": "subscribe", "topics": ["a", "b", "c"] + ["x"] * 50000}).encode())
    h.flush()
    got = a.take()
    assert [(m["code"], m["message"]) for m in got] == [
        ("too-many-topics", "you are subscribed to as many topics as one connection may be "
                            "(50000 of the topics refused)")]
    assert h.factory.yjs.topics.topics_of(a.server) == {"a", "b", "c"}
    assert h.factory.yjs.counters()["refused"] == {"too-many-topics": 50000}
    h.send(a, {"type": "unsubscribe", "topics": ["a", "b", "c"]})
    assert h.factory.yjs.summary()["topics"] == 0


def test_token_topics_restrict_subscribe_and_publish():
    """With access tokens, a token's topics (or prefix) bound what its holder subscribes and publishes to."""
    h = Harness(rate=1000, burst=1000, token_secret=SECRET)
    install(h.factory)
    now = h.clock.seconds()
    listed = make_token(SECRET, 600, now=now, topics=["r"])
    prefixed = make_token(SECRET, 600, now=now, topic_prefix="team/")
    plain = make_token(SECRET, 600, now=now, peer_id="alice")
    a = join(h, url=f"{URL}?token={listed}")
    b = join(h, url=f"{URL}?token={prefixed}")
    c = join(h, url=f"{URL}?token={plain}")  # no topics in it: any topic (and its peer id means nothing here)
    assert c.server.peer_id.startswith("yjs/")
    h.send(a, {"type": "subscribe", "topics": ["r", "s", "team/x"]})
    assert errors(a) == [("topic-not-allowed", "subscribe")]
    h.send(b, {"type": "subscribe", "topics": ["team/x", "r"]})
    assert errors(b) == [("topic-not-allowed", "subscribe")]
    h.send(c, {"type": "subscribe", "topics": ["r", "team/x", "s"]})
    h.send(a, {"type": "publish", "topic": "team/x"})
    assert errors(a) == [("topic-not-allowed", "publish")] and b.take() == [] and c.take() == []
    h.send(b, {"type": "publish", "topic": "team/x"})
    assert b.take() == c.take() == [{"type": "publish", "topic": "team/x", "clients": 2}]
    h.send(c, {"type": "publish", "topic": "r"})
    assert a.take() == [{"type": "publish", "topic": "r", "clients": 2}]
    refused = h.connect(handshake=False, url=URL)  # no token at all: refused at the handshake, as on /
    assert refused.server.peer_id is None


def test_rate_limit_is_the_cores():
    """Publishes spend the connection's frame rate like any frame (answered rate-limited past the burst)."""
    h = Harness(rate=1, burst=3)
    install(h.factory)
    a = join(h, "r")  # (1 frame)
    for n in range(4):
        a.send_json({"type": "publish", "topic": "r", "n": n})
    h.flush()
    got = a.take()
    assert [m.get("n") for m in got if m["type"] == "publish"] == [0, 1]
    assert [m["code"] for m in got if m["type"] == "error"] == ["rate-limited", "rate-limited"]


def test_shutdown_closes_yjs_connections_too(h):
    """On shutdown y-webrtc connections are closed with 1001 like every other."""
    a = join(h, "r")
    h.factory.shutdown(5)
    h.flush()
    assert a.closed_with[1] == 1001
    assert h.factory.yjs.summary()["topics"] == 0
