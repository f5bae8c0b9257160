"""
``signaling.reactor`` (``twistd -r signaling-epoll``): Twisted's epoll
reactor without a logging context per event, trying an accepted
connection's writes before watching it for writability.

Three kinds of checks: its own behaviour over real loopback sockets;
Twisted's own reactor conformance suites run against it (only the two
documented differences skipped); and the Twisted internals it copies or
relies on, checked against the installed Twisted so that an upgrade that
changes them fails here rather than quietly.
"""

import hashlib
import inspect
import os
import socket
import textwrap

import pytest
from twisted.internet import epollreactor, posixbase, protocol
from twisted.internet.test import reactormixins, test_core, test_fdset, test_time
from twisted.python import log

from signaling import reactor as signaling_reactor
from signaling.reactor import SignalingReactor

pytestmark = pytest.mark.live

REACTOR = "signaling.reactor.SignalingReactor"


# -- its own behaviour ------------------------------------------------------------------


class Recorder(protocol.Protocol):
    """A server-side protocol that records what it receives and lets the test act on connect."""

    def __init__(self, factory):
        self.factory = factory
        self.received = b""

    def connectionMade(self):
        self.factory.connections.append(self)
        if self.factory.on_connect is not None:
            self.factory.on_connect(self)

    def dataReceived(self, data):
        self.received += data
        if self.factory.on_data is not None:
            self.factory.on_data(self, data)

    def connectionLost(self, reason):
        self.factory.lost.append(reason)


class RecorderFactory(protocol.Factory):
    def __init__(self, on_connect=None, on_data=None):
        self.on_connect = on_connect
        self.on_data = on_data
        self.connections = []
        self.lost = []

    def buildProtocol(self, addr):
        return Recorder(self)


def turn(reactor, until, limit=2000):
    """Run reactor turns (without ``run``) until ``until()`` is true."""
    for _ in range(limit):
        if until():
            return
        reactor.runUntilCurrent()
        reactor.doIteration(0.01)
    raise AssertionError("condition not reached")


@pytest.fixture
def loop():
    """A SignalingReactor driven turn by turn by the test (never run)."""
    reactor = SignalingReactor()
    yield reactor
    reactor.removeAll()
    reactor._poller.close()


def serve(reactor, factory):
    port = reactor.listenTCP(0, factory, interface="127.0.0.1")
    client = socket.create_connection(("127.0.0.1", port.getHost().port))
    client.settimeout(5)
    turn(reactor, lambda: factory.connections)
    return port, client


def test_write_goes_out_at_the_end_of_the_turn_without_epoll(loop, monkeypatch):
    """An accepted connection's write is sent at the end of the turn; epoll never watches it for writability."""
    watched = []
    real_add = epollreactor.EPollReactor.addWriter
    monkeypatch.setattr(epollreactor.EPollReactor, "addWriter", lambda self, w: watched.append(w) or real_add(self, w))
    factory = RecorderFactory(on_data=lambda proto, data: proto.transport.write(b"echo:" + data))
    port, client = serve(loop, factory)
    client.sendall(b"hello")
    turn(loop, lambda: not loop._to_try and factory.connections[0].received)
    assert client.recv(100) == b"echo:hello"
    assert watched == []
    assert not loop._writes
    client.close()
    turn(loop, lambda: factory.lost)
    port.stopListening()


def test_what_the_socket_does_not_take_waits_for_writability(loop):
    """A peer that does not read: the rest waits in Twisted's buffer, watched by epoll; all of it arrives, in order."""
    payload = bytes(range(256)) * 40000  # 10 MB: more than the socket buffers hold
    factory = RecorderFactory(on_connect=lambda proto: proto.transport.write(payload))
    port, client = serve(loop, factory)
    transport = factory.connections[0].transport
    turn(loop, lambda: transport.fileno() in loop._writes)  # left over: watched the usual way
    got = bytearray()
    while len(got) < len(payload):
        loop.runUntilCurrent()
        loop.doIteration(0)
        try:
            got += client.recv(1 << 20)
        except socket.timeout:  # pragma: no cover
            pass
    assert bytes(got) == payload
    turn(loop, lambda: transport.fileno() not in loop._writes)
    client.close()
    turn(loop, lambda: factory.lost)
    port.stopListening()


def test_lose_connection_after_a_write_sends_it_then_closes(loop):
    """loseConnection right after a write: the data goes out first, then the connection ends cleanly."""

    def reply_and_close(proto, data):
        proto.transport.write(b"bye")
        proto.transport.loseConnection()

    factory = RecorderFactory(on_data=reply_and_close)
    port, client = serve(loop, factory)
    client.sendall(b"x")
    turn(loop, lambda: factory.lost)
    assert client.recv(100) == b"bye"
    assert client.recv(100) == b""  # closed after it
    client.close()
    port.stopListening()


