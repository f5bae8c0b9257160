"""
Accepted WebSocket connections have TCP_NODELAY (Autobahn's ``tcpNoDelay``
option, on by default), which Autobahn's own ``connectionMade`` fails to
apply (it reads the option before copying it from the factory, and
swallows the error): ``signaling._compat.connection_made_quietly`` applies it.
"""

import pytest
from twisted.internet import protocol, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.trial import unittest

from signaling.protocol import SignalingFactory
from signaling.registry import Registry
from signaling.settings import Settings


@pytest.mark.live
class NoDelay(unittest.TestCase):
    timeout = 30

    @inlineCallbacks
    def _accepted(self, **options):
        factory = SignalingFactory(Registry(reactor), Settings(), reactor)
        factory.setProtocolOptions(**options)
        accepted = Deferred()
        build = factory.buildProtocol

        def spy(addr):
            proto = build(addr)
            reactor.callLater(0, accepted.callback, proto)  # (after connectionMade)
            return proto

        factory.buildProtocol = spy
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        client = yield connectProtocol(
            TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port), protocol.Protocol()
        )
        self.addCleanup(client.transport.abortConnection)
        proto = yield accepted
        self.addCleanup(proto.transport.abortConnection)
        return proto

    @inlineCallbacks
    def test_accepted_connections_have_tcp_nodelay(self):
        """A small frame is sent at once, not held back by Nagle's algorithm until an earlier one is acknowledged."""
        proto = yield self._accepted()
        self.assertTrue(proto.transport.getTcpNoDelay())

    @inlineCallbacks
    def test_the_option_is_honoured(self):
        """tcpNoDelay=False (Autobahn's option) leaves Nagle's algorithm on."""
        proto = yield self._accepted(tcpNoDelay=False)
        self.assertFalse(proto.transport.getTcpNoDelay())