def test_an_exception_in_a_handler_is_logged_in_the_connections_context_and_drops_it(loop):
    """As in Twisted: an exception from dataReceived is logged, with the connection's log prefix, and drops it."""
    events = []
    log.addObserver(events.append)
    try:
        factory = RecorderFactory(on_data=lambda proto, data: 1 / 0)
        port, client = serve(loop, factory)
        client.sendall(b"boom")
        turn(loop, lambda: factory.lost)
    finally:
        log.removeObserver(events.append)
    failures = [e for e in events if e.get("isError") and e.get("failure") is not None]
    assert [f["failure"].type for f in failures] == [ZeroDivisionError]
    assert failures[0]["system"] == "Recorder,0,127.0.0.1"  # the connection's log prefix
    client.close()
    port.stopListening()


def test_install_installs_it():
    """install() is what twistd -r calls: it makes a SignalingReactor the global reactor (in a child process)."""
    import subprocess
    import sys

    code = textwrap.dedent("""
        from signaling.reactor import install
        install()
        from twisted.internet import reactor
        print(type(reactor).__name__)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "SignalingReactor"


def test_the_plugin_names_it():
    """twistd -r signaling-epoll finds it through Twisted's reactor plugins."""
    from twisted.application.reactors import getReactorTypes

    [found] = [r for r in getReactorTypes() if r.shortName == "signaling-epoll"]
    assert found.moduleName == "signaling.reactor"


# -- what it takes from Twisted --------------------------------------------------------


def fingerprint(function):
    return hashlib.sha256(textwrap.dedent(inspect.getsource(function)).encode()).hexdigest()[:16]


def test_twisted_internals_it_relies_on_are_there():
    """The non-public names the reactor uses exist in the installed Twisted."""
    reactor = epollreactor.EPollReactor()
    try:
        for name in ("_poller", "_selectables", "_reads", "_writes"):
            assert hasattr(reactor, name), name
        assert callable(reactor._disconnectSelectable)
    finally:
        reactor._poller.close()
    assert isinstance(posixbase._NO_FILEDESC, Exception)
    assert signaling_reactor._NO_FILEDESC is posixbase._NO_FILEDESC


#: What SignalingReactor copies: if Twisted changes one of these, compare the
#: new code with SignalingReactor.doPoll/_dispatch/addWriter, then update the
#: fingerprint.
COPIED = {
    "EPollReactor.doPoll": (epollreactor.EPollReactor.doPoll, "312b649eff9e5e23"),  # Twisted 26.10
    "_PollLikeMixin._doReadOrWrite": (posixbase._PollLikeMixin._doReadOrWrite, "0979d4247d0e5c47"),
}


@pytest.mark.parametrize("name", sorted(COPIED))
def test_the_twisted_code_it_copies_has_not_changed(name):
    function, expected = COPIED[name]
    assert fingerprint(function) == expected, (
        f"Twisted's {name} changed: check signaling.reactor against it, then update COPIED"
    )


# -- Twisted's own conformance suites, run against it ---------------------------------------

#: The documented differences: no logging context per event (so legacy log
#: lines written while handling it have no connection prefix), and the check
#: Twisted itself skips for its epoll reactor by class name (epoll cannot see
#: a descriptor closed and replaced underneath).
DIFFERENCES = {
    "test_logPrefix": "no logging context per event (documented in signaling.reactor)",
    "test_lostFileDescriptor": "epoll cannot detect lost file descriptors (Twisted skips it for EPollReactor)",
}


def _against_ours(builder):
    """Builder's test case classes for SignalingReactor only, without the documented differences."""
    overrides = {"_reactors": [REACTOR]}
    for name in DIFFERENCES:
        if hasattr(builder, name):
            overrides[name] = None  # (not a test here: see DIFFERENCES)
    subclass = type(builder.__name__, (builder,), overrides)
    subclass.__module__ = __name__
    return subclass.makeTestCaseClasses()


_BUILDERS = [test_core.SystemEventTestsBuilder, test_time.TimeTestsBuilder,
             test_fdset.ReactorFDSetTestsBuilder]
try:  # Twisted's TCP and TLS suites import hamcrest (a test dependency of Twisted's, PyPI pyhamcrest)
    from twisted.internet.test import test_newtls, test_tcp, test_tls
except ImportError:  # pragma: no cover
    test_tcp = None
else:
    _BUILDERS += [
        test_tcp.TCP4ClientTestsBuilder, test_tcp.TCP6ClientTestsBuilder, test_tcp.TCPPortTestsBuilder,
        test_tcp.TCPFDPortTestsBuilder, test_tcp.TCPConnectionTestsBuilder, test_tcp.TCP4ConnectorTestsBuilder,
        test_tcp.TCP6ConnectorTestsBuilder, test_tcp.TCPTransportTestsBuilder,
        test_tcp.AdoptStreamConnectionTestsBuilder, test_tcp.AbortConnectionTests,
        test_tls.SSLClientTestsMixin, test_tls.StartTLSClientTestsMixin, test_tls.TLSPortTestsBuilder,
        test_tls.AbortSSLConnectionTests, test_newtls.ProducerTestsMixin,
    ]

def test_twisted_tcp_and_tls_suites_ran():
    """Twisted's TCP and TLS conformance suites are among the ones run here (they need pyhamcrest)."""
    if test_tcp is None:
        message = "Twisted's TCP and TLS suites need hamcrest: pip install pyhamcrest (in the test extras)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


for _builder in _BUILDERS:
    if issubclass(_builder, reactormixins.ReactorBuilder):
        globals().update(_against_ours(_builder))
del _builder
